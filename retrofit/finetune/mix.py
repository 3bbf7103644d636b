"""Retrieval-aware tuning data: training-book text with synthetic long-range items in it.

Gate tuning on plain text learns little, because text rarely needs a fact from 2 KB back.
This builds labelled rows ``(input_ids [N, L], labels [N, L])`` for
``finetune(model, (input_ids, labels))`` from a *mix*, e.g. ``text=0.6,passkey=0.2,
multikey=0.1,kv=0.1``:

- ``text``: a window of the tuning text, every next token scored;
- ``passkey``: a number stated once at some depth, asked for at the end;
- ``multikey``: several named numbers (distractors), one asked for;
- ``kv``: attribute facts about invented names (``the colour of Tarvo is 41207``) stated
  at several depths, one queried at the end.

Retrieval rows score only their answer tokens (``labels = -100`` elsewhere), so the loss
weight sits on what needs the far-back memory. Needles sit at depths spread over the whole
window (uniform), and with ``curriculum`` the rows are ordered by the distance from the
needle to the question (short first), for samplers that read rows in order.

The phrasings here are the tuning phrasings only: every one differs from the phrasing
``mc_retrofit.tasks`` uses for evaluation (``The pass key is ...``), and the filler must be
training text (the evaluation-only books are refused by content), so what an evaluation
measures afterwards is retrieval, not template matching.

Everything is assembled at the token level: ``encode(bytes) -> list[int]`` (default: the
bytes themselves, for byte-level models; a tokenizer's encode otherwise), so the rows have
exactly ``L`` tokens for any tokenizer.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MCError
from ..eval_only import check_not_eval_only

ITEMS = ("text", "passkey", "multikey", "kv")

# (needle, question) templates; {key} the number, {name} a name, {attr} an attribute.
PASSKEY = (
    (" Keep this code in mind: {key}. ", " Which code was I asked to keep in mind? It was "),
    (" My locker number is {key}, I must not forget it. ", " Later I wondered: my locker number? It is "),
    (" Secret number: {key}. Do not lose it. ", " Recall the secret number. The secret number is "),
    (" Note for later - the ticket reads {key}. ", " What did the ticket read? The ticket read "),
)
MULTIKEY = (
    (" The code of the {name} room is {key}. ", " Which code opens the {name} room? The code is "),
    (" {name} was given the number {key}. ", " What number was {name} given? {name} was given "),
    (" Box {name} carries the label {key}. ", " Tell me the label of box {name}. The label is "),
)
KV = (
    (" The {attr} of {name} is {key}. ", " So, the {attr} of {name}? It is "),
    (" {name}'s {attr} was recorded as {key}. ", " What was {name}'s {attr} recorded as? It was "),
    (" Record: {name}, {attr} {key}. ", " Look up {name}, {attr}: "),
)
ATTRS = ("colour", "height", "weight", "price", "age", "rank", "score", "depth")
NAMES = ("Tarvo", "Elsbeth", "Quill", "Marnie", "Oskar", "Pell", "Ysolde", "Bram", "Corin", "Dagny", "Fenwick",
         "Ilse", "Jory", "Katrin", "Lorcan", "Nessa")
# The evaluation phrasings (mc_retrofit.tasks): a tuning template must contain none of them.
EVAL_MARKERS = ("pass key", "Remember it", "What is the", "Let ")


def parse_mix(text: str | dict) -> dict[str, float]:
    """``"text=0.6,passkey=0.2,..."`` (or a dict) -> shares that sum to 1, with one-line errors."""
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        pairs = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            name, eq, value = part.partition("=")
            if not eq:
                raise MCError(f"--mix takes name=share pairs like text=0.6,passkey=0.4, not {part.strip()!r}")
            pairs.append((name.strip(), value.strip()))
    shares: dict[str, float] = {}
    for name, value in pairs:
        if name not in ITEMS:
            raise MCError(f"unknown mix item {name!r}; choose from {', '.join(ITEMS)}")
        try:
            share = float(value)
        except (TypeError, ValueError):
            raise MCError(f"the share of {name} must be a number, not {value!r}") from None
        if not math.isfinite(share) or share < 0:
            raise MCError(f"the share of {name} must be a finite number >= 0, not {value!r}")
        shares[name] = shares.get(name, 0.0) + share
    total = sum(shares.values())
    if not shares or abs(total - 1.0) > 1e-6:
        raise MCError(f"mix shares must sum to 1, these sum to {total:g}: {shares}")
    return {k: v for k, v in shares.items() if v > 0}


@dataclass
class Row:
    tokens: list[int]  # L + 1 tokens
    answer: tuple[int, int] | None  # [start, end) of the answer tokens in ``tokens``; None: score all
    item: str
    distance: int  # tokens from the (queried) needle to the question (0 for text)


def _bytes_encode(data: bytes) -> list[int]:
    return list(data)


class MixBuilder:
    """Rows of exactly ``seq_len + 1`` tokens from ``text`` (training text, bytes)."""

    def __init__(self, text: bytes, seq_len: int, mix: str | dict, *, encode: Callable[[bytes], list[int]] | None = None,
                 vocab_size: int | None = None, digits: int = 5, where: str = "the tuning text"):
        if seq_len < 16:
            raise MCError(f"--seq-len {seq_len} is too short for retrieval items (at least 16 tokens)")
        check_not_eval_only(text, where)
        self.shares = parse_mix(mix)
        self.seq_len, self.digits = seq_len, digits
        self.encode = encode or _bytes_encode
        self.stream = self.encode(text)
        if len(self.stream) < seq_len + 1:
            raise MCError(f"{where} has {len(self.stream)} tokens; a row needs {seq_len + 1}")
        if vocab_size is not None:
            probe = self.encode(" ".join(t for pair in PASSKEY + MULTIKEY + KV for t in pair).encode() + b"0123456789")
            high = max(max(probe), max(self.stream))
            if high >= vocab_size:
                raise MCError(f"the text and items need token ids up to {high}, but the model's vocabulary has "
                              f"{vocab_size} entries: this model cannot spell the retrieval items")

    # -- one row of each kind ------------------------------------------------------------------
    def _filler(self, n: int, rng: random.Random) -> list[int]:
        start = rng.randrange(0, len(self.stream) - n + 1)
        return self.stream[start:start + n]

    def _key(self, rng: random.Random) -> str:
        return str(rng.randrange(10 ** (self.digits - 1), 10 ** self.digits))

    def _assemble(self, rng, needles: list[list[int]], target: int, question: list[int], answer: list[int],
                  item: str) -> Row:
        L1 = self.seq_len + 1
        n_fill = L1 - sum(map(len, needles)) - len(question) - len(answer)
        if n_fill < 0:
            raise MCError(f"--seq-len {self.seq_len} is too short for a {item} item ({L1 - n_fill} tokens)")
        fill = self._filler(n_fill, rng)
        cuts = sorted((rng.randint(0, n_fill), i) for i in range(len(needles)))  # depths uniform over the window
        out, pos, at = [], 0, {}
        for cut, i in cuts:
            out += fill[pos:cut]
            pos = cut
            at[i] = len(out) + len(needles[i])  # end of needle i
            out += needles[i]
        out += fill[pos:]
        distance = len(out) - at[target]
        start = len(out) + len(question)
        tokens = out + question + answer
        return Row(tokens, (start, start + len(answer)), item, distance)

    def row(self, item: str, rng: random.Random) -> Row:
        enc = self.encode
        if item == "text":
            return Row(self._filler(self.seq_len + 1, rng), None, "text", 0)
        key = self._key(rng)
        if item == "passkey":
            needle, question = rng.choice(PASSKEY)
            return self._assemble(rng, [enc(needle.format(key=key).encode())], 0, enc(question.encode()),
                                  enc(key.encode()), item)
        templates = MULTIKEY if item == "multikey" else KV
        n = rng.randint(2, 4)
        names = rng.sample(NAMES, n)
        attr = rng.choice(ATTRS)
        keys = [key] + [self._key(rng) for _ in range(n - 1)]
        needle, question = rng.choice(templates)
        needles = [enc(needle.format(name=nm, key=k, attr=attr).encode()) for nm, k in zip(names, keys)]
        target = rng.randrange(n)
        return self._assemble(rng, needles, target, enc(question.format(name=names[target], attr=attr).encode()),
                              enc(keys[target].encode()), item)

    # -- a dataset ---------------------------------------------------------------------------
    def rows(self, n: int, seed: int = 0, curriculum: bool = False) -> list[Row]:
        """``n`` rows, item counts in proportion to the shares (largest remainders)."""
        rng = random.Random(seed)
        counts = {k: int(v * n) for k, v in self.shares.items()}
        rest = sorted(self.shares, key=lambda k: self.shares[k] * n - counts[k], reverse=True)
        for k in rest[: n - sum(counts.values())]:
            counts[k] += 1
        rows = [self.row(item, rng) for item, c in counts.items() for _ in range(c)]
        if curriculum:  # short needle-to-question distances first (text rows spread evenly)
            rows.sort(key=lambda r: r.distance if r.answer is not None else rng.randrange(self.seq_len))
        else:
            rng.shuffle(rows)
        return rows

    def tensors(self, n: int, seed: int = 0, curriculum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [n, L], labels [n, L]): labels[t] is the target of position t (the next
        token), -100 where not scored (everything but the answer in retrieval rows)."""
        rows = self.rows(n, seed, curriculum)
        ids = torch.tensor([r.tokens for r in rows], dtype=torch.long)
        labels = ids[:, 1:].clone()
        for i, r in enumerate(rows):
            if r.answer is not None:
                a, b = r.answer
                keep = labels[i, a - 1:b - 1].clone()  # positions a-1..b-2 predict the answer tokens
                labels[i] = -100
                labels[i, a - 1:b - 1] = keep
        return ids[:, :-1].contiguous(), labels
