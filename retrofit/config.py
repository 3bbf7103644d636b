"""MCConfig: what Memory Caching does to a model, saved as ``mc_config.json``.

A dataclass in the style of PEFT's configs: every field is documented, the file
carries a format version, and unknown or invalid values fail with one clear line.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MCError

FORMAT_VERSION = 1
CONFIG_NAME = "mc_config.json"

AGGREGATIONS = ("residual", "gated", "ssc")
# For linear memories Memory Soup (interpolate the memories, read once) equals the
# gated residual exactly, and every supported family reads linearly: an alias.
AGGREGATION_ALIASES = {"soup": "gated", "grm": "gated", "sparse": "ssc"}
SEGMENTATIONS = ("constant", "log")
GATE_SOURCES = ("query", "lowrank", "learned")
CACHE_POLICIES = ("recent", "log")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a user


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class MCConfig:
    """Memory Caching settings.

    Fields:
        segmentation: ``constant`` (boundaries every ``segment_size`` tokens, counted from
            the first token) or ``log`` (a call of L tokens is split into the powers of two
            of L's binary expansion, largest first: 37 = 32 + 4 + 1).
        segment_size: tokens per segment for ``constant`` segmentation.
        aggregation: how a token combines its online memory with the cached ones:
            ``residual`` (every cached read added with weight 1), ``gated`` (softmax gates
            over the online memory and every cached segment; ``soup`` is an alias), or
            ``ssc`` (sparse selective caching: a router keeps the ``top_k`` best cached
            segments per token, the online memory is always in, softmax over those).
        top_k: cached segments each token keeps under ``ssc``.
        gate_source: what the gates compare against each segment's mean-pooled keys.
            ``query``: the layer's own query (parameter-free, training-free);
            ``lowrank``: ``u_t = q_t + (x_t A) B``, the query plus a rank-``gate_rank``
            correction from the layer input (``B`` starts at zero, so it starts as ``query``;
            light: ``gate_rank * (d_model + H * U)`` parameters per layer);
            ``learned``: ``u_t = x_t W_u``, a full connector from the layer input (initialised
            to zero, i.e. uniform gates, and trained by ``mc-retrofit finetune``).
        gate_rank: the rank of the ``lowrank`` connector.
        temperature: gate logits are ``<u_t, pool_i> / (sqrt(d_k) * temperature)``.
        online_bias: initial per-layer, per-head value added to the online memory's gate
            logit (> 0 trusts the online memory more; a training-free knob, and the
            starting point of the gate's ``online_bias`` that ``finetune`` tunes).
            ``None`` (the default): the model family's own default, which ``convert`` fills
            in and saves (``Adapter.default_online_bias``: 0 for most families, 4 for RWKV-7,
            whose in-context retrieval breaks when a cached state gets much weight).
        cache_weight: initial per-layer, per-head mix ``a`` in ``y = o + a * (agg - o)``
            where ``o`` is the model's own output and ``agg`` the aggregated read.
            ``1.0`` is Memory Caching as the paper defines it; ``0.0`` is **off**: the
            model is then exactly the base model (and gate tuning starts from there).
        layers: indices of the mixer layers to wrap; ``None`` wraps all of them.
        max_cached_segments: cap on cached segments per layer (per sequence); ``None``: no
            cap. What is dropped past it is ``cache_policy``'s choice.
        cache_policy: which segments a full cache keeps. ``recent``: the newest
            ``max_cached_segments`` (the oldest are dropped first). ``log``: the newest
            half of the cap, and older segments thinned to about two per power-of-two
            band of age (ages 4-7, 8-15, 16-31, ... segments back), so a cap of 16 still
            reaches about 100 segments back; when even that is over the cap, the oldest go.
        family: the model family, filled in by ``convert`` (informational).
        format_version: version of this file's format.
    """

    segmentation: str = "constant"
    segment_size: int = 256
    aggregation: str = "gated"
    top_k: int = 2
    gate_source: str = "query"
    gate_rank: int = 2
    temperature: float = 1.0
    online_bias: float | None = None
    cache_weight: float = 1.0
    layers: list[int] | None = None
    max_cached_segments: int | None = None
    cache_policy: str = "recent"
    family: str | None = None
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self):
        self.aggregation = AGGREGATION_ALIASES.get(str(self.aggregation).lower(), str(self.aggregation).lower())
        self.validate()

    def validate(self) -> None:
        if self.segmentation not in SEGMENTATIONS:
            raise MCError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}, not {self.segmentation!r}")
        if not (_is_int(self.segment_size) and self.segment_size >= 1):
            raise MCError(f"segment_size must be a positive integer, not {self.segment_size!r}")
        if self.aggregation not in AGGREGATIONS:
            names = ", ".join(AGGREGATIONS + tuple(AGGREGATION_ALIASES))
            raise MCError(f"aggregation must be one of {names}, not {self.aggregation!r}")
        if not (_is_int(self.top_k) and self.top_k >= 1):
            raise MCError(f"top_k must be a positive integer, not {self.top_k!r}")
        if self.gate_source not in GATE_SOURCES:
            raise MCError(f"gate_source must be one of {', '.join(GATE_SOURCES)}, not {self.gate_source!r}")
        if not (_is_int(self.gate_rank) and self.gate_rank >= 1):
            raise MCError(f"gate_rank must be a positive integer, not {self.gate_rank!r}")
        if not (_is_number(self.temperature) and self.temperature > 0 and math.isfinite(self.temperature)):
            raise MCError(f"temperature must be a positive number, not {self.temperature!r}")
        if self.online_bias is not None and not (_is_number(self.online_bias) and math.isfinite(self.online_bias)):
            raise MCError(f"online_bias must be a finite number, not {self.online_bias!r}")
        if not (_is_number(self.cache_weight) and math.isfinite(self.cache_weight)):
            raise MCError(f"cache_weight must be a finite number, not {self.cache_weight!r}")
        if self.layers is not None:
            if not (isinstance(self.layers, (list, tuple)) and all(_is_int(i) and i >= 0 for i in self.layers)):
                raise MCError(f"layers must be a list of non-negative layer indices, not {self.layers!r}")
            if not self.layers:  # an empty list would convert nothing and still call it converted
                raise MCError("layers must name at least one layer (None wraps all of them)")
            self.layers = sorted(set(self.layers))
        if self.max_cached_segments is not None and not (
            _is_int(self.max_cached_segments) and self.max_cached_segments >= 1
        ):
            raise MCError(f"max_cached_segments must be a positive integer or None, not {self.max_cached_segments!r}")
        if self.cache_policy not in CACHE_POLICIES:
            raise MCError(f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, not {self.cache_policy!r}")
        if self.family is not None and not isinstance(self.family, str):
            raise MCError(f"family must be a model family name or None, not {self.family!r}")
        if not (_is_int(self.format_version) and self.format_version >= 1):
            raise MCError(f"format_version must be a positive integer (this version writes {FORMAT_VERSION}), "
                          f"not {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise MCError(
                f"mc_config format version {self.format_version} is newer than this mc-retrofit reads "
                f"({FORMAT_VERSION}); upgrade mc-retrofit"
            )

    def ignored(self, given) -> list[tuple[str, str]]:
        """``(field, why)`` for each field in ``given`` (the ones a user set explicitly) that
        this configuration would ignore: setting it changes nothing, which is almost always a
        mistake about what the other settings mean, so callers refuse it."""
        given = set(given)
        out = []
        if "segment_size" in given and self.segmentation == "log":
            out.append(("segment_size", "has no effect under log segmentation (segments are the powers of two "
                                        "of each call's length)"))
        if "top_k" in given and self.aggregation != "ssc":
            out.append(("top_k", f"applies only to aggregation ssc, not {self.aggregation}"))
        if "gate_rank" in given and self.gate_source != "lowrank":
            out.append(("gate_rank", f"applies only to gate_source lowrank, not {self.gate_source}"))
        if "cache_policy" in given and self.max_cached_segments is None:
            out.append(("cache_policy", "applies only with max_cached_segments (without a cap nothing is dropped)"))
        if self.aggregation == "residual":
            for name in ("temperature", "online_bias", "gate_source"):
                if name in given:
                    out.append((name, "has no effect under residual aggregation (every cached read has weight 1)"))
        return out

    def for_family(self, adapter) -> "MCConfig":
        """This configuration on ``adapter``'s family: the knobs left unset (None) take the
        family's defaults. What ``convert`` uses and saves, so a reload never depends on
        the defaults of a later version."""
        data = {**self.to_dict(), "family": adapter.family}
        if data["online_bias"] is None:
            data["online_bias"] = float(adapter.default_online_bias)
        return MCConfig.from_dict(data)

    # -- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "MCConfig":
        if not isinstance(data, dict):
            raise MCError("mc_config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MCError(f"unknown mc_config field(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MCConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MCError(f"mc_config is not valid JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "MCConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise MCError(f"{path} not found: not a converted mc-retrofit directory (run `mc-retrofit convert` first)")
        return cls.from_json(path.read_text())

    def applies_to(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers
