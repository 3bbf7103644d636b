"""Checkpoints as their family publishes them, not in transformers' layout, and pickle weights.

Some families publish in their own library's format: ``state-spaces/mamba2-130m`` is a
mamba_ssm ``config.json`` (``d_model``, ``n_layer``, ``ssm_cfg``; no ``model_type``) with
weights in ``pytorch_model.bin`` under mamba_ssm's names. A family's adapter declares each
such format (``Adapter.foreign_formats``, a :class:`ForeignFormat`); the machinery here is
generic:

- :func:`translate`: where a config is read (``checkpoints.config_from_dict``), a dict with
  no ``model_type`` that a declared format recognises becomes its family's transformers
  config dict;
- :func:`state_dict_for`: where ``load_base`` finds weights, the tensors of a checkpoint
  transformers cannot read as it is (a foreign format's names, or pickle files), under the
  transformers names; None where transformers reads the safetensors itself;
- :func:`read_pickle`: a pickle weight file (``pytorch_model.bin``), read only with
  ``torch.load(weights_only=True)``: one that holds anything besides tensors is refused,
  never unpickled (unpickling runs whatever code the file names).

A model loaded from a foreign format is an ordinary transformers model: ``save_converted``
and ``export`` write transformers' own format (safetensors).
"""
from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MCError

TRANSFORMERS = "transformers"  # Checkpoint.format of a checkpoint in transformers' own layout
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# The files whose presence means a checkpoint ships its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _same(name: str) -> str:
    return name


@dataclass(frozen=True)
class ForeignFormat:
    """One format a family publishes checkpoints in, as its adapter declares it.

    ``recognise(data)``: whether a config.json dict (without ``model_type``) is in this
    format; ``config(data)``: the transformers config fields it means (``model_type`` is
    added from the adapter), or an MCError saying what transformers' class cannot express;
    ``rename(name)``: a weight's transformers name; ``tokenizer``: the Hub id of the
    tokenizer the format implies when the checkpoint ships none."""

    name: str
    recognise: Callable[[dict], bool]
    config: Callable[[dict], dict]
    rename: Callable[[str], str] = field(default=_same)
    tokenizer: str | None = None


def foreign_format(data) -> tuple[object, ForeignFormat] | None:
    """``(adapter, format)`` of a config dict in a family's own format, or None (a
    transformers config, which has ``model_type``, is never foreign)."""
    if not isinstance(data, dict) or "model_type" in data:
        return None
    from mc_retrofit.adapters import ADAPTERS

    for adapter in ADAPTERS:
        for fmt in adapter.foreign_formats:
            if fmt.recognise(data):
                return adapter, fmt
    return None


def known_formats() -> list[str]:
    from mc_retrofit.adapters import ADAPTERS

    return sorted({f"{fmt.name} ({a.family})" for a in ADAPTERS for fmt in a.foreign_formats})


def translate(data, where: str = "config") -> tuple[dict, ForeignFormat | None]:
    """``(transformers config dict, the format it was in or None)``: a foreign-format dict
    translated, anything else as it is."""
    found = foreign_format(data)
    if found is None:
        return data, None
    adapter, fmt = found
    try:
        fields = fmt.config(data)
    except MCError as e:
        raise MCError(f"{where} is a {fmt.name} {adapter.family} config that transformers' {adapter.family} "
                      f"cannot express: {e}") from None
    except (TypeError, ValueError, KeyError) as e:  # a field of the wrong type or missing
        raise MCError(f"{where} is a {fmt.name} {adapter.family} config with a field mc-retrofit cannot read "
                      f"({type(e).__name__}: {e}); the file is broken") from None
    return {**fields, "model_type": adapter.model_types[0]}, fmt


def format_of(name: str | None) -> ForeignFormat | None:
    """The declared format called ``name`` (Checkpoint.format), or None for transformers'."""
    from mc_retrofit.adapters import ADAPTERS

    for adapter in ADAPTERS:
        for fmt in adapter.foreign_formats:
            if fmt.name == name:
                return fmt
    return None


