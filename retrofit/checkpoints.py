"""What is at a path: :func:`open_checkpoint` names the kind of checkpoint and reads its configs.

Every command and ``load``/``load_base``/``describe`` ask this one function, so a path is
recognised, and refused, the same way everywhere. Kinds:

- ``original``: a Hugging Face-format directory (``config.json`` and the family's weights);
- ``converted``: the same plus ``mc_config.json`` and ``mc_gates.safetensors``;
- ``exported``: one ``.safetensors`` file (the suffix in any case) whose metadata holds
  both configs (``mc_retrofit``, ``hf_config``, ``mc_config``).

Where it comes from: a path on disk, ``builtin:NAME`` (shipped in :mod:`mc_retrofit.builtin`),
or an ``org/name[@revision]`` Hugging Face Hub id, which :func:`resolve_hub` downloads into
the Hugging Face cache (:mod:`mc_retrofit.hub`). A path that exists on disk is always the local one.

Only configs and safetensors headers are read here; no tensor is loaded.
"""
from __future__ import annotations

import json
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path

from .config import CONFIG_NAME, MCConfig
from .errors import MCError

GATES_NAME = "mc_gates.safetensors"
EXPORT_FORMAT = "mc-retrofit/1"
BUILTIN_PREFIX = "builtin:"
# org/name or org/name@revision: the shape of a Hub id (a local path that exists wins).
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[^@\s]+))?")

KINDS = ("original", "converted", "exported")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint, identified: ``kind`` (see :data:`KINDS`), where it lies, its configs."""

    spec: str  # what the caller gave: a path, builtin:NAME or a Hub id
    path: Path  # on disk: the directory, or the exported file
    kind: str
    hf_config: object  # the family's transformers config
    mc_config: MCConfig | None  # None for an original checkpoint
    origin: str = "local"  # local, builtin or hub
    # The layout its config and weights are in: "transformers", or a format its family also
    # publishes in (mc_retrofit.formats: e.g. "mamba_ssm"), which load_base translates.
    format: str = "transformers"
    # The Hub id of the tokenizer its format implies, when it ships none (mamba_ssm's models
    # use EleutherAI/gpt-neox-20b's); None when it has its own or its format implies none.
    tokenizer_hint: str | None = None

    @property
    def converted(self) -> bool:
        """A converted directory or an exported file: both carry their own MCConfig."""
        return self.kind != "original"

    @property
    def exported(self) -> bool:
        return self.kind == "exported"

    @property
    def source_dir(self) -> Path | None:
        """The directory whose side files (tokenizer, training.json, README) belong to it."""
        return None if self.exported else self.path

    @property
    def weight_files(self) -> list[Path]:
        """The files that hold the weights (for an export, the file itself)."""
        return [self.path] if self.exported else weight_files(self.path)


def open_checkpoint(path, *, revision: str | None = None, cache_dir: str | None = None,
                    config_only: bool = False) -> Checkpoint:
    """The :class:`Checkpoint` at ``path`` (a path, ``builtin:NAME``, a Hub id, or a
    Checkpoint, returned as it is), or one line saying why it is none.

    ``revision`` / ``cache_dir``: for a Hub id (``org/name@rev`` in the id wins over
    ``revision``); ``config_only``: fetch only the configs of a Hub id (``inspect``)."""
    if isinstance(path, Checkpoint):
        return path
    p, origin = locate(path, revision=revision, cache_dir=cache_dir, config_only=config_only)
    if p.is_file():
        if not exports_to_file(p):  # the suffix in any case, as export writes it
            raise MCError(f"{p} is not a .safetensors file exported by mc-retrofit")
        meta = export_metadata(p)
        try:
            hf = json.loads(meta["hf_config"])
        except json.JSONDecodeError:
            raise MCError(f"{p} has no readable model config in its metadata") from None
        return Checkpoint(str(path), p, "exported", config_from_dict(hf, where=str(p)),
                          MCConfig.from_json(meta["mc_config"]), origin)
    hf, fmt = read_config(p)
    converted = (p / CONFIG_NAME).is_file()
    from .formats import TRANSFORMERS, tokenizer_hint

    return Checkpoint(str(path), p, "converted" if converted else "original", hf,
                      MCConfig.load(p) if converted else None, origin,
                      format=fmt.name if fmt is not None else TRANSFORMERS, tokenizer_hint=tokenizer_hint(p, fmt))


def locate(path, *, revision: str | None = None, cache_dir: str | None = None,
           config_only: bool = False) -> tuple[Path, str]:
    """``(path on disk, origin)`` of a path, ``builtin:NAME`` or Hub id; nothing is read."""
    if not isinstance(path, (str, os.PathLike)):  # str() of a model object is a 1 KB "file name"
        raise MCError(f"expected a path (a directory, a .safetensors file or builtin:NAME), not {type(path).__name__}")
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        from .builtin import builtin_path

        return builtin_path(text[len(BUILTIN_PREFIX):]), "builtin"
    p = Path(text)
    if p.exists():
        return p, "local"
    hub = HUB_ID.fullmatch(text)
    if hub is not None:
        return resolve_hub(hub["repo"], hub["revision"] or revision, cache_dir=cache_dir,
                           config_only=config_only), "hub"
    raise MCError(f"{p} does not exist")


def resolve_hub(repo: str, revision: str | None = None, *, cache_dir: str | None = None,
                config_only: bool = False) -> Path:
    """The local directory of Hub repository ``repo`` at ``revision``.

    The one place Hub ids resolve (tests point it at local folders): the snapshot folder in
    the Hugging Face cache, downloaded if needed (see :func:`mc_retrofit.hub.resolve_hub`);
    everything after it (kinds, configs, checks) is the same as for a local directory."""
    from .hub import resolve_hub as download

    return download(repo, revision, cache_dir=cache_dir, config_only=config_only)


def resolve_path(path, **hub) -> Path:
    """The path on disk of a path, ``builtin:NAME`` or Hub id (see :func:`locate`)."""
    return locate(path, **hub)[0]


def exports_to_file(out) -> bool:
    """``export`` writes one file when ``out`` ends in .safetensors, in any case (E.SAFETENSORS
    too: a directory by that name would surprise), else a converted directory."""
    return Path(out).suffix.lower() == ".safetensors"


def weight_files(directory: Path) -> list[Path]:
    """A checkpoint directory's safetensors weight files (the MC gates are not weights)."""
    return sorted(p for p in directory.glob("*.safetensors") if p.name != GATES_NAME)


