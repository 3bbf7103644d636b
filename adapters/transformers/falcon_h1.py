"""Falcon-H1 (transformers ``FalconH1ForCausalLM``): every layer runs a Mamba2 mixer
(``FalconH1Mixer``) and an attention block side by side on the same input. Memory Caching
wraps the Mamba2 half of each layer (the attention half is untouched), through the module's
own copies of the Mamba2 scans. The mixer scales its input (``ssm_in_multiplier``) and its
projections (``mup_vector``) before the scan, so the query ``C_t`` and keys ``B_t`` are the
scaled ones. With ``mamba_rms_norm=False`` it has no gated norm: the chunk form multiplies by
``silu(z)`` after the scan and the one-token form hands ``z`` to the op; the read goes in
before that gate either way."""
from __future__ import annotations

from .mamba2 import Mamba2ScanAdapter


class FalconH1Adapter(Mamba2ScanAdapter):
    family = "falcon_h1"
    model_types = ("falcon_h1",)
    description = ("Mamba2 half of every layer: query C_t; key summary mean B_t; read S_i C_t before the D skip "
                   "and the gated norm (or silu(z))")
    op_module = "transformers.models.falcon_h1.modeling_falcon_h1"
    model_class_name = "FalconH1ForCausalLM"
    mixer_class_name = "FalconH1Mixer"
    state_fields = ("mamba_n_heads", "mamba_d_head", "mamba_d_state")
