"""The models an evaluation compares: the base checkpoint and its MC configurations.

The base is loaded once; each MC variant is a deep copy converted with its own
``MCConfig`` (cheap for the small models this runs on; one variant is alive at a time).
A converted directory or exported file also brings its own, possibly tuned, variant.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mc_retrofit.config import CONFIG_NAME, MCConfig
from mc_retrofit.errors import MCError
from mc_retrofit.checkpoints import open_checkpoint
from mc_retrofit.model import (GATES_NAME, _load_gates, _read_safetensors, convert, gate_modules, load, load_base,
                               mc_state, unconvert)

BASE = "base"
OWN = "model"


@dataclass
class Variant:
    """One column of the comparison. ``mc`` None is the base model."""

    name: str
    mc: MCConfig | None = None
    source: str = "recipe"

    def describe(self, model_config=None) -> dict:
        """What the column ran: with the checkpoint's ``model_config``, the MC settings as
        ``convert`` takes them on that family (unset knobs filled from its defaults)."""
        mc = self.mc
        if mc is not None and model_config is not None:
            from mc_retrofit.adapters import adapter_for

            mc = mc.for_family(adapter_for(model_config))
        return {"name": self.name, "source": self.source, "mc_config": None if mc is None else mc.to_dict()}


def parse_variant(text: str) -> Variant:
    """``"name=ssc4,aggregation=ssc,top_k=4"`` -> a Variant (values parsed as JSON when they can be)."""
    fields: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise MCError(f"--variant takes key=value pairs separated by commas, not {part!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        try:
            fields[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            fields[k.replace("-", "_")] = v
    name = str(fields.pop("name", "")) or ",".join(f"{k}={v}" for k, v in fields.items()) or "mc"
    config = MCConfig.from_dict(fields)
    ignored = config.ignored(fields)
    if ignored:  # e.g. top_k=4 without aggregation=ssc: the variant would not be what its name says
        raise MCError(f"--variant {text}: {ignored[0][0]} {ignored[0][1]}; drop it")
    return Variant(name, config, source="--variant")


def variant_from_file(path: str) -> Variant:
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise MCError(f"{path} does not exist")
    return Variant(p.parent.name if p.name == CONFIG_NAME else p.stem, MCConfig.from_json(p.read_text()),
                   source=f"--config {path}")


class ModelSource:
    """Where the models come from: an original checkpoint, ``builtin:NAME``, a converted
    directory or an exported ``.safetensors`` file."""

    def __init__(self, path: str, device: str = "cpu", dtype: torch.dtype | None = None,
                 device_map: str | None = None, revision: str | None = None, cache_dir: str | None = None):
        self.spec = str(path)
        self.checkpoint = open_checkpoint(path, revision=revision, cache_dir=cache_dir)  # configs only
        self.device_map = device_map
        self.path = self.checkpoint.path
        self.device = device
        self.dtype = dtype
        self.exported = self.checkpoint.exported
        self.converted = self.checkpoint.converted
        self._base = None

    def own_config(self) -> MCConfig | None:
        return self.checkpoint.mc_config

    @property
    def _placement(self) -> dict:
        """``load``/``load_base`` keywords: the dtype, and the device map or else the device."""
        if self.device_map is not None:
            return {"dtype": self.dtype, "device_map": self.device_map}
        return {"dtype": self.dtype, "device": self.device}

    def base(self):
        """The unconverted base model (loaded once)."""
        if self._base is None:
            if self.exported:
                # An exported file holds a converted model: with every cache weight at 0 it
                # computes exactly what the base model computes.
                model = load(self.checkpoint, **self._placement)  # --dtype applies to exported files too
                with torch.no_grad():
                    for gate in gate_modules(model).values():
                        gate.cache_weight.zero_()
            else:
                model = load_base(self.checkpoint, **self._placement)
            self._base = model.eval()
        if self.device_map is not None and mc_state(self._base) is not None:
            unconvert(self._base)  # a variant converted it in place (see build): the base again, exactly
        return self._base

    def build(self, variant: Variant):
        if variant.name == BASE:
            return self.base()
        if self.device_map is not None and not self.exported:
            # A model that needs a device map is too big to copy: each variant converts the
            # base in place, and base() undoes it (one variant is alive at a time).
            model = convert(self.base(), variant.mc)
            if variant.source == OWN and gate_modules(model):
                _load_gates(model, _read_safetensors(self.path / GATES_NAME))
            return model.eval()
        if variant.source == OWN:
            return load(self.checkpoint, **self._placement).eval()
        if self.exported:
            raise MCError(
                "an exported file can only be compared with its own configuration; give the original "
                "checkpoint or a converted directory to evaluate other MC configurations"
            )
        model = convert(copy.deepcopy(self.base()), variant.mc)
        return model.to(self.device).eval()

    def config(self):
        return self.base().config

    def training_context(self) -> int | None:
        """The context the checkpoint was trained at, where it records it."""
        if not self.exported:
            info = self.path / "training.json"
            if info.is_file():
                try:
                    data = json.loads(info.read_text())
                    ctx = data.get("ctx", data.get("seq_len"))  # text recipe / MQAR recipe
                except json.JSONDecodeError:
                    ctx = None
                if isinstance(ctx, int) and ctx > 0:
                    return ctx
        ctx = getattr(self.config(), "context_length", None)
        return ctx if isinstance(ctx, int) and ctx > 0 else None


def assemble(source: ModelSource, recipe_variants: list[dict], extra: list[Variant], use_recipe: bool | None = None) -> list[Variant]:
    """Base first, then the model's own configuration (a converted input), then the
    explicit ``--config``/``--variant`` ones; the recipe's variants when nothing explicit
    was given (or ``use_recipe`` is True)."""
    out = [Variant(BASE, None, source=BASE)]
    own = source.own_config()
    if own is not None:
        out.append(Variant(OWN, own, source=OWN))
    explicit = own is not None or bool(extra)
    if use_recipe or (use_recipe is None and not explicit):
        out += [Variant(v["name"], MCConfig.from_dict(v.get("mc", {})), source="recipe") for v in recipe_variants]
    out += extra
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise MCError(f"two variants are named {dup[0]!r}; give each a distinct name (name=... in --variant)")
    if len(out) == 1 and use_recipe is not False:  # --no-recipe-variants alone: the base model only, on purpose
        raise MCError("nothing to compare with the base model: give --config, --variant or a recipe with variants")
    return out
