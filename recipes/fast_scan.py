"""A training-speed fix for transformers' Mamba (v1) on CPU, same math as the stock op.

Without ``mamba_ssm``, ``MambaMixer`` runs ``mamba_selective_scan``'s sequential loop, which
indexes ``discrete_A[:, :, t]`` at each step. Autograd turns every such index into a full-size
zero gradient, so the backward pass is quadratic in the sequence length (25 s for 8 x 128
bytes on one core). ``sequential_scan`` runs the same recurrence over ``unbind`` views, whose
backward is a single stack. ``patched()`` swaps it in while training; the saved checkpoint is
an ordinary ``MambaForCausalLM`` (tests compare it with the stock op).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def sequential_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                    return_last_state=False, **_):
    """``transformers.models.mamba.modeling_mamba.mamba_selective_scan`` (recurrent path)."""
    batch, inner, seq_len = hidden_states.shape
    dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    discrete_a = torch.exp(A[None, :, None, :] * dt[:, :, :, None])  # [b, d, l, n]
    delta_bu = dt[:, :, :, None] * B.transpose(1, 2)[:, None, :, :].float() * hidden_states[:, :, :, None].float()
    state = torch.zeros(batch, inner, A.shape[-1], dtype=dtype, device=hidden_states.device)
    outs = []
    for a_t, bu_t, c_t in zip(discrete_a.unbind(2), delta_bu.unbind(2), C.unbind(2)):
        state = a_t * state + bu_t
        outs.append(torch.einsum("bdn,bn->bd", state.to(dtype), c_t))
    out = torch.stack(outs, dim=-1)
    if D is not None:
        out = out + hidden_states * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    return (out, state) if return_last_state else out


@contextlib.contextmanager
def patched():
    """Use ``sequential_scan`` inside transformers' Mamba while the block runs."""
    from transformers.models.mamba import modeling_mamba as mm

    old = mm.mamba_selective_scan
    mm.mamba_selective_scan = sequential_scan
    try:
        yield
    finally:
        mm.mamba_selective_scan = old
