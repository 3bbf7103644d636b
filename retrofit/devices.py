"""Devices and dtypes: the names users give, checked before anything loads."""
from __future__ import annotations

import torch

from .errors import MCError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def torch_dtype(name):
    """``"bfloat16"`` (or a torch dtype, or None) -> the torch dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise MCError(f"dtype must be one of float32, bfloat16, float16, not {name!r}")
    return _DTYPES[name]


def check_device(device: str | None) -> None:
    """A device torch knows and this machine has, before anything loads."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MCError(f"--device takes cpu, cuda, cuda:N or mps, not {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MCError(f"--device {device}: CUDA is not available on this machine (no GPU, or a CPU-only "
                          "torch); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MCError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise MCError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise MCError(f"--device takes cpu, cuda, cuda:N or mps, not {device!r}")


def check_placement(device: str | None, dtype, device_map: str | None = None) -> None:
    """``--device``, ``--dtype`` and ``--device-map`` together, before anything loads."""
    if device is not None and device_map is not None:
        raise MCError("give --device or --device-map, not both (--device-map places the model itself)")
    check_device(device)
    torch_dtype(dtype)
