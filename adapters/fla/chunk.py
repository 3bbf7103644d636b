"""Chunkwise forms of fla's recurrences on CPU: training speed, and one-pass boundary capture.

``mc_retrofit.adapters.fla.cpu`` routes fla's chunk ops on CPU to fla's ``naive`` *recurrent* references:
a Python loop over every token, which autograd turns into thousands of tiny nodes (4-8 s per
training step of a 4-layer model at batch 8 x 512 bytes). The same recurrences can be computed
chunk by chunk (the form fla's Triton kernels use): inside a chunk of ``C`` tokens everything
is a few batched matrix products, and only the state is carried from chunk to chunk, so the
Python loop runs ``T / C`` times instead of ``T``.

This module gives drop-in chunkwise versions of the four naive recurrences the fla_cpu
references call (same signature, layout, scaling and returned state):

- ``delta_rule_recurrence`` (DeltaNet) and ``naive_recurrent_gated_delta_rule`` (Gated
  DeltaNet): one gated delta rule with a scalar per-head gate (0 for DeltaNet), the WY form
  with the unit-lower-triangular inverse done by ``torch.linalg.solve_triangular``;
- ``naive_recurrent_gla`` (GLA, and RetNet whose fixed decay fla_cpu feeds as a GLA gate):
  per-key decays, the intra-chunk scores with exact ``exp(G_i - G_j)`` factors (never
  ``exp(G_i) * exp(-G_j)``, which overflows for strong gates);
- ``dplr_recurrence`` (RWKV-7): ``S_t = (diag(e^w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T`` with
  the pseudo-values ``u_t = a_t^T S_{t-1}`` solved per chunk.

:func:`patched` swaps them in for fla's naive recurrences while a block runs, so fla's
layers still go through fla_cpu's *own* references (every argument mapping: scale, l2-norm
flags, gates, GVA, state layout, stays the one fla_cpu has) and only the recurrence inside is
chunkwise. It is used only while training/measuring in ``recipes/``
(``families.speed_context``); the package keeps its references. ``tests/adapters/test_fast_chunk.py``
compares every op and a whole model's loss and gradients with and without it.

:func:`capturing` is the package's use: Memory Caching's one-pass path for the delta-rule
families (DeltaNet, Gated DeltaNet, RWKV-7) runs the layer's op once inside it, and the chunkwise
form, which carries the state from chunk to chunk anyway, also hands over the state at every
segment end (fla_cpu's references call :func:`during_capture` to take the chunkwise form then).
It patches nothing: the request lives in a context variable of the calling thread.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F

from ... import compat

CHUNK = 16  # 16 was fastest on CPU at T = 512 for every family (32 similar; 64 slower)


class Boundaries:
    """The states at the ends of the segments (every ``segment_size`` tokens from the call's
    start) of one chunkwise run, K-first ``[B, H, K, V]`` fp32, in order."""

    def __init__(self, segment_size: int):
        self.segment_size = segment_size
        self.states: list[torch.Tensor] = []
        # a chunk size that divides the segment, so every segment end is a chunk end
        self.chunk = max(c for c in range(1, min(CHUNK, segment_size) + 1) if segment_size % c == 0)

    def after_chunk(self, i: int, C: int, T: int, S: torch.Tensor) -> None:
        end = (i + 1) * C
        if end <= T and end % self.segment_size == 0:
            self.states.append(S)


_CAPTURE: contextvars.ContextVar[Boundaries | None] = contextvars.ContextVar("mc_chunk_capture", default=None)


@contextlib.contextmanager
def capturing(segment_size: int):
    """Inside the block, the fla_cpu references of this thread run their recurrence chunkwise
    and record the state at every segment end into the :class:`Boundaries` yielded."""
    sink = Boundaries(segment_size)
    token = _CAPTURE.set(sink)
    try:
        yield sink
    finally:
        _CAPTURE.reset(token)


def during_capture(naive, chunked):
    """The recurrence a fla_cpu reference runs: ``chunked`` inside :func:`capturing`, else ``naive``."""
    return naive if _CAPTURE.get() is None else chunked


def _chunk_size(C):
    sink = _CAPTURE.get()
    return C or (CHUNK if sink is None else sink.chunk)


def _record(i, C, T, S):
    sink = _CAPTURE.get()
    if sink is not None:
        sink.after_chunk(i, C, T, S)


# -- helpers ---------------------------------------------------------------------------
def _chunked(x, C, pad):
    """[B, H, T, ...] -> [B, H, T/C, C, ...], padding T up to a multiple of C with zeros."""
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(x.shape[0], x.shape[1], -1, C, *x.shape[3:])


def _unit_lower_inverse(A):
    """``(I + A)^{-1}`` for strictly lower-triangular ``A`` [..., C, C] (differentiable)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)


