"""Recall tasks on real-text haystacks: pass-key (single needle, a grid of lengths x
depths), multi-key (several named keys, one asked for: the others are distractors) and
variable tracking (a chain of assignments plus distractor chains).

The prompts come from :mod:`mc_retrofit.tasks` (byte-exact lengths). A sample is scored
by teacher-forced greedy decoding: correct when the argmax at every answer position is
the answer token (which is exactly when greedy decoding would write the answer); the
answer's log-likelihood is kept too, a softer signal when accuracies sit at 0 or 1.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import torch

from mc_retrofit import tasks
from mc_retrofit.errors import MCError

from .forward import answer_scores
from .stats import wilson
from .text import Codec

LN2 = math.log(2.0)


@dataclass
class TaskItem:
    task: str
    length: int  # requested length in tokens
    depth: float | None
    index: int
    ids: torch.Tensor  # prompt + answer token ids
    answer_len: int
    meta: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return (self.task, self.length, self.depth, self.index)


def _generate(task: str, haystack: bytes, n_bytes: int, rng: random.Random, depth, body: dict) -> tasks.TextSample:
    digits = body.get("digits", 5)
    if task == "passkey":
        return tasks.passkey_sample(haystack, n_bytes, rng, depth=depth, digits=digits)
    if task == "multikey":
        return tasks.multikey_sample(haystack, n_bytes, rng, n_keys=body.get("n_keys", 4), depth=depth, digits=digits)
    if task == "variable_tracking":
        return tasks.variable_tracking_sample(haystack, n_bytes, rng, hops=body.get("hops", 2),
                                              n_chains=body.get("n_chains", 2), digits=digits)
    raise ValueError(task)


def make_mqar_items(body: dict, vocab_size: int, seed: int) -> list[TaskItem]:
    """MQAR sequences (``mc_retrofit.tasks.mqar``, the generator the recall checkpoints
    were trained with) for every (length, pairs) cell; ``depth`` holds the number of
    pairs, so results come as a length x pairs grid. A sample's score is the share of its
    queried keys whose value is the argmax (its ``correct``), over ``n_pairs`` queries (fewer
    when the length leaves less room after the pairs)."""
    for P in body.get("pairs", [8]):
        if P >= vocab_size // 2:
            raise MCError(f"mqar: {P} pairs need more than {vocab_size // 2} key tokens (vocabulary {vocab_size})")
    items = []
    for L, P, n_queries, cell_seed in mqar_cells(body, seed):
        batch = tasks.mqar(body.get("samples", 64), L, P, vocab_size=vocab_size, n_queries=n_queries,
                           seed=cell_seed, random_non_queries=bool(body.get("noise", False)))
        for i in range(batch.inputs.shape[0]):
            items.append(TaskItem("mqar", L, float(P), i, batch.inputs[i], 0,
                                  {"targets": batch.targets[i], "n_pairs": P}))
    return items


def mqar_cells(body: dict, seed: int) -> list[tuple[int, int, int, int]]:
    """``(length, pairs, queries, generator seed)`` of every MQAR cell that exists: a
    (length, pairs) cell needs room for a query after its pairs, and asks at most ``pairs``."""
    cells = []
    for L in body["lengths"]:
        for P in body.get("pairs", [8]):
            room = (L - 2 * P) // 2  # query slots after the pairs
            if room >= 1:
                cells.append((L, P, min(P, room), _seed(f"{seed}:mqar:{L}:{P}")))
    return cells


def _seed(text: str) -> int:
    return int.from_bytes(text.encode(), "little") % (2**31 - 1)


@torch.no_grad()
def score_mqar(model, items: list[TaskItem], device, batch_size: int, variant: str, progress=None) -> list[dict]:
    """One record per MQAR sequence: correct = recall (share of queries answered), the
    queries' total NLL (nats) as answer_nll over answer_tokens = queries."""
    from .forward import backbone_hidden, logits_at

    records = []
    i = 0
    while i < len(items):
        # a batch of equal lengths: up to where the length changes (no sample is skipped)
        L = items[i].ids.shape[0]
        chunk = list(itertools.takewhile(lambda it: it.ids.shape[0] == L, items[i:i + batch_size]))
        i += len(chunk)
        ids = torch.stack([it.ids for it in chunk]).to(device)
        targets = torch.stack([it.meta["targets"] for it in chunk]).to(device)
        hidden = backbone_hidden(model, ids)
        for b, it in enumerate(chunk):
            pos = (targets[b] != -100).nonzero()[:, 0]
            logits = logits_at(model, hidden[b:b + 1, pos.to(hidden.device)], targets.device)[0]
            want = targets[b, pos]
            correct = tasks.answer_hits(logits, want).float().mean()
            nll = tasks.answer_nll(logits, want)
            records.append({
                "kind": "mqar", "variant": variant, "length": it.length, "depth": it.depth, "sample": it.index,
                "tokens": L, "correct": float(correct), "answer_nll": float(nll), "answer_tokens": int(pos.numel()),
                "answer": None, "needle_offsets": None,
            })
        if progress is not None:
            progress.update(len(chunk))
    return records


