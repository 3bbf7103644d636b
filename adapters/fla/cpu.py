"""Run flash-linear-attention (fla) models on CPU: route fla's Triton leaf ops to PyTorch.

fla's layers call Triton kernels for everything (norms, short convolution, rotary,
token shift, activations, the recurrences), and Triton has no CPU driver, so an fla
model cannot run on CPU at all. :func:`enable` puts a device check in front of each
of those leaf ops: **CPU tensors go to a PyTorch reference** (fla's own where it ships
one: ``group_norm_ref``, ``rotary_embedding_ref``, ``token_shift_ref``,
``gate_output_correction_ref``, ``k_update_ref``, ``torch_addcmul_rwkv7``,
``naive_gdn_gate``, and the ``naive`` recurrences of ``fla.ops.*``), while **GPU
tensors go to the untouched Triton op**. fla's layer code itself is not changed.

Where a leaf op is patched, and why there:
- ``torch.autograd.Function`` leaf ops (norms, l2norm, token shift, convolution,
  rotary, activations, RWKV-7's fused helpers): their ``apply`` attribute, looked up
  at call time by every public wrapper, so one patch covers every importer.
- plain functions called from inside fla's own modules (``causal_conv1d_update``):
  the defining module's global.
- the recurrences: the names each fla layer module imported
  (``fla.layers.gla.chunk_gla`` ...), the same names Memory Caching wraps. The routing is
  the "fla-cpu" layer of ``mc_retrofit.compat``'s registry, below the "mc" layer, so the
  MC wrapper's "original op" is this device-dispatching op (the registry installs the
  lower layer first and refuses the other order).

Every replacement is a ``compat.Patch`` (:func:`patches` lists them); it stays installed
while the process may run an fla model and goes with ``compat.uninstall_patches()``.
The references compute in fp32 and return the input dtype, like the kernels. They were
written for (and are guarded to) fla ``compat.PATCH_WINDOWS``: fla moves fast and its op
signatures change between minor versions, so another version is refused with one line.
"""
from __future__ import annotations

import importlib
import inspect
import math

import torch
import torch.nn.functional as F

from ... import compat
from ...errors import MCError

FLA = "flash-linear-attention"


def check_version(version: str | None = None) -> str:
    """The installed (or given) fla version, or a one-line MCError when it is outside the
    range the routing was written for (``compat.PATCH_WINDOWS``)."""
    return compat.check_window(FLA, compat.PATCH_WINDOWS[FLA], version)


