"""RWKV-7 (fla ``RWKV7ForCausalLM``, layer ``fla.layers.rwkv7.RWKV7Attention``).

State per head: ``S [K, V]`` (K-first, ``[B, H, K, V]``), updated by the DPLR rule
``S_t = S_{t-1} diag(e^{w_t}) + b_t (a_t^T S_{t-1}) + k_t v_t^T`` and read by the
receptance after the update: ``o_t = r_t^T S_t`` (``scale = 1``).

- query: ``r_t`` (the receptance the op reads with, scale 1);
- key summary: mean of the op's ``k_t`` (already ``k * (1 + (a - 1) k_a)``) over the segment;
- read of a cached state: ``r_t^T S_i`` (scale 1), added to the op's output, i.e.
  **before** the per-head GroupNorm and before ``gate_output_correction``. The output
  correction ``((r_t k_t r_k) . 1) v_t`` depends on the current token only, not on a
  state, so it is applied once, by the layer, on top of the aggregated read.

Wrapped ops (module globals of ``fla.layers.rwkv7``): ``chunk_rwkv7`` (prefill,
training) and ``fused_mul_recurrent_rwkv7`` (short calls and decoding; it takes ``kk``
and ``a`` and forms the DPLR vectors inside).
"""
from __future__ import annotations

from mc_retrofit.adapters.fla import FlaAdapter, OpSpec

_COMMON = dict(query=lambda a: a["r"], keys=lambda a: a["k"], scale=lambda a: 1.0 if a.get("scale") is None
               else float(a["scale"]), layout=lambda a: "kv", chunkwise=True)


class Rwkv7Adapter(FlaAdapter):
    family = "rwkv7"
    model_types = ("rwkv7",)
    description = "query r_t; key summary mean k_t; read r_t^T S_i before GroupNorm and the output correction"
    layer_module = "fla.layers.rwkv7"
    layer_class = "RWKV7Attention"
    model_class_name = "RWKV7ForCausalLM"
    # Training-free MC at the paper's weights breaks RWKV-7's in-context retrieval (pass keys
    # at 1x 1.00 -> 0.13, +0.75 bits/byte at 4x on checkpoints/rwkv7-byte): with
    # near-uniform query gates a stale state gets most of the weight, and RWKV-7 cannot
    # take that in every layer. Even an oracle gate that weighs only the cache holding the
    # needle breaks it at weight 0.5 (one layer alone does: recipes/studies/results/
    # oracle-gate/). A bias of 4 leaves each cache about 2% of the weight unless it
    # matches the query far better than the online memory. Training-free gated and SSC MC
    # then cost at most +0.003 bits/byte to 4x and keep the base's pass keys
    # (eval-rwkv7-byte-family-default/). Gate tuning starts from it.
    default_online_bias = 4.0
    ops = {
        "chunk_rwkv7": OpSpec(time_args=("r", "w", "k", "v", "a", "b"), **_COMMON),
        "fused_mul_recurrent_rwkv7": OpSpec(time_args=("r", "w", "k", "v", "kk", "a"), **_COMMON),
    }

    def state_dims(self, mixer):
        return mixer.num_heads, mixer.head_dim, mixer.head_v_dim
