"""Per-layer Memory Caching memory: the cached boundary states and their key summaries.

One ``LayerMemory`` lives for one forward call, or, when the model runs with a cache
(chunked prefill, generation), as long as that cache object: it is attached to it, so
the cached segments travel with the model's own recurrent state.

Every row of the batch keeps its own segment clock. Without padding all clocks agree
and the memory is a plain ``[B, N, ...]`` stack. With left padding a row's segments
start at its first real token, so rows close segments at different call positions and
hold different numbers of them: ``counts[r]`` says how many of the ``N`` slots of row
``r`` are filled (the rest are zeros that no token can see).
"""
from __future__ import annotations

import torch


def kept_slots(serials: list[int], closed: int, cap: int | None, policy: str) -> list[int]:
    """Which of a row's cached segments (``serials``: their order numbers, ascending;
    ``closed``: segments closed so far) a cache capped at ``cap`` keeps.

    ``recent``: the newest ``cap``. ``log``: the newest ``cap // 2`` and, older than
    that, segment ``s`` of age ``a = closed - s`` only if ``s`` is a multiple of
    ``2 ** (floor(log2 a) - 1)``: about two per power-of-two band of age (a segment
    thinned out would never qualify again: the divisor only grows with its age). Then
    the oldest go, down to ``cap``. Applied after every close, so the kept set depends
    only on the sequence of closes: split prefill and one forward keep the same.
    """
    keep = list(range(len(serials)))
    if cap is None:
        return keep
    if policy == "log":
        dense = max(1, cap // 2)
        keep = [i for i in keep if closed - serials[i] <= dense
                or serials[i] % (1 << max(0, (closed - serials[i]).bit_length() - 2)) == 0]
    return keep[-cap:]


class LayerMemory:
    """Cached states ``[B, N, ...]`` (the adapter's layout), their mean-pooled keys
    ``[B, N, H, U]``, and the running key sum of each row's still-open segment."""

    def __init__(self, max_segments: int | None = None, policy: str = "recent"):
        self.states: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None
        self.key_sum: torch.Tensor | None = None  # [B, H, U], keys of the open segment
        self.serials: list[list[int]] = []  # per row: order number of each filled slot
        self.closed: list[int] = []  # segments each row has closed (kept or evicted)
        self.seg_fill: list[int] = []  # real tokens in each row's open segment
        self.real: list[int] = []  # real (non-pad) tokens each row has seen
        self.pos = 0  # call positions seen by this layer (pads included)
        self.gap = 0  # call positions run with Memory Caching off (see pass_over): not covered
        self.max_segments = max_segments
        self.policy = policy

    # -- shape of the memory ---------------------------------------------------------------
    def bind(self, batch: int) -> None:
        """Size the per-row bookkeeping for ``batch`` rows (first call), or check it."""
        if not self.serials:
            self.serials = [[] for _ in range(batch)]
            self.closed, self.seg_fill, self.real = [0] * batch, [0] * batch, [0] * batch
        elif len(self.serials) != batch:
            from .errors import MCError

            raise MCError(f"batch size changed from {len(self.serials)} to {batch} within one cache; "
                          "start a new cache for a new batch")

    @property
    def counts(self) -> list[int]:
        """Filled segment slots per row."""
        return [len(s) for s in self.serials]

    @property
    def dropped_rows(self) -> list[int]:
        """Segments evicted by the cap, per row."""
        return [c - len(s) for c, s in zip(self.closed, self.serials)]

    @property
    def n(self) -> int:
        """Segment slots (the most any row holds)."""
        return 0 if self.states is None else self.states.shape[1]

    @property
    def dropped(self) -> int:
        return max(self.dropped_rows, default=0)

    @property
    def uniform(self) -> bool:
        """Every row holds every slot (no padding, or padding that has evened out)."""
        return all(c == self.n for c in self.counts)

    def visible(self, length: int, device) -> torch.Tensor:
        """``n_visible`` for ``length`` tokens that all lie before the next close:
        ``[length]`` when rows agree (the fast path), else ``[B, length]``."""
        if self.uniform:
            return torch.full((length,), self.n, dtype=torch.long, device=device)
        c = torch.tensor(self.counts, dtype=torch.long, device=device)
        return c[:, None].expand(len(self.counts), length)

    # -- keys of the open segment ---------------------------------------------------------------
    def add_keys(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Account ``keys [B, t, H, U]`` to the open segments (``valid [B, t]``: real tokens)."""
        self.bind(keys.shape[0])
        kf = keys.float()
        if valid is not None:
            kf = kf * valid[:, :, None, None]
            fills = valid.sum(1).tolist()
        else:
            fills = [keys.shape[1]] * keys.shape[0]
        s = kf.sum(1)
        self.key_sum = s if self.key_sum is None else self.key_sum + s
        self.seg_fill = [f + int(d) for f, d in zip(self.seg_fill, fills)]
        self.real = [r + int(d) for r, d in zip(self.real, fills)]
        self.pos += keys.shape[1]

    def pass_over(self, length: int, valid: torch.Tensor | None = None) -> None:
        """Account ``length`` call positions that ran with Memory Caching off (every cache
        weight 0: nothing read, and no segment of them cached, so that the output is the
        base model's exactly). The token counts move on (a family's "has this cache seen
        tokens" check and the padding checks read them); ``gap`` records that this memory
        no longer covers the sequence, so a later call that would read it is refused."""
        fills = [length] * len(self.serials) if valid is None else valid.sum(1).tolist()
        self.real = [r + int(d) for r, d in zip(self.real, fills)]
        self.pos += length
        self.gap += length

    def running_pool(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal running mean of the open segment's keys for each of ``keys [B,t,H,U]``
        (computed before :meth:`add_keys` for the same tokens). Pads count for nothing."""
        self.bind(keys.shape[0])
        kf = keys.float()
        fill = torch.tensor(self.seg_fill, dtype=torch.float32, device=keys.device)[:, None]
        if valid is None:
            count = torch.arange(1, keys.shape[1] + 1, device=keys.device, dtype=torch.float32)[None] + fill
        else:
            kf = kf * valid[:, :, None, None]
            count = (valid.float().cumsum(1) + fill).clamp_min(1.0)  # a pad's own pool is unused
        csum = kf.cumsum(1)
        if self.key_sum is not None:
            csum = csum + self.key_sum[:, None]
        return csum / count[:, :, None, None]

    def extend(self, states: torch.Tensor, pooled: torch.Tensor, tokens: int) -> None:
        """Cache ``states [B, n, ...]`` with ``pooled [B, n, H, U]``: ``n`` whole segments of
        ``tokens`` tokens in total, captured in one pass (every row's clock on a boundary)."""
        self.bind(states.shape[0])
        if states.shape[1]:
            self._append_many(states, pooled)
        self.pos += tokens
        self.real = [r + tokens for r in self.real]

    def _append_many(self, states: torch.Tensor, pooled: torch.Tensor) -> None:
        # Cached states and key summaries are float32 whatever the model's dtype (a family's
        # capture may hand over its own dtype): every read of them is fp32 math.
        states, pooled = states.float(), pooled.float()
        if self.states is None:
            self.states, self.pooled = states, pooled
        else:
            self.states = torch.cat([self.states, states], 1)
            self.pooled = torch.cat([self.pooled, pooled], 1)
        for r in range(len(self.serials)):
            for _ in range(states.shape[1]):
                self._record(r)
        self._evict()

    # -- closing segments ------------------------------------------------------------------------
    def close(self, state: torch.Tensor, rows: list[int] | None = None) -> None:
        """End the open segment of ``rows`` (default: all): cache row r's ``state[r]``
        with its mean-pooled keys. Rows whose open segment is empty are skipped."""
        self.bind(state.shape[0])
        rows = [r for r in (range(len(self.serials)) if rows is None else rows) if self.seg_fill[r] > 0]
        if not rows:
            return
        fill = torch.tensor([max(f, 1) for f in self.seg_fill], dtype=torch.float32, device=self.key_sum.device)
        pooled = self.key_sum / fill[:, None, None]
        if len(rows) == len(self.serials) and self.uniform:
            self._append_many(state[:, None], pooled[:, None])
        else:
            self._append_rows(rows, state, pooled)
        keep = torch.ones(len(self.serials), device=self.key_sum.device)
        keep[rows] = 0
        self.key_sum = self.key_sum * keep[:, None, None]  # not in place: autograd may hold it
        for r in rows:
            self.seg_fill[r] = 0

    def _append_rows(self, rows: list[int], state: torch.Tensor, pooled: torch.Tensor) -> None:
        """Ragged append (padded batches): each of ``rows`` writes its next slot."""
        B = len(self.serials)
        if self.states is None:
            self.states = state.new_zeros((B, 0) + tuple(state.shape[1:]), dtype=torch.float32)  # fp32, as above
            self.pooled = pooled.new_zeros((B, 0) + tuple(pooled.shape[1:]), dtype=torch.float32)
        counts = self.counts
        grow = max(counts[r] for r in rows) + 1 - self.n  # new slots: zeros, invisible to rows that do not fill them
        # fresh tensors either way: a read earlier in this call may hold the old ones for backward
        self.states = torch.cat([self.states, self.states.new_zeros((B, max(grow, 0)) + self.states.shape[2:])], 1)
        self.pooled = torch.cat([self.pooled, self.pooled.new_zeros((B, max(grow, 0)) + self.pooled.shape[2:])], 1)
        for r in rows:
            self.states[r, counts[r]] = state[r].to(self.states.dtype)
            self.pooled[r, counts[r]] = pooled[r]
            self._record(r)
        self._evict()

    def _record(self, r: int) -> None:
        self.serials[r].append(self.closed[r])  # its order number: segments closed before it
        self.closed[r] += 1

    def _evict(self) -> None:
        """Apply the cap: every row keeps :func:`kept_slots` of its segments."""
        if self.max_segments is None:
            return
        keeps = [kept_slots(s, c, self.max_segments, self.policy) for s, c in zip(self.serials, self.closed)]
        if all(len(k) == len(s) for k, s in zip(keeps, self.serials)):
            return
        width = max(len(k) for k in keeps)
        if self.uniform and all(k == keeps[0] for k in keeps):
            idx = torch.tensor(keeps[0], device=self.states.device)
            self.states, self.pooled = self.states.index_select(1, idx), self.pooled.index_select(1, idx)
        else:  # rows keep different slots: gather each row's, zero-fill the rest
            states = self.states.new_zeros((self.states.shape[0], width) + tuple(self.states.shape[2:]))
            pooled = self.pooled.new_zeros((self.pooled.shape[0], width) + tuple(self.pooled.shape[2:]))
            for r, k in enumerate(keeps):
                states[r, : len(k)] = self.states[r, k]
                pooled[r, : len(k)] = self.pooled[r, k]
            self.states, self.pooled = states, pooled
        self.serials = [[s[i] for i in k] for s, k in zip(self.serials, keeps)]

    def nbytes(self) -> int:
        total = 0
        for t in (self.states, self.pooled, self.key_sum):
            if t is not None:
                total += t.numel() * t.element_size()
        return total
