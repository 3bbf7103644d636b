"""Gated DeltaNet layers of transformers' hybrids: Qwen3-Next (``Qwen3NextForCausalLM``), and
:class:`GdnHybridAdapter`, what every such hybrid shares (Qwen3.5, OLMo Hybrid, Kimi Linear).

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

Left padding: the hybrids zero the hidden states of pads before the layer
(``apply_mask_to_padding_states``), and the bias-free short convolution then gives q = k = v = 0
there, so a pad decays a zero state and writes nothing: each row's state is what it is alone,
and Memory Caching keeps a segment clock per row (``supports_padding``). Right padding is
refused by the core.
"""
from __future__ import annotations

import importlib

from mc_retrofit import compat
from mc_retrofit.adapters.base import StateInfo
from mc_retrofit.adapters.fla import FlaAdapter

from ..fla.gated_deltanet import gdn_spec

OPS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule")
GDN_HYBRID_SPEC = gdn_spec("query", "key", "value")  # transformers names the op's arguments so


def _gdn_cpu_ref(query, key, value, g, beta, chunk_size=64, **kwargs):
    from mc_retrofit.adapters.fla import cpu as fla_cpu

    return fla_cpu.gated_delta_rule_ref(query, key, value, g, beta, **kwargs)


class GdnHybridAdapter(FlaAdapter):
    """A transformers hybrid whose ``linear_attention`` layers (``layer_class`` in
    ``layer_module``) run a gated delta rule through the module-global ops ``op_names``;
    a subclass declares the names, and for another op family ``spec``/``cpu_ref``/``dims``."""

    model_class_name = ""
    op_names: tuple[str, ...] = OPS
    spec = GDN_HYBRID_SPEC
    cpu_ref = staticmethod(_gdn_cpu_ref)
    # config fields of one layer's state: value heads, key width, value width
    dims = ("linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
    mixer_dims = ("num_v_heads", "head_k_dim", "head_v_dim")

    @property
    def ops(self):
        return {name: self.spec for name in self.op_names}

    def model_class(self):
        cls = getattr(importlib.import_module(self.layer_module), self.model_class_name)
        compat.install(self.support_patches())
        return cls

    def _layer_cls(self):
        return getattr(importlib.import_module(self.layer_module), self.layer_class)

    def support_patches(self):
        import importlib.util

        if importlib.util.find_spec("fla") is None:
            return []  # transformers' own torch fallbacks already run on CPU
        from mc_retrofit.adapters.fla import cpu as fla_cpu

        return [*fla_cpu.patches(),
                *(fla_cpu.route(self.layer_module, name, self.cpu_ref, group=self.family) for name in self.op_names)]

    cache_names = ("cache", "past_key_values")  # the model; its linear mixers: the default names
    mixer_cache_names = ("cache", "cache_params")

    def state_dims(self, mixer):
        return tuple(getattr(mixer, name) for name in self.mixer_dims)

    def recurrent_layers(self, config):
        # hybrid: only the linear-attention layers are recurrent
        return [i for i, kind in enumerate(config.layer_types) if kind == "linear_attention"]

    def state_info(self, config):
        heads, k, v = (getattr(config, name) for name in self.dims)
        return StateInfo(shapes=[(heads, k, v)], bytes_per_element=4, key_dim=k, heads=heads)


class Qwen3NextAdapter(GdnHybridAdapter):
    family = "qwen3_next"
    model_types = ("qwen3_next",)
    description = "GDN layers only: query l2norm(q_t) per value group; read K^-1/2 q_t^T S_i before the gated norm"
    layer_module = "transformers.models.qwen3_next.modeling_qwen3_next"
    layer_class = "Qwen3NextGatedDeltaNet"
    model_class_name = "Qwen3NextForCausalLM"