SAFE_SPAN = 60.0  # exp(60) ~ 1e26: far from float32's overflow (~3e38)


def _decayed_scores(x, Gx, y, Gy, strict):
    """``A[i, j] = sum_d x[i, d] y[j, d] exp(Gx[i, d] - Gy[j, d])`` for ``j <= i`` (``j < i``
    when ``strict``), else 0; [..., C, K] inputs, ``G*`` cumulative log decays (<= 0, falling).

    When the decay inside every chunk spans less than ``SAFE_SPAN`` (always for RWKV-7's
    bounded decay at C = 16; GLA unless a gate saturates), the exponent splits into two
    matmul factors ``(x e^{Gx}) (y e^{-Gy})^T``: each valid term is still ``x y e^{Gx - Gy}``
    up to rounding, and ``e^{-Gy} <= e^{span}`` cannot overflow. Otherwise the exact
    [..., C, C, K] broadcast, masked before ``exp``."""
    C = x.shape[-2]
    keep = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    if float(-Gy.detach().amin()) < SAFE_SPAN:
        return ((x * Gx.exp()) @ (y * (-Gy).exp()).transpose(-1, -2)).masked_fill(~keep, 0.0)
    diff = (Gx[..., :, None, :] - Gy[..., None, :, :]).masked_fill(~keep[:, :, None], float("-inf"))
    return (x[..., :, None, :] * y[..., None, :, :] * diff.exp()).sum(-1)


# -- cores (layout [B, H, T, D], q already scaled, fp32) -------------------------------
def gated_delta_core(q, k, v, beta, g, S, C=None):
    """Gated delta rule ``S_t = e^{g_t} S_{t-1} + k_t beta_t (v_t - k_t^T e^{g_t} S_{t-1})^T``,
    ``o_t = q_t^T S_t``; ``g`` [B, H, T] (None: no gate), ``beta`` [B, H, T]."""
    B, H, T, K = q.shape
    C = _chunk_size(C)
    pad = (-T) % C
    if g is None:
        g = q.new_zeros(B, H, T)
    q, k, v = (_chunked(x, C, pad) for x in (q, k, v))
    beta, g = (_chunked(x[..., None], C, pad)[..., 0] for x in (beta, g))  # [B, H, n, C]
    G = g.cumsum(-1)
    keep = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    L = (G[..., :, None] - G[..., None, :]).masked_fill(~keep, float("-inf")).exp()  # [B, H, n, C, C]
    kb = k * beta[..., None]
    Tinv = _unit_lower_inverse((kb @ k.transpose(-1, -2) * L).tril(-1))
    u = Tinv @ (v * beta[..., None])
    w = Tinv @ (kb * G.exp()[..., None])
    attn = q @ k.transpose(-1, -2) * L
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    end = G[..., -1].exp()
    S = q.new_zeros(B, H, K, v.shape[-1]) if S is None else S
    outs = []
    for i in range(q.shape[2]):
        v_new = u[:, :, i] - w[:, :, i] @ S
        outs.append(q_decayed[:, :, i] @ S + attn[:, :, i] @ v_new)
        S = S * end[:, :, i, None, None] + k_to_end[:, :, i].transpose(-1, -2) @ v_new
        _record(i, C, T, S)
    o = torch.stack(outs, 2).reshape(B, H, T + pad, -1)[:, :, :T]
    return o, S


