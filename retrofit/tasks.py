"""Synthetic and text tasks shared by the training recipes and the evaluation harness.

Everything here is deterministic given a seed (``random.Random`` / ``numpy`` generators are
passed in or built from an int), runs on CPU, and needs no model. API (stable):

Text (byte-level, token = UTF-8 byte; the Gutenberg books of ``../shared/data/gutenberg``):
- ``EVAL_ONLY``: the evaluation-only books (never train or tune on them).
- ``gutenberg_dir(path=None) -> Path``: the books folder (``$MC_RETROFIT_DATA`` or ``../shared``).
- ``book_names(split="train", data_dir=None) -> list[str]``: split is ``"train"`` (every book
  except ``EVAL_ONLY``), ``"eval"`` (only ``EVAL_ONLY``) or ``"all"``.
- ``load_book(name, data_dir=None) -> bytes`` and ``load_corpus(split="train", data_dir=None)
  -> bytes`` (the books of a split joined by blank lines, sorted by name).
- ``text_files(folder, split="all") -> list[Path]`` and ``read_documents(path, split="all")
  -> list[(name, bytes)]``: any ``.txt`` file or folder, listed and read the same way for
  training (``finetune --data``), evaluation (``eval --data``) and the recipes.
- ``eval_slice(name="austen-emma.txt", n_bytes=65536, offset=0, data_dir=None) -> bytes``:
  the fixed held-out slice the checkpoints' bits/byte are measured on.
- ``unigram_bits_per_byte(train: bytes, test: bytes) -> float``: the baseline a real LM must beat.

Recall prompts over a text haystack (each returns a ``TextSample`` of exactly ``length`` bytes,
``prompt + answer``; the model must produce ``answer`` greedily right after ``prompt``):
- ``passkey_sample(haystack, length, rng, depth=None, digits=5)``: the shared format
  ``... The pass key is 12345. Remember it. 12345 is the pass key. ... What is the pass key?
  The pass key is 12345``.
- ``multikey_sample(haystack, length, rng, n_keys=4, depth=None, digits=5)``: several named keys
  (``The pass key for apple is 12345. Remember it.``), one of them asked for
  (``What is the pass key for apple? The pass key for apple is 12345``).
- ``variable_tracking_sample(haystack, length, rng, hops=2, n_chains=2, digits=5)``:
  ``Let xq = 12345.`` ... ``Let kz = xq.`` ... ``What is kz? kz = 12345``; the other chains
  are distractors with other values.

Scoring text samples (exact match, greedy):
- ``encode(sample) -> (ids LongTensor [L], answer_mask BoolTensor [L])``: ``answer_mask[t]``
  marks the positions whose *next-token prediction* must equal ``ids[t + 1]``.
- ``score_logits(logits, sample) -> float``: 1.0 when the argmax at every answer position is
  the right byte (teacher-forced argmax, which equals greedy decoding when it is all right).
- ``exact_match(pred: bytes, sample) -> float``: for an answer produced by any other decoder.
- ``text_accuracy(model, samples, device="cpu", batch_size=8) -> float``: runs a causal LM
  (``model(input_ids).logits``) on every sample and averages ``score_logits``.
- ``bits_per_byte(model, data: bytes, window=512, device="cpu", batch_size=8) -> float``: mean
  next-byte cross-entropy in bits over non-overlapping ``window``-byte pieces of ``data``,
  each read from an empty state (the first byte of each piece is not scored).

MQAR (Zoology's multi-query associative recall, Arora et al. 2023), token ids not bytes:
- ``mqar(n, seq_len, n_pairs, vocab_size=128, n_queries=None, seed=0, power_a=0.01,
  random_non_queries=True, query_start=None) -> MQARBatch(inputs, targets, mask)``: keys come
  from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``; the ``n_pairs`` key-value pairs come
  first, then ``n_queries`` of the keys reappear at power-law gaps; ``targets[b, t]`` is the
  value the model must predict *after reading* ``inputs[b, t]`` (a queried key), ``-100``
  elsewhere; ``mask = targets != -100``. ``query_start`` (default: right after the pairs)
  pushes the queries further from the pairs, to test recall at a distance.
- ``mqar_accuracy(logits, batch) -> float``: share of scored positions whose argmax is right.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import MCError

EVAL_ONLY = ("austen-emma.txt", "melville-moby_dick.txt", "whitman-leaves.txt")
DATA_ENV = "MC_RETROFIT_DATA"

# Names for the multi-key task: short, distinct, ASCII; none is a prefix of another.
KEY_NAMES = ("apple", "river", "candle", "forest", "silver", "harbor", "violet", "lantern", "meadow",
             "copper", "falcon", "willow", "thunder", "pepper", "marble", "orchid")


# -- Gutenberg text -----------------------------------------------------------------------
def gutenberg_dir(path: str | Path | None = None) -> Path:
    """The folder of Gutenberg ``*.txt`` books: ``path``, else ``$MC_RETROFIT_DATA``, else
    ``<repo>/../shared/data/gutenberg``."""
    if path is None:
        path = os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gutenberg"
    path = Path(path)
    if not path.is_dir() or not any(path.glob("*.txt")):
        raise MCError(f"no Gutenberg books (*.txt) in {path}; pass the folder or set ${DATA_ENV}")
    return path


def text_files(folder: str | Path, split: str = "all") -> list[Path]:
    """The ``*.txt`` files of a folder, sorted by name, of a split: "train" (all but
    EVAL_ONLY), "eval" (EVAL_ONLY) or "all". The one place a text folder is listed
    (training, evaluation and the recipes read the same files in the same order)."""
    if split not in ("train", "eval", "all"):
        raise MCError(f"unknown split {split!r}: use train, eval or all")
    files = sorted(Path(folder).glob("*.txt"))
    if split == "train":
        return [p for p in files if p.name not in EVAL_ONLY]
    if split == "eval":
        return [p for p in files if p.name in EVAL_ONLY]
    return files


def read_documents(path: str | Path, split: str = "all") -> list[tuple[str, bytes]]:
    """``(file name, bytes)`` of a ``.txt`` file, or of a folder's :func:`text_files`."""
    path = Path(path)
    files = [path] if path.is_file() else text_files(path, split)
    return [(p.name, p.read_bytes()) for p in files]


