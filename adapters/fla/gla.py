"""GLA (fla ``GLAForCausalLM``, layer ``fla.layers.gla.GatedLinearAttention``).

State per head: ``S [V, K]`` (**V-first**, ``[B, H, V, K]``: the layer passes
``state_v_first=True``), ``S_t = S_{t-1} diag(e^{gk_t}) + v_t k_t^T`` (data-dependent
per-key decay), read ``o_t = K^-1/2 S_t q_t``. fla's chunk op asserts an **fp32**
initial state, so states chained between segments are kept fp32.

- query: ``q_t`` (after the optional feature map), with kv groups already expanded;
- key summary: mean of ``k_t`` over the segment;
- read of a cached state: ``K^-1/2 S_i q_t`` (layout ``vk``), added to the op's output
  before the output norm / swish gate and ``o_proj``.

Modes: ``chunk`` and ``fused_recurrent`` are wrapped. ``fused_chunk`` passes a K-first
state and fla 0.6 no longer implements it (``fused_chunk_gla`` raises and says to use
``chunk_gla``), so a converted layer is **switched** to ``chunk`` (a warning says so).
"""
from __future__ import annotations

from mc_retrofit.adapters.fla import FlaAdapter, OpSpec, default_scale


def _spec(gate):
    return OpSpec(time_args=("q", "k", "v", gate, "gv"), query=lambda a: a["q"], keys=lambda a: a["k"],
                  scale=default_scale, layout=lambda a: "vk" if a.get("state_v_first") else "kv", fp32_state=True,
                  linear=lambda a: dict(k=a["k"], v=a["v"], gk=a[gate], gv=a.get("gv")))


class GLAAdapter(FlaAdapter):
    family = "gla"
    model_types = ("gla",)
    description = "query q_t; key summary mean k_t; read K^-1/2 S_i q_t (V-first) before the output norm and gate"
    layer_module = "fla.layers.gla"
    layer_class = "GatedLinearAttention"
    model_class_name = "GLAForCausalLM"
    ops = {"chunk_gla": _spec("g"), "fused_recurrent_gla": _spec("gk")}

    def check_mixer(self, mixer):
        self.switch_mode(mixer, "fused_chunk", "chunk", "stores its state K-first and is gone from fla 0.6")

    def state_shape(self, mixer):
        return (mixer.num_heads, mixer.head_v_dim, mixer.head_k_dim)
