"""Qwen3.5 and Qwen3.5-MoE (transformers ``qwen3_5`` / ``qwen3_5_moe``): their Gated DeltaNet layers.

Both modules have the same layer (``Qwen3_5GatedDeltaNet`` / ``Qwen3_5MoeGatedDeltaNet``:
separate ``in_proj_qkv``/``in_proj_z``/``in_proj_b``/``in_proj_a``, then the same call as
Qwen3-Next's) and their own module-global ``torch_chunk_gated_delta_rule`` /
``torch_recurrent_gated_delta_rule``, so the read is Qwen3-Next's (:mod:`.qwen3_next`): query
``l2norm(q_t)`` per value group, key summary mean ``l2norm(k_t)``, read ``K^-1/2 q_t^T S_i``
(K-first) before the gated RMSNorm. Only the text model is supported (``Qwen3_5ForCausalLM``,
model types ``qwen3_5_text`` / ``qwen3_5_moe_text``): a vision-language ``qwen3_5`` checkpoint nests
its text config in ``text_config`` and its weights under ``model.language_model``, which mc-retrofit's
checkpoint reader does not unpack, so such a directory is refused as an unsupported model type.
"""
from __future__ import annotations

from .qwen3_next import GdnHybridAdapter


class Qwen3_5Adapter(GdnHybridAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5_text",)
    description = "GDN layers only: query l2norm(q_t) per value group; read K^-1/2 q_t^T S_i before the gated norm"
    layer_module = "transformers.models.qwen3_5.modeling_qwen3_5"
    layer_class = "Qwen3_5GatedDeltaNet"
    model_class_name = "Qwen3_5ForCausalLM"


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe_text",)
    layer_module = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe"
    layer_class = "Qwen3_5MoeGatedDeltaNet"
    model_class_name = "Qwen3_5MoeForCausalLM"
