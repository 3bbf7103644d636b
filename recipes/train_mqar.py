"""Train a small model of any supported family on multi-query associative recall only (MQAR).

Usage:
    nice -n 10 python recipes/train_mqar.py recipes/configs/mqar-mamba2.json --out checkpoints/mqar-mamba2

The task is ``mc_retrofit.tasks.mqar`` (Zoology's MQAR: ``n_pairs`` key-value pairs, then
queries for the keys at power-law gaps; vocabulary ``vocab_size``), at ``seq_len`` tokens. Each
step draws a fresh batch; the number of pairs per batch is drawn from ``pairs_range`` (its top
growing over the first ``pairs_curriculum_frac`` of training) so the model learns to store
every count up to ``n_pairs``. The loss is cross-entropy on the queried
positions only. Training stops at ``steps``, at ``max_minutes``, or when recall on a fixed
validation batch at the training setting reaches ``target_accuracy``.

Then it measures recall on every (seq_len, n_pairs) setting of ``eval_grid`` (fresh seeds) and
writes a Hugging Face-format directory with ``training.json`` (config, steps, time, device,
log, and the accuracy table).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import families  # noqa: E402

from mc_retrofit import tasks  # noqa: E402
from mc_retrofit.errors import MCError  # noqa: E402

DEFAULTS = dict(
    family="mamba2", model={"hidden_size": 64, "num_hidden_layers": 2}, vocab_size=128, seq_len=64, n_pairs=8,
    pairs_range=[1, 8], pairs_curriculum_frac=0.0, random_non_queries=True, batch_size=64, steps=3000,
    max_minutes=None, lr=3e-3, min_lr_frac=0.05, warmup=50,
    weight_decay=0.1, grad_clip=1.0, seed=0, target_accuracy=0.99, check_every=50, log_every=25,
    eval_samples=256,
    # [seq_len, n_pairs] or [seq_len, n_pairs, random_non_queries]: longer, more pairs, noisier than trained.
    eval_grid=[[64, 8], [128, 8], [256, 8], [512, 8], [1024, 8], [64, 16], [128, 16], [128, 32], [256, 32],
               [64, 8, True], [256, 8, True], [1024, 8, True]],
    threads=None, device=None,
)
VAL_SEED, EVAL_SEED = 1, 100  # training batches use seeds from 10**6 up: never the same sequences


def model_defaults(family: str) -> dict:
    """Head layout for a hidden size of 64 (the family defaults assume 128)."""
    return {
        "mamba2": dict(num_heads=4, head_dim=32, state_size=16, chunk_size=32),
        "mamba": dict(state_size=16),
        "delta_net": dict(num_heads=2),
        "gated_deltanet": dict(num_heads=2, head_dim=32),
        "retnet": dict(num_heads=2),
        "gla": dict(num_heads=2),
        "rwkv7": dict(head_dim=32),
    }.get(family, {})


def scan_context(family: str):
    """Same math, faster on CPU: see families.speed_context (kept under this name for callers)."""
    return families.speed_context(family)


@torch.no_grad()
def accuracy(model, cfg: dict, seq_len: int, n_pairs: int, seed: int, device, noise: bool | None = None) -> float:
    """Recall on ``cfg["eval_samples"]`` sequences; ``noise`` (default: as trained) fills the
    gaps with random tokens instead of zeros."""
    noise = cfg["random_non_queries"] if noise is None else noise
    batch = tasks.mqar(cfg["eval_samples"], seq_len, n_pairs, vocab_size=cfg["vocab_size"], seed=seed,
                       random_non_queries=noise)
    correct = total = 0
    for i in range(0, cfg["eval_samples"], 64):
        part = tasks.MQARBatch(*(t[i:i + 64] for t in (batch.inputs, batch.targets, batch.mask)))
        logits = model(input_ids=part.inputs.to(device)).logits.float().cpu()
        n = int(part.mask.sum())
        correct += tasks.mqar_accuracy(logits, part) * n
        total += n
    return correct / total


def pairs_max(cfg: dict, progress: float) -> int:
    """Most pairs in a training batch: grows from the low end of ``pairs_range`` to its high
    end over the first ``pairs_curriculum_frac`` of training (at once when 0)."""
    lo, hi = cfg["pairs_range"]
    frac = cfg["pairs_curriculum_frac"]
    ramp = min(1.0, progress / frac) if frac > 0 else 1.0
    return max(lo, round(lo + ramp * (hi - lo)))


def evaluate_grid(model, cfg: dict, device) -> list[dict]:
    rows = []
    for entry in tqdm(cfg["eval_grid"], desc="eval grid", leave=False):
        L, k = entry[:2]
        noise = bool(entry[2]) if len(entry) > 2 else cfg["random_non_queries"]
        rows.append({"seq_len": L, "n_pairs": k, "random_non_queries": noise,
                     "accuracy": accuracy(model, cfg, L, k, EVAL_SEED, device, noise)})
    return rows


def reevaluate(path: str | Path, update: bool = False) -> list[dict]:
    """Measure the current default ``eval_grid`` on a checkpoint this recipe wrote (for one
    trained before a setting was added); with ``update``, store it in its training.json."""
    path = Path(path)
    record = json.loads((path / "training.json").read_text())
    cfg = {**DEFAULTS, **record["recipe"], "eval_grid": DEFAULTS["eval_grid"]}
    device = common.setup(cfg)
    model = families.load(path).to(device)
    with scan_context(cfg["family"]):
        grid = evaluate_grid(model, cfg, device)
    if update:
        record["eval"]["grid"] = grid
        record["recipe"]["eval_grid"] = cfg["eval_grid"]
        (path / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return grid


def lr_at(cfg: dict, step: int, progress: float) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    floor = cfg["lr"] * cfg["min_lr_frac"]
    return floor + (cfg["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: dict, out: str | Path, force: bool = False, quiet: bool = False) -> dict:
    device = common.setup(cfg)
    lo, hi = cfg["pairs_range"]
    if not 1 <= lo <= hi <= cfg["n_pairs"]:
        raise MCError(f"pairs_range {cfg['pairs_range']} must lie in 1..n_pairs ({cfg['n_pairs']})")
    model = families.build(cfg["family"], vocab_size=cfg["vocab_size"], seed=cfg["seed"],
                           **{**model_defaults(cfg["family"]), **cfg["model"]}).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.98))
    rng = random.Random(cfg["seed"])
    limit = cfg["max_minutes"] * 60 if cfg["max_minutes"] else None
    log, t0, step, val, losses = [], time.time(), 0, 0.0, []
    bar = tqdm(total=cfg["steps"], disable=quiet, desc=f"mqar {cfg['family']}")
    with scan_context(cfg["family"]):
        while step < cfg["steps"] and (limit is None or time.time() - t0 < limit):
            progress = max(step / cfg["steps"], (time.time() - t0) / limit if limit else 0.0)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, progress)
            b = tasks.mqar(cfg["batch_size"], cfg["seq_len"], rng.randint(lo, pairs_max(cfg, progress)),
                           vocab_size=cfg["vocab_size"], random_non_queries=cfg["random_non_queries"],
                           seed=10**6 + cfg["seed"] * 10**7 + step)
            logits = model(input_ids=b.inputs.to(device)).logits.float()
            loss = F.cross_entropy(logits[b.mask.to(device)], b.targets[b.mask].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % cfg["log_every"] == 0 or step % cfg["check_every"] == 0:
                if step % cfg["check_every"] == 0:
                    model.eval()
                    val = accuracy(model, cfg, cfg["seq_len"], cfg["n_pairs"], VAL_SEED, device)
                    model.train()
                log.append([step, round(time.time() - t0, 1), sum(losses) / len(losses), val])
                losses = []
                bar.set_postfix(loss=f"{log[-1][2]:.3f}", val_acc=f"{val:.3f}")
                if val >= cfg["target_accuracy"]:
                    break
        bar.close()
        model.eval()
        grid = evaluate_grid(model, cfg, device)
    record = {
        "family": cfg["family"], "task": "mqar", "params": families.n_params(model), "seq_len": cfg["seq_len"],
        "n_pairs": cfg["n_pairs"], "vocab_size": cfg["vocab_size"], "steps": step,
        "minutes": round((time.time() - t0) / 60, 2), "device": common.device_name(device), "host": common.host(),
        "recipe": cfg, "log_columns": ["step", "seconds", "train_loss", "val_accuracy"], "log": log,
        "eval": {"samples": cfg["eval_samples"], "seed": EVAL_SEED, "generator": "mc_retrofit.tasks.mqar",
                 "grid": grid},
    }
    common.save(model, record, out, force)
    return record


def report(rec: dict) -> None:
    print(f"{rec['family']} MQAR: {rec['steps']} steps, {rec['minutes']} min")
    print_grid(rec["eval"]["grid"])


def main(argv=None):
    common.main(__doc__, DEFAULTS, train, reevaluate, report, print_grid, "the grid", argv)


def print_grid(grid: list[dict]) -> None:
    for row in grid:
        fill = "noise" if row.get("random_non_queries") else "zeros"
        print(f"  seq_len {row['seq_len']:5d}  pairs {row['n_pairs']:3d}  {fill}  accuracy {row['accuracy']:.3f}")


if __name__ == "__main__":
    main()