# -- dispatch ------------------------------------------------------------------------
def _first_tensor(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _on_cpu(args, kwargs) -> bool:
    t = _first_tensor(args, kwargs)
    return t is not None and t.device.type == "cpu"


def _dispatching(original, ref, split=False):
    def op(*args, **kwargs):
        if _on_cpu(args, kwargs):
            return per_sequence(ref, args, kwargs) if split else ref(*args, **kwargs)
        return original(*args, **kwargs)

    op.__mc_cpu_original__ = original
    op.__mc_cpu_ref__ = ref
    op.__name__ = getattr(original, "__name__", "op")
    op.__doc__ = getattr(original, "__doc__", None)
    return op


def _resolve(ref):
    """A reference function, or fla's own given as ``"module:name"`` (imported at install)."""
    if isinstance(ref, str):
        module_name, _, name = ref.partition(":")
        return getattr(importlib.import_module(module_name), name)
    return ref


def per_sequence(ref, args, kwargs):
    """``ref(*args, **kwargs)``, where a ``cu_seqlens`` call (sequences packed into batch 1, as
    fla's layers pass a padded batch) runs each sequence alone from its own ``initial_state[i]``:
    the references are written for ``[B, T, ...]`` batches. ``ref`` returns (output, final state)."""
    sig = inspect.signature(ref)
    call = {}
    for name, value in sig.bind(*args, **kwargs).arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        else:
            call[name] = value
    cu = call.pop("cu_seqlens", None)
    if cu is None:
        return ref(**call)
    bounds = [int(b) for b in cu.tolist()]
    init, want = call.pop("initial_state", None), bool(call.pop("output_final_state", False))
    timed = [n for n, t in call.items()
             if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == (1, bounds[-1])]
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        start = None if init is None else init[i:i + 1]
        if a == b:  # a row that is all padding in this call: no output, its state unchanged
            finals.append(start)
            continue
        piece = {**call, **{n: call[n][:, a:b] for n in timed}}
        o, final = ref(**piece, initial_state=start, output_final_state=True)
        outs.append(o)
        finals.append(final)
    if not outs:
        raise MCError("fla CPU routing: a variable-length (cu_seqlens) call without any token")
    if not want:
        return torch.cat(outs, 1), None
    like = next(f for f in finals if f is not None)  # a state that started and stayed empty is zero
    return torch.cat(outs, 1), torch.cat([like.new_zeros(like.shape) if f is None else f.to(like.dtype)
                                          for f in finals], 0)


def route(owner: str, name: str, ref, group: str = "fla-cpu", split: bool = False) -> compat.Patch:
    """The "fla-cpu" patch putting a device check in front of ``owner.name``: CPU tensors go
    to ``ref``, others to the op it replaces. On a class (an autograd Function's ``apply``,
    which the class inherits) the dispatcher is a staticmethod; uninstall deletes it again.
    ``split``: ``ref`` takes variable-length calls sequence by sequence (:func:`per_sequence`)."""

    def make(current):
        op = _dispatching(current, _resolve(ref), split)
        return staticmethod(op) if ":" in owner else op

    what = ref if isinstance(ref, str) else ref.__name__
    return compat.Patch(owner, name, make, layer="fla-cpu", group=group,
                        why=f"Triton has no CPU driver: CPU tensors run the PyTorch reference {what}")


# -- norms ---------------------------------------------------------------------------
def _norm_core(x, weight, bias, num_groups, eps, is_rms_norm):
    """fp32 (group/layer/RMS) norm of ``x`` over its last dim split into groups."""
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], num_groups, shape[-1] // num_groups)
    if not is_rms_norm:
        xf = xf - xf.mean(-1, keepdim=True)
    y = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).reshape(shape)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def layer_norm_apply_ref(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False,
                         is_rms_norm=False, num_groups=1):
    """``LayerNormFunction.apply`` (LayerNorm, RMSNorm, GroupNorm) on CPU; the math of
    fla's ``group_norm_ref`` with the kernel's fp32 compute and residual dtypes."""
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    xs = x.float() + residual.float() if residual is not None else x.float()
    y = _norm_core(xs, weight, bias, num_groups, eps, is_rms_norm).to(x.dtype)
    return (y, xs.to(res_dtype)) if prenorm else y


def layer_norm_gated_apply_ref(x, g, weight, bias, activation, residual=None, eps=1e-6, prenorm=False,
                               residual_in_fp32=False, is_rms_norm=False):
    """``LayerNormGatedFunction.apply`` (FusedRMSNormGated ...) on CPU: norm, then the
    swish or sigmoid output gate, as the kernel does."""
    res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    xs = x.float() + residual.float() if residual is not None else x.float()
    y = _norm_core(xs, weight, bias, 1, eps, is_rms_norm)
    gf = g.float()
    if activation in ("swish", "silu"):
        y = y * gf * torch.sigmoid(gf)
    elif activation == "sigmoid":
        y = y * torch.sigmoid(gf)
    else:
        raise MCError(f"fla CPU routing: gated norm activation {activation!r} is not supported")
    y = y.to(x.dtype)
    return (y, xs.to(res_dtype)) if prenorm else y


