"""Falcon-Mamba (transformers ``FalconMambaForCausalLM``): Mamba with RMS-normalised ``dt``,
``B`` and ``C`` before the scan (so the query and keys are the normalised ones), every layer
recurrent. Memory Caching wraps the module's own copies of the Mamba scans; query, key summary
and read as Mamba's (``mamba.py``)."""
from __future__ import annotations

from .mamba import MambaScanAdapter


class FalconMambaAdapter(MambaScanAdapter):
    family = "falcon_mamba"
    model_types = ("falcon_mamba",)
    op_module = "transformers.models.falcon_mamba.modeling_falcon_mamba"
    model_class_name = "FalconMambaForCausalLM"
    mixer_class_name = "FalconMambaMixer"
