"""The README's memory table: what Memory Caching stores per sequence for published model
sizes, from their configs alone.

    python recipes/memory_table.py [--configs tests/published_configs] [--segment-size 256]

Prints a Markdown table. Every number is ``mc_retrofit.describe`` (what ``mc-retrofit
inspect`` prints) of a folder holding only that model's config.json, so the table is the
tool's own arithmetic; ``tests/test_memory_table.py`` checks it against a hand computation
per family and checks that README.md holds exactly this output. The configs, each with a
``_source`` saying where its numbers come from, are ``tests/published_configs/*.json``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from mc_retrofit.cli import _human
from mc_retrofit.config import MCConfig
from mc_retrofit.describe import TOKENS, Description, describe

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "published_configs"
CONTEXTS = (32 * 1024, 128 * 1024)

# (name in the table, config file stem), in table order.
MODELS = [
    ("Mamba-2 130M", "mamba2-130m"),
    ("Mamba-2 1.3B", "mamba2-1.3b"),
    ("Mamba-2 2.7B", "mamba2-2.7b"),
    ("Mamba 130M", "mamba-130m"),
    ("Mamba 1.4B", "mamba-1.4b"),
    ("Mamba 2.8B", "mamba-2.8b"),
    ("RWKV-7 0.1B", "rwkv7-0.1B-g1"),
    ("RWKV-7 1.5B", "rwkv7-1.5B-world"),
    ("RWKV-7 2.9B", "rwkv7-2.9B-world"),
    ("GLA 1.3B", "gla-1.3B-100B"),
    ("Gated DeltaNet 1.3B", "gated_deltanet-1.3B"),
    ("Qwen3-Next-80B-A3B (GDN layers)", "qwen3-next-80b-a3b"),
    ("Jamba v0.1 52B (Mamba layers)", "jamba-v0.1"),
    ("Kimi-Linear-48B-A3B (KDA layers)", "kimi-linear-48b-a3b"),
]


def describe_config(config: Path, segment_size: int = 256) -> Description:
    """``describe`` of a folder holding only ``config``, as config.json (no weights: what
    ``inspect`` sees of a Hub id, whose weights it does not download)."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(config, Path(tmp) / "config.json")
        return describe(tmp, MCConfig(segment_size=segment_size))


def cache_bytes(d: Description, tokens: int) -> float:
    """What the cache holds after ``tokens`` tokens of one sequence: describe's bytes per
    1K tokens, scaled (constant segments: tokens / segment_size segments of segment_bytes)."""
    return d.cache_bytes_per_1k * tokens / TOKENS


def rows(configs: Path = CONFIGS, segment_size: int = 256) -> list[tuple[str, Description]]:
    return [(name, describe_config(configs / f"{stem}.json", segment_size)) for name, stem in MODELS]


def table(described: list[tuple[str, Description]]) -> str:
    k = [f"{t // 1024}K" for t in CONTEXTS]
    lines = [
        f"| model | family | recurrent layers | state per layer | state, all layers | "
        f"cache at {k[0]} tokens | cache at {k[1]} tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in described:
        cells = [name, f"`{d.family}`", str(d.num_layers), _human(d.state_bytes), _human(d.state_bytes * d.num_layers),
                 *(_human(cache_bytes(d, t)) for t in CONTEXTS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=Path, default=CONFIGS, help="folder of <name>.json configs (default: %(default)s)")
    ap.add_argument("--segment-size", type=int, default=256, help="tokens per cached segment (default 256)")
    args = ap.parse_args(argv)
    sys.stdout.write(table(rows(args.configs, args.segment_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
