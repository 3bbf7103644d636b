"""Devices and dtypes: the names users give, checked before anything loads, and where a
placed model (one device, or a device map) takes its inputs and runs each layer."""
from __future__ import annotations

import contextlib
import importlib.util

import torch

from .errors import MCError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}

# The device maps transformers' from_pretrained computes itself (through accelerate).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


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


def _cuda_bf16(index: int) -> bool:
    """Native bfloat16 on CUDA device ``index`` (compute capability 8.0, Ampere, or newer).
    ``torch.cuda.is_bf16_supported()`` also says yes for older GPUs that only emulate it,
    many times slower; ROCm builds answer through it."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)


def check_device_map(device_map) -> None:
    """A device map transformers can place with (a name it computes, or a dict), and
    accelerate, which does the placing, importable."""
    if device_map is None:
        return
    if not (isinstance(device_map, dict) or device_map in DEVICE_MAPS):
        raise MCError(f"--device-map takes {', '.join(DEVICE_MAPS)}, not {device_map!r}")
    if importlib.util.find_spec("accelerate") is None:
        raise MCError("--device-map needs accelerate: pip install accelerate (or use --device)")


def check_placement(device: str | None, dtype, device_map=None) -> None:
    """``--device``, ``--dtype`` and ``--device-map`` together, before anything loads."""
    if device is not None and device_map is not None:
        raise MCError("give --device or --device-map, not both (--device-map places the model itself)")
    check_device(device)
    check_device_map(device_map)
    dt = torch_dtype(dtype)
    # float16 runs on CPU in the torch this supports (every family's ops: tested), so only
    # bfloat16 on a GPU without it is refused. The GPUs are those the model will run on:
    # --device, or (no --device: the default, or a device map) every visible one.
    if dt == torch.bfloat16 and torch.cuda.is_available():
        dev = torch.device(device) if device is not None else None
        if dev is None or dev.type == "cuda":
            indices = [dev.index or 0] if dev is not None else range(torch.cuda.device_count())
            bad = [i for i in indices if not _cuda_bf16(i)]
            if bad:
                name = torch.cuda.get_device_name(bad[0])
                raise MCError(f"--dtype bfloat16: cuda:{bad[0]} ({name}) has no native bfloat16 support (it needs "
                              "compute capability 8.0 or newer); use --dtype float16 or float32")


def _as_device(d) -> torch.device:
    return torch.device(f"cuda:{d}") if isinstance(d, int) else torch.device(d)


def _execution_device(hook):
    """The device accelerate runs a hooked module on (it may keep the weights elsewhere)."""
    if hook is None:
        return None
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    return None


def module_device(model: torch.nn.Module, module: torch.nn.Module, name: str | None = None) -> torch.device:
    """Where ``module`` (named ``name`` in ``model``) computes: the device of its weights or,
    when accelerate offloads them (on the meta device until its forward), the execution
    device of its own hook or the nearest hooked module above it."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    if name is None:
        name = next((n for n, m in model.named_modules() if m is module), "")
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        dev = _execution_device(getattr(model.get_submodule(".".join(parts[:i])), "_hf_hook", None))
        if dev is not None:
            return dev
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a placed model's input ids go: its input embeddings' device (``model.device``
    is the first parameter's, which under a device map need not be the embeddings')."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(model, emb) if emb is not None else module_device(model, model, "")


def on_device(device: torch.device):
    """``device`` as the current CUDA device for the block (kernels launch there), or nothing
    off CUDA."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
