"""The carried state of state passing (``finetune --state-passing``) as plain data.

A checkpoint must never be unpickled: ``torch.load(weights_only=False)`` on a file in
``<out>.checkpoint`` would run whatever code a planted pickle names. But the carried
state is a family's own cache object (a transformers ``DynamicCache``, RWKV-4's list of
tensors with the MC memory hung on one of them, fla's ``Cache``), each holding
``LayerMemory`` objects. So it is saved as a tree of plain values that
``torch.load(weights_only=True)`` reads without any allow-list: tensors, numbers,
strings, lists and dicts of them, and, for each object, its class name and its
attributes. Values that are not data (devices, dtypes, classes, functions) are not
saved.

To resume, the model builds a fresh cache of the right kind (one 2-token forward,
:func:`template_cache`) and :func:`restore` writes the saved values into it: no class
is ever created from a name in the file, and a saved tree that does not fit the fresh
cache (another family, another transformers version) is refused with one line.
"""
from __future__ import annotations

import types

import torch

from ..errors import MCError

FORMAT = "mc-retrofit-carry/1"

_LEAVES = (bool, int, float, str, type(None))
_NOT_DATA = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType,
             torch.nn.Module, torch.device, torch.dtype)


def _qualname(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def to_plain(obj):
    """``obj`` as nested tuples of plain values (see the module docstring). Node kinds:
    ``("V", value)`` a leaf; ``("S",)`` not data (the fresh cache's own value stays);
    ``("R", n)`` the n-th node again (shared or cyclic references); ``("T", n, tensor,
    attrs)``; ``("L", n, items)``; ``("U", n, items)`` a tuple; ``("D", n, pairs)``;
    ``("O", n, class name, attrs)``. Tensors are detached and moved to the CPU."""
    memo: dict[int, int] = {}
    keep: list = []  # holds every visited object, so that no id is reused meanwhile

    def plain(x):
        if type(x) in _LEAVES:
            return ("V", x)
        if isinstance(x, _NOT_DATA) or callable(x) and not hasattr(x, "__dict__"):
            return ("S",)
        if id(x) in memo:
            return ("R", memo[id(x)])
        n = memo[id(x)] = len(memo)
        keep.append(x)
        if isinstance(x, torch.Tensor):
            attrs = {k: plain(v) for k, v in (getattr(x, "__dict__", None) or {}).items()}
            return ("T", n, x.detach().cpu().clone(), attrs)
        if isinstance(x, list):
            return ("L", n, [plain(v) for v in x])
        if isinstance(x, tuple):
            return ("U", n, [plain(v) for v in x])
        if isinstance(x, dict):
            return ("D", n, [[plain(k), plain(v)] for k, v in x.items()])
        if hasattr(x, "__dict__"):
            return ("O", n, _qualname(x), {k: plain(v) for k, v in vars(x).items()})
        return ("S",)

    return plain(obj)


def restore(template, node, device, where: str = "the carried state"):
    """The value ``node`` (from :func:`to_plain`) describes, built into ``template``: a
    fresh object of the same structure (objects are the template's own, their attributes
    overwritten; tensors go to ``device``). Raises MCError when they do not fit."""
    table: dict[int, object] = {}

    def mismatch(what: str):
        return MCError(f"{where} does not fit this model's cache ({what}); it was written by another model, family "
                       "or library version: resume without it (delete it) or start over with --force")

    def build(tmpl, x):
        if not isinstance(x, (tuple, list)) or not x or not isinstance(x[0], str):
            raise mismatch("an unreadable entry")
        kind = x[0]
        if kind == "V":
            return x[1]
        if kind == "S":
            return tmpl
        if kind == "R":
            if x[1] not in table:
                raise mismatch("a dangling reference")
            return table[x[1]]
        n = x[1]
        if kind == "T":
            if not isinstance(x[2], torch.Tensor):
                raise mismatch("a tensor entry without a tensor")
            t = x[2].to(device)
            table[n] = t
            for k, v in x[3].items():
                setattr(t, k, build(getattr(tmpl, k, None) if isinstance(tmpl, torch.Tensor) else None, v))
            return t
        if kind == "L":
            out = tmpl if isinstance(tmpl, list) and len(tmpl) == len(x[2]) else [None] * len(x[2])
            table[n] = out
            out[:] = [build(t, v) for t, v in zip(out, x[2])]
            return out
        if kind == "U":
            fit = isinstance(tmpl, tuple) and len(tmpl) == len(x[2])
            items = [build(tmpl[i] if fit else None, v) for i, v in enumerate(x[2])]
            out = type(tmpl)(*items) if fit and hasattr(tmpl, "_fields") else tuple(items)
            table[n] = out
            return out
        if kind == "D":
            out: dict = {}
            table[n] = out
            own = tmpl if isinstance(tmpl, dict) else {}
            for k, v in x[2]:
                key = build(None, k)
                out[key] = build(own.get(key), v)
            return out
        if kind == "O":
            name = x[2]
            if tmpl is None or _qualname(tmpl) != name:
                raise mismatch(f"a {name} where this model has {'nothing' if tmpl is None else _qualname(tmpl)}")
            table[n] = tmpl
            own = vars(tmpl)
            for k, v in x[3].items():
                own[k] = build(own.get(k), v)
            return tmpl
        raise mismatch(f"an entry of kind {kind!r}")

    return build(template, node)


def template_cache(model, batch: int, device):
    """A fresh cache of ``model``'s own kind for ``batch`` streams: one 2-token forward (in
    eval mode, so no dropout draws from the generator; no gradient)."""
    from .. import compat

    ids = torch.zeros(batch, 2, dtype=torch.long, device=device)
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, cache = compat.forward_with_cache(model, ids)
    finally:
        model.train(mode)
    return cache
