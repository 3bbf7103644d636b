"""Model-level API: convert a model in place, save, load, export, describe.

A converted directory holds the original ``config.json`` and weights exactly as the
family saves them, plus ``mc_config.json`` and ``mc_gates.safetensors`` (the only new
parameters). An exported file is one ``.safetensors`` with every tensor and the model
and MC configs in its metadata.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

# What a path holds is decided in checkpoints.py; the names stay importable from here.
from .checkpoints import (EXPORT_FORMAT, GATES_NAME, Checkpoint, config_from_dict,  # noqa: F401
                          export_metadata, exports_to_file, open_checkpoint, read_hf_config, resolve_path,
                          weight_files)
from . import compat, formats
from .checkpoints import first_line as _first_line
from .checkpoints import read_safetensors as _read_safetensors
from .config import MCConfig
from .errors import MCError
from .files import atomic_dir, atomic_file
from .devices import check_placement, module_device
from .layer import MCGate, attach, detach


def _adapters():
    from mc_retrofit import adapters

    return adapters


def adapter_of(model):
    return _adapters().adapter_for(model.config)


# -- convert -------------------------------------------------------------------
class MCState:
    """Everything ``convert`` adds to a model, in one place: ``model.mc``.

    config: the :class:`MCConfig` (with its family); hooks: the handles of the hooks it
    registered; source_dir: the checkpoint directory the base came from (``load_base``'s
    note, moved here: ``save`` carries its side files and never writes over it); changed:
    ``(module, attribute, value before)`` for each plain setting convert changed (e.g. an fla
    layer's attention mode), so ``unconvert`` can put it back.

    A copy of a converted model (``copy.deepcopy``) is a live conversion too: its state
    installs the family's patches and holds them like ``convert`` does."""

    def __init__(self, config: MCConfig, hooks: list, source_dir: str | None, changed: list):
        self.config, self.hooks, self.source_dir, self.changed = config, hooks, source_dir, changed
        _hold(self)

    @property
    def family(self) -> str:
        return self.config.family

    def __setstate__(self, state):
        self.__dict__.update(state)
        _adapters().adapter_by_family(self.family).install()
        _hold(self)

    def __repr__(self) -> str:
        return f"MCState(family={self.family!r}, hooks={len(self.hooks)}, source_dir={self.source_dir!r})"


def _hold(state: MCState) -> None:
    compat.install(SAVE_PATCHES)
    compat.hold("mc", state)


def mc_state(model) -> MCState | None:
    """The Memory Caching state of a converted model (``model.mc``), or None."""
    state = getattr(model, "__dict__", {}).get("mc")
    return state if isinstance(state, MCState) else None


def require_converted(model, what: str = "model is not converted") -> MCState:
    state = mc_state(model)
    if state is None:
        raise MCError(f"{what}; call mc_retrofit.convert(model, MCConfig(...)) first")
    return state


_PLAIN = (str, int, float, bool, type(None))
_MISSING = object()


def _settings(model) -> dict:
    """Every module's plain public settings (``mode`` ...), to see what convert changes."""
    return {m: {k: v for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, _PLAIN)}
            for m in model.modules()}


def _changes(before: dict, model) -> list:
    """(module, attribute, value before or _MISSING) for each setting that differs now."""
    out = []
    for module, now in _settings(model).items():
        if module not in before:
            continue  # added by convert (the gates): they go as a whole
        was = before[module]
        out += [(module, k, was.get(k, _MISSING)) for k in now if was.get(k, _MISSING) != now[k]]
    return out


def _restore(changed: list) -> None:
    for module, key, old in reversed(changed):
        if old is _MISSING:
            module.__dict__.pop(key, None)
        else:
            setattr(module, key, old)


