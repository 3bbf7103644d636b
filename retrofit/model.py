"""Model-level API: convert a model in place, save, load, export, describe.

A converted directory holds the original ``config.json`` and weights exactly as the
family saves them, plus ``mc_config.json`` and ``mc_gates.safetensors`` (the only new
parameters). An exported file is one ``.safetensors`` with every tensor and the model
and MC configs in its metadata.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
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
    (``mc_gate`` on each mixer) start from ``config``'s values. ``config`` is an
    :class:`MCConfig` or a dict of its fields (as PEFT's ``get_peft_model`` takes)."""
    if config is None:
        config = MCConfig()
    elif isinstance(config, dict):
        config = MCConfig.from_dict(config)
    elif not isinstance(config, MCConfig):
        raise MCError(f"convert takes an MCConfig or a dict of its fields as config, not {type(config).__name__}")
    if not (isinstance(model, torch.nn.Module) and hasattr(getattr(model, "config", None), "model_type")):
        hint = " (load a checkpoint with mc_retrofit.load_base(path) first)" if isinstance(model, (str, Path)) else ""
        raise MCError(f"convert takes a transformers model (a torch module with a .config), not "
                      f"{type(model).__name__}{hint}")
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
    # NaN/inf out of the backbone becomes one line (W18: a huge cache weight overflows)
    from .segments import check_finite_output

    hooks.append(model.base_model.register_forward_hook(check_finite_output))
    model.mc_config = config
    model._mc_hooks = hooks
    # save_pretrained keeps working: it writes a converted directory.
    model.save_pretrained = types.MethodType(save_converted, model)
    return model


def gate_modules(model) -> dict[str, MCGate]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MCGate)}


def gate_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The MC gate parameters (the only ones gate tuning trains), with their names."""
    return [(n, p) for n, p in model.named_parameters() if ".mc_gate." in f".{n}"]


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
    # The source checkpoint is never written over (its own side files would be lost).
    with atomic_dir(directory, force=force, kind="converted", sources=[getattr(model, "mc_source_dir", None)]) as tmp:
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
    if not isinstance(path, (str, os.PathLike)):  # str() of a model object is a 1 KB "file name"
        raise MCError(f"expected a path (a directory, a .safetensors file or builtin:NAME), not {type(path).__name__}")
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
    """No per-tensor 'Loading weights' bars and no multi-line load report (a table of
    missing/unexpected keys logged as a warning): they bury the one-line errors that
    ``load_base`` raises for the same facts, and say little."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    report = logging.getLogger("transformers.utils.loading_report")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _header_shapes(files) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from safetensors headers alone (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        except Exception as e:  # noqa: BLE001
            raise MCError(f"{f} is not a readable safetensors file ({_first_line(e)}); it may be corrupted") from None
    return shapes


def _layer_indices(names) -> set[int]:
    """The layer indices tensor names mention: the first all-digit part of each name
    (``backbone.layers.3.mixer.A_log``, ``rwkv.blocks.3.ln1.weight``, ``model.layers.3.attn...``)."""
    found = set()
    for name in names:
        for part in name.split("."):
            if part.isdigit():
                found.add(int(part))
                break
    return found


def check_layer_count(config, names, where: str) -> None:
    """The config's layer count against the layers the tensor names hold (cheap: names only)."""
    expected = getattr(config, "num_hidden_layers", None)
    found = _layer_indices(n for n in names if ".mc_gate." not in f".{n}")
    if isinstance(expected, int) and found and found != set(range(expected)):
        held = max(found) + 1 if found == set(range(max(found) + 1)) else len(found)
        raise MCError(f"{where}: its config asks for {expected} layer{'s' if expected != 1 else ''} but the weights "
                      f"hold {held}; the config does not belong to these weights (edited, or from another model)")


def weight_files(directory: Path) -> list[Path]:
    """A checkpoint directory's safetensors weight files (the MC gates are not weights)."""
    return sorted(p for p in directory.glob("*.safetensors") if p.name != GATES_NAME)


