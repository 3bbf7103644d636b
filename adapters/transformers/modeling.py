"""What the transformers families wrapped at their modeling module share: the module that
holds the model class, the mixer class and the scan ops, named once per family.

The hybrids (Bamba, Falcon-H1, Nemotron-H, Granite 4, Zamba2, Jamba) keep their own copy of
the Mamba/Mamba2 scan functions as module globals of ``transformers.models.<name>.modeling_<name>``,
so a family is its module, its causal-LM class, its Mamba mixer class and its config's
names; the op wrappers are Mamba2's or Mamba's (``mamba2.py``, ``mamba.py``).
"""
from __future__ import annotations

import importlib

from mc_retrofit.adapters.base import Adapter

# ``config.layer_types`` entries whose layer holds a Mamba mixer: transformers names a Mamba
# layer "linear_attention" (the hybrids' legacy "mamba" is remapped to it), and a layer with
# a Mamba mixer next to (Falcon-H1) or after (Zamba2) an attention block "hybrid".
RECURRENT_KINDS = ("linear_attention", "hybrid")


class ModuleMixerAdapter(Adapter):
    """A family whose model class, mixer class and ops live in one modeling module
    (``op_module``). Its recurrent layers are the mixers of ``mixer_class_name``, each under its
    own ``layer_idx`` (the index its cache layer has); every other layer (attention, MLP, MoE)
    is left as it is."""

    model_class_name: str = ""
    mixer_class_name: str = ""
    # The model forward takes the cache as ``cache`` (5.24) or, before, ``cache_params``
    # (pure Mamba/Mamba2) or ``past_key_values`` (the hybrids); mixers as ``cache``/``cache_params``.
    cache_names = ("cache", "cache_params", "past_key_values")

    def _module(self):
        return importlib.import_module(self.op_module)

    def model_class(self):
        return getattr(self._module(), self.model_class_name)

    def mixers(self, model):
        cls = getattr(self._module(), self.mixer_class_name)
        found = [(m.layer_idx, m) for m in model.modules() if isinstance(m, cls)]
        return sorted(found, key=lambda pair: pair[0])

    def recurrent_layers(self, config):
        return [i for i, kind in enumerate(config.layer_types) if kind in RECURRENT_KINDS]