def l2norm_apply_ref(x, eps=1e-6, output_dtype=None):
    """``L2NormFunction.apply``: ``x / sqrt(sum x^2 + eps)`` in fp32 (the kernel's form)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


# -- token shift, short convolution, rotary -------------------------------------------
def token_shift_apply_ref(x, cu_seqlens=None, cache=None, output_cache=False, chunk_indices=None):
    """``TokenShift.apply``: ``delta_t = x_{t-1} - x_t`` with ``x_{-1}`` from ``cache``
    (zeros without one); returns (delta, last token as the next cache or None)."""
    if cu_seqlens is not None:
        if cache is not None or output_cache:
            raise MCError("fla CPU routing: token shift with cu_seqlens and a cache is not supported on CPU")
        from fla.modules.token_shift import token_shift_ref

        return token_shift_ref(x, cu_seqlens), None
    prev = torch.zeros_like(x[:, :1]) if cache is None else cache.reshape(x.shape[0], 1, x.shape[-1]).to(x.dtype)
    shifted = torch.cat([prev, x[:, :-1]], 1)
    return shifted - x, (x[:, -1].clone() if output_cache else None)


def _conv_act(y, activation):
    if activation in ("swish", "silu"):
        return F.silu(y)
    if activation is None:
        return y
    raise MCError(f"fla CPU routing: convolution activation {activation!r} is not supported")


def causal_conv1d_apply_ref(x, weight, bias=None, residual=None, initial_state=None, output_final_state=False,
                            activation=None, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None):
    """``CausalConv1dFunction.apply``: depthwise causal conv over time, ``weight [D, W]``,
    left context from ``initial_state [N, D, W]`` (the last W inputs, newest last)."""
    if cu_seqlens is not None:
        raise MCError("fla CPU routing: variable-length (cu_seqlens) convolution is not supported on CPU")
    B, T, D = x.shape
    W = weight.shape[-1]
    xt = x.float().transpose(1, 2)  # [B, D, T]
    past = xt.new_zeros(B, D, W) if initial_state is None else initial_state.float()
    full = torch.cat([past, xt], -1)  # [B, D, W + T]
    y = F.conv1d(full[..., 1:], weight.float()[:, None], bias.float() if bias is not None else None, groups=D)
    y = _conv_act(y, activation).transpose(1, 2)
    if residual is not None:
        y = y + residual.float()
    final = full[..., -W:].to(x.dtype).contiguous() if output_final_state else None
    return y.to(x.dtype), final


def causal_conv1d_update_ref(x, cache, residual=None, weight=None, bias=None, activation=None):
    """``causal_conv1d_update`` (one token per sequence): shifts ``cache`` **in place**
    like the decode kernel and returns (y, cache)."""
    shape = x.shape
    D = cache.shape[1]
    xs = x.reshape(-1, D)
    new = torch.cat([cache[..., 1:].float(), xs.float()[..., None]], -1)
    y = (new * weight.float()).sum(-1) if weight is not None else new.sum(-1)
    if bias is not None:
        y = y + bias.float()
    y = _conv_act(y, activation)
    if residual is not None:
        y = y + residual.reshape(-1, D).float()
    cache.copy_(new.to(cache.dtype))
    return y.to(x.dtype).view(shape), cache


def rotary_apply_ref(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     chunk_indices=None):
    """``RotaryEmbeddingFunction.apply`` through fla's ``rotary_embedding_ref``; x
    ``[B, T, H, D]``, cos/sin ``[seqlen, rotary_dim / 2]`` indexed from ``seqlen_offsets``."""
    from fla.modules.rotary import rotary_embedding_ref

    if cu_seqlens is not None:  # packed sequences (a padded batch unpadded by its mask), each from its own offset
        bounds = [int(b) for b in cu_seqlens.tolist()]
        offsets = (seqlen_offsets.tolist() if isinstance(seqlen_offsets, torch.Tensor)
                   else [seqlen_offsets] * (len(bounds) - 1))
        y = torch.cat([rotary_apply_ref(x[:, a:b], cos, sin, interleaved, False, int(o))
                       for a, b, o in zip(bounds[:-1], bounds[1:], offsets)], 1)
        return x.copy_(y) if inplace else y
    B, T = x.shape[:2]
    if isinstance(seqlen_offsets, torch.Tensor):
        idx = seqlen_offsets.to(cos.device).long()[:, None] + torch.arange(T, device=cos.device)[None]  # [B, T]
        c, s = cos[idx], sin[idx]  # [B, T, d]
    else:
        c, s = cos[seqlen_offsets:seqlen_offsets + T], sin[seqlen_offsets:seqlen_offsets + T]
    y = rotary_embedding_ref(x.float(), c.float(), s.float(), interleaved).to(x.dtype)
    if inplace:
        x.copy_(y)
        return x
    return y


# -- activations ----------------------------------------------------------------------
# fla binds its activations at import (``swish = SwishFunction.apply``), so they are
# routed one level down: the ``*_fwd`` / ``*_bwd`` helpers each Function's forward and
# backward look up in ``fla.modules.activations.ops`` at call time (for the gated MLP's
# SwiGLU / SigmoidGLU, whose backward is one fused ``*glu_fwdbwd``, that one too).
def _f32(fn):
    def ref(x, *rest, **kwargs):
        return fn(x.float(), *(r.float() if isinstance(r, torch.Tensor) else r for r in rest), **kwargs).to(x.dtype)

    return ref


_ACT_FWD = {
    "sigmoid_fwd": lambda x, output_contiguous=False: torch.sigmoid(x),
    "elu_p1_fwd": lambda x: F.elu(x) + 1.0,
    "logsigmoid_fwd": lambda x, temperature=1.0, output_contiguous=False: F.logsigmoid(x) / temperature,
    "swish_fwd": lambda x, output_contiguous=False: F.silu(x),
    "sqrelu_fwd": lambda x: F.relu(x).square(),
    "swiglu_fwd": lambda x, y, output_contiguous=False: F.silu(x) * y,
    "sigmoidglu_fwd": lambda x, y, output_contiguous=False: torch.sigmoid(x) * y,
}


def _grad_of(fwd):
    """``*_bwd(x, dy, ...)`` of a one-input activation, by autograd through its reference."""

    def bwd(x, dy, *args, **kwargs):
        kwargs.pop("output_contiguous", None)
        with torch.enable_grad():
            xr = x.detach().float().requires_grad_(True)
            (dx,) = torch.autograd.grad(fwd(xr, *args, **kwargs), xr, dy.float())
        return dx.to(x.dtype)

    return bwd


def _glu_fwdbwd(act):
    """``swiglu_fwdbwd`` / ``sigmoidglu_fwdbwd(x, y, g, use_weight)``: the gradients of
    ``act(x) * y`` by autograd through the reference (and the product itself when
    ``use_weight``), fp32 inside. The gated MLP's backward calls it: training needs it."""

    def fwdbwd(x, y, g, use_weight=False, output_contiguous=False):
        with torch.enable_grad():
            xr, yr = x.detach().float().requires_grad_(True), y.detach().float().requires_grad_(True)
            z = act(xr) * yr
            dx, dy = torch.autograd.grad(z, (xr, yr), g.float())
        out = (dx.to(x.dtype), dy.to(y.dtype))
        return out + (z.detach().to(x.dtype),) if use_weight else out

    return fwdbwd


