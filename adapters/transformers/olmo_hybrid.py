"""OLMo Hybrid (transformers ``olmo_hybrid``): its Gated DeltaNet layers (``OlmoHybridGatedDeltaNet``).

Separate q/k/v/a/b/g projections (and ``beta * 2`` with ``linear_allow_neg_eigval``), then the
same module-global ops as Qwen3-Next (``torch_chunk_gated_delta_rule`` /
``torch_recurrent_gated_delta_rule`` of ``modeling_olmo_hybrid``) with ``use_qk_l2norm_in_kernel``:
the read is Qwen3-Next's (:mod:`.qwen3_next`), added before ``o_norm`` and ``o_proj``. The layer
works with left padding only (its own comment: pads are zeroed before it); Memory Caching keeps
a clock per row for left padding and the core refuses right padding.
"""
from __future__ import annotations

from .qwen3_next import GdnHybridAdapter


class OlmoHybridAdapter(GdnHybridAdapter):
    family = "olmo_hybrid"
    model_types = ("olmo_hybrid",)
    description = "GDN layers only: query l2norm(q_t) per value group; read K^-1/2 q_t^T S_i before the gated norm"
    layer_module = "transformers.models.olmo_hybrid.modeling_olmo_hybrid"
    layer_class = "OlmoHybridGatedDeltaNet"
    model_class_name = "OlmoHybridForCausalLM"
