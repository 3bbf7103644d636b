"""Pilot for issue 17: light (lowrank) gates tuned on retrieval-aware mix rows.

    python recipes/studies/pilot_lowrank_mix.py --rank 2 --steps 200 --lr 0.05 --out recipes/studies/results/pilot-lowrank-mix

builtin:mamba2-byte-v2 (context 512 bytes), MC gated, segment 256, gate source lowrank,
tuned from cache weight 0 (exactly the base) on 400 rows of 2048 bytes built by
``mc_retrofit.finetune.mix`` from the *training* books (text 0.4, passkey 0.3, multikey 0.15,
kv 0.15; tuning phrasings only). Evaluated with the *evaluation* phrasing
(``mc_retrofit.tasks.passkey_sample``) on filler from Emma (evaluation-only, never tuned on):
30 prompts per length, random depths, 95% Wilson intervals; bits/byte on 8 windows of 2048
bytes of Emma. A pilot: one seed, one model, no validation split (nothing was selected on
the reported numbers except the rank/steps/lr of this one run; the earlier rank-2/100-step
and rank-8/200-step runs are listed in the README of the results folder).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import mc_retrofit
from mc_retrofit import MCConfig, tasks
from mc_retrofit.calibrate import bits_per_token
from mc_retrofit.distributed import cpu_numerics
from mc_retrofit.eval.stats import wilson
from mc_retrofit.finetune import finetune, gate_parameters
from mc_retrofit.finetune.mix import MixBuilder

TRAIN_BOOKS = ("austen-persuasion.txt", "austen-sense.txt", "chesterton-ball.txt", "chesterton-brown.txt",
               "chesterton-thursday.txt", "carroll-alice.txt", "milton-paradise.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--out", default="recipes/studies/results/pilot-lowrank-mix")
    ap.add_argument("--model", default="builtin:mamba2-byte-v2", help="a byte-level checkpoint (context 512)")
    ap.add_argument("--online-bias", type=float, default=0.0, help="the online memory's gate logit bias (fixed)")
    a = ap.parse_args()
    cpu_numerics()
    torch.set_num_threads(1)
    text = b"\n\n".join(tasks.load_book(b) for b in TRAIN_BOOKS)
    emma = tasks.load_book("austen-emma.txt")
    t0 = time.time()
    rows = MixBuilder(text, 2048, "text=0.4,passkey=0.3,multikey=0.15,kv=0.15", vocab_size=256).tensors(a.rows, seed=0)
    base = mc_retrofit.load_base(a.model)
    model = mc_retrofit.convert(mc_retrofit.load_base(a.model),
                                MCConfig(segment_size=256, aggregation="gated", gate_source="lowrank",
                                         gate_rank=a.rank, cache_weight=0.0, online_bias=a.online_bias))
    n_gate = sum(p.numel() for _, p in gate_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    finetune(model, rows, steps=a.steps, seq_len=2048, batch=4, lr=a.lr, warmup=10, eval_every=0, progress=True)
    out = {"model": a.model, "online_bias": a.online_bias, "rank": a.rank, "steps": a.steps, "lr": a.lr, "rows": a.rows,
           "gate_parameters": n_gate, "share_of_model": n_gate / n_all, "tune_seconds": round(time.time() - t0)}
    windows = torch.tensor(list(emma[200000:200000 + 8 * 2049])).view(8, 2049)
    for name, m in (("base", base), ("tuned", model)):
        out[f"{name}_bits_per_byte_2048"] = bits_per_token(m, windows)
    for L in (2048, 4096, 8192):
        rng = random.Random(L)
        samples = [tasks.passkey_sample(emma, L, rng) for _ in range(a.prompts)]
        for name, m in (("base", base), ("tuned", model)):
            acc = tasks.text_accuracy(m, samples, batch_size=2)
            ci = wilson(round(acc * a.prompts), a.prompts)
            out[f"{name}_passkey_{L}"] = {"accuracy": acc, "ci95": [ci.low, ci.high], "prompts": a.prompts}
            print(f"{name} pass key @{L}: {ci}", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    tag = "" if a.model == "builtin:mamba2-byte-v2" else Path(a.model.replace("builtin:", "")).name + "-"
    bias = f"-bias{a.online_bias:g}" if a.online_bias else ""
    path = Path(a.out) / f"result-{tag}r{a.rank}-s{a.steps}{bias}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
