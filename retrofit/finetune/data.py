"""Training data for gate-only fine-tuning: the token stream (bytes of ``.txt`` files for a
byte-level model, exactly as always; a tokenizer's ids of any :mod:`mc_retrofit.data`
source otherwise), a held-out tail, and the window sampler (random windows, or
continuations of the previous step's windows when state passing is on)."""
from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.codec import Codec, codec_for
from ..data.sources import is_streamed
from ..data.tokens import load_corpus
from ..errors import MCError
from ..eval_only import check_not_eval_only
from ..tasks import EVAL_ONLY, read_documents


@dataclass
class TokenStream:
    """The training text as one stream of ids, and what an id is (``unit``: byte or token)."""

    ids: torch.Tensor  # 1-D int64
    codec: Codec
    text: bytes  # the documents' text, joined (retrieval-aware rows are built from it)

    @property
    def unit(self) -> str:
        return self.codec.unit


def _document_source(data) -> bool:
    """A source only :mod:`mc_retrofit.data` reads (rows of .jsonl, a dataset, a stream)."""
    if is_streamed(data):
        return True
    if isinstance(data, (str, Path)):
        p = Path(data)
        return (p.is_file() and p.suffix in (".jsonl", ".json")) or (p.is_dir() and (
            (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()))
    return False


def token_stream(data, codec: Codec, *, text_field: str = "text", split: str | None = None,
                 max_tokens: int | None = None) -> TokenStream:
    """``data`` as the ids ``codec`` gives it. Bytes: :func:`read_texts` of ``.txt`` files,
    unchanged (token = byte, files joined by a blank line); every other source and every
    tokenizer goes through :func:`mc_retrofit.data.load_corpus` (evaluation-only text
    refused in every document, documents tokenized once and cached, joined by EOS)."""
    if isinstance(data, TokenStream):
        return data
    parts = list(data) if isinstance(data, (list, tuple)) else [data]
    if codec.byte_level and not any(map(_document_source, parts)):  # bytes, .txt files: exactly as always
        text = read_texts(data)
        ids = torch.frombuffer(bytearray(text), dtype=torch.uint8).long() if text else torch.zeros(0, dtype=torch.long)
        return TokenStream(ids if max_tokens is None else ids[:max_tokens], codec, text)
    if not codec.byte_level and any(isinstance(d, (bytes, bytearray)) for d in parts):
        raise MCError("raw bytes are text for a byte-level model only; give this model's tokenizer a file or dataset")
    if len(parts) > 1:
        from ..data.tokens import pack

        streams = [token_stream(d, codec, text_field=text_field, split=split, max_tokens=max_tokens) for d in parts]
        return TokenStream(pack([t.ids for t in streams], codec), codec, b"\n\n".join(t.text for t in streams))
    corpus = load_corpus(data if not isinstance(data, (list, tuple)) else parts[0], codec, text_field=text_field,
                         split=split, training=True, max_tokens=max_tokens)
    return TokenStream(corpus.stream, codec, "\n\n".join(corpus.texts).encode("utf-8"))


def model_codec(model, tokenizer=None) -> Codec:
    """The codec of a converted ``model``: ``tokenizer`` (a Codec, ``"bytes"``, a folder or
    Hub id), else the tokenizer files of the checkpoint it came from, else bytes for a
    256-entry vocabulary (any other vocabulary without a tokenizer: refused)."""
    if isinstance(tokenizer, Codec):
        return tokenizer
    from ..model import require_converted

    source = require_converted(model).source_dir
    return codec_for(Path(source) if source else None, model.config.vocab_size, tokenizer)


def read_texts(data) -> bytes:
    """Bytes from ``data``: a ``.txt`` file, a folder of ``*.txt`` files (sorted; the
    evaluation-only books are skipped), ``bytes`` (the text itself), or a list of those.
    Text that is, or contains paragraphs of, an evaluation-only book is refused whatever
    its name (:mod:`mc_retrofit.eval_only`)."""
    if isinstance(data, (bytes, bytearray)):
        out = bytes(data)
        check_not_eval_only(out, "the tuning text")
    elif isinstance(data, (list, tuple)):
        out = b"\n\n".join(read_texts(d) for d in data)
    else:
        path = Path(data)
        if not path.exists():
            raise MCError(f"data path {path} does not exist")
        if path.is_dir():
            docs = read_documents(path, "train")
            if not docs:
                raise MCError(f"no training .txt files in {path} (evaluation-only books are skipped)")
            for name, part in docs:
                check_not_eval_only(part, str(path / name))
            out = b"\n\n".join(part for _, part in docs)
        else:
            if path.name in EVAL_ONLY:
                raise MCError(f"{path.name} is an evaluation-only book; do not train on it")
            out = path.read_bytes()
            check_not_eval_only(out, str(path))
    return out


def split_heldout(data, seq_len: int, heldout_share: float, unit: str = "byte") -> tuple[torch.Tensor, torch.Tensor]:
    """Id tensors (train, held-out) of ``data`` (bytes, or a 1-D tensor of ids); each must
    hold at least one window of seq_len + 1."""
    need = seq_len + 1
    if len(data) == 0:
        raise MCError("the training data is empty")
    n_held = max(need, int(len(data) * heldout_share))
    if len(data) - n_held < need:
        raise MCError(f"the training data has {len(data)} {unit}s; need at least {2 * need} "
                      f"(a {need}-{unit} window to train on and one held out) at --seq-len {seq_len}")
    t = data.long() if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return t[: len(data) - n_held], t[len(data) - n_held:]


def windows_at(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()])


