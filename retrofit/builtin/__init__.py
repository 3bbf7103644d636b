"""Checkpoints shipped inside the package, usable as ``builtin:NAME`` wherever a path is.

Each folder is a Hugging Face-format directory with its provenance in ``README.md``
(and ``training.json`` where the project trained it)."""
from __future__ import annotations

from pathlib import Path

from mc_retrofit.errors import MCError

ROOT = Path(__file__).parent
DEFAULT = "mamba2-byte"


def available() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())


def builtin_path(name: str) -> Path:
    name = name or DEFAULT
    path = ROOT / name
    if not (path / "config.json").is_file():
        raise MCError(f"no builtin checkpoint {name!r} (available: {', '.join(available())})")
    return path