def convert(model, config: MCConfig | None = None):
    """Wrap every (selected) recurrent layer of ``model`` with Memory Caching, in place.

    Returns the same model. Its original weights are untouched; the new gate parameters
    (``mc_gate`` on each mixer) start from ``config``'s values; ``model.mc`` holds the rest
    (:class:`MCState`). ``config`` is an :class:`MCConfig` or a dict of its fields (as
    PEFT's ``get_peft_model`` takes). :func:`unconvert` gives the base model back."""
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
    if mc_state(model) is not None:
        raise MCError("this model is already converted; load the original to convert it again")
    adapter = adapter_of(model)
    adapter.install()
    before = _settings(model)
    mixers = adapter.mixers(model)
    if config.layers is not None:
        valid = [i for i, _ in mixers]  # model layer indices (hybrids skip their attention layers)
        bad = [i for i in config.layers if i not in valid]
        if bad:
            _restore(_changes(before, model))
            raise MCError(f"layers {bad} do not exist or are not recurrent: recurrent layers are {valid}")
    config = config.for_family(adapter)  # unset knobs take the family's defaults
    hooks = []
    # Each gate lives where its layer computes (under a device map, layers sit on different
    # devices, or are offloaded and run on their hook's execution device).
    names = {m: n for n, m in model.named_modules()}
    for idx, mixer in mixers:
        if not config.applies_to(idx):
            continue
        heads, key_dim = adapter.gate_dims(mixer, model.config)
        gate = MCGate(config, idx, heads, key_dim, model.config.hidden_size)
        gate = gate.to(module_device(model, mixer, names.get(mixer)))
        hooks += attach(mixer, gate, adapter.cache_reader(mixer), padding=adapter.supports_padding)
    # NaN/inf out of the backbone becomes one line (W18: a huge cache weight overflows)
    from .segments import check_finite_output

    hooks.append(model.base_model.register_forward_hook(check_finite_output))
    changed = _changes(before, model)
    model.mc = MCState(config, hooks, model.__dict__.pop("mc_source_dir", None), changed)
    return model


def unconvert(model):
    """Undo :func:`convert` in place and return the same model, exactly the base again: the
    gates, hooks and every attribute convert set are gone, the settings it changed are back
    (its state_dict and forward are the original's). When no converted model is left in the
    process, the op wrappers are uninstalled: transformers and fla as imported (fla's CPU
    routing stays: an fla model needs it to run on CPU at all; see compat.uninstall_patches)."""
    state = mc_state(model)
    if state is None:
        raise MCError("this model is not converted: there is nothing to unconvert")
    for handle in state.hooks:
        handle.remove()
    for mixer in [m for m in model.modules() if isinstance(getattr(m, "mc_gate", None), MCGate)]:
        detach(mixer)
    _restore(state.changed)
    del model.mc
    if state.source_dir is not None:
        model.mc_source_dir = state.source_dir  # load_base's note, as it was before convert
    compat.release("mc", state)
    return model


def gate_modules(model) -> dict[str, MCGate]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MCGate)}


