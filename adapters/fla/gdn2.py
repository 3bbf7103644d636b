"""Gated DeltaNet-2 (fla ``fla.layers.gdn2.GatedDeltaNet2``, ops ``fla.ops.gdn2``): the read only.

fla 0.6.0 ships GDN-2 as a **layer and ops only**: no ``fla.models`` config or ``*ForCausalLM``
(``fla/models`` has no ``gdn2`` / ``gated_deltanet2`` package and nothing under ``fla/models``
imports ``GatedDeltaNet2``), so there is no checkpoint format and no model type for an
:class:`~mc_retrofit.adapters.base.Adapter` to match. What a family built on the layer needs is
declared here: the op spec and (in ``adapters/fla/cpu.py``) the CPU routing of both ops to fla's
``naive_recurrent_gdn2`` (chunkwise as a DPLR recurrence during one-pass capture:
:func:`mc_retrofit.adapters.fla.chunk.gdn2_chunked`).

GDN-2 per head: ``S [K, V]`` (K-first; the layer passes no ``state_v_first``),
``S_t = (I - k_t (b_t * k_t)^T) diag(e^{g_t}) S_{t-1} + k_t (w_t * v_t)^T`` (erase gate ``b`` on K,
write gate ``w`` on V, per-channel decay ``g``), read ``o_t = K^-1/2 q_t^T S_t`` with q, k
l2-normalised inside the op. The layer repeats q/k/g/b up to the value heads itself.

- query: ``l2norm(q_t)``; key summary: mean of ``l2norm(k_t)``;
- read of a cached state: ``K^-1/2 l2norm(q_t)^T S_i`` (layout ``kv``), before ``o_norm``/``o_proj``.
"""
from __future__ import annotations

from .gated_deltanet import gdn_spec

LAYER_MODULE = "fla.layers.gdn2"
LAYER_CLASS = "GatedDeltaNet2"
# time-run gates: decay g [B,T,H,K], erase b [B,T,H,K], write w [B,T,H,V]; no scalar beta
GDN2_SPEC = gdn_spec(gates=("g", "b", "w"), fp32_state=True)
GDN2_OPS = {"chunk_gdn2": GDN2_SPEC, "fused_recurrent_gdn2": GDN2_SPEC}