def make_items(task: str, body: dict, haystack: bytes, codec: Codec, seed: int,
               bytes_per_token: float = 1.0) -> list[TaskItem]:
    """Every sample of a task's grid. Each sample's generator is seeded from
    (seed, task, length, depth, index), so any subset (a shard) is reproducible alone."""
    depths = body.get("depths") or [None]
    items = []
    for L in body["lengths"]:
        for d in depths:
            for i in range(body.get("samples", 4)):
                n_bytes = max(2, int(round(L * bytes_per_token)))
                for _ in range(1 if codec.byte_level else 3):
                    # A tokenizer packs filler and needles differently: rescale the byte
                    # length until the sample has about L tokens (same seed each time).
                    s = _generate(task, haystack, n_bytes, random.Random(f"{seed}:{task}:{L}:{d}:{i}"), d, body)
                    prompt, answer = codec.encode(s.prompt), codec.encode(s.answer)
                    n_tok = len(prompt) + len(answer)
                    if n_tok == L:
                        break
                    n_bytes = max(2, int(round(n_bytes * L / n_tok)))
                ids = torch.tensor(prompt + answer, dtype=torch.long)
                meta = {k: v for k, v in s.meta.items() if k in ("needle_offsets", "depth", "name")}
                meta["answer"] = s.answer.decode()
                items.append(TaskItem(task, L, d, i, ids, len(answer), meta))
    return items


def score_items(model, items: list[TaskItem], device, batch_size: int, variant: str, progress=None) -> list[dict]:
    """One record per sample: correct (0/1), answer NLL (nats) and answer tokens."""
    groups: dict[tuple, list[TaskItem]] = {}
    for it in items:
        groups.setdefault((len(it.ids), it.answer_len), []).append(it)
    records = []
    for (T, A), group in sorted(groups.items()):
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            ids = torch.stack([it.ids for it in chunk]).to(device)
            correct, nll = answer_scores(model, ids, T - A, A)
            for it, c, n in zip(chunk, correct.tolist(), nll.tolist()):
                records.append({
                    "kind": it.task, "variant": variant, "length": it.length, "depth": it.depth,
                    "sample": it.index, "tokens": T, "correct": int(c), "answer_nll": float(n), "answer_tokens": A,
                    "answer": it.meta.get("answer"), "needle_offsets": it.meta.get("needle_offsets"),
                })
            if progress is not None:
                progress.update(len(chunk))
    return records


def summarise(records: list[dict], task: str, variants: list[str]) -> dict:
    """``by_length[variant][L]`` = accuracy and answer bits/token over every depth;
    ``grid[variant][L][depth]`` = accuracy per cell (tasks with a depth grid)."""
    by_length, grid = {}, {}
    for v in variants:
        rows = [r for r in records if r["kind"] == task and r["variant"] == v]
        for L in sorted({r["length"] for r in rows}):
            rs = [r for r in rows if r["length"] == L]
            hits = sum(r["correct"] for r in rs)
            ci = wilson(hits, len(rs))
            by_length.setdefault(v, {})[str(L)] = {
                "accuracy": hits / len(rs),
                "ci95": [ci.low, ci.high],  # Wilson score interval over the samples
                "answer_bits_per_token": sum(r["answer_nll"] for r in rs) / sum(r["answer_tokens"] for r in rs) / LN2,
                "samples": len(rs),
                "mean_tokens": sum(r["tokens"] for r in rs) / len(rs),
            }
            depths = sorted({r["depth"] for r in rs if r["depth"] is not None})
            for d in depths:
                cell = [r for r in rs if r["depth"] == d]
                grid.setdefault(v, {}).setdefault(str(L), {})[str(d)] = {
                    "accuracy": sum(r["correct"] for r in cell) / len(cell),
                    "answer_bits_per_token": sum(r["answer_nll"] for r in cell) / sum(r["answer_tokens"] for r in cell) / LN2,
                    "samples": len(cell),
                }
    return {"by_length": by_length, "grid": grid}
