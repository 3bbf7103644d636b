"""One training step's forward and backward: whole windows, or segment-wise truncated
backpropagation (TBPTT) through the family's own cache.

Chunked prefill with ``use_cache=True`` computes exactly what one full forward computes:
the family's cache object carries the recurrent state and, as ``_mc_memory``, the Memory
Caching memory (cached states, pooled keys, the open segment's key sum). TBPTT runs a
window's chunks in order through that cache and calls ``backward`` after each chunk, so
only one chunk's activations are alive at a time; between chunks every tensor the cache
holds is detached, which truncates the gradient at the chunk boundary and frees the
previous chunk's graph. The forward, hence the loss value, is the full-window one.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .. import compat
from ..adapters import adapter_for
from .data import inputs_and_targets

def detach_state(obj, _seen: set | None = None):
    """Detach, in place, every tensor a cache object holds (its attributes, lists, dicts,
    the MC memory's ``LayerMemory`` objects). Returns the object; a bare tensor comes back
    as a detached tensor (with its Python attributes, e.g. RWKV-4's ``_mc_memory``)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        extra = getattr(obj, "__dict__", None) or {}
        out = obj.detach()
        for key, value in extra.items():
            setattr(out, key, detach_state(value, seen))
        return out
    if isinstance(obj, list):
        obj[:] = [detach_state(v, seen) for v in obj]
    elif isinstance(obj, tuple):
        items = [detach_state(v, seen) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple or tuple
    elif isinstance(obj, dict):
        for key in list(obj):
            obj[key] = detach_state(obj[key], seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for key, value in list(vars(obj).items()):
            if isinstance(value, (torch.Tensor, list, tuple, dict)) or hasattr(value, "__dict__"):
                new = detach_state(value, seen)
                if new is not value:
                    setattr(obj, key, new)
    return obj




def _clone(t: torch.Tensor):
    return t if isinstance(t, torch.nn.Parameter) else t.clone()


def _same(t: torch.Tensor):
    return t


def _anchor(params) -> torch.Tensor:
    """``0 * sum(params)``: added to every chunk's loss so each backward reaches every gate
    parameter (a zero gradient where the chunk does not use it, e.g. a first chunk with no
    cached segment yet). Backward is then always possible, and DistributedDataParallel sees
    every trainable parameter in every step (no ``find_unused_parameters`` needed).
    It changes neither the loss value nor any gradient's value; a parameter a step does
    not use gets a zero gradient instead of none (AdamW then still applies its momentum)."""
    return sum(p.sum() for p in params) * 0.0


def window_loss_and_backward(model, windows: torch.Tensor, params, *, tbptt: int | None = None, cache=None,
                             keep_cache: bool = False, no_sync=None):
    """Forward and backward of one batch of windows ``[B, L+1]`` (next-token targets), or of
    labelled sequences ``[B, 2, L+1]`` (inputs, then the label of each position, -100 =
    not scored; the last column unused) (gradients accumulate into ``.grad``). Returns (mean next-byte loss as a detached tensor, the final cache or None).

    ``tbptt``: chunk length (None or >= L: one chunk). ``cache``: the state to start from
    (state passing); ``keep_cache``: run through the cache even for one chunk and return it.
    ``no_sync``: DDP's ``model.no_sync`` (every chunk but the last runs under it, so the
    gradients are all-reduced once per step, after the last chunk)."""
    labelled = windows.dim() == 3  # [B, 2, L+1]: inputs and their own labels (token sequences)
    inputs, targets = inputs_and_targets(windows)
    n_valid = (targets != -100).sum().clamp_min(1) if labelled else None
    T = inputs.shape[1]
    chunk = T if tbptt is None else min(int(tbptt), T)
    use_cache = cache is not None or keep_cache or chunk < T
    # the family's forward writes its cache in place: save copies for the backward (see Adapter)
    clone_saved = use_cache and adapter_for(_unwrap(model).config).writes_cache_in_place
    total = torch.zeros((), device=windows.device)
    bounds = chunk_bounds(T, chunk)
    for i, (a, b) in enumerate(bounds):
        last = i == len(bounds) - 1
        with contextlib.ExitStack() as stack:
            if no_sync is not None and not last:
                stack.enter_context(no_sync())
            if use_cache:
                if clone_saved:
                    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_clone, _same))
                out, cache = compat.forward_with_cache(model, inputs[:, a:b], cache)
                logits = out.logits
            else:
                logits = model(inputs[:, a:b], use_cache=False).logits
            # mean over the chunk, weighted by its share of the window: the chunks sum to the
            # window's mean (one chunk: exactly F.cross_entropy's mean, no reweighting)
            flat = logits.float().reshape(-1, logits.shape[-1])
            if labelled:  # -100 labels ignored: sum over the chunk / all valid labels of the window
                loss = F.cross_entropy(flat, targets[:, a:b].reshape(-1), ignore_index=-100, reduction="sum") / n_valid
            else:
                loss = F.cross_entropy(flat, targets[:, a:b].reshape(-1))
                if b - a != T:
                    loss = loss * ((b - a) / T)
            (loss + _anchor(params)).backward()
        total = total + loss.detach()
        del logits, loss
        if cache is not None:
            cache = detach_state(cache)
    return total, (cache if use_cache else None)


def chunk_bounds(T: int, chunk: int) -> list[tuple[int, int]]:
    """``[a, b)`` chunks of ``chunk`` tokens covering ``T``; a one-token remainder joins the
    chunk before it. A one-token call would take the families' decoding step, which
    updates the cache in place and so cannot be differentiated through."""
    bounds = [(a, min(T, a + chunk)) for a in range(0, T, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], T)]
    return bounds


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model as .module
