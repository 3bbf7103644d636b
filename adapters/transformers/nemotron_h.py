"""Nemotron-H (transformers ``NemotronHForCausalLM``): a stack of single-mixer blocks, each
Mamba2 (``NemotronHMamba2Mixer``), attention, MLP or MoE (``config.layer_types``). Memory
Caching wraps the Mamba2 blocks only, through the module's own copies of the Mamba2 scans;
query, key summary and read as Mamba2's (``mamba2.py``)."""
from __future__ import annotations

from .mamba2 import Mamba2ScanAdapter


class NemotronHAdapter(Mamba2ScanAdapter):
    family = "nemotron_h"
    model_types = ("nemotron_h",)
    op_module = "transformers.models.nemotron_h.modeling_nemotron_h"
    model_class_name = "NemotronHForCausalLM"
    mixer_class_name = "NemotronHMamba2Mixer"
    state_fields = ("mamba_num_heads", "mamba_head_dim", "ssm_state_size")