def book_names(split: str = "train", data_dir: str | Path | None = None) -> list[str]:
    """Book file names of a split: "train" (all but EVAL_ONLY), "eval" (EVAL_ONLY) or "all"."""
    return [p.name for p in text_files(gutenberg_dir(data_dir), split)]


def load_book(name: str, data_dir: str | Path | None = None) -> bytes:
    path = gutenberg_dir(data_dir) / name
    if not path.is_file():
        raise MCError(f"no book {name!r} in {path.parent}")
    return path.read_bytes()


def load_corpus(split: str = "train", data_dir: str | Path | None = None) -> bytes:
    """The books of a split, sorted by name, joined by a blank line."""
    return b"\n\n".join(data for _, data in read_documents(gutenberg_dir(data_dir), split))


def eval_slice(name: str = "austen-emma.txt", n_bytes: int = 65536, offset: int = 0,
               data_dir: str | Path | None = None) -> bytes:
    """``n_bytes`` bytes of an evaluation book from ``offset``: the fixed held-out slice."""
    data = load_book(name, data_dir)
    if offset + n_bytes > len(data):
        raise MCError(f"{name} has {len(data)} bytes; cannot take {n_bytes} from offset {offset}")
    return data[offset:offset + n_bytes]


def unigram_bits_per_byte(train: bytes, test: bytes) -> float:
    """Cross-entropy (bits/byte) of ``test`` under add-one-smoothed byte frequencies of ``train``."""
    counts = np.bincount(np.frombuffer(train, dtype=np.uint8), minlength=256).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[np.frombuffer(test, dtype=np.uint8)].mean())


