"""Pieces both recipes share: JSON configs with --set overrides, torch setup, saving."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

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
    torch.set_flush_denormal(True)  # tiny models on CPU hit denormals (50x slower)
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
