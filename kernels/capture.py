"""Boundary-state capture in one pass: the recurrent state at the end of every segment.

The segment loop (``mc_retrofit.segments``) calls the family's op once per segment to obtain
each boundary state. These functions give all of them from one call instead:

- ``linear_boundary_states`` (torch, any device): gated linear recurrences
  ``S_t = diag(a_t) S_{t-1} diag(b_t) + k_t v_t^T`` with ``a_t = exp(g_t + gk_t)``,
  ``b_t = exp(gv_t)`` (RetNet/GLA/RWKV-6-style decays, natural log). Within-segment
  sums are one batched einsum over all segments; only the N-step scan across segments
  is sequential.
  (Mamba2's SSM is a special case: ``mc_retrofit.adapters.transformers.mamba2``.)
- ``fla_boundary_states`` (CUDA only): fla's own ``chunk_fwd_h`` with
  ``split_size = segment_size`` returns the state at the start of every split, i.e. every
  segment boundary, in one kernel (segment size must be a multiple of the chunk size).
- ``gated_linear_boundary_states``: the one the fla adapters call (GLA, RetNet, RWKV-6):
  ``fla_boundary_states`` where it applies, ``linear_boundary_states`` elsewhere.

The delta rules (DeltaNet, Gated DeltaNet, RWKV-7) capture on CPU through the recording
chunkwise forms of ``mc_retrofit.adapters.fla.chunk``; on CUDA they keep the per-segment loop
(a capture through fla's delta-rule state kernels was never verified on a GPU, so it is not here).

Each returns ``boundaries [B, N, H, ...]`` with N = T // segment_size (the segments that
end inside the call; a call ending exactly on a boundary includes that state) and the
final state after the last token. The CUDA path is unverified without a GPU (tests
marked ``gpu`` compare it with the torch reference).
"""
from __future__ import annotations

import torch

from mc_retrofit.errors import MCError


def _segments(x: torch.Tensor, C: int, n_seg: int):
    """``[B, T, ...]`` -> ``[B, n_seg, C, ...]``, zero-padded (zero keys and zero log
    decays leave a state unchanged, so padding does not alter the last state)."""
    B, T = x.shape[:2]
    pad = n_seg * C - T
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], 1)
    return x.view(B, n_seg, C, *x.shape[2:])


def linear_boundary_states(k, v, *, g=None, gk=None, gv=None, initial_state=None, segment_size: int):
    """Boundary states of ``S_t = diag(exp(g_t + gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T``.

    k ``[B,T,H,K]``, v ``[B,T,H,V]``, g ``[B,T,H]``, gk ``[B,T,H,K]``, gv ``[B,T,H,V]``
    (log decays, any of them None), initial_state ``[B,H,K,V]``. Returns
    ``(boundaries [B, T//C, H, K, V], final [B,H,K,V])`` in fp32.
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = int(segment_size)
    if C < 1:
        raise MCError(f"segment_size must be positive, not {segment_size}")
    n_seg = -(-T // C)
    f = lambda x: None if x is None else x.float()  # noqa: E731
    k, v, g, gk, gv = f(k), f(v), f(g), f(gk), f(gv)
    lk = torch.zeros(B, T, H, K, device=k.device) if gk is None else gk
    if g is not None:
        lk = lk + g[..., None]
    lv = torch.zeros(B, T, H, V, device=k.device) if gv is None else gv
    ks, vs, lks, lvs = (_segments(x, C, n_seg) for x in (k, v, lk, lv))
    ck, cv = lks.cumsum(2), lvs.cumsum(2)  # [B, n, C, H, K|V]
    ek, ev = ck[:, :, -1:], cv[:, :, -1:]  # decay over the whole segment
    # state each segment adds, as seen at its end: sum_t (k_t e^{Gk_end - Gk_t}) (v_t e^{Gv_end - Gv_t})^T
    local = torch.einsum("bnchk,bnchv->bnhkv", ks * torch.exp(ek - ck), vs * torch.exp(ev - cv))
    dk, dv = torch.exp(ek[:, :, 0]), torch.exp(ev[:, :, 0])  # [B, n, H, K|V]
    S = torch.zeros(B, H, K, V, device=k.device) if initial_state is None else initial_state.float()
    out = []
    for i in range(n_seg):
        S = dk[:, i, :, :, None] * S * dv[:, i, :, None, :] + local[:, i]
        out.append(S)
    n_full = T // C
    bounds = torch.stack(out[:n_full], 1) if n_full else S.new_zeros(B, 0, H, K, V)
    return bounds, S


def gated_linear_boundary_states(k, v, *, g=None, gk=None, gv=None, initial_state=None, segment_size: int,
                                 chunk_size: int = 64):
    """:func:`linear_boundary_states`' arguments and result (K-first), on the device's fast
    path: fla's ``chunk_fwd_h`` on CUDA when the segment is a whole number of its chunks,
    the torch form otherwise (any device). Used by the fla adapters' one-pass capture."""
    if k.is_cuda and segment_size % chunk_size == 0:
        bounds, final = fla_boundary_states(k, v, g=g, gk=gk, gv=gv, initial_state=initial_state,
                                            segment_size=segment_size, chunk_size=chunk_size)
        return bounds.float(), final.float()
    return linear_boundary_states(k, v, g=g, gk=gk, gv=gv, initial_state=initial_state, segment_size=segment_size)


def _pick(h, final, T, segment_size):
    """States at split starts ``h [B, NS, ...]`` -> states at the NS' = T // C segment ends."""
    n_full = T // segment_size
    starts = h[:, 1:n_full + 1]  # the start of split i+1 is the end of segment i
    if starts.shape[1] < n_full:  # T is a multiple of C: the last end is the final state
        starts = torch.cat([starts, final[:, None].to(starts.dtype)], 1)
    return starts, final


def fla_boundary_states(k, v, *, g=None, g_gamma=None, gk=None, gv=None, initial_state=None, segment_size: int,
                        chunk_size: int = 64, state_v_first: bool = False):
    """Boundary states through ``fla.ops.common.chunk_h.chunk_fwd_h`` (CUDA; GLA, RetNet,
    RWKV-6, simple GLA, HGRN2 recurrences). Log decays in natural log, as the families'
    naive references take them (converted to fla's base-2 chunk-local cumsums here)."""
    if not k.is_cuda:
        raise MCError("fla_boundary_states needs CUDA tensors; use linear_boundary_states on CPU")
    if segment_size % chunk_size:
        raise MCError(f"segment_size ({segment_size}) must be a multiple of the chunk size ({chunk_size})")
    from fla.ops.common.chunk_h import chunk_fwd_h
    from fla.ops.utils.constant import RCP_LN2
    from fla.ops.utils.cumsum import chunk_local_cumsum

    cum = lambda x: None if x is None else chunk_local_cumsum(x, chunk_size=chunk_size, scale=RCP_LN2)  # noqa: E731
    h, final = chunk_fwd_h(
        k=k, v=v, g=cum(g), g_gamma=None if g_gamma is None else g_gamma * RCP_LN2, gk=cum(gk), gv=cum(gv),
        h0=initial_state, output_final_state=True, state_v_first=state_v_first, chunk_size=chunk_size,
        split_size=segment_size, states_in_fp32=True,
    )
    return _pick(h, final, k.shape[1], segment_size)
