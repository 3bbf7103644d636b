"""Gated DeltaNet layers of transformers' hybrids: Qwen3-Next (``Qwen3NextForCausalLM``).

The linear-attention layers (``Qwen3NextGatedDeltaNet``) keep a gated delta rule state
per value head ``S [K, V]`` (**K-first** here, ``[B, HV, K, V]``: transformers does not
pass ``state_v_first``), read as in fla's Gated DeltaNet: ``o_t = K^-1/2 S_t^T l2norm(q_t)``
(l2norm inside the op, ``use_qk_l2norm_in_kernel=True``; value head ``hv`` reads q/k
head ``hv // (HV / H)``). The full-attention layers are untouched.

- query: ``l2norm(q_t)`` repeated over each value-head group;
- key summary: mean of ``l2norm(k_t)``, repeated the same way;
- read of a cached state: ``K^-1/2 l2norm(q_t)^T S_i`` (layout ``kv``), added to the op's
  output before the gated RMSNorm (``self.norm(o, z)``) and ``out_proj``.

Wrapped ops (module globals of ``transformers.models.qwen3_next.modeling_qwen3_next``):
``torch_chunk_gated_delta_rule`` and ``torch_recurrent_gated_delta_rule``. With fla
installed transformers binds these names to fla's Triton kernels, which do not run on
CPU; CPU tensors are routed to :func:`mc_retrofit.adapters.fla.cpu.gated_delta_rule_ref`.
"""
from __future__ import annotations

from mc_retrofit import compat
from mc_retrofit.adapters.base import StateInfo
from mc_retrofit.adapters.fla import FlaAdapter

from ..fla.gated_deltanet import gdn_spec

MODULE = "transformers.models.qwen3_next.modeling_qwen3_next"
OPS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")


def _cpu_ref(query, key, value, g, beta, chunk_size=64, **kwargs):
    from mc_retrofit.adapters.fla import cpu as fla_cpu

    return fla_cpu.gated_delta_rule_ref(query, key, value, g, beta, **kwargs)


class Qwen3NextAdapter(FlaAdapter):
    family = "qwen3_next"
    model_types = ("qwen3_next",)
    description = "GDN layers only: query l2norm(q_t) per value group; read K^-1/2 q_t^T S_i before the gated norm"
    layer_module = MODULE
    layer_class = "Qwen3NextGatedDeltaNet"
    ops = {name: gdn_spec("query", "key", "value") for name in OPS}

    def model_class(self):
        from transformers import Qwen3NextForCausalLM

        compat.install(self.support_patches())
        return Qwen3NextForCausalLM

    def _layer_cls(self):
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

        return Qwen3NextGatedDeltaNet

    def support_patches(self):
        import importlib.util

        if importlib.util.find_spec("fla") is None:
            return []  # transformers' own torch fallbacks already run on CPU
        from mc_retrofit.adapters.fla import cpu as fla_cpu

        return [*fla_cpu.patches(), *(fla_cpu.route(MODULE, name, _cpu_ref, group=self.family) for name in OPS)]

    cache_names = ("cache", "past_key_values")  # the model; its GDN mixers: the default names
    mixer_cache_names = ("cache", "cache_params")

    def state_dims(self, mixer):
        return mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim

    def recurrent_layers(self, config):
        # hybrid: only the linear-attention (GDN) layers are recurrent
        return [i for i, kind in enumerate(config.layer_types) if kind == "linear_attention"]

    def state_info(self, config):
        return StateInfo(shapes=[(config.linear_num_value_heads, config.linear_key_head_dim,
                                  config.linear_value_head_dim)], bytes_per_element=4,
                         key_dim=config.linear_key_head_dim, heads=config.linear_num_value_heads)