ACTIVATION_REFS = {name: _f32(fn) for name, fn in _ACT_FWD.items()}
ACTIVATION_REFS.update({
    "sigmoid_bwd": _grad_of(_ACT_FWD["sigmoid_fwd"]),
    "elu_p1_bwd": _grad_of(_ACT_FWD["elu_p1_fwd"]),
    "logsigmoid_bwd": _grad_of(_ACT_FWD["logsigmoid_fwd"]),
    "swish_bwd": _grad_of(_ACT_FWD["swish_fwd"]),
    "sqrelu_bwd": lambda g, x: (2.0 * g.float() * F.relu(x.float())).to(x.dtype),
    "swiglu_fwdbwd": _glu_fwdbwd(F.silu),
    "sigmoidglu_fwdbwd": _glu_fwdbwd(torch.sigmoid),
})


# -- recurrences (torch references, fp32 inside) -------------------------------------
def _no_varlen(cu_seqlens, what):
    if cu_seqlens is not None:
        raise MCError(f"fla CPU routing: variable-length (cu_seqlens) {what} is not supported on CPU")


def _state_in(initial_state, v_first):
    if initial_state is None:
        return None
    s = initial_state.float()
    return s.transpose(-1, -2) if v_first else s


def _state_out(state, v_first, want):
    if not want or state is None:
        return None
    s = state.float()
    return (s.transpose(-1, -2) if v_first else s).contiguous()


