"""``inspect``: what a model's recurrent state and Memory Caching cost, from configs alone."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .checkpoints import open_checkpoint
from .config import MCConfig
from .errors import MCError
from .model import _header_shapes, check_layer_count

TOKENS = 1024  # "per 1K tokens"


@dataclass
class Description:
    path: str
    family: str
    converted: bool
    num_layers: int
    mc_layers: list[int]
    state_shapes: list[tuple[int, ...]]
    state_bytes: int  # one layer's cached state, per sequence
    summary_bytes: int  # one layer's pooled-key summary, per sequence
    segment_bytes: int  # everything one cached segment costs, over all MC layers
    segments_per_1k: float
    cache_bytes_per_1k: float
    cache_cap_bytes: int | None  # the most the cache holds per sequence under max_cached_segments
    mc_config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def describe(path, mc_config: MCConfig | None = None) -> Description:
    """Family, layers, state sizes and cache bytes per 1K tokens of a checkpoint.

    For an unconverted checkpoint, ``mc_config`` (default: ``MCConfig()``) says which
    segment size to cost."""
    from mc_retrofit.adapters import adapter_for

    ckpt = open_checkpoint(path)  # the same checks (and messages) as loading it
    path, hf, saved = ckpt.spec, ckpt.hf_config, ckpt.mc_config
    # Costs come from the config; the weights' headers (names only, nothing loaded) say
    # whether it is the config of these weights: an edited layer count is refused here as
    # it is on load, rather than costed.
    check_layer_count(hf, _header_shapes(ckpt.weight_files), path)
    if saved is not None and mc_config is not None:
        # A converted model's costs follow its own mc_config.json; describing it under other
        # options would be a report about a model that does not exist.
        raise MCError(f"{path} is converted: its mc_config.json sets the MC options; drop them, or inspect "
                      "the original checkpoint with those options")
    cfg = saved if saved is not None else (mc_config or MCConfig())
    adapter = adapter_for(hf)
    recurrent = adapter.recurrent_layers(hf)
    info = _state_info(adapter, hf, recurrent)
    bad = [i for i in (cfg.layers or []) if i not in recurrent]
    if bad:  # what convert refuses, inspect refuses (rather than costing zero layers)
        raise MCError(f"layers {bad} do not exist or are not recurrent: recurrent layers are {recurrent}")
    n_layers = len(recurrent)
    layers = [i for i in recurrent if cfg.applies_to(i)]
    segment_bytes = (info.state_bytes + info.summary_bytes) * len(layers)
    if cfg.segmentation == "constant":
        per_1k = TOKENS / cfg.segment_size
    else:  # log: a 1K-token call is one power of two, kept open
        per_1k = float(bin(TOKENS).count("1") - 1)
    return Description(
        path=path, family=adapter.family, converted=ckpt.converted, num_layers=n_layers, mc_layers=layers,
        state_shapes=info.shapes, state_bytes=info.state_bytes, summary_bytes=info.summary_bytes,
        segment_bytes=segment_bytes, segments_per_1k=per_1k, cache_bytes_per_1k=per_1k * segment_bytes,
        cache_cap_bytes=None if cfg.max_cached_segments is None else cfg.max_cached_segments * segment_bytes,
        mc_config=cfg.to_dict(),
    )


def _state_info(adapter, hf, recurrent):
    """One recurrent layer's state, from a config cut after the layer that follows the first recurrent one.

    ``StateInfo`` is one layer's, the same for every recurrent layer, so the rest is not
    needed. Adapters that read the shapes off a model built on the meta device (fla's) then
    build two layers, not all: fla's RWKV-7 layers run per-channel Python initialisation
    loops even on meta, 15 s for the 2.9B model's 32 layers. Two, not one: RWKV-7's
    initialisation divides by ``num_hidden_layers - 1``. Should the cut config not build (a
    family whose config lists every layer, or whose first layers are not the family's
    mixer), the full config is costed as before."""
    n = getattr(hf, "num_hidden_layers", None)
    if recurrent and isinstance(n, int) and recurrent[0] + 2 < n:
        cut = copy.deepcopy(hf)
        cut.num_hidden_layers = recurrent[0] + 2
        try:
            return adapter.state_info(cut)
        except Exception:  # noqa: BLE001 - the full config below raises its own error, if any
            pass
    return adapter.state_info(hf)
