"""Jamba (transformers ``JambaForCausalLM``): Mamba layers (``JambaMambaMixer``) with attention
every ``attn_layer_period`` layers, MLP or MoE after each. Memory Caching wraps the Mamba layers
only, through the module's own copies of the Mamba scans; query, key summary and read as
Mamba's (``mamba.py``). Jamba RMS-normalises ``dt``, ``B`` and ``C`` before the scan: the query
and keys are the normalised ones."""
from __future__ import annotations

from .mamba import MambaScanAdapter


class JambaAdapter(MambaScanAdapter):
    family = "jamba"
    model_types = ("jamba",)
    op_module = "transformers.models.jamba.modeling_jamba"
    model_class_name = "JambaForCausalLM"
    mixer_class_name = "JambaMambaMixer"

    def ssm_dims(self, config):
        return config.mamba_expand * config.hidden_size, config.mamba_d_state
