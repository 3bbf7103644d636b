"""Kimi Delta Attention (fla ``KDAForCausalLM``, layer ``fla.layers.kda.KimiDeltaAttention``).

KDA is Gated DeltaNet with a per-key-channel decay: per value head a state ``S [V, K]``
(**V-first**, ``[B, HV, V, K]``: the layer passes ``state_v_first=True``),
``S_t = S_{t-1} diag(e^{g_t}) + beta_t (v_t - S_{t-1} diag(e^{g_t}) k_t) k_t^T`` with
``g_t [K]`` per channel, read ``o_t = K^-1/2 S_t q_t``. The layer hands the kernel the raw gate
(``use_gate_in_kernel``: ``g = -e^{A_log} softplus(f + dt_bias)``) and raw beta
(``use_beta_sigmoid_in_kernel``); q, k are l2-normalised inside (``use_qk_l2norm_in_kernel``).
The per-channel decay changes how a state is written, not how it is read, so the read is
Gated DeltaNet's:

- query: ``l2norm(q_t)`` (the op's q after its own l2norm; scale ``K^-1/2``), repeated over
  each value-head group (GVA);
- key summary: mean of ``l2norm(k_t)``, repeated the same way;
- read of a cached state: ``K^-1/2 S_i q_t`` (layout ``vk``), added to the op's output before
  the gated RMSNorm (``o_norm``) and ``o_proj``.

Wrapped ops (module globals of ``fla.layers.kda``): ``chunk_kda`` and ``fused_recurrent_kda``;
on CPU both run :func:`mc_retrofit.adapters.fla.cpu.kda_ref` (fla's ``naive_recurrent_kda``),
which inside one-pass capture runs chunkwise as a DPLR recurrence
(:func:`mc_retrofit.adapters.fla.chunk.kda_chunked`) and records the segment-end states.
"""
from __future__ import annotations

from .gated_deltanet import GatedDeltaNetAdapter, gdn_spec

KDA_SPEC = gdn_spec(fp32_state=True)  # chunk_kda asserts an fp32 initial state


class KDAAdapter(GatedDeltaNetAdapter):  # same state layout and dimensions as Gated DeltaNet
    family = "kda"
    model_types = ("kda",)
    description = ("query l2norm(q_t) per value group; key summary mean l2norm(k_t); read K^-1/2 S_i q_t "
                   "(V-first; per-channel decay)")
    layer_module = "fla.layers.kda"
    layer_class = "KimiDeltaAttention"
    model_class_name = "KDAForCausalLM"
    ops = {"chunk_kda": KDA_SPEC, "fused_recurrent_kda": KDA_SPEC}
