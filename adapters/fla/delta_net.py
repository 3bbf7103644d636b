"""DeltaNet (fla ``DeltaNetForCausalLM``, layer ``fla.layers.delta_net.DeltaNet``).

State per head: ``S [K, V]`` (K-first, ``[B, H, K, V]``), delta rule
``S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T``, read ``o_t = K^-1/2 q_t^T S_t``.

- query: ``q_t``, l2-normalised when the op normalises it inside
  (``use_qk_l2norm_in_kernel``, i.e. ``qk_norm='l2'``, the default);
- key summary: mean of ``k_t`` (normalised the same way) over the segment;
- read of a cached state: ``K^-1/2 l2norm(q_t)^T S_i`` (the op's ``scale`` when given),
  added to the op's output before the layer's output norm / gate and ``o_proj``.

Wrapped ops (module globals of ``fla.layers.delta_net``): ``chunk_delta_rule`` and
``fused_recurrent_delta_rule``.
"""
from __future__ import annotations

from mc_retrofit.adapters.fla import FlaAdapter, OpSpec, default_scale, l2norm


def _normed(a, name):
    x = a[name]
    return l2norm(x) if a.get("use_qk_l2norm_in_kernel") else x


_SPEC = OpSpec(time_args=("q", "k", "v", "beta"), query=lambda a: _normed(a, "q"), keys=lambda a: _normed(a, "k"),
               scale=default_scale, layout=lambda a: "kv", chunkwise=True)


class DeltaNetAdapter(FlaAdapter):
    family = "delta_net"
    model_types = ("delta_net",)
    description = "query l2norm(q_t); key summary mean l2norm(k_t); read K^-1/2 q_t^T S_i before the output norm"
    layer_module = "fla.layers.delta_net"
    layer_class = "DeltaNet"
    model_class_name = "DeltaNetForCausalLM"
    ops = {"chunk_delta_rule": _SPEC, "fused_recurrent_delta_rule": _SPEC}
