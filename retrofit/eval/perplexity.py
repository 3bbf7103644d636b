"""Perplexity / bits per token by context length and by position on long documents.

For each length L the same ``windows`` windows of L tokens (seeded choice of document
and offset among documents at least L tokens long) are scored by every variant, with
one forward per window (batched). A window's record keeps the sums, not the means, so
results from several processes merge exactly.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from mc_retrofit.errors import MCError

from .forward import token_nll

LN2 = math.log(2.0)


@dataclass
class Window:
    length: int
    index: int
    doc: str
    start: int
    ids: torch.Tensor  # [length]

    def key(self) -> tuple:
        return ("perplexity", self.length, self.index)


def make_windows(docs: list[tuple[str, torch.Tensor]], lengths: list[int], windows: int, seed: int) -> list[Window]:
    """``windows`` windows per length, chosen by a generator seeded from (seed, length, i):
    a document with probability proportional to the number of windows it offers."""
    out = []
    for L in lengths:
        fits = [(name, ids) for name, ids in docs if len(ids) >= L]
        if not fits:
            longest = max((len(ids) for _, ids in docs), default=0)
            raise MCError(f"no document has {L} tokens (the longest has {longest}); use shorter lengths or longer texts")
        weights = [len(ids) - L + 1 for _, ids in fits]
        for i in range(windows):
            rng = random.Random(f"{seed}:perplexity:{L}:{i}")
            name, ids = rng.choices(fits, weights=weights)[0]
            start = rng.randrange(len(ids) - L + 1)
            out.append(Window(L, i, name, start, ids[start:start + L].clone()))
    return out


def score_windows(model, windows: list[Window], bucket: int, device, batch_size: int, variant: str,
                  progress=None) -> list[dict]:
    """One record per window: total NLL (nats) and token count, overall and per position
    bucket (bucket ``b`` holds the predictions of tokens ``b*bucket .. (b+1)*bucket - 1``;
    token j is predicted from j tokens of context)."""
    records = []
    by_len: dict[int, list[Window]] = {}
    for w in windows:
        by_len.setdefault(w.length, []).append(w)
    for L, group in sorted(by_len.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            ids = torch.stack([w.ids for w in chunk]).to(device)
            nll = token_nll(model, ids).double().cpu()  # [B, L-1], target positions 1..L-1
            targets = torch.arange(1, L)
            which = targets // bucket
            nb = (L - 1) // bucket + 1
            for w, row in zip(chunk, nll):
                sums = torch.zeros(nb, dtype=torch.float64).index_add_(0, which, row)
                counts = torch.bincount(which, minlength=nb)
                records.append({
                    "kind": "perplexity", "variant": variant, "length": L, "window": w.index, "doc": w.doc,
                    "start": w.start, "nll_sum": float(row.sum()), "count": int(row.numel()),
                    "bucket": bucket, "bucket_nll": [float(x) for x in sums], "bucket_count": [int(c) for c in counts],
                })
            if progress is not None:
                progress.update(len(chunk))
    return records


def summarise(records: list[dict], variants: list[str]) -> dict:
    """``by_length[variant][L]`` = bits/token, perplexity, standard error over windows;
    ``by_position[variant][L]`` = bits/token per position bucket."""
    by_length: dict = {}
    by_position: dict = {}
    for v in variants:
        rows = [r for r in records if r["kind"] == "perplexity" and r["variant"] == v]
        for L in sorted({r["length"] for r in rows}):
            rs = [r for r in rows if r["length"] == L]
            nll, n = sum(r["nll_sum"] for r in rs), sum(r["count"] for r in rs)
            per_window = [r["nll_sum"] / r["count"] / LN2 for r in rs]
            mean = nll / n / LN2
            sd = math.sqrt(sum((x - sum(per_window) / len(per_window)) ** 2 for x in per_window) / (len(rs) - 1)) if len(rs) > 1 else 0.0
            by_length.setdefault(v, {})[str(L)] = {
                "bits_per_token": mean, "perplexity": math.exp(nll / n), "windows": len(rs), "tokens": n,
                "stderr_bits": sd / math.sqrt(len(rs)),
            }
            bucket = rs[0]["bucket"]
            nb = len(rs[0]["bucket_nll"])
            sums = [sum(r["bucket_nll"][b] for r in rs) for b in range(nb)]
            counts = [sum(r["bucket_count"][b] for r in rs) for b in range(nb)]
            by_position.setdefault(v, {})[str(L)] = {
                "bucket": bucket,
                "start": [b * bucket for b in range(nb)],
                "end": [min(L, (b + 1) * bucket) for b in range(nb)],
                "bits_per_token": [s / c / LN2 if c else None for s, c in zip(sums, counts)],
            }
    _paired_deltas(records, variants, by_length)
    return {"by_length": by_length, "by_position": by_position}


def _paired_deltas(records: list[dict], variants: list[str], by_length: dict) -> None:
    """``delta_ci95`` for every non-base variant and length: a paired bootstrap interval of the
    mean per-window bits/token change vs the base, over the same windows (same starts)."""
    from .stats import paired_bootstrap

    def per_window(v, L):
        return {r["start"]: r["nll_sum"] / r["count"] / LN2 for r in records
                if r["kind"] == "perplexity" and r["variant"] == v and r["length"] == L}

    if "base" not in variants:
        return
    for v in variants:
        if v == "base":
            continue
        for L in by_length.get(v, {}):
            a, b = per_window("base", int(L)), per_window(v, int(L))
            shared = sorted(set(a) & set(b))
            if len(shared) > 1:
                ci = paired_bootstrap([a[s] for s in shared], [b[s] for s in shared], seed=int(L))
                by_length[v][L]["delta_ci95"] = [ci.low, ci.high]
