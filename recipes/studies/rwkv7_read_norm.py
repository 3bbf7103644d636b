"""Study for issue 17 item 4: does RWKV-7's harm under training-free MC come from read scale?

    python recipes/studies/rwkv7_read_norm.py --out recipes/studies/results/rwkv7-read-norm

RWKV-7's cached read ``r_t^T S_i`` is added before a per-head GroupNorm, which is invariant to
the scale of its input. Under a gated mix ``w_0 o + sum_i w_i r_i`` a cached read much larger
than the online read ``o`` sets the direction of the normalised output even at a small weight.
This script compares, on ``checkpoints/rwkv7-byte`` (context 512), training-free gated MC
(segment 256) as it is against the same with every cached read rescaled per head and token
to the online read's L2 norm before mixing ("norm-matched"). The variant is a patch of
``mc_retrofit.segments.readout`` for this process only (CPU reference path); it is not a
product option. Also recorded: the mean norm ratio ||r_i|| / ||o|| the model produces.

Also recorded: the gates' mean total weight on cached reads (tokens that see a cached segment).

Measured: bits/byte on 8 windows of Emma (evaluation-only) at 2048 and 4096 bytes, and pass
keys (evaluation phrasing, Emma filler, 30 prompts per length) at 512, 1024 and 2048, with 95%
Wilson intervals and a paired bootstrap interval for the bits/byte change.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import torch

import mc_retrofit
from mc_retrofit import MCConfig, core, segments, tasks
from mc_retrofit.distributed import cpu_numerics
from mc_retrofit.eval.stats import paired_bootstrap, wilson

RATIOS: list[float] = []
CACHED_WEIGHT: list[float] = []  # the gates' total weight on cached reads, mean over heads and tokens


def cached_reads(x: core.ReadInputs, n: int) -> torch.Tensor:
    """``q^T S_i * scale`` for the first ``n`` cached states: ``[B,T,H,n,V]`` (fp32)."""
    eq = "bthk,bnhkv->bthnv" if x.layout == "kv" else "bthk,bnhvk->bthnv"
    return torch.einsum(eq, x.q.float(), x.states[:, :n].float()) * x.scale


def norm_matched(x: core.ReadInputs) -> torch.Tensor:
    """:func:`core.readout_reference` with each cached read scaled to ``||o||`` per head and token."""
    N = 0 if x.states is None else x.states.shape[1]
    if N == 0 or int(x.n_visible.max()) == 0:
        return x.online
    o = x.online.float()
    n = int(x.n_visible.max())
    reads = cached_reads(x, n)  # [B,T,H,n,V]
    o_norm = o.norm(dim=-1, keepdim=True)[..., None, :]  # [B,T,H,1,1]
    r_norm = reads.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    RATIOS.append(float((r_norm / o_norm.clamp_min(1e-12)).median()))
    reads = reads * (o_norm / r_norm)
    w = core.gate_weights(x.u, x.pooled[:, :n], x.online_pool, x.n_visible, x.aggregation, x.top_k, x.gate_scale,
                          x.online_bias)
    agg = w[..., :1] * o + (w[..., 1:, None] * reads).sum(-2)
    mix = x.mix.float()[None, None, :, None]
    return (o + mix * (agg - o)).to(x.online.dtype)


def measuring(x: core.ReadInputs) -> torch.Tensor:
    """The read-out as it is, recording the norm ratio."""
    if x.states is not None and int(x.n_visible.max()) > 0:
        n = int(x.n_visible.max())
        reads = cached_reads(x, n)
        RATIOS.append(float((reads.norm(dim=-1) / x.online.float().norm(dim=-1)[..., None].clamp_min(1e-12)).median()))
        w = core.gate_weights(x.u, x.pooled[:, :n], x.online_pool, x.n_visible, x.aggregation, x.top_k, x.gate_scale,
                              x.online_bias)
        nv = x.n_visible if x.n_visible.dim() == 2 else x.n_visible[None]  # [B or 1, T]
        seen = (nv > 0).to(w.device)[..., None].expand(w.shape[:-1])  # tokens that read a cached segment
        CACHED_WEIGHT.append(float(w[..., 1:].sum(-1)[seen].mean()))
    return core.readout_reference(x)


@contextlib.contextmanager
def readout(fn):
    saved = segments.readout  # the name the segment loop calls
    segments.readout = fn
    try:
        yield
    finally:
        segments.readout = saved


def window_bits(model, windows: torch.Tensor) -> torch.Tensor:
    """Bits per byte of each window ``[N, L+1]``."""
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None, :-1], use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0], w[1:], reduction="mean")
            out.append(float(nll) / 0.6931471805599453)
    return torch.tensor(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/rwkv7-byte")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--out", default="recipes/studies/results/rwkv7-read-norm")
    a = ap.parse_args()
    cpu_numerics()
    t0 = time.time()
    emma = tasks.load_book("austen-emma.txt")
    base = mc_retrofit.load_base(a.model)
    mc = mc_retrofit.convert(mc_retrofit.load_base(a.model), MCConfig(segment_size=256, aggregation="gated", online_bias=0.0))  # as measured (before RWKV-7 had a default bias)
    runs = {"base": (base, core.readout_reference), "gated": (mc, measuring), "gated-norm-matched": (mc, norm_matched)}
    out = {"model": a.model, "segment_size": 256, "aggregation": "gated", "prompts": a.prompts, "bits_per_byte": {},
           "passkey": {}, "median_read_norm_ratio": {}, "mean_cached_gate_weight": {}}
    for L in (2048, 4096):
        windows = torch.tensor(list(emma[300000:300000 + 8 * (L + 1)])).view(8, L + 1)
        bits = {}
        for name, (model, fn) in runs.items():
            RATIOS.clear()
            CACHED_WEIGHT.clear()
            with readout(fn):
                bits[name] = window_bits(model, windows)
            if RATIOS:
                out["median_read_norm_ratio"].setdefault(name, {})[L] = sorted(RATIOS)[len(RATIOS) // 2]
            if CACHED_WEIGHT:
                out["mean_cached_gate_weight"].setdefault(name, {})[L] = sum(CACHED_WEIGHT) / len(CACHED_WEIGHT)
        for name, b in bits.items():
            entry = {"mean": float(b.mean())}
            if name != "base":
                ci = paired_bootstrap(bits["base"].tolist(), b.tolist())
                entry["change"] = {"mean": float((b - bits["base"]).mean()), "ci95": [ci.low, ci.high]}
            out["bits_per_byte"].setdefault(name, {})[L] = entry
            print(f"{name} bits/byte @{L}: {entry}", flush=True)
    for L in (512, 1024, 2048):
        rng = random.Random(L)
        samples = [tasks.passkey_sample(emma, L, rng) for _ in range(a.prompts)]
        for name, (model, fn) in runs.items():
            with readout(fn):
                acc = tasks.text_accuracy(model, samples, batch_size=2)
            ci = wilson(round(acc * a.prompts), a.prompts)
            out["passkey"].setdefault(name, {})[L] = {"accuracy": acc, "ci95": [ci.low, ci.high]}
            print(f"{name} pass key @{L}: {ci}", flush=True)
    out["seconds"] = round(time.time() - t0)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "result.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {Path(a.out) / 'result.json'} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