def sample_windows(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq_len + 1`` bytes (deterministic given ``gen``)."""
    return windows_at(data, _random_starts(data, batch, seq_len, gen), seq_len)


def _random_starts(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, len(data) - seq_len, (batch,), generator=gen)


class WindowSampler:
    """The global batch of each step, deterministic given ``gen``.

    Without state passing (``passing == 0``) it draws exactly what :func:`sample_windows`
    draws, so plain runs are unchanged. With ``passing = P > 0`` each step after the first
    draws one uniform number; below ``P`` the step continues the previous step's streams
    (window ``i`` starts where the previous window ``i``'s input ended, ``seq_len`` bytes
    later) and the trainer carries their final state over. A continuation that would run
    past the end of the data starts fresh instead (the draw is still consumed, so the
    stream of random numbers does not depend on the data length)."""

    def __init__(self, data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator, passing: float = 0.0):
        self.data, self.batch, self.seq_len, self.gen, self.passing = data, batch, seq_len, gen, float(passing)
        self.starts: torch.Tensor | None = None  # the previous step's window starts

    def next(self) -> tuple[torch.Tensor, bool]:
        """(windows ``[batch, seq_len + 1]``, whether they continue the previous step's)."""
        continued = False
        if self.passing > 0 and self.starts is not None:
            draw = float(torch.rand((), generator=self.gen))
            following = self.starts + self.seq_len
            if draw < self.passing and int(following.max()) + self.seq_len + 1 <= len(self.data):
                self.starts, continued = following, True
        if not continued:
            self.starts = _random_starts(self.data, self.batch, self.seq_len, self.gen)
        return windows_at(self.data, self.starts, self.seq_len), continued

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "starts": self.starts}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.starts = state["starts"]


# -- pre-tokenised sequences (synthetic tasks) -----------------------------------------------
def inputs_and_targets(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs [B, L], targets [B, L])`` of text windows ``[B, L+1]`` (the next token) or of
    labelled rows ``[B, 2, L+1]`` (their own labels; -100 = not scored)."""
    if windows.dim() == 3:
        return windows[:, 0, :-1], windows[:, 1, :-1]
    return windows[:, :-1], windows[:, 1:]


def labelled_rows(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(input_ids [N, L], labels [N, L])`` -> ``[N, 2, L+1]`` rows (a last unused column,
    so that rows have the windows' ``L + 1`` length)."""
    if input_ids.dim() != 2 or input_ids.shape != labels.shape:
        raise MCError(f"input_ids and labels must both be [N, L]; got {list(input_ids.shape)} and {list(labels.shape)}")
    pad = torch.full((input_ids.shape[0], 1), -100, dtype=torch.long)
    ids = torch.cat([input_ids.long(), torch.zeros_like(pad)], 1)
    return torch.stack([ids, torch.cat([labels.long(), pad], 1)], 1)


def split_rows(rows: torch.Tensor, seq_len: int, heldout_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences ``[N, seq_len + 1]`` (or labelled ``[N, 2, seq_len + 1]``) ->
    (train rows, held-out rows: the last share)."""
    if rows.dim() not in (2, 3) or rows.shape[-1] != seq_len + 1 or (rows.dim() == 3 and rows.shape[1] != 2):
        raise MCError(f"token sequences must be shaped [N, seq_len + 1] = [N, {seq_len + 1}] (or input_ids and "
                      f"labels of [N, {seq_len}]), not {list(rows.shape)}")
    n_held = max(1, int(rows.shape[0] * heldout_share))
    if rows.shape[0] - n_held < 1:
        raise MCError(f"{rows.shape[0]} token sequences are too few: need one to train on and one held out")
    rows = rows.long()
    return rows[: rows.shape[0] - n_held], rows[rows.shape[0] - n_held:]


class RowSampler:
    """:class:`WindowSampler` for whole pre-tokenised sequences: each step draws ``batch``
    rows (never a continuation: sequences are independent).

    ``grow`` > 0 is a curriculum over rows stored easiest first (``MixBuilder(...,
    curriculum=True)``: shortest needle-to-question distance first): step ``s`` (from 0)
    draws from the first :meth:`pool` rows, a prefix that grows linearly to all of them by
    step ``grow``. The step is part of the state, so a resumed run draws what an
    uninterrupted one would."""

    def __init__(self, rows: torch.Tensor, batch: int, gen: torch.Generator, grow: int = 0):
        self.rows, self.batch, self.gen, self.grow = rows, batch, gen, int(grow)
        self.step = 0

    def pool(self, step: int) -> int:
        """Rows step ``step`` draws from: all, or the curriculum's prefix (never fewer than a batch)."""
        n = self.rows.shape[0]
        if self.grow <= 0 or step + 1 >= self.grow:
            return n
        return min(n, max(self.batch, math.ceil(n * (step + 1) / self.grow)))

    def next(self) -> tuple[torch.Tensor, bool]:
        n = self.pool(self.step)
        self.step += 1
        return self.rows[torch.randint(0, n, (self.batch,), generator=self.gen)], False

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state(), "starts": None, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.step = int(state.get("step", 0))