def gla_core(q, k, v, gk, S, C=None):
    """GLA ``S_t = diag(e^{gk_t}) S_{t-1} + k_t v_t^T``, ``o_t = q_t^T S_t``; gk [B, H, T, K]."""
    B, H, T, K = q.shape
    C = _chunk_size(C)
    pad = (-T) % C
    q, k, v, gk = (_chunked(x, C, pad) for x in (q, k, v, gk))
    G = gk.cumsum(-2)
    o_intra = _decayed_scores(q, G, k, G, strict=False) @ v
    q_decayed = q * G.exp()
    k_to_end = k * (G[..., -1:, :] - G).exp()
    end = G[..., -1, :].exp()
    S = q.new_zeros(B, H, K, v.shape[-1]) if S is None else S
    outs = []
    for i in range(q.shape[2]):
        outs.append(o_intra[:, :, i] + q_decayed[:, :, i] @ S)
        S = S * end[:, :, i, :, None] + k_to_end[:, :, i].transpose(-1, -2) @ v[:, :, i]
        _record(i, C, T, S)
    o = torch.stack(outs, 2).reshape(B, H, T + pad, -1)[:, :, :T]
    return o, S


def dplr_core(q, k, v, a, b, gk, S, C=None):
    """DPLR ``S_t = diag(e^{gk_t}) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``, ``o_t = q_t^T S_t``.

    With the pseudo-values ``u_t = a_t^T S_{t-1}`` the state is a GLA over two sources (k with
    v, b with u); inside a chunk ``u = (I - A_ab)^{-1} (A_ak v + (a e^{G_{t-1}}) S_0)``."""
    B, H, T, K = q.shape
    C = _chunk_size(C)
    pad = (-T) % C
    q, k, v, a, b, gk = (_chunked(x, C, pad) for x in (q, k, v, a, b, gk))
    G = gk.cumsum(-2)
    G_before = G - gk  # decay up to (not including) each token
    A_qk, A_qb = _decayed_scores(q, G, k, G, False), _decayed_scores(q, G, b, G, False)
    A_ak, A_ab = _decayed_scores(a, G_before, k, G, True), _decayed_scores(a, G_before, b, G, True)
    Tinv = _unit_lower_inverse(-A_ab)
    u0 = Tinv @ (A_ak @ v)
    w = Tinv @ (a * G_before.exp())
    o_known = A_qk @ v + A_qb @ u0
    q_decayed = q * G.exp()
    to_end = (G[..., -1:, :] - G).exp()
    k_to_end, b_to_end = k * to_end, b * to_end
    end = G[..., -1, :].exp()
    S = q.new_zeros(B, H, K, v.shape[-1]) if S is None else S
    outs = []
    for i in range(q.shape[2]):
        wS = w[:, :, i] @ S  # the part of u that depends on the chunk's initial state
        outs.append(o_known[:, :, i] + A_qb[:, :, i] @ wS + q_decayed[:, :, i] @ S)
        u = u0[:, :, i] + wS
        S = (S * end[:, :, i, :, None] + k_to_end[:, :, i].transpose(-1, -2) @ v[:, :, i]
             + b_to_end[:, :, i].transpose(-1, -2) @ u)
        _record(i, C, T, S)
    o = torch.stack(outs, 2).reshape(B, H, T + pad, -1)[:, :, :T]
    return o, S


# -- drop-in replacements of fla's naive recurrences (same signature, layout, scaling) ----
def _init(initial_state):
    return None if initial_state is None else initial_state.float()


def delta_rule_chunked(q, k, v, beta, initial_state=None, output_final_state=True, *, recurrent=None):
    """``fla.ops.delta_rule.naive.delta_rule_recurrence`` ([B, H, T, D], q scaled by D^-1/2).
    ``recurrent``: the recurrent original, for a per-channel beta (not chunkwise here)."""
    if beta.dim() == v.dim():  # a per-channel beta: keep the recurrent reference
        if recurrent is None:
            from fla.ops.delta_rule.naive import delta_rule_recurrence as recurrent
        return recurrent(q, k, v, beta, initial_state, output_final_state)
    dtype = q.dtype
    q, k, v, beta = (x.float() for x in (q, k, v, beta))
    o, S = gated_delta_core(q * q.shape[-1] ** -0.5, k, v, beta, None, _init(initial_state))
    return o.to(dtype), (S if output_final_state else None)


