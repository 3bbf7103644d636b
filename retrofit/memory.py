"""Per-layer Memory Caching memory: the cached boundary states and their key summaries.

One ``LayerMemory`` lives for one forward call, or, when the model runs with a cache
(chunked prefill, generation), as long as that cache object: it is attached to it, so
the cached segments travel with the model's own recurrent state.
"""
from __future__ import annotations

import torch


class LayerMemory:
    """Cached states ``[B, N, ...]`` (the adapter's layout), their mean-pooled keys
    ``[B, N, H, U]``, and the running key sum of the still-open segment."""

    def __init__(self, max_segments: int | None = None):
        self.states: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None
        self.key_sum: torch.Tensor | None = None  # [B, H, U], keys of the open segment
        self.seg_fill = 0  # tokens in the open segment
        self.pos = 0  # tokens seen by this layer
        self.max_segments = max_segments
        self.dropped = 0  # segments evicted by the cap

    @property
    def n(self) -> int:
        return 0 if self.states is None else self.states.shape[1]

    def add_keys(self, keys: torch.Tensor) -> None:
        """Account ``keys [B, t, H, U]`` to the open segment."""
        s = keys.float().sum(1)
        self.key_sum = s if self.key_sum is None else self.key_sum + s
        self.seg_fill += keys.shape[1]
        self.pos += keys.shape[1]

    def running_pool(self, keys: torch.Tensor) -> torch.Tensor:
        """Causal running mean of the open segment's keys for each of ``keys [B,t,H,U]``
        (computed before :meth:`add_keys` for the same tokens)."""
        csum = keys.float().cumsum(1)
        if self.key_sum is not None:
            csum = csum + self.key_sum[:, None]
        count = torch.arange(1, keys.shape[1] + 1, device=keys.device, dtype=torch.float32) + self.seg_fill
        return csum / count[None, :, None, None]

    def close(self, state: torch.Tensor) -> None:
        """End the open segment: cache ``state [B, ...]`` with its mean-pooled keys."""
        if self.seg_fill == 0:
            return
        pooled = (self.key_sum / self.seg_fill)[:, None]
        state = state[:, None]
        if self.states is None:
            self.states, self.pooled = state, pooled
        else:
            self.states = torch.cat([self.states, state.to(self.states.dtype)], 1)
            self.pooled = torch.cat([self.pooled, pooled], 1)
        if self.max_segments is not None and self.n > self.max_segments:
            # Keep the most recent segments: the oldest ones are dropped first.
            extra = self.n - self.max_segments
            self.states, self.pooled = self.states[:, extra:], self.pooled[:, extra:]
            self.dropped += extra
        self.key_sum = None
        self.seg_fill = 0

    def nbytes(self) -> int:
        total = 0
        for t in (self.states, self.pooled, self.key_sum):
            if t is not None:
                total += t.numel() * t.element_size()
        return total