def _l2(x):
    return l2norm_apply_ref(x.float(), 1e-6)


def delta_rule_ref(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, use_qk_l2norm_in_kernel=False, **kwargs):
    """``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` through fla's
    ``delta_rule_recurrence`` (``[B,H,T,D]``, fixed ``K^-1/2``: q is rescaled so the
    effective scale is ``scale``). State ``[B,H,K,V]``."""
    from fla.ops.delta_rule.naive import delta_rule_recurrence

    from .chunk import delta_rule_chunked, during_capture

    delta_rule_recurrence = during_capture(delta_rule_recurrence, delta_rule_chunked)  # one-pass capture

    _no_varlen(cu_seqlens, "delta rule")
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm_in_kernel:
        q, k = _l2(q), _l2(k)
    if beta is None:
        beta = torch.ones_like(q[..., 0])
    qf = q.float() * (scale * math.sqrt(K))
    o, S = delta_rule_recurrence(
        qf.transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), beta.float().transpose(1, 2),
        initial_state=_state_in(initial_state, False), output_final_state=True,
    )
    return o.transpose(1, 2).to(v.dtype), _state_out(S, False, output_final_state)


def gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                         use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                         state_v_first=False, cu_seqlens=None, **kwargs):
    """``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` through fla's
    ``naive_recurrent_gated_delta_rule`` (gate by ``naive_gdn_gate`` when
    ``use_gate_in_kernel``; q/k heads repeat over value groups, GVA)."""
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    from .chunk import during_capture, gated_delta_rule_chunked

    naive_recurrent_gated_delta_rule = during_capture(naive_recurrent_gated_delta_rule, gated_delta_rule_chunked)

    _no_varlen(cu_seqlens, "gated delta rule")
    for name in ("gk", "gv"):
        if kwargs.get(name) is not None:
            raise MCError(f"fla CPU routing: gated delta rule with {name} is not supported on CPU")
    if kwargs.get("use_gate_in_kernel", False):
        g = naive_gdn_gate(g, kwargs["A_log"], kwargs.get("dt_bias"))
    beta = beta.float()
    if use_beta_sigmoid_in_kernel:
        beta = torch.sigmoid(beta) * (2.0 if allow_neg_eigval else 1.0)
    if use_qk_l2norm_in_kernel:
        q, k = _l2(q), _l2(k)
    HV = v.shape[2]
    qf, kf = (x.float().repeat_interleave(HV // x.shape[2], dim=2) for x in (q, k))
    o, S = naive_recurrent_gated_delta_rule(
        qf, kf, v.float(), beta, g.float(), scale=scale if scale is not None else q.shape[-1] ** -0.5,
        initial_state=_state_in(initial_state, state_v_first), output_final_state=True,
    )
    return o.to(v.dtype), _state_out(S, state_v_first, output_final_state)


def gla_ref(q, k, v, g=None, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
            reverse=False, state_v_first=False, cu_seqlens=None, **kwargs):
    """``chunk_gla`` (``g``) / ``fused_recurrent_gla`` (``gk``) through fla's
    ``naive_recurrent_gla`` (fixed ``K^-1/2``: q is rescaled to ``scale``)."""
    from fla.ops.gla.naive import naive_recurrent_gla

    _no_varlen(cu_seqlens, "GLA")
    if reverse or gv is not None:
        raise MCError("fla CPU routing: reverse GLA or gv gates are not supported on CPU")
    gk = g if gk is None else gk
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    o, S = naive_recurrent_gla(
        q.float() * (scale * math.sqrt(K)), k.float(), v.float(), gk.float(),
        initial_state=_state_in(initial_state, state_v_first), output_final_state=True,
    )
    return o.to(v.dtype), _state_out(S, state_v_first, output_final_state)


def retention_decay(heads: int, device=None) -> torch.Tensor:
    """RetNet's per-head log decay ``log(1 - 2^(-5 - h))``, as fla's retention ops use it."""
    return (1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float, device=device))).log()


