"""Model-level API: convert a model in place, save, load, export, describe.

A converted directory holds the original ``config.json`` and weights exactly as the
family saves them, plus ``mc_config.json`` and ``mc_gates.safetensors`` (the only new
parameters). An exported file is one ``.safetensors`` with every tensor and the model
and MC configs in its metadata.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import types
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from .config import CONFIG_NAME, MCConfig
from .errors import MCError
from .files import atomic_dir, atomic_file
from .layer import MCGate, attach

GATES_NAME = "mc_gates.safetensors"
EXPORT_FORMAT = "mc-retrofit/1"
BUILTIN_PREFIX = "builtin:"


def _adapters():
    from mc_retrofit import adapters

    return adapters


def adapter_of(model):
    return _adapters().adapter_for(model.config)


# -- convert -------------------------------------------------------------------
def convert(model, config: MCConfig | None = None):
    """Wrap every (selected) recurrent layer of ``model`` with Memory Caching, in place.

    Returns the same model. Its original weights are untouched; the new gate parameters
    (``mc_gate`` on each mixer) start from ``config``'s values."""
    config = MCConfig() if config is None else config
    if getattr(model, "mc_config", None) is not None:
        raise MCError("this model is already converted; load the original to convert it again")
    adapter = adapter_of(model)
    adapter.install()
    mixers = adapter.mixers(model)
    if config.layers is not None:
        valid = [i for i, _ in mixers]  # model layer indices (hybrids skip their attention layers)
        bad = [i for i in config.layers if i not in valid]
        if bad:
            raise MCError(f"layers {bad} do not exist or are not recurrent: recurrent layers are {valid}")
    config = MCConfig.from_dict({**config.to_dict(), "family": adapter.family})
    hooks = []
    ref = next(model.parameters())
    for idx, mixer in mixers:
        if not config.applies_to(idx):
            continue
        heads, key_dim = adapter.gate_dims(mixer, model.config)
        gate = MCGate(config, idx, heads, key_dim, model.config.hidden_size).to(ref.device)
        hooks += attach(mixer, gate, adapter.cache_reader(mixer), padding=adapter.supports_padding)
    model.mc_config = config
    model._mc_hooks = hooks
    # save_pretrained keeps working: it writes a converted directory.
    model.save_pretrained = types.MethodType(save_converted, model)
    return model


def gate_modules(model) -> dict[str, MCGate]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MCGate)}


def gate_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".mc_gate." in f".{k}"}


@contextlib.contextmanager
def _gates_detached(model):
    """Temporarily remove the gate modules so the family saves exactly its own weights."""
    owners = []
    for name, gate in gate_modules(model).items():
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        owners.append((parent, gate))
        del parent.mc_gate
    try:
        yield
    finally:
        for parent, gate in owners:
            parent.mc_gate = gate


# -- save / load -------------------------------------------------------------------
def save_converted(model, directory, force: bool = False, **kwargs):
    """Write a converted directory atomically (config, weights, mc_config, gates)."""
    if getattr(model, "mc_config", None) is None:
        raise MCError("model is not converted; call mc_retrofit.convert(model, MCConfig(...)) first")
    adapter_of(model).prepare_save(model)
    gates = {k: v.detach().contiguous().cpu() for k, v in gate_state_dict(model).items()}
    with atomic_dir(directory, force=force) as tmp:
        with _gates_detached(model), _quiet_transformers():
            type(model).save_pretrained(model, tmp, **kwargs)
        model.mc_config.save(tmp)
        _copy_side_files(getattr(model, "mc_source_dir", None), tmp)
        save_file(gates, str(tmp / GATES_NAME), metadata={"format": "pt", "mc_retrofit": EXPORT_FORMAT})
    return Path(directory)


