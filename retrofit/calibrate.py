"""Training-free calibration: pick MC settings by forward passes, under a no-harm constraint.

The baseline every user tries first (MambaExtend-style): no gradient, a few minutes on CPU
for the reference models. On a calibration split of *training* text plus synthetic
retrieval rows (the tuning phrasings of :mod:`mc_retrofit.finetune.mix`, never the
evaluation's), it searches

1. the structural settings from short lists: segment size, aggregation (gated, SSC top-1,
   SSC top-2), then one knob at a time: cache weight, online bias, temperature
   (coordinate search from the best so far; each knob over its list);
2. then, one pass over the layers, each layer's own cache weight (0, half, the global one),

keeping the candidate with the best retrieval among those whose bits per token on the
calibration text stay within ``margin`` of the base model's. Retrieval is ranked by accuracy
(every answer token right), then by the answers' mean negative log-likelihood: a few rows
of a model that cannot yet answer them all score accuracy 0 for every candidate, and the
likelihood still tells which setting brings the answer closer. A candidate beats the base
when it is more accurate, or equally accurate with an answer likelihood that is better by a
95% paired bootstrap interval over the rows (below 0 for the change in NLL). When nothing
feasible beats the base, the result is the base itself (cache weight 0 everywhere):
calibration never makes a model worse on what it measures. Every candidate is one row of the
returned table (settings, bits, accuracy, answer NLL, feasible), for the report.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .config import MCConfig
from .errors import MCError

AGGREGATIONS = (("gated", 2), ("ssc", 1), ("ssc", 2))
CACHE_WEIGHTS = (0.25, 0.5, 1.0)
ONLINE_BIASES = (0.0, 1.0, 2.0, 4.0)
TEMPERATURES = (0.5, 1.0, 2.0)


@dataclass
class Calibration:
    config: MCConfig
    layer_weights: dict[int, float]  # per-layer cache weight (layer index -> weight)
    base_bits: float
    bits: float
    base_accuracy: float
    accuracy: float
    table: list[dict] = field(default_factory=list)
    base_answer_nll: float = float("nan")  # mean answer NLL, nats per answer token
    answer_nll: float = float("nan")

    @property
    def is_base(self) -> bool:
        return all(w == 0.0 for w in self.layer_weights.values())


@torch.no_grad()
def bits_per_token(model, windows: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token cross-entropy in bits over ``windows [N, L+1]``."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(w[:, :-1], use_cache=False).logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count / math.log(2.0)


@torch.no_grad()
def answer_scores(model, ids: torch.Tensor, labels: torch.Tensor, batch: int = 4) -> tuple[list[bool], list[float]]:
    """Per row: whether the argmax gives every labelled (answer) token (teacher-forced greedy
    decoding writes the answer exactly then), and the answer's mean NLL in nats per token."""
    hits, nll = [], []
    for i in range(0, len(ids), batch):
        logits = model(ids[i:i + batch], use_cache=False).logits.float()
        lab = labels[i:i + batch]
        ok = (logits.argmax(-1) == lab) | (lab == -100)
        hits += ok.all(1).tolist()
        tok = F.cross_entropy(logits.transpose(1, 2), lab, ignore_index=-100, reduction="none")  # [b, L]
        nll += (tok.sum(1) / (lab != -100).sum(1).clamp_min(1)).tolist()
    return hits, nll


def answer_accuracy(model, ids: torch.Tensor, labels: torch.Tensor, batch: int = 4) -> float:
    """Share of rows whose argmax gives every labelled (answer) token."""
    hits, _ = answer_scores(model, ids, labels, batch)
    return sum(hits) / len(hits)


def _with(base, config: MCConfig, weights: dict[int, float] | None = None):
    from .model import convert, gate_modules

    model = convert(copy.deepcopy(base), config)
    if weights:
        with torch.no_grad():
            for gate in gate_modules(model).values():
                gate.cache_weight.fill_(weights.get(gate.layer_idx, config.cache_weight))
    return model