def retention_ref(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                  state_v_first=False, reverse=False, **kwargs):
    """``chunk_retention`` / ``fused_recurrent_retention``: GLA with the fixed per-head
    decay broadcast over K (through fla's ``naive_recurrent_gla``)."""
    if reverse:
        raise MCError("fla CPU routing: reverse retention is not supported on CPU")
    B, T, H, K = q.shape
    gk = retention_decay(H, q.device)[None, None, :, None].expand(B, T, H, K)
    return gla_ref(q, k, v, gk=gk, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   state_v_first=state_v_first, cu_seqlens=cu_seqlens)


def parallel_retention_ref(q, k, v, scale=None, cu_seqlens=None, **kwargs):
    """``parallel_retention`` returns no state; same output as the recurrent form."""
    o, _ = retention_ref(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    return o, None


def rwkv6_ref(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False, reverse=False,
              cu_seqlens=None, **kwargs):
    """``chunk_rwkv6`` / ``fused_recurrent_rwkv6`` through fla's ``naive_recurrent_rwkv6``
    (``[B,H,T,D]``; the bonus ``u`` reads the current token on top of the pre-update state)."""
    from fla.ops.rwkv6.recurrent_naive import naive_recurrent_rwkv6

    _no_varlen(cu_seqlens, "RWKV-6")
    if reverse:
        raise MCError("fla CPU routing: reverse RWKV-6 is not supported on CPU")
    K = r.shape[-1]
    o, S = naive_recurrent_rwkv6(
        *(x.float().transpose(1, 2) for x in (r, k, v, w)), u.float(),
        scale=K ** -0.5 if scale is None else scale, initial_state=_state_in(initial_state, False),
        output_final_state=True,
    )
    return o.transpose(1, 2).to(v.dtype), _state_out(S, False, output_final_state)


def rwkv7_ref(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None,
              **kwargs):
    """``chunk_rwkv7``: the DPLR recurrence ``S_t = S_{t-1} diag(e^w) + b_t (a_t^T S_{t-1}) + k_t v_t^T``
    (K-first ``[B,H,K,V]``), ``o_t = scale r_t^T S_t``, through fla's ``dplr_recurrence``
    (fixed ``K^-1/2``: r is rescaled to ``scale``)."""
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    from .chunk import dplr_chunked, during_capture

    dplr_recurrence = during_capture(dplr_recurrence, dplr_chunked)  # one-pass capture

    _no_varlen(cu_seqlens, "RWKV-7")
    K = r.shape[-1]
    scale = 1.0 if scale is None else scale
    o, S = dplr_recurrence(
        (r.float() * (scale * math.sqrt(K))).transpose(1, 2),
        *(x.float().transpose(1, 2) for x in (k, v, a, b, w)),
        initial_state=_state_in(initial_state, False), output_final_state=True,
    )
    return o.transpose(1, 2).to(v.dtype), _state_out(S, False, output_final_state)


def rwkv7_mul_ref(r, w, k, v, kk, a, scale=1.0, initial_state=None, output_final_state=False, reverse=False,
                  cu_seqlens=None, **kwargs):
    """``fused_mul_recurrent_rwkv7``: :func:`rwkv7_ref` with ``a = -kk``, ``b = kk * a``."""
    if reverse:
        raise MCError("fla CPU routing: reverse RWKV-7 is not supported on CPU")
    return rwkv7_ref(r, w, k, v, -kk, kk * a, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _kda_beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval):
    beta = beta.float()
    return torch.sigmoid(beta) * (2.0 if allow_neg_eigval else 1.0) if use_beta_sigmoid_in_kernel else beta


def kda_ref(q, k, v, g, beta, A_log=None, dt_bias=None, scale=None, initial_state=None, output_final_state=False,
            use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
            allow_neg_eigval=False, lower_bound=None, state_v_first=False, cu_seqlens=None, **kwargs):
    """``chunk_kda`` / ``fused_recurrent_kda`` (Kimi Delta Attention: the gated delta rule with a
    per-key-channel decay ``g [B,T,HV,K]``) through fla's ``naive_recurrent_kda``; the gate by
    ``naive_kda_gate`` (or ``naive_kda_lowerbound_gate`` with ``lower_bound``) when
    ``use_gate_in_kernel``, beta by the kernel's sigmoid when asked. State ``[B,HV,K,V]``."""
    from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
    from fla.ops.kda.naive import naive_recurrent_kda

    from .chunk import during_capture, kda_chunked

    naive_recurrent_kda = during_capture(naive_recurrent_kda, kda_chunked)  # one-pass capture

    _no_varlen(cu_seqlens, "KDA")
    if use_gate_in_kernel:
        g = (naive_kda_gate(g, A_log, dt_bias) if lower_bound is None
             else naive_kda_lowerbound_gate(g, A_log, dt_bias, lower_bound))
    if use_qk_l2norm_in_kernel:
        q, k = _l2(q), _l2(k)
    o, S = naive_recurrent_kda(
        q.float(), k.float(), v.float(), g.float(), _kda_beta(beta, use_beta_sigmoid_in_kernel, allow_neg_eigval),
        scale=scale, initial_state=_state_in(initial_state, state_v_first), output_final_state=True,
    )
    return o.to(v.dtype), _state_out(S, state_v_first, output_final_state)


def gdn2_ref(q, k, v, g, b, w, scale=None, initial_state=None, output_final_state=False,
             use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, state_v_first=False, cu_seqlens=None,
             **kwargs):
    """``chunk_gdn2`` / ``fused_recurrent_gdn2`` (Gated DeltaNet-2: per-channel decay ``g``, erase
    gate ``b`` on K, write gate ``w`` on V; q/k/g/b already at the value-head count, as the layer
    passes them) through fla's ``naive_recurrent_gdn2``. State ``[B,H,K,V]``."""
    from fla.ops.gdn2.naive import naive_recurrent_gdn2

    from .chunk import during_capture, gdn2_chunked

    naive_recurrent_gdn2 = during_capture(naive_recurrent_gdn2, gdn2_chunked)  # one-pass capture

    _no_varlen(cu_seqlens, "GDN-2")
    if use_gate_in_kernel:  # fla.layers.gdn2 computes its gate itself; nothing here calls it so
        raise MCError("fla CPU routing: GDN-2 with use_gate_in_kernel is not supported on CPU")
    if use_qk_l2norm_in_kernel:
        q, k = _l2(q), _l2(k)
    o, S = naive_recurrent_gdn2(
        *(x.float() for x in (q, k, v, g, b, w)), scale=scale,
        initial_state=_state_in(initial_state, state_v_first), output_final_state=True,
    )
    return o.to(v.dtype), _state_out(S, state_v_first, output_final_state)


# Per fla layer module: the recurrence names it imported and their CPU references.
RECURRENCES = {
    "fla.layers.delta_net": {"chunk_delta_rule": delta_rule_ref, "fused_recurrent_delta_rule": delta_rule_ref},
    "fla.layers.gated_deltanet": {
        "chunk_gated_delta_rule": gated_delta_rule_ref, "fused_recurrent_gated_delta_rule": gated_delta_rule_ref,
    },
    "fla.layers.multiscale_retention": {
        "chunk_retention": retention_ref, "fused_chunk_retention": retention_ref,
        "fused_recurrent_retention": retention_ref, "parallel_retention": parallel_retention_ref,
    },
    "fla.layers.gla": {"chunk_gla": gla_ref, "fused_recurrent_gla": gla_ref},
    "fla.layers.rwkv6": {"chunk_rwkv6": rwkv6_ref, "fused_recurrent_rwkv6": rwkv6_ref},
    "fla.layers.rwkv7": {"chunk_rwkv7": rwkv7_ref, "fused_mul_recurrent_rwkv7": rwkv7_mul_ref},
    "fla.layers.kda": {"chunk_kda": kda_ref, "fused_recurrent_kda": kda_ref},
    "fla.layers.gdn2": {"chunk_gdn2": gdn2_ref, "fused_recurrent_gdn2": gdn2_ref},
}


def _k_update_ref(k, a, ka, cu_seqlens=None, cu_seqlens_cpu=None):
    from fla.ops.rwkv7.fused_k_update import k_update_ref

    return k_update_ref(k, a, ka)


# fla's autograd-Function leaf ops ("module:Class") and their CPU references.
LEAF_OPS = (
    ("fla.modules.norm.layernorm:LayerNormFunction", layer_norm_apply_ref),
    ("fla.modules.norm.fused_norm_gate:LayerNormGatedFunction", layer_norm_gated_apply_ref),
    ("fla.modules.norm.l2norm:L2NormFunction", l2norm_apply_ref),
    ("fla.modules.token_shift:TokenShift", token_shift_apply_ref),
    ("fla.modules.causal_conv1d.ops:CausalConv1dFunction", causal_conv1d_apply_ref),
    ("fla.modules.rotary.ops:RotaryEmbeddingFunction", rotary_apply_ref),
    ("fla.ops.rwkv7.fused_addcmul:Rwkv7FusedAddcmul", "fla.ops.rwkv7.fused_addcmul:torch_addcmul_rwkv7"),
    ("fla.ops.rwkv7.fused_k_update:KUpdateFunction", _k_update_ref),
    ("fla.ops.rwkv7.gate_output_correction:GateOutputCorrection",
     "fla.ops.rwkv7.gate_output_correction:gate_output_correction_ref"),
)


def patches() -> list[compat.Patch]:
    """Every fla symbol the CPU routing replaces: the leaf ops' ``apply``, the convolution
    update, the activation helpers and each layer module's recurrences."""
    out = [route(owner, "apply", ref, split=ref is causal_conv1d_apply_ref) for owner, ref in LEAF_OPS]
    out.append(route("fla.modules.causal_conv1d.ops", "causal_conv1d_update", causal_conv1d_update_ref))
    out += [route("fla.modules.activations.ops", name, ref) for name, ref in ACTIVATION_REFS.items()]
    out += [route(module, name, ref, split=True)
            for module, names in RECURRENCES.items() for name, ref in names.items()]
    return out


def enable() -> None:
    """Route fla's leaf ops to PyTorch for CPU tensors (idempotent; GPU tensors are untouched)."""
    compat.install(patches())


def reference(module_name: str, name: str):
    """The CPU reference routed in for ``module_name.name`` (for tests and adapters)."""
    return RECURRENCES[module_name][name]