# Files a checkpoint directory may carry that the model's own save does not write.
SIDE_FILES = ("training.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "tokenizer.model", "LICENSE", "README.md")


def _copy_side_files(source, target: Path) -> None:
    if not source:
        return
    for name in SIDE_FILES:
        src = Path(source) / name
        if src.is_file() and not (target / name).exists():
            shutil.copyfile(src, target / name)


def resolve_path(path: str | Path) -> Path:
    """A path on disk, or a ``builtin:NAME`` checkpoint shipped with the package."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        from .builtin import builtin_path

        return builtin_path(text[len(BUILTIN_PREFIX):])
    p = Path(text)
    if not p.exists():
        raise MCError(f"{p} does not exist")
    return p


def read_hf_config(directory: Path):
    """The transformers config of a Hugging Face-format directory, with clear errors."""
    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise MCError(f"{directory} is not a directory of a Hugging Face-format model")
    if not cfg_path.is_file():
        raise MCError(f"{directory} has no config.json: not a Hugging Face-format model directory")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MCError(f"{cfg_path} is not valid JSON ({e}); the file is broken") from None
    return config_from_dict(data, where=str(cfg_path))


def config_from_dict(data: dict, where: str = "config"):
    if not isinstance(data, dict) or "model_type" not in data:
        raise MCError(f"{where} has no model_type: not a Hugging Face model config")
    probe = types.SimpleNamespace(model_type=data["model_type"])
    adapter = _adapters().adapter_for(probe)
    cls = adapter.model_class().config_class
    try:
        return cls.from_dict(cls._decode_special_floats(data))  # {"__float__": "Infinity"} -> inf
    except Exception as e:  # noqa: BLE001 - surface as one line
        raise MCError(f"{where} could not be read as a {adapter.family} config: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_transformers():
    """No per-tensor 'Loading weights' bars: they bury one-line errors and say little."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_base(path: str | Path, dtype: torch.dtype | None = None):
    """Load an original (unconverted) Hugging Face-format checkpoint of a supported family."""
    directory = resolve_path(path)
    config = read_hf_config(directory)
    adapter = _adapters().adapter_for(config)
    weights = [p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.name != GATES_NAME]
    if not weights:
        raise MCError(f"{directory} has no weights (model.safetensors); the checkpoint is incomplete")
    kwargs = {"output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with _quiet_transformers():
            model, info = adapter.model_class().from_pretrained(str(directory), **kwargs)
    except MCError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MCError(f"could not load the weights in {directory}: {_first_line(e)} (is a file corrupted?)") from None
    missing = [k for k in info.get("missing_keys", []) if ".mc_gate." not in f".{k}"]
    if missing:
        raise MCError(f"{directory} is missing {len(missing)} weight(s), e.g. {missing[0]}; the checkpoint is incomplete")
    model.eval()
    model.mc_source_dir = str(directory)  # save_converted carries its side files along
    return model


def load(path: str | Path, dtype: torch.dtype | None = None):
    """Load a converted directory or an exported ``.safetensors`` file: a ready
    transformers model with Memory Caching applied."""
    p = resolve_path(path)
    if p.is_file():
        return _load_exported(p)
    if not (p / CONFIG_NAME).is_file():
        if (p / "config.json").is_file():
            raise MCError(f"{p} is an original checkpoint, not a converted one; run `mc-retrofit convert {p} --out DIR`")
        raise MCError(f"{p} is neither a converted mc-retrofit directory nor an exported .safetensors file")
    mc_config = MCConfig.load(p)
    gates_file = p / GATES_NAME
    gates = _read_safetensors(gates_file) if gates_file.is_file() else None  # fail early, before the weights
    model = convert(load_base(p, dtype=dtype), mc_config)
    if gate_modules(model):
        if gates is None:
            raise MCError(f"{gates_file} is missing; the converted directory is incomplete")
        _load_gates(model, gates)
    return model


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise MCError(f"{path} is not a readable safetensors file ({_first_line(e)}); it may be corrupted") from None


def _load_gates(model, tensors: dict[str, torch.Tensor]) -> None:
    expected = gate_state_dict(model)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise MCError(f"gate file does not match the mc_config (missing {missing[:2]}, unexpected {extra[:2]})")
    with torch.no_grad():
        for name, value in tensors.items():
            target = expected[name]
            if target.shape != value.shape:
                raise MCError(f"gate tensor {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value)


# -- export ------------------------------------------------------------------------
def export(model, out: str | Path, force: bool = False) -> Path:
    """Write a converted model as one ``.safetensors`` file (configs in its metadata),
    or, when ``out`` does not end in ``.safetensors``, as a converted directory."""
    out = Path(out)
    if out.suffix != ".safetensors":
        return save_converted(model, out, force=force)
    if getattr(model, "mc_config", None) is None:
        raise MCError("model is not converted; nothing to export")
    adapter_of(model).prepare_save(model)
    metadata = {
        "format": "pt",
        "mc_retrofit": EXPORT_FORMAT,
        "mc_config": model.mc_config.to_json(),
        "hf_config": model.config.to_json_string(use_diff=False),
    }
    with atomic_file(out, force=force) as tmp:
        save_model(model, str(tmp), metadata=metadata)
    return out


def _load_exported(path: Path):
    if path.suffix != ".safetensors":
        raise MCError(f"{path} is not a .safetensors file exported by mc-retrofit")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise MCError(f"{path} is not a readable safetensors file ({_first_line(e)}); it may be corrupted") from None
    if meta.get("mc_retrofit") != EXPORT_FORMAT:
        raise MCError(f"{path} was not exported by mc-retrofit (no mc_retrofit metadata)")
    try:
        hf = json.loads(meta["hf_config"])
    except (KeyError, json.JSONDecodeError):
        raise MCError(f"{path} has no readable model config in its metadata") from None
    config = config_from_dict(hf, where=str(path))
    mc_config = MCConfig.from_json(meta.get("mc_config", "{}"))
    adapter = _adapters().adapter_for(config)
    try:
        with safe_open(str(path), framework="pt") as f:
            base_keys = [k for k in f.keys() if ".mc_gate." not in f".{k}"]
            dtype = f.get_tensor(base_keys[0]).dtype if base_keys else torch.float32
    except Exception as e:  # noqa: BLE001
        raise MCError(f"could not read the tensors in {path}: {_first_line(e)} (is the file corrupted?)") from None
    model = adapter.model_class()(config).to(dtype)  # base in the file's dtype; gates stay fp32
    convert(model, mc_config)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as e:  # noqa: BLE001
        raise MCError(f"could not read the tensors in {path}: {_first_line(e)} (is the file corrupted?)") from None
    if missing or unexpected:
        raise MCError(f"{path} does not match its config (missing {sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]})")
    model.eval()
    return model