def _check_against_config(config, adapter, shapes: dict, where: str, exact_names: bool) -> None:
    """Refuse a config that does not describe these tensors, before building the model.

    A config is small and easy to edit, a model built from it can be huge: 100,000 layers
    or a giant vocabulary are allocated (and randomly initialised) before a key check
    could fail. So first the layer count, from tensor names alone; then every tensor's
    shape against a model built on the meta device (no memory). ``exact_names``: the
    names are the model's own (an export); a checkpoint may use older names that
    transformers maps on load, so only names both sides know are compared."""
    shapes = {k: v for k, v in shapes.items() if ".mc_gate." not in f".{k}"}
    if not shapes:
        return
    check_layer_count(config, shapes, where)
    try:
        with torch.device("meta"):
            meta = adapter.model_class()(config)
        implied = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    except Exception:  # noqa: BLE001 - a family that cannot build on meta: transformers' own checks remain
        return
    for name, shape in sorted(shapes.items()):
        if name in implied and implied[name] != shape:
            raise MCError(f"{where}: tensor {name} is {shape} in the weights but the config implies "
                          f"{implied[name]}; the config does not belong to these weights")
    if exact_names:
        extra = sorted(set(shapes) - set(implied))
        if extra:
            raise MCError(f"{where} holds {len(extra)} tensor(s) its config has no place for, e.g. {extra[0]}; "
                          "the config does not belong to these weights")


def load_base(path: str | Path, dtype: torch.dtype | None = None):
    """Load an original (unconverted) Hugging Face-format checkpoint of a supported family."""
    _not_a_model(path, "load_base")
    directory = resolve_path(path)
    config = read_hf_config(directory)
    adapter = _adapters().adapter_for(config)
    weights = [p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.name != GATES_NAME]
    if not weights:
        raise MCError(f"{directory} has no weights (model.safetensors); the checkpoint is incomplete")
    # Names and shapes from the safetensors headers, checked against the config before
    # transformers builds (and randomly initialises) whatever the config asks for.
    shapes = _header_shapes([p for p in weights if p.suffix == ".safetensors"])
    _check_against_config(config, adapter, shapes, str(directory), exact_names=False)
    # Mismatched sizes are reported below, by name; transformers would raise pointing at its
    # load report, which _quiet_transformers keeps off the terminal.
    kwargs = {"output_loading_info": True, "ignore_mismatched_sizes": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with _quiet_transformers():
            model, info = adapter.model_class().from_pretrained(str(directory), **kwargs)
    except MCError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MCError(f"could not load the weights in {directory}: {_first_line(e)} (is a file corrupted?)") from None
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, found, wanted = mismatched[0]
        raise MCError(f"{directory}: weight {name} is {tuple(found)} but config.json implies {tuple(wanted)}; "
                      "the config does not belong to these weights")
    missing = [k for k in info.get("missing_keys", []) if ".mc_gate." not in f".{k}"]
    if missing:
        raise MCError(f"{directory} is missing {len(missing)} weight(s), e.g. {missing[0]}; the checkpoint is incomplete")
    # Weights the config has no place for are dropped by transformers: a model quietly
    # smaller than its checkpoint. Refused like missing ones.
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if ".mc_gate." not in f".{k}")
    if unexpected:
        raise MCError(f"{directory} has {len(unexpected)} weight(s) its config.json has no place for, e.g. "
                      f"{unexpected[0]}; the config does not belong to these weights")
    model.eval()
    model.mc_source_dir = str(directory)  # save_converted carries its side files along
    return model


def _not_a_model(path, fn: str) -> None:
    if isinstance(path, torch.nn.Module):  # a common slip: the model is already in memory
        raise MCError(f"{fn} takes a path, not a {type(path).__name__} object; to add Memory Caching to a model "
                      "in memory, call mc_retrofit.convert(model, config)")


def load(path: str | Path, dtype: torch.dtype | None = None):
    """Load a converted directory or an exported ``.safetensors`` file: a ready
    transformers model with Memory Caching applied."""
    _not_a_model(path, "load")
    p = resolve_path(path)
    if p.is_file():
        return _load_exported(p, dtype=dtype)
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
            check_finite_gate(name, value)
            target.copy_(value)


