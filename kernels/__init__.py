"""Triton kernels for Memory Caching, each beside its PyTorch reference.

``readout`` is the dispatch point ``mc_retrofit.segments`` calls. It takes what
``mc_retrofit.core.readout_reference`` takes (one ``mc_retrofit.core.ReadInputs``) and runs

- the Triton kernels (``readout_op.readout_triton``: block-of-tokens forward and
  backward, a one-token decode path) when the tensors are on CUDA, or when
  ``MC_RETROFIT_FORCE_TRITON=1`` (on CPU this needs ``TRITON_INTERPRET=1`` set before
  triton is first imported: slow, for tests);
- the PyTorch reference otherwise, or whenever ``MC_RETROFIT_FORCE_REFERENCE=1``.

Nothing here imports triton until a Triton path is taken, so the package imports on
machines without CUDA (and does not fix triton's interpreter mode as a side effect).
Boundary-state capture lives in ``mc_retrofit.kernels.capture``.
"""
from __future__ import annotations

import os

from mc_retrofit.core import ReadInputs, readout_reference

__all__ = ["ReadInputs", "readout", "readout_reference", "use_triton"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() not in ("", "0", "false", "no")


def use_triton(tensor) -> bool:
    """Whether ``readout`` takes the Triton path for inputs living where ``tensor`` does."""
    if _flag("MC_RETROFIT_FORCE_REFERENCE"):
        return False
    return tensor.is_cuda or _flag("MC_RETROFIT_FORCE_TRITON")


def readout(x: ReadInputs):
    """Fused Memory Caching read-out ``y = o + mix * (agg - o)``; see
    :func:`mc_retrofit.core.readout_reference` for its semantics."""
    # Per-row visibility ([B, T]: left-padded batches whose rows hold different numbers of
    # segments) takes the reference path; the kernels read one count per token.
    if x.states is None or x.states.shape[1] == 0 or x.n_visible.dim() == 2 or not use_triton(x.q):
        return readout_reference(x)
    from .readout_op import readout_triton

    return readout_triton(x)