def gate_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The MC gate parameters (the only ones gate tuning trains), with their names."""
    return [(n, p) for n, p in model.named_parameters() if ".mc_gate." in f".{n}"]


def is_connector(name: str) -> bool:
    """Whether the gate parameter ``name`` belongs to a connector (not a per-head scalar)."""
    from .layer import MCGate

    return any(f".mc_gate.{m}." in f".{name}" for m in MCGate.CONNECTOR_MODULES)


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
# Set while save_converted has transformers write the base: save_pretrained runs as it is.
_SAVING_BASE: contextvars.ContextVar[bool] = contextvars.ContextVar("mc_saving_base", default=False)


def save_converted(model, directory, force: bool = False, *, extra_files: dict | None = None, tokenizer=None,
                   **kwargs):
    """Write a converted directory atomically (config, weights, mc_config, gates).
    ``mc_retrofit.save``; a converted model's ``save_pretrained`` comes here too.
    ``extra_files``: name -> text of reports to write in the same atomic step (e.g.
    ``calibration.json``), so the output's marker lists them as mc-retrofit's."""
    state = require_converted(model)
    adapter_of(model).prepare_save(model)
    gates = {k: v.detach().contiguous().cpu() for k, v in gate_state_dict(model).items()}
    # The source checkpoint is never written over (its own side files would be lost).
    with atomic_dir(directory, force=force, kind="converted", sources=[state.source_dir]) as tmp:
        token = _SAVING_BASE.set(True)
        try:
            with _gates_detached(model), _quiet_transformers():
                type(model).save_pretrained(model, tmp, **kwargs)
        finally:
            _SAVING_BASE.reset(token)
        state.config.save(tmp)
        _copy_side_files(state.source_dir, tmp)
        if tokenizer is not None:  # the one the model was tuned with, over any the source shipped
            tokenizer.save_pretrained(str(tmp))
        save_file(gates, str(tmp / GATES_NAME), metadata={"format": "pt", "mc_retrofit": EXPORT_FORMAT})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(directory)


save = save_converted


def _save_converted_too(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if _SAVING_BASE.get() or mc_state(self) is None:
            return original(self, save_directory, *args, **kwargs)
        return save_converted(self, save_directory, *args, **kwargs)

    return save_pretrained


# transformers has no extension point for writing extra files or for atomic saves, and
# convert must not rebind a method on the user's object: the class's save_pretrained sends
# converted models (those with ``model.mc``) to save_converted, every other model through
# unchanged. Installed with the first conversion, gone with the last ("mc" layer).
SAVE_PATCHES = [compat.Patch(
    "transformers.modeling_utils:PreTrainedModel", "save_pretrained", _save_converted_too, layer="mc", group="save",
    why="a converted model's save_pretrained writes a converted directory (mc_retrofit.save), never the base alone")]


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


def load_base(path: str | Path | Checkpoint, dtype: torch.dtype | None = None, *, device=None,
              device_map=None, revision: str | None = None, cache_dir: str | None = None):
    """Load an original (unconverted) Hugging Face-format checkpoint of a supported family
    (of a converted directory: its base model, without the MC gates).

    ``path``: a directory, ``builtin:NAME`` or a Hub id ``org/name[@revision]`` (``revision``,
    ``cache_dir``: where a Hub id resolves). ``dtype``: the weights' dtype (MC state and gate
    math stay fp32 whatever it is); ``device``: where the model goes; ``device_map``: a
    big-model placement (``"auto"``) through accelerate, instead of ``device``."""
    _not_a_model(path, "load_base")
    _check_placement(device, dtype, device_map)
    ckpt = open_checkpoint(path, revision=revision, cache_dir=cache_dir)
    if ckpt.exported:
        raise MCError(f"{ckpt.path} is an exported mc-retrofit file, not a Hugging Face-format model directory; "
                      "load it with mc_retrofit.load(path)")
    directory, config = ckpt.path, ckpt.hf_config
    adapter = _adapters().adapter_for(config)
    # Weights transformers cannot be given as a directory (a foreign format's names, pickle
    # files, which are read safely there) come as tensors; safetensors in transformers'
    # layout it reads itself (None).
    state_dict = formats.state_dict_for(directory, formats.format_of(ckpt.format))
    # Names and shapes (the safetensors headers, or the tensors read), checked against the config
    # before transformers builds (and randomly initialises) whatever the config asks for.
    shapes = (_header_shapes(weight_files(directory)) if state_dict is None
              else {k: tuple(v.shape) for k, v in state_dict.items()})
    _check_against_config(config, adapter, shapes, str(directory), exact_names=False)
    # Mismatched sizes are reported below, by name; transformers would raise pointing at its
    # load report, which _quiet_transformers keeps off the terminal.
    kwargs = {"output_loading_info": True, "ignore_mismatched_sizes": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:  # accelerate places the weights as they load (big-model loading)
        kwargs["device_map"] = device_map
    try:
        with _quiet_transformers():
            if state_dict is None:
                model, info = adapter.model_class().from_pretrained(str(directory), **kwargs)
            else:
                model, info = formats.from_state_dict(adapter.model_class(), config, state_dict, directory, **kwargs)
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
    if device is not None:
        model.to(device)
    model.eval()
    model.mc_source_dir = str(directory)  # save_converted carries its side files along
    return model


def _check_placement(device, dtype, device_map) -> None:
    """check_placement for the Python API, where no device and no map mean the CPU (the
    command line's default is the local GPU)."""
    check_placement("cpu" if device is None and device_map is None else device, dtype, device_map)


def _not_a_model(path, fn: str) -> None:
    if isinstance(path, torch.nn.Module):  # a common slip: the model is already in memory
        raise MCError(f"{fn} takes a path, not a {type(path).__name__} object; to add Memory Caching to a model "
                      "in memory, call mc_retrofit.convert(model, config)")


def load(path: str | Path | Checkpoint, dtype: torch.dtype | None = None, *, device=None, device_map=None,
         revision: str | None = None, cache_dir: str | None = None):
    """Load a converted directory or an exported ``.safetensors`` file: a ready
    transformers model with Memory Caching applied (arguments as :func:`load_base`)."""
    _not_a_model(path, "load")
    _check_placement(device, dtype, device_map)
    ckpt = open_checkpoint(path, revision=revision, cache_dir=cache_dir)
    p = ckpt.path
    if ckpt.exported:
        if device_map is not None:
            raise MCError(f"{p} is an exported file, which loads whole: use --device, or turn it into a converted "
                          f"directory (mc-retrofit export {p} --out DIR) and load that with --device-map")
        return _load_exported(ckpt, dtype=dtype, device=device)
    if not ckpt.converted:
        raise MCError(f"{p} is an original checkpoint, not a converted one; run `mc-retrofit convert {p} --out DIR`")
    gates_file = p / GATES_NAME
    gates = _read_safetensors(gates_file) if gates_file.is_file() else None  # fail early, before the weights
    # The gates follow: convert puts each on its layer's device, loading copies into them.
    model = convert(load_base(ckpt, dtype=dtype, device=device, device_map=device_map), ckpt.mc_config)
    if gate_modules(model):
        if gates is None:
            raise MCError(f"{gates_file} is missing; the converted directory is incomplete")
        _load_gates(model, gates)
    return model


# Gate tensors added after gate files were first written (``online_bias``, per head, was one
# float of the mc_config before): a file without them loads with them at their config value,
# which is what that file's model computed with.
_LATER_GATE_TENSORS = (".mc_gate.online_bias",)


def refused_missing_gates(names) -> list[str]:
    """The missing gate tensors a load refuses: all but those an older file could not hold."""
    return sorted(n for n in names if not f".{n}".endswith(_LATER_GATE_TENSORS))


def _load_gates(model, tensors: dict[str, torch.Tensor]) -> None:
    expected = gate_state_dict(model)
    missing = refused_missing_gates(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
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
    state = require_converted(model, "model is not converted, so there is nothing to export")
    adapter_of(model).prepare_save(model)
    metadata = {
        "format": "pt",
        "mc_retrofit": EXPORT_FORMAT,
        "mc_config": state.config.to_json(),
        "hf_config": model.config.to_json_string(use_diff=False),
    }
    with atomic_file(out, force=force, kind="exported", sources=[state.source_dir]) as tmp:
        save_model(model, str(tmp), metadata=metadata)
    return out


# safetensors header dtype names of the float types a model is saved in.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _load_exported(ckpt: Checkpoint, dtype: torch.dtype | None = None, device=None):
    path, config, mc_config = ckpt.path, ckpt.hf_config, ckpt.mc_config  # metadata read once, by open_checkpoint
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
    missing = refused_missing_gates(missing)  # an older file's later gate tensors keep their config value
    if missing or unexpected:
        raise MCError(f"{path} does not match its config (missing {sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]})")
    for name, value in gate_state_dict(model).items():  # refused like a converted directory's gates
        check_finite_gate(name, value)
    if device is not None:
        model.to(device)  # the gates with it (they stay float32)
    model.eval()
    return model