def check_finite_gate(name: str, value: torch.Tensor) -> None:
    """A NaN or inf gate makes every output of its layer NaN; refuse it where it loads."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise MCError(f"gate tensor {name} is not finite ({bad} of {value.numel()} values are NaN/inf): the gates are "
                      "broken; convert or finetune again")


# -- export ------------------------------------------------------------------------
def export(model, out: str | Path, force: bool = False) -> Path:
    """Write a converted model as one ``.safetensors`` file (configs in its metadata),
    or, when ``out`` does not end in ``.safetensors``, as a converted directory."""
    out = Path(out)
    if not exports_to_file(out):
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
    with atomic_file(out, force=force, kind="exported", sources=[getattr(model, "mc_source_dir", None)]) as tmp:
        save_model(model, str(tmp), metadata=metadata)
    return out


def exports_to_file(out: str | Path) -> bool:
    """``export`` writes one file when ``out`` ends in .safetensors, in any case (E.SAFETENSORS
    too: a directory by that name would surprise), else a converted directory."""
    return Path(out).suffix.lower() == ".safetensors"


# safetensors header dtype names of the float types a model is saved in.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def export_metadata(path: Path) -> dict:
    """The metadata of a file ``export`` wrote, or one line saying why it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise MCError(f"{path} is not a readable safetensors file ({_first_line(e)}); it may be corrupted") from None
    fmt = meta.get("mc_retrofit")
    if fmt is None:
        raise MCError(f"{path} was not exported by mc-retrofit (no mc_retrofit metadata)")
    if fmt != EXPORT_FORMAT:
        if fmt.startswith("mc-retrofit/"):  # another version of this format: say which, not "not ours"
            raise MCError(f"{path} was exported in format {fmt}; this mc-retrofit reads {EXPORT_FORMAT}: "
                          "upgrade mc-retrofit (pip install -U mc-retrofit), or export it again with this version")
        raise MCError(f"{path} has mc_retrofit metadata {fmt!r}, not a format mc-retrofit knows ({EXPORT_FORMAT})")
    for key in ("hf_config", "mc_config"):
        if key not in meta:  # a default MCConfig in place of a missing one would be a different model
            raise MCError(f"{path} has no {key} in its metadata; the file is incomplete or was altered")
    return meta


def _load_exported(path: Path, dtype: torch.dtype | None = None):
    if not exports_to_file(path):  # the suffix in any case, as export writes it
        raise MCError(f"{path} is not a .safetensors file exported by mc-retrofit")
    meta = export_metadata(path)
    try:
        hf = json.loads(meta["hf_config"])
    except json.JSONDecodeError:
        raise MCError(f"{path} has no readable model config in its metadata") from None
    config = config_from_dict(hf, where=str(path))
    mc_config = MCConfig.from_json(meta["mc_config"])
    adapter = _adapters().adapter_for(config)
    shapes = _header_shapes([path])
    _check_against_config(config, adapter, shapes, str(path), exact_names=True)
    if dtype is None:  # the base in the file's own dtype, unless asked otherwise; gates stay fp32
        try:
            with safe_open(str(path), framework="pt") as f:
                base_keys = [k for k in f.keys() if ".mc_gate." not in f".{k}"]
                dtype = f.get_slice(base_keys[0]).get_dtype() if base_keys else "F32"
        except Exception as e:  # noqa: BLE001
            raise MCError(f"could not read the tensors in {path}: {_first_line(e)} (is the file corrupted?)") from None
        dtype = _SAFETENSORS_DTYPES.get(dtype, torch.float32)
    model = adapter.model_class()(config).to(dtype)
    convert(model, mc_config)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as e:  # noqa: BLE001
        raise MCError(f"could not read the tensors in {path}: {_first_line(e)} (is the file corrupted?)") from None
    if missing or unexpected:
        raise MCError(f"{path} does not match its config (missing {sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]})")
    for name, value in gate_state_dict(model).items():  # refused like a converted directory's gates
        check_finite_gate(name, value)
    model.eval()
    return model
