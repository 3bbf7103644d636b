"""Gated DeltaNet (fla ``GatedDeltaNetForCausalLM``, layer ``fla.layers.gated_deltanet.GatedDeltaNet``).

State per value head: ``S [V, K]`` (**V-first**, ``[B, HV, V, K]``: the layer passes
``state_v_first=True``), gated delta rule
``S_t = e^{g_t} S_{t-1} + beta_t (v_t - e^{g_t} S_{t-1} k_t) k_t^T``,
read ``o_t = K^-1/2 S_t q_t`` with q, k l2-normalised inside the kernel
(``use_qk_l2norm_in_kernel=True``). With GVA (``num_v_heads > num_heads``) value head
``hv`` reads query/key head ``hv // (HV / H)``.

- query: ``l2norm(q_t)`` repeated over each value-head group (HV heads);
- key summary: mean of ``l2norm(k_t)``, repeated the same way;
- read of a cached state: ``K^-1/2 S_i l2norm(q_t)`` (layout ``vk``), added to the op's
  output before the gated RMSNorm (``o_norm``) and ``o_proj``.

Wrapped ops (module globals of ``fla.layers.gated_deltanet``): ``chunk_gated_delta_rule``
and ``fused_recurrent_gated_delta_rule``. The shared :data:`GDN_SPEC` also serves
the Gated DeltaNet layers of transformers' hybrids (``adapters/qwen3_next.py``).
"""
from __future__ import annotations

from mc_retrofit.adapters.fla import FlaAdapter, OpSpec, default_scale, expand, l2norm


def _layout(a):
    return "vk" if a.get("state_v_first") or a.get("transpose_state_layout") else "kv"


def gdn_spec(q: str = "q", k: str = "k", v: str = "v", gates: tuple[str, ...] = ("g", "beta"),
             chunkwise: bool = True, fp32_state: bool = False) -> OpSpec:
    """The gated delta rule's read, for an op whose q/k/v arguments have these names and whose
    per-token ``gates`` run along time too. The delta-rule relatives (KDA's per-channel decay,
    GDN-2's erase/write gates) change only how the state is written, not how it is read, so
    they share this spec (``chunkwise``: the op's CPU reference can record segment-end states)."""

    def qk(a, name):
        x = l2norm(a[name]) if a.get("use_qk_l2norm_in_kernel") else a[name]
        return expand(x, a[v].shape[2])

    return OpSpec(time_args=(q, k, v, *gates), query=lambda a: qk(a, q), keys=lambda a: qk(a, k),
                  scale=lambda a: default_scale(a, q), layout=_layout, positional=(q, k, v), chunkwise=chunkwise,
                  fp32_state=fp32_state)


GDN_SPEC = gdn_spec()


class GatedDeltaNetAdapter(FlaAdapter):
    family = "gated_deltanet"
    model_types = ("gated_deltanet",)
    description = "query l2norm(q_t) per value group; key summary mean l2norm(k_t); read K^-1/2 S_i q_t (V-first)"
    layer_module = "fla.layers.gated_deltanet"
    layer_class = "GatedDeltaNet"
    model_class_name = "GatedDeltaNetForCausalLM"
    ops = {"chunk_gated_delta_rule": GDN_SPEC, "fused_recurrent_gated_delta_rule": GDN_SPEC}

    def state_dims(self, mixer):
        return mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim

    def state_shape(self, mixer):
        return (mixer.num_v_heads, mixer.head_v_dim, mixer.head_k_dim)