# -- recall prompts over a haystack ---------------------------------------------------------------
@dataclass
class TextSample:
    """A recall prompt: the model reads ``prompt`` and must continue with ``answer``."""
    prompt: bytes
    answer: bytes
    meta: dict = field(default_factory=dict)

    @property
    def text(self) -> bytes:
        return self.prompt + self.answer


def _rng(rng) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randrange(10 ** (n - 1), 10 ** n))  # no leading zero: a fixed number of digits


def _filler(haystack: bytes, n: int, rng: random.Random) -> bytes:
    if n <= 0:
        return b""
    if len(haystack) < n:
        raise MCError(f"haystack has {len(haystack)} bytes; {n} are needed")
    start = rng.randrange(0, len(haystack) - n + 1)
    return haystack[start:start + n]


def _assemble(haystack: bytes, length: int, rng: random.Random, needles: list[bytes], depths: list[float],
              question: bytes, answer: bytes, meta: dict) -> TextSample:
    """Place ``needles`` at relative ``depths`` of a filler window, then the question.

    The filler fills exactly ``length - len(needles) - len(question) - len(answer)`` bytes,
    so the sample has exactly ``length`` bytes."""
    fixed = sum(len(n) for n in needles) + len(question) + len(answer)
    n_fill = length - fixed
    if n_fill < 0:
        raise MCError(f"length {length} is too short for this sample (needs at least {fixed} bytes)")
    fill = _filler(haystack, n_fill, rng)
    cuts = [min(n_fill, max(0, round(d * n_fill))) for d in depths]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    out, pos, where = [], 0, [0] * len(needles)
    for i in order:
        out.append(fill[pos:cuts[i]])
        pos = cuts[i]
        where[i] = sum(len(p) for p in out)
        out.append(needles[i])
    out.append(fill[pos:])
    prompt = b"".join(out) + question
    meta = {**meta, "needle_offsets": where, "length": length}
    return TextSample(prompt, answer, meta)


def passkey_sample(haystack: bytes, length: int, rng=0, depth: float | None = None, digits: int = 5) -> TextSample:
    """One pass-key sample of exactly ``length`` bytes; ``depth`` in [0, 1] is where the
    needle sits in the filler (random when None)."""
    rng = _rng(rng)
    key = _digits(rng, digits)
    depth = rng.random() if depth is None else depth
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. ".encode()
    question = b" What is the pass key? The pass key is "
    return _assemble(haystack, length, rng, [needle], [depth], question, key.encode(),
                     {"task": "passkey", "depth": depth})


def multikey_sample(haystack: bytes, length: int, rng=0, n_keys: int = 4, depth: float | None = None,
                    digits: int = 5) -> TextSample:
    """``n_keys`` named pass keys (distinct names, distinct numbers) at random depths; the
    question asks for one of them, whose needle sits at ``depth`` when given."""
    rng = _rng(rng)
    if not 1 <= n_keys <= len(KEY_NAMES):
        raise MCError(f"n_keys must be in 1..{len(KEY_NAMES)}, got {n_keys}")
    names = rng.sample(KEY_NAMES, n_keys)
    keys: list[str] = []
    while len(keys) < n_keys:
        k = _digits(rng, digits)
        if k not in keys:
            keys.append(k)
    target = rng.randrange(n_keys)
    depths = [rng.random() for _ in range(n_keys)]
    if depth is not None:
        depths[target] = depth
    needles = [f" The pass key for {n} is {k}. Remember it. ".encode() for n, k in zip(names, keys)]
    question = f" What is the pass key for {names[target]}? The pass key for {names[target]} is ".encode()
    return _assemble(haystack, length, rng, needles, depths, question, keys[target].encode(),
                     {"task": "multikey", "depth": depths[target], "n_keys": n_keys, "name": names[target]})