def calibrate(base, text_windows: torch.Tensor, retrieval: tuple[torch.Tensor, torch.Tensor], *,
              segment_sizes: tuple[int, ...] = (256,), margin: float = 0.01, start: MCConfig | None = None,
              log: Callable[[str], None] = print) -> Calibration:
    """Search MC settings for the unconverted ``base`` model (see the module docstring).

    ``text_windows [N, L+1]``: calibration text (training text only); ``retrieval``:
    ``(input_ids, labels)`` rows whose labels mark the answer tokens; ``margin``: allowed rise
    of bits per token over the base."""
    if not len(text_windows) or not len(retrieval[0]):
        raise MCError("calibration needs text windows and retrieval rows; the calibration data is empty")
    if not (math.isfinite(margin) and margin >= 0):
        raise MCError(f"--margin must be a finite number >= 0, not {margin}")
    from .eval.stats import paired_bootstrap

    base.eval()
    base_bits = bits_per_token(base, text_windows)
    base_hits, base_nll = answer_scores(base, *retrieval)
    base_acc, base_mean_nll = sum(base_hits) / len(base_hits), sum(base_nll) / len(base_nll)
    log(f"base: {base_bits:.4f} bits/token, retrieval {base_acc:.3f} (answer NLL {base_mean_nll:.3f})")
    table: list[dict] = []
    row_nll: dict[int, list[float]] = {}  # id(row) -> per-row answer NLL, for the paired test against the base

    def score(cfg: MCConfig, weights=None) -> dict:
        model = _with(base, cfg, weights)
        hits, nll = answer_scores(model, *retrieval)
        row = {"segment_size": cfg.segment_size, "aggregation": cfg.aggregation, "top_k": cfg.top_k,
               "cache_weight": cfg.cache_weight, "online_bias": cfg.online_bias, "temperature": cfg.temperature,
               "layer_weights": dict(weights or {}), "bits": bits_per_token(model, text_windows),
               "accuracy": sum(hits) / len(hits), "answer_nll": sum(nll) / len(nll)}
        row["feasible"] = row["bits"] <= base_bits + margin
        row_nll[id(row)] = nll
        table.append(row)
        log(f"  {_describe(row)}: {row['bits']:.4f} bits/token ({row['bits'] - base_bits:+.4f}), "
            f"retrieval {row['accuracy']:.3f} (answer NLL {row['answer_nll']:.3f})"
            f"{'' if row['feasible'] else ' (over the margin)'}")
        return row

    def better(a: dict, b: dict | None) -> bool:  # feasible first, then accuracy, then answer NLL, then bits
        if b is None:
            return True
        return (a["feasible"], a["accuracy"], -a["answer_nll"], -a["bits"]) > \
            (b["feasible"], b["accuracy"], -b["answer_nll"], -b["bits"])

    def beats_base(row: dict) -> bool:
        if not row["feasible"] or row["accuracy"] < base_acc:
            return False
        if row["accuracy"] > base_acc:
            return True
        return paired_bootstrap(base_nll, row_nll[id(row)]).high < 0  # the answers' NLL fell, beyond noise

    from .model import adapter_of

    start = (start or MCConfig()).for_family(adapter_of(base))  # the family's defaults, as convert takes them
    best_cfg, best = None, None
    for C in segment_sizes:
        for agg, k in AGGREGATIONS:
            cfg = MCConfig.from_dict({**start.to_dict(), "segment_size": C, "aggregation": agg, "top_k": k})
            row = score(cfg)
            if better(row, best):
                best_cfg, best = cfg, row
    for name, values in (("cache_weight", CACHE_WEIGHTS), ("online_bias", ONLINE_BIASES),
                         ("temperature", TEMPERATURES)):
        for v in values:
            if v == getattr(best_cfg, name):
                continue
            cfg = MCConfig.from_dict({**best_cfg.to_dict(), name: v})
            row = score(cfg)
            if better(row, best):
                best_cfg, best = cfg, row
    from .model import gate_modules

    # the gates' own layer indices (a hybrid's mixers are numbered by the adapter, not the config)
    layers = [g.layer_idx for g in gate_modules(_with(base, best_cfg)).values()]
    weights = {i: best_cfg.cache_weight for i in layers}
    for i in layers:
        for w in (0.0, best_cfg.cache_weight / 2):
            trial = {**weights, i: w}
            row = score(best_cfg, trial)
            if better(row, best):
                weights, best = trial, row
    if not beats_base(best):
        log("no setting beats the base within the margin: the calibrated model is the base (cache weight 0)")
        weights = {i: 0.0 for i in layers}
        return Calibration(best_cfg, weights, base_bits, base_bits, base_acc, base_acc, table,
                           base_mean_nll, base_mean_nll)
    return Calibration(best_cfg, weights, base_bits, best["bits"], base_acc, best["accuracy"], table,
                       base_mean_nll, best["answer_nll"])


def _describe(row: dict) -> str:
    agg = f"ssc-{row['top_k']}" if row["aggregation"] == "ssc" else row["aggregation"]
    lw = "".join(f" L{i}={w:g}" for i, w in sorted(row["layer_weights"].items())) if row["layer_weights"] else ""
    return (f"seg {row['segment_size']} {agg} a={row['cache_weight']:g} bias={row['online_bias']:g} "
            f"T={row['temperature']:g}{lw}")


def calibrated_model(base, result: Calibration):
    """The base converted with the calibrated settings and per-layer cache weights."""
    return _with(base, result.config, result.layer_weights)
