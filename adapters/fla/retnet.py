"""RetNet (fla ``RetNetForCausalLM``, layer ``fla.layers.multiscale_retention.MultiScaleRetention``).

State per head: ``S [K, V]`` (K-first, ``[B, H, K, V]``), retention with a fixed
per-head decay ``gamma_h = 1 - 2^(-5-h)``: ``S_t = gamma_h S_{t-1} + k_t v_t^T``,
read ``o_t = K^-1/2 q_t^T S_t``. The op receives q and k **after** the rotary
embedding (xPos-free RoPE applied by the layer at each token's absolute position), and
with ``num_kv_heads < num_heads`` k and v already repeated to every head.

- query: the RoPE-rotated ``q_t`` the op reads with;
- key summary: mean of the RoPE-rotated ``k_t`` over the segment;
- read of a cached state: ``K^-1/2 q_t^T S_i`` (the op's ``scale`` when given), added to
  the op's output before the group norm / output gate and ``o_proj``.

Modes: ``chunk``, ``fused_chunk`` and ``fused_recurrent`` are wrapped. ``parallel``
returns no state (and ignores a cached one), so a converted layer is **switched** to
``chunk`` (the same outputs; a warning says so).
"""
from __future__ import annotations

from mc_retrofit.adapters.fla import FlaAdapter, OpSpec, default_scale
from mc_retrofit.adapters.fla.cpu import retention_decay

def _linear(a):
    """Retention as a gated linear recurrence: the fixed per-head decay ``gamma_h`` on every token."""
    B, T, H, _ = a["k"].shape
    return dict(k=a["k"], v=a["v"], g=retention_decay(H, a["k"].device)[None, None].expand(B, T, H))


_SPEC = OpSpec(time_args=("q", "k", "v"), query=lambda a: a["q"], keys=lambda a: a["k"], scale=default_scale,
               layout=lambda a: "vk" if a.get("state_v_first") else "kv", linear=_linear)


class RetNetAdapter(FlaAdapter):
    family = "retnet"
    model_types = ("retnet",)
    description = "query RoPE(q_t); key summary mean RoPE(k_t); read K^-1/2 q_t^T S_i before the group norm"
    layer_module = "fla.layers.multiscale_retention"
    layer_class = "MultiScaleRetention"
    model_class_name = "RetNetForCausalLM"
    ops = {"chunk_retention": _SPEC, "fused_chunk_retention": _SPEC, "fused_recurrent_retention": _SPEC}

    def check_mixer(self, mixer):
        self.switch_mode(mixer, "parallel", "chunk", "keeps no recurrent state to cache")
