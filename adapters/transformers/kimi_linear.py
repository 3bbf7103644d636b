"""Kimi Linear (transformers ``kimi_linear``): its KDA layers (``KimiLinearDeltaAttention``).

Kimi Delta Attention is the gated delta rule with a per-key-channel decay ``g [B,T,H,K]`` (the
layer's ``forget_gate`` computes it; beta is already a sigmoid): per head a state ``S [K, V]``
(K-first, ``[B, H, K, V]``), ``o_t = K^-1/2 q_t^T S_t`` with q, k l2-normalised inside the op.
The module-global ops are ``chunk_kimi_delta_attention`` / ``recurrent_kimi_delta_attention``:
with fla installed transformers binds them to fla's ``chunk_kda`` / ``fused_recurrent_kda``
(Triton), otherwise to its own torch versions. On CPU they are routed to
:func:`mc_retrofit.adapters.fla.cpu.kda_ref` (fla's ``naive_recurrent_kda``).

- query: ``l2norm(q_t)`` (the op's q after its own l2norm; scale ``K^-1/2``);
- key summary: mean of ``l2norm(k_t)``;
- read of a cached state: ``K^-1/2 l2norm(q_t)^T S_i`` (layout ``kv``), added before ``o_norm``
  and ``o_proj``. The attention (MLA) layers are untouched.
"""
from __future__ import annotations

from .qwen3_next import GdnHybridAdapter


def _kda_cpu_ref(query, key, value, g, beta, chunk_size=64, **kwargs):
    from mc_retrofit.adapters.fla import cpu as fla_cpu

    return fla_cpu.kda_ref(query, key, value, g, beta, **kwargs)


class KimiLinearAdapter(GdnHybridAdapter):
    family = "kimi_linear"
    model_types = ("kimi_linear",)
    description = ("KDA layers only: query l2norm(q_t); key summary mean l2norm(k_t); read K^-1/2 q_t^T S_i "
                   "before the gated norm (per-channel decay)")
    layer_module = "transformers.models.kimi_linear.modeling_kimi_linear"
    layer_class = "KimiLinearDeltaAttention"
    model_class_name = "KimiLinearForCausalLM"
    op_names = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")
    cpu_ref = staticmethod(_kda_cpu_ref)
    dims = ("linear_num_heads", "linear_head_dim", "linear_head_dim")
    mixer_dims = ("num_heads", "head_dim", "head_dim")
