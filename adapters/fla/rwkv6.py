"""RWKV-6 (fla ``RWKV6ForCausalLM``, layer ``fla.layers.rwkv6.RWKV6Attention``).

State per head: ``S [K, V]`` (K-first, ``[B, H, K, V]``), ``S_t = diag(e^{w_t}) S_{t-1} +
k_t v_t^T``. The layer's own (online) read uses the **pre-update** state plus the bonus
``u`` on the current token: ``o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)`` (scale 1).

- query: ``r_t``;
- key summary: mean of ``k_t`` over the segment;
- read of a cached state: ``r_t^T S_i`` (scale 1). ``S_i`` is a state at a segment
  end, so it holds every token of its prefix: no bonus term belongs to it (the bonus is
  the current token's, and stays in the online read only). Added to the op's output
  before the GroupNorm, the gate and ``o_proj``.

Wrapped ops (module globals of ``fla.layers.rwkv6``): ``chunk_rwkv6`` and
``fused_recurrent_rwkv6``.
"""
from __future__ import annotations

from mc_retrofit.adapters.fla import FlaAdapter, OpSpec

_SPEC = OpSpec(time_args=("r", "k", "v", "w"), query=lambda a: a["r"], keys=lambda a: a["k"],
               scale=lambda a: 1.0 if a.get("scale") is None else float(a["scale"]), layout=lambda a: "kv",
               linear=lambda a: dict(k=a["k"], v=a["v"], gk=a["w"]))  # S_t = diag(e^{w_t}) S_{t-1} + k_t v_t^T


class Rwkv6Adapter(FlaAdapter):
    family = "rwkv6"
    model_types = ("rwkv6",)
    description = "query r_t; key summary mean k_t; read r_t^T S_i (no bonus) before GroupNorm"
    layer_module = "fla.layers.rwkv6"
    layer_class = "RWKV6Attention"
    model_class_name = "RWKV6ForCausalLM"
    ops = {"chunk_rwkv6": _SPEC, "fused_recurrent_rwkv6": _SPEC}
