"""Zamba2 (transformers ``Zamba2ForCausalLM``): every layer is a Mamba2 layer
(``Zamba2MambaMixer``); the "hybrid" ones first run a shared attention block whose output is
added to the Mamba2 layer's input. Memory Caching wraps every Mamba2 mixer (the shared
attention blocks are untouched), through the module's own copies of the Mamba2 scans; query,
key summary and read as Mamba2's (``mamba2.py``)."""
from __future__ import annotations

from .mamba2 import Mamba2ScanAdapter


class Zamba2Adapter(Mamba2ScanAdapter):
    family = "zamba2"
    model_types = ("zamba2",)
    op_module = "transformers.models.zamba2.modeling_zamba2"
    model_class_name = "Zamba2ForCausalLM"
    mixer_class_name = "Zamba2MambaMixer"
    state_fields = ("n_mamba_heads", "mamba_headdim", "mamba_d_state")
