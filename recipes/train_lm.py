"""Train a small byte-level (vocab 256) causal LM of any supported family on the Gutenberg books.

Usage:
    nice -n 10 python recipes/train_lm.py recipes/configs/mamba2-byte.json --out checkpoints/mamba2-byte
    python recipes/train_lm.py CONFIG --out DIR [--set key=value ...] [--force]

Data: the books of ``mc_retrofit.tasks.book_names("train")`` (never the evaluation-only ones),
minus a held-out tail of 32 KB used for the validation bits/byte in the log. Each training row
holds ``ctx + 1`` bytes of text; a share ``passkey_frac`` (``multikey_frac``) of the rows end
with a pass-key (multi-key recall) sample whose length is drawn between ``recall_min_len``
and a curriculum maximum that grows to ``ctx`` over the first ``curriculum_frac`` of training.
The loss is next-byte cross-entropy; answer bytes of recall samples weigh ``answer_weight``.

Progress (LR schedule, curriculum) follows whichever ends first: ``steps`` or ``max_minutes``.
Writes a Hugging Face-format directory (config.json, model.safetensors) and ``training.json``
with the recipe config, data, steps, time, device, the log of training bits/byte, and the
final held-out bits/byte on ``eval_book`` (first ``eval_bytes`` bytes, windows of ``ctx``),
the unigram baseline, and pass-key accuracy at length ``ctx``.
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
    family="mamba2", model={}, init_from=None, ctx=512, batch_size=16, steps=1000, max_minutes=None,
    lr=3e-3, min_lr_frac=0.1, warmup=50, weight_decay=0.1, grad_clip=1.0, seed=0,
    passkey_frac=0.25, multikey_frac=0.0, multikey_keys=[2, 4], recall_min_len=128, curriculum_frac=0.5,
    answer_weight=1.0, log_every=20, val_bytes=32768, eval_book="austen-emma.txt", eval_bytes=65536,
    passkey_eval_samples=20, data_dir=None, device=None, threads=None,
)
CHECK_BYTES = 8192  # a quick re-check slice (the start of the held-out slice) for tests


class Sampler:
    """Training batches: either ``ctx + 1`` bytes of text per row, or (a share
    ``passkey_frac + multikey_frac`` of the batches) recall samples of one curriculum length.

    Recall batches are only as long as their samples, so the short samples early in the
    curriculum cost little."""

    def __init__(self, cfg: dict, corpus: bytes, rng: random.Random):
        self.cfg, self.corpus, self.rng = cfg, corpus, rng

    def recall_length(self, progress: float) -> int:
        cfg, n = self.cfg, self.cfg["ctx"] + 1
        ramp = min(1.0, progress / cfg["curriculum_frac"]) if cfg["curriculum_frac"] > 0 else 1.0
        hi = int(cfg["recall_min_len"] + ramp * (n - cfg["recall_min_len"]))
        return self.rng.randint(min(cfg["recall_min_len"], hi), hi)

    def recall(self, length: int) -> tasks.TextSample:
        cfg, rng = self.cfg, self.rng
        if rng.random() * (cfg["passkey_frac"] + cfg["multikey_frac"]) < cfg["passkey_frac"]:
            return tasks.passkey_sample(self.corpus, length, rng)
        lo, top = cfg["multikey_keys"]
        keys = rng.randint(lo, top)
        return tasks.multikey_sample(self.corpus, max(length, 70 * keys + 60), rng, n_keys=keys)

    def batch(self, size: int, progress: float):
        """(ids [size, T+1], loss weights [size, T], "text" or "recall"); T = ctx for text."""
        cfg, rng, n = self.cfg, self.rng, self.cfg["ctx"] + 1
        if rng.random() >= cfg["passkey_frac"] + cfg["multikey_frac"]:
            starts = [rng.randrange(0, len(self.corpus) - n) for _ in range(size)]
            ids = torch.tensor([list(self.corpus[s:s + n]) for s in starts], dtype=torch.long)
            return ids, torch.ones(size, n - 1), "text"
        samples = [self.recall(self.recall_length(progress))]
        samples += [self.recall(len(samples[0].text)) for _ in range(size - 1)]
        width = max(len(s.text) for s in samples)
        rows, weight = [], torch.ones(size, width - 1)
        for i, s in enumerate(samples):
            pad = width - len(s.text)  # multi-key samples may need more room: left-fill with text
            start = rng.randrange(0, len(self.corpus) - pad)
            rows.append(list(self.corpus[start:start + pad] + s.text))
            weight[i, width - 1 - len(s.answer):] = cfg["answer_weight"]  # targets that are answer bytes
        return torch.tensor(rows, dtype=torch.long), weight, "recall"


def lr_at(cfg: dict, step: int, progress: float) -> float:
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    floor = cfg["lr"] * cfg["min_lr_frac"]
    return floor + (cfg["lr"] - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def scan_context(family: str):
    """Same math, faster on CPU: see families.speed_context (kept under this name for callers)."""
    return families.speed_context(family)


def evaluate(model, cfg: dict, train_corpus: bytes, device) -> dict:
    """Final numbers recorded in training.json: held-out bits/byte (and on its first
    CHECK_BYTES, which tests recompute), the unigram baseline, pass-key accuracy at ctx."""
    model.eval()
    held = tasks.eval_slice(cfg["eval_book"], cfg["eval_bytes"], data_dir=cfg["data_dir"])
    with scan_context(cfg["family"]):
        bpb = tasks.bits_per_byte(model, held, window=cfg["ctx"], device=device)
        check = tasks.bits_per_byte(model, held[:CHECK_BYTES], window=cfg["ctx"], device=device)
        book = tasks.load_book(cfg["eval_book"], cfg["data_dir"])
        samples = [tasks.passkey_sample(book, cfg["ctx"], random.Random(1000 + i))
                   for i in range(cfg["passkey_eval_samples"])]
        pk = tasks.text_accuracy(model, samples, device=device) if samples else None
    return {
        "heldout": {"book": cfg["eval_book"], "bytes": cfg["eval_bytes"], "offset": 0, "window": cfg["ctx"],
                    "bits_per_byte": bpb, "check_bytes": CHECK_BYTES, "check_bits_per_byte": check,
                    "unigram_bits_per_byte": tasks.unigram_bits_per_byte(train_corpus, held)},
        "passkey": {"length": cfg["ctx"], "samples": len(samples), "haystack": cfg["eval_book"],
                    "seeds": f"1000..{1000 + len(samples) - 1}", "accuracy": pk},
    }


def train(cfg: dict, out: str | Path, force: bool = False, quiet: bool = False) -> dict:
    if cfg["passkey_frac"] + cfg["multikey_frac"] > 0 and cfg["recall_min_len"] < 110:
        raise MCError("recall_min_len must be at least 110 bytes (a pass-key sample needs 104)")
    if cfg["multikey_frac"] > 0 and cfg["ctx"] + 1 < 70 * cfg["multikey_keys"][1] + 60:
        raise MCError(f"ctx {cfg['ctx']} is too short for {cfg['multikey_keys'][1]} keys")
    device = common.setup(cfg)
    names = tasks.book_names("train", cfg["data_dir"])
    corpus = tasks.load_corpus("train", cfg["data_dir"])
    train_corpus, val = corpus[: -cfg["val_bytes"]], corpus[-cfg["val_bytes"]:]
    if cfg["init_from"]:
        model = families.load(cfg["init_from"]).train()
        if families.family_of(cfg["init_from"]) != cfg["family"]:
            raise MCError(f"init_from {cfg['init_from']} is not a {cfg['family']} checkpoint")
    else:
        model = families.build(cfg["family"], vocab_size=256, seed=cfg["seed"], **cfg["model"])
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    sampler = Sampler(cfg, train_corpus, random.Random(cfg["seed"]))
    log, t0, step, progress = [], time.time(), 0, 0.0
    limit = cfg["max_minutes"] * 60 if cfg["max_minutes"] else None
    bar = tqdm(total=cfg["steps"], disable=quiet, desc=f"train {cfg['family']}")
    running, recall_running = [], []
    with scan_context(cfg["family"]):
        while step < cfg["steps"] and (limit is None or time.time() - t0 < limit):
            progress = max(step / cfg["steps"], (time.time() - t0) / limit if limit else 0.0)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, progress)
            ids, weight, kind = sampler.batch(cfg["batch_size"], progress)
            ids, weight = ids.to(device), weight.to(device)
            logits = model(input_ids=ids[:, :-1]).logits.float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
            loss = (nll * weight.reshape(-1)).sum() / weight.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            opt.step()
            step += 1
            if kind == "text":
                running.append(float(nll.detach().mean()) / math.log(2))
            else:  # how many answer bytes the model already gets right (teacher-forced argmax)
                ans = weight.reshape(-1) == cfg["answer_weight"]
                hit = logits.detach().reshape(-1, logits.shape[-1]).argmax(-1)[ans] == ids[:, 1:].reshape(-1)[ans]
                recall_running.append(float(hit.float().mean()))
            if step % cfg["log_every"] == 0:
                mean = (lambda v: sum(v) / len(v) if v else None)
                log.append([step, round(time.time() - t0, 1), mean(running), mean(recall_running)])
                recall_running = []
                bar.set_postfix(text_bpb=log[-1][2], answer_acc=log[-1][3])
                running = []
            bar.update(1)
        bar.close()
        model.eval()
        val_bpb = tasks.bits_per_byte(model, val, window=cfg["ctx"], device=device)
    seconds = time.time() - t0
    record = {
        "family": cfg["family"], "params": families.n_params(model), "ctx": cfg["ctx"], "steps": step,
        "minutes": round(seconds / 60, 2), "device": common.device_name(device),
        "host": common.host(),
        "tokens_seen": step * cfg["batch_size"] * cfg["ctx"],
        "data": {"text_files": names, "excluded": list(tasks.EVAL_ONLY), "val_bytes": cfg["val_bytes"],
                 "passkey_frac": cfg["passkey_frac"], "multikey_frac": cfg["multikey_frac"]},
        "recipe": cfg, "log_columns": ["step", "seconds", "text_bits_per_byte", "recall_answer_byte_accuracy"], "log": log, "val_bits_per_byte": val_bpb,
    }
    if cfg["init_from"]:  # keep the chain of earlier training runs with the checkpoint
        parent = Path(cfg["init_from"]) / "training.json"
        earlier = json.loads(parent.read_text()) if parent.is_file() else {}
        record["init"] = {"from": str(cfg["init_from"]), "training": {k: v for k, v in earlier.items() if k != "log"}}
    record.update(evaluate(model, cfg, train_corpus, device))
    common.save(model, record, out, force)
    return record


def reevaluate(path: str | Path, update: bool = False) -> dict:
    """Recompute ``evaluate`` for a checkpoint this recipe wrote; with ``update``, store the
    numbers in its training.json (for checkpoints written before a measurement existed)."""
    path = Path(path)
    record = json.loads((path / "training.json").read_text())
    cfg = {**DEFAULTS, **record["recipe"]}
    device = common.setup(cfg)
    model = families.load(path).to(device)
    corpus = tasks.load_corpus("train", cfg["data_dir"])
    numbers = evaluate(model, cfg, corpus[: -cfg["val_bytes"]], device)
    if update:
        record.update(numbers)
        (path / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return numbers


def report(rec: dict) -> None:
    h = rec["heldout"]
    print(f"{rec['family']}: {rec['steps']} steps, {rec['minutes']} min, {h['book']} {h['bits_per_byte']:.3f} bits/byte "
          f"(unigram {h['unigram_bits_per_byte']:.3f}), pass key @{rec['ctx']}: {rec['passkey']['accuracy']}")


def main(argv=None):
    common.main(__doc__, DEFAULTS, train, reevaluate, report, lambda numbers: print(json.dumps(numbers, indent=1)),
                "the numbers", argv)


if __name__ == "__main__":
    main()