def tokenizer_hint(directory: Path, fmt: ForeignFormat | None) -> str | None:
    """The tokenizer a foreign checkpoint's format implies, when it ships none of its own."""
    if fmt is None or fmt.tokenizer is None:
        return None
    if any((directory / n).exists() for n in TOKENIZER_FILES):
        return None
    return fmt.tokenizer


# -- weights ---------------------------------------------------------------------------
def pickle_weight_files(directory: Path) -> list[Path]:
    """The pickle weight files transformers would read: the shards its index names, else
    ``pytorch_model.bin`` (other ``.bin`` files, e.g. ``training_args.bin``, are not weights)."""
    index = directory / PICKLE_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise MCError(f"{index} is not a readable weight index (no weight_map); the file is broken") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise MCError(f"{directory} is missing {missing[0]}, which {PICKLE_INDEX} names; "
                          "the checkpoint is incomplete")
        return [directory / n for n in names]
    single = directory / PICKLE_WEIGHTS
    return [single] if single.is_file() else []


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickle weight file, read without running any code it names.

    ``weights_only=True`` lets the unpickler build tensors, plain containers and numbers
    only, so a file that names anything else (a class, ``os.system``) is refused before a
    single object of it is built. ``mmap``: the tensors stay in the file until used (a
    zip-format file, which torch.save has written since 1.6; an older one is read whole)."""
    mmap = zipfile.is_zipfile(path)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise MCError(f"{path} holds Python objects besides tensors; it is not loaded (unsafe): if you trust its "
                      f"source, convert it to safetensors with {_to_safetensors_command(path)}") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line
        from .checkpoints import first_line

        raise MCError(f"{path} is not a readable PyTorch weight file ({first_line(e)}); it may be corrupted") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise MCError(f"{path} is not a state dict (a mapping of names to tensors); it is not a weight file "
                      "transformers or mc-retrofit reads")
    return data


def _to_safetensors_command(path: Path) -> str:
    """The one command that turns a trusted pickle into safetensors next to it (its tensors
    only, cloned: tied weights share memory, which safetensors refuses); safetensors are read
    before pickles, so the pickle may stay."""
    target = path.parent / ("model.safetensors" if path.name == PICKLE_WEIGHTS else path.stem + ".safetensors")
    return (f"python -c \"import torch, safetensors.torch as st; d = torch.load({str(path)!r}, weights_only=False); "
            f"st.save_file({{k: v.clone() for k, v in d.items() if isinstance(v, torch.Tensor)}}, {str(target)!r})\"")


def state_dict_for(directory: Path, fmt: ForeignFormat | None) -> dict[str, torch.Tensor] | None:
    """The weights of a checkpoint directory under transformers' names, where transformers
    cannot be given the directory as it is: a foreign format (its names), or pickle weights
    only (read safely here, never by transformers). None: safetensors in transformers'
    layout, which transformers reads itself. Safetensors win over pickles, as in transformers."""
    from .checkpoints import read_safetensors, weight_files

    safetensors = weight_files(directory)
    if fmt is None and safetensors:
        return None
    files = safetensors or pickle_weight_files(directory)
    if not files:
        wanted = "model.safetensors or pytorch_model.bin"
        raise MCError(f"{directory} has no weights ({wanted}); the checkpoint is incomplete")
    rename = fmt.rename if fmt is not None else _same
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        part = read_safetensors(f) if f.suffix == ".safetensors" else read_pickle(f)
        for name, value in part.items():
            tensors[rename(name)] = value
    return tensors


def from_state_dict(model_class, config, state_dict: dict, directory: Path, **kwargs):
    """``model_class.from_pretrained`` of tensors in memory, as transformers loads a directory
    (the same dtype, placement and load report), plus the directory's generation config."""
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        loaded = model[0] if isinstance(model, tuple) else model
        loaded.generation_config = GenerationConfig.from_pretrained(str(directory))
    return model