def _var_names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(2)))
    out = sorted(names)
    rng.shuffle(out)
    return out


def variable_tracking_sample(haystack: bytes, length: int, rng=0, hops: int = 2, n_chains: int = 2,
                             digits: int = 5) -> TextSample:
    """Variable tracking (RULER VT): chain 0 is ``Let a = V.``, ``Let b = a.`` ... (``hops``
    assignments after the value, in order, at increasing random depths); the other chains
    are distractors with other values. The question asks for the last variable of chain 0."""
    rng = _rng(rng)
    if hops < 1 or n_chains < 1:
        raise MCError("hops and n_chains must be at least 1")
    names = _var_names(rng, n_chains * (hops + 1))
    values: list[str] = []
    while len(values) < n_chains:
        v = _digits(rng, digits)
        if v not in values:
            values.append(v)
    needles, depths = [], []
    for c in range(n_chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        ds = sorted(rng.random() for _ in range(hops + 1))  # assignments in order
        needles.append(f" Let {chain[0]} = {values[c]}. ".encode())
        needles += [f" Let {b} = {a}. ".encode() for a, b in zip(chain, chain[1:])]
        depths += ds
    last = names[hops]
    question = f" What is {last}? {last} = ".encode()
    return _assemble(haystack, length, rng, needles, depths, question, values[0].encode(),
                     {"task": "variable_tracking", "hops": hops, "n_chains": n_chains, "name": last})


# -- scoring text samples -------------------------------------------------------------------
def encode(sample: TextSample) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids of ``prompt + answer`` and the mask of positions whose next-token
    prediction is an answer byte (the last prompt byte .. the second-to-last answer byte)."""
    ids = torch.tensor(list(sample.text), dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    p, a = len(sample.prompt), len(sample.answer)
    mask[p - 1:p + a - 1] = True
    return ids, mask


def answer_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits [..., V]`` at answer positions against ``targets [...]``: True where the
    argmax is the target. Every answer score is built on it: a text answer is right when
    all its positions hit (teacher-forced argmax, which is exactly when greedy decoding
    writes it), MQAR recall is the share of queries that hit."""
    return logits.argmax(-1) == targets.to(logits.device)


def answer_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The answer's total negative log-likelihood in nats: ``-log p(target)`` summed over
    the last (position) axis of ``logits [..., A, V]`` / ``targets [..., A]``."""
    logp = torch.log_softmax(logits.float(), -1)
    return -logp.gather(-1, targets.to(logits.device)[..., None])[..., 0].sum(-1)


def score_logits(logits: torch.Tensor, sample: TextSample) -> float:
    """1.0 when the argmax of ``logits`` ([L, V] for ``sample.text``, or [L', V] with
    L' >= len(prompt) + len(answer) - 1) gives every answer byte, else 0.0."""
    ids, mask = encode(sample)
    at = mask[:-1]  # positions whose next token is an answer byte
    return float(bool(answer_hits(logits[: len(ids) - 1][at], ids[1:][at]).all()))


def exact_match(pred: bytes | str, sample: TextSample) -> float:
    """1.0 when a decoded continuation starts with the answer."""
    pred = pred.encode() if isinstance(pred, str) else bytes(pred)
    return float(pred[: len(sample.answer)] == sample.answer)


@torch.no_grad()
def text_accuracy(model, samples: list[TextSample], device="cpu", batch_size: int = 8) -> float:
    """Mean ``score_logits`` of a causal LM over ``samples`` (batched when lengths agree)."""
    if not samples:
        raise MCError("no samples to score")
    scores: list[float] = []
    by_len: dict[int, list[TextSample]] = {}
    for s in samples:
        by_len.setdefault(len(s.text), []).append(s)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            ids = torch.stack([encode(s)[0] for s in chunk]).to(device)
            logits = model(input_ids=ids).logits.float().cpu()
            scores += [score_logits(lg, s) for lg, s in zip(logits, chunk)]
    return sum(scores) / len(scores)


@torch.no_grad()
def bits_per_byte(model, data: bytes, window: int = 512, device="cpu", batch_size: int = 8) -> float:
    """Held-out bits/byte of a byte-level causal LM (see the module docstring)."""
    n = len(data) // window
    if n == 0:
        raise MCError(f"{len(data)} bytes is less than one window of {window}")
    ids = torch.tensor(list(data[: n * window]), dtype=torch.long).view(n, window)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = ids[i:i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    return total / count / float(np.log(2))


# -- MQAR ---------------------------------------------------------------------------------------
@dataclass
class MQARBatch:
    """``inputs`` [n, L] token ids; ``targets`` [n, L] (-100 = not scored); ``mask`` = targets != -100."""
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def mqar(n: int, seq_len: int, n_pairs: int, vocab_size: int = 128, n_queries: int | None = None, seed: int = 0,
         power_a: float = 0.01, random_non_queries: bool = True, query_start: int | None = None) -> MQARBatch:
    """A batch of Zoology-style MQAR sequences (see the module docstring)."""
    n_queries = n_pairs if n_queries is None else n_queries
    key_vocab = vocab_size // 2
    if not 1 <= n_pairs < key_vocab:
        raise MCError(f"n_pairs must be in 1..{key_vocab - 1} for vocab_size {vocab_size}, got {n_pairs}")
    if not 1 <= n_queries <= n_pairs:
        raise MCError(f"n_queries must be in 1..n_pairs ({n_pairs}), got {n_queries}")
    ctx = 2 * n_pairs
    query_start = ctx if query_start is None else query_start
    if query_start < ctx:
        raise MCError(f"query_start {query_start} must be at least 2 * n_pairs = {ctx}")
    space = (seq_len - query_start) // 2  # query slots are every other position: key, then its value
    if space < n_queries:
        raise MCError(f"seq_len {seq_len} leaves room for {max(space, 0)} queries after position {query_start}; "
                      f"{n_queries} were asked for")
    rs = np.random.default_rng(seed)
    keys = np.stack([rs.choice(np.arange(1, key_vocab), n_pairs, replace=False) for _ in range(n)])
    values = np.stack([rs.choice(np.arange(key_vocab, vocab_size), n_pairs, replace=False) for _ in range(n)])
    # Power-law gaps (Zoology): most queries come soon, some much later.
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p /= p.sum()
    gaps = np.stack([rs.choice(space, n_queries, replace=False, p=p) for _ in range(n)])
    asked = np.stack([rs.choice(n_pairs, n_queries, replace=False) for _ in range(n)])
    inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:ctx:2] = keys
    inputs[:, 1:ctx:2] = values
    targets = np.full((n, seq_len), -100, dtype=np.int64)
    pos = query_start + 2 * gaps
    rows = np.arange(n)[:, None]
    inputs[rows, pos] = np.take_along_axis(keys, asked, 1)
    targets[rows, pos] = np.take_along_axis(values, asked, 1)
    inputs = torch.from_numpy(inputs)
    if random_non_queries:
        # Filler positions get random tokens (Zoology); they are never scored.
        noise = torch.from_numpy(rs.integers(0, vocab_size, size=(n, seq_len)))
        free = inputs == 0
        free[:, :ctx] = False
        inputs = torch.where(free, noise, inputs)
    targets = torch.from_numpy(targets)
    return MQARBatch(inputs, targets, targets != -100)


def mqar_accuracy(logits: torch.Tensor, batch: MQARBatch) -> float:
    """Share of the scored positions (``batch.mask``) where the argmax of ``logits`` [n, L, V] is the target."""
    mask = batch.mask.to(logits.device)
    return float(answer_hits(logits[mask], batch.targets.to(logits.device)[mask]).float().mean())