def gated_delta_rule_chunked(q, k, v, beta, g, scale=None, initial_state=None, output_final_state=False, *, recurrent=None):
    """``fla.ops.gated_delta_rule.naive.naive_recurrent_gated_delta_rule`` ([B, T, H, D])."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, beta, g = (x.transpose(1, 2).float() for x in (q, k, v, beta, g))
    o, S = gated_delta_core(q * scale, k, v, beta, g, _init(initial_state))
    return o.transpose(1, 2).contiguous(), (S if output_final_state else None)


def gla_chunked(q, k, v, gk, initial_state=None, output_final_state=False, *, recurrent=None):
    """``fla.ops.gla.naive.naive_recurrent_gla`` ([B, T, H, K], q scaled by K^-1/2)."""
    dtype = q.dtype
    q, k, v, gk = (x.transpose(1, 2).float() for x in (q, k, v, gk))
    o, S = gla_core(q * q.shape[-1] ** -0.5, k, v, gk, _init(initial_state))
    return o.transpose(1, 2).to(dtype), (S if output_final_state else None)


def dplr_chunked(q, k, v, alpha, beta, gk, initial_state=None, output_final_state=True, *, recurrent=None):
    """``fla.ops.generalized_delta_rule.dplr.naive.dplr_recurrence`` ([B, H, T, D], q scaled
    by D^-1/2; ``alpha`` reads the state, ``beta`` writes it back)."""
    dtype = q.dtype
    q, k, v, alpha, beta, gk = (x.float() for x in (q, k, v, alpha, beta, gk))
    o, S = dplr_core(q * q.shape[-1] ** -0.5, k, v, alpha, beta, gk, _init(initial_state))
    return o.to(dtype), (S if output_final_state else None)


def kda_chunked(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """``fla.ops.kda.naive.naive_recurrent_kda`` ([B, T, H, K], v [B, T, HV, V]; GVA) as a DPLR
    recurrence: ``S_t = D_t S - beta_t k_t ((k_t e^{g_t})^T S) + beta_t k_t v_t^T`` with
    ``D_t = diag(e^{g_t})``, i.e. ``a = -k e^g``, ``b = beta k`` and key ``beta k``."""
    HV = v.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = (x.float().repeat_interleave(HV // x.shape[2], dim=2) for x in (q, k))
    q, k, v, g = (x.transpose(1, 2).float() for x in (q, k, v, g))
    bk = k * beta.transpose(1, 2).float()[..., None]
    o, S = dplr_core(q * scale, bk, v, -(k * g.exp()), bk, g, _init(initial_state))
    return o.transpose(1, 2).contiguous(), (S if output_final_state else None)


def gdn2_chunked(q, k, v, g, b, w, scale=None, initial_state=None, output_final_state=False):
    """``fla.ops.gdn2.naive.naive_recurrent_gdn2`` ([B, T, H, D]) as a DPLR recurrence:
    ``S_t = D_t S - k_t ((b_t k_t e^{g_t})^T S) + k_t (w_t v_t)^T``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, b, w = (x.transpose(1, 2).float() for x in (q, k, v, g, b, w))
    o, S = dplr_core(q * scale, k, w * v, -(b * k * g.exp()), k, g, _init(initial_state))
    return o.transpose(1, 2).contiguous(), (S if output_final_state else None)


# (module holding the naive recurrence, its name, chunkwise replacement)
NAIVE = (
    ("fla.ops.delta_rule.naive", "delta_rule_recurrence", delta_rule_chunked),
    ("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule", gated_delta_rule_chunked),
    ("fla.ops.gla.naive", "naive_recurrent_gla", gla_chunked),
    ("fla.ops.generalized_delta_rule.dplr.naive", "dplr_recurrence", dplr_chunked),
)


def _fast(fast):
    def make(current):  # the recurrent original stays reachable for what the chunkwise form skips
        return functools.partial(fast, recurrent=current)

    return make


# While training or measuring on CPU only (recipes/): declared in the one registry like every
# other foreign symbol mc-retrofit replaces, and installed just for a block.
FAST_PATCHES = tuple(
    compat.Patch(module, name, _fast(fast), layer="fla-cpu", group="fla-chunk",
                 why="chunkwise form of fla's naive recurrence, for CPU training and measuring (same math)")
    for module, name, fast in NAIVE
)


@contextlib.contextmanager
def patched():
    """Inside the block, fla_cpu's references run their recurrences chunkwise.

    fla_cpu's references import fla's naive recurrence at call time, so swapping the four
    names in fla's ``naive`` modules reroutes every fla layer (with or without Memory Caching
    wrapped around it) while the block runs; on exit the recurrent ones are back."""
    with compat.temporarily(FAST_PATCHES):
        yield
