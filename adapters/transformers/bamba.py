"""Bamba (transformers ``BambaForCausalLM``): Mamba2 layers (``BambaMixer``) between attention
layers (``attn_layer_indices``). Memory Caching wraps the Mamba2 layers only, through the
module's own copies of the Mamba2 scans; query, key summary and read as Mamba2's (``mamba2.py``)."""
from __future__ import annotations

from .mamba2 import Mamba2ScanAdapter


class BambaAdapter(Mamba2ScanAdapter):
    family = "bamba"
    model_types = ("bamba",)
    op_module = "transformers.models.bamba.modeling_bamba"
    model_class_name = "BambaForCausalLM"
    mixer_class_name = "BambaMixer"
    state_fields = ("mamba_n_heads", "mamba_d_head", "mamba_d_state")
