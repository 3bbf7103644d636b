"""Pieces both recipes share: the command line, JSON configs with --set overrides, torch setup, saving."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Callable

import torch

from mc_retrofit.distributed import cpu_numerics
from mc_retrofit.errors import MCError
from mc_retrofit.files import atomic_dir


def load_config(defaults: dict, path: str | None, sets: list[str]) -> dict:
    """``defaults`` updated by the JSON file at ``path``, then by ``KEY=VALUE`` items (JSON values,
    or bare strings)."""
    cfg = dict(defaults)
    if path:
        user = json.loads(Path(path).read_text())
        unknown = set(user) - set(defaults)
        if unknown:
            raise MCError(f"{path}: unknown keys {sorted(unknown)}")
        cfg.update(user)
    for item in sets:
        key, _, value = item.partition("=")
        if key not in defaults:
            raise MCError(f"--set {item}: unknown key {key!r}")
        try:
            cfg[key] = json.loads(value)
        except json.JSONDecodeError:
            cfg[key] = value  # a bare string
    return cfg


def setup(cfg: dict) -> torch.device:
    cpu_numerics()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])  # on a shared CPU one thread wastes less time waiting
    return torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def host() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}


def save(model, record: dict, out: str | Path, force: bool = False) -> None:
    """Write ``model`` (Hugging Face format, on CPU) and ``training.json`` atomically."""
    model.to("cpu")
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp)
        (Path(tmp) / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def main(doc: str, defaults: dict, train: Callable, reevaluate: Callable, report: Callable, report_measured: Callable,
         measured: str, argv=None) -> None:
    """The recipes' command line: train from a config (``report`` prints the record), or
    re-measure a checkpoint with ``--evaluate`` (``report_measured`` prints ``measured``)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("config", nargs="?", help="JSON recipe config (keys: see DEFAULTS)")
    p.add_argument("--out", help="output directory (Hugging Face format)")
    p.add_argument("--evaluate", metavar="DIR", help=f"only re-measure {measured} of a checkpoint this recipe wrote")
    p.add_argument("--update", action="store_true", help=f"with --evaluate: store {measured} in its training.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    args = p.parse_args(argv)
    if not args.evaluate and not args.out:
        p.error("--out is required to train")
    try:
        if args.evaluate:
            report_measured(reevaluate(args.evaluate, args.update))
            return
        rec = train(load_config(defaults, args.config, args.set), args.out, args.force)
    except (MCError, OSError, json.JSONDecodeError) as e:  # bad config or checkpoint path: one line
        sys.exit(f"error: {e}")
    report(rec)
