"""Granite 4 (transformers ``GraniteMoeHybridForCausalLM``): Mamba2 layers
(``GraniteMoeHybridMambaLayer``) and attention layers (``config.layer_types``), each followed by
a (MoE) MLP. Memory Caching wraps the Mamba2 layers only, through the module's own copies of
the Mamba2 scans; query, key summary and read as Mamba2's (``mamba2.py``)."""
from __future__ import annotations

from .mamba2 import Mamba2ScanAdapter


class GraniteMoeHybridAdapter(Mamba2ScanAdapter):
    family = "granitemoehybrid"
    model_types = ("granitemoehybrid",)
    op_module = "transformers.models.granitemoehybrid.modeling_granitemoehybrid"
    model_class_name = "GraniteMoeHybridForCausalLM"
    mixer_class_name = "GraniteMoeHybridMambaLayer"
    state_fields = ("mamba_n_heads", "mamba_d_head", "mamba_d_state")