def read_safetensors(path: Path) -> dict:
    """Every tensor of a safetensors file, or one line saying it is not a readable one."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise MCError(f"{path} is not a readable safetensors file ({first_line(e)}); it may be corrupted") from None


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_hf_config(directory: Path):
    """The transformers config of a Hugging Face-format directory, with clear errors (a
    config in a format its family also publishes in, e.g. mamba_ssm's, translated)."""
    return read_config(directory)[0]


def read_config(directory: Path):
    """``(transformers config, the foreign format it was in or None)`` of a directory."""
    from .formats import translate

    cfg_path = directory / "config.json"
    if not directory.is_dir():
        raise MCError(f"{directory} is not a directory of a Hugging Face-format model")
    if not cfg_path.is_file():
        raise MCError(f"{directory} has no config.json: not a Hugging Face-format model directory")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MCError(f"{cfg_path} is not valid JSON ({e}); the file is broken") from None
    data, fmt = translate(data, where=str(cfg_path))
    return config_from_dict(data, where=str(cfg_path)), fmt


def config_from_dict(data: dict, where: str = "config"):
    from mc_retrofit.adapters import adapter_for

    from .formats import known_formats, translate

    data, _ = translate(data, where)  # a family's own format (no model_type) as its transformers config
    if not isinstance(data, dict) or "model_type" not in data:
        raise MCError(f"{where} has no model_type: not a Hugging Face model config "
                      f"(nor one of the formats mc-retrofit translates: {', '.join(known_formats())})")
    adapter = adapter_for(types.SimpleNamespace(model_type=data["model_type"]))
    cls = adapter.model_class().config_class
    try:
        return cls.from_dict(cls._decode_special_floats(data))  # {"__float__": "Infinity"} -> inf
    except Exception as e:  # noqa: BLE001 - surface as one line
        raise MCError(f"{where} could not be read as a {adapter.family} config: {first_line(e)}") from None


def export_metadata(path: Path) -> dict:
    """The metadata of a file ``export`` wrote, or one line saying why it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise MCError(f"{path} is not a readable safetensors file ({first_line(e)}); it may be corrupted") from None
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
