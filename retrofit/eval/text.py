"""Turning text into token ids for evaluation: a byte codec or the model's own tokenizer,
and long documents from a ``.txt`` file or folder, a ``.jsonl`` file or a ``datasets``
dataset saved on disk.

Byte-level models (vocab 256, no tokenizer files: token = UTF-8 byte) are the default;
a checkpoint directory that ships tokenizer files gets its ``AutoTokenizer``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mc_retrofit import tasks
from mc_retrofit.errors import MCError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Codec:
    """Text <-> token ids. ``tokenizer`` None means bytes (token = UTF-8 byte)."""

    tokenizer: object | None = None
    name: str = "bytes"

    @property
    def byte_level(self) -> bool:
        return self.tokenizer is None

    def encode(self, data: bytes | str) -> list[int]:
        if self.tokenizer is None:
            return list(data.encode("utf-8") if isinstance(data, str) else bytes(data))
        text = data if isinstance(data, str) else bytes(data).decode("utf-8", errors="replace")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)


def codec_for(model_dir: Path | None, vocab_size: int, tokenizer: str | None = None) -> Codec:
    """``tokenizer``: ``"bytes"``, a tokenizer path/name, or None (auto: the checkpoint's
    own tokenizer files if it ships them, else bytes when the vocabulary has 256 entries)."""
    if tokenizer == "bytes":
        if vocab_size < 256:
            raise MCError(f"the model's vocabulary has {vocab_size} entries; a byte-level model needs 256")
        return Codec()
    source = tokenizer
    if source is None and model_dir is not None and model_dir.is_dir():
        if any((model_dir / f).is_file() for f in TOKENIZER_FILES):
            source = str(model_dir)
    if source is None:
        if vocab_size == 256:
            return Codec()
        raise MCError(
            f"the model has a {vocab_size}-token vocabulary and no tokenizer files; pass --tokenizer PATH"
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MCError(f"could not load a tokenizer from {source}: {first}") from None
    return Codec(tok, name=str(source))


# -- documents ---------------------------------------------------------------------------
def load_texts(source: str | Path, text_field: str = "text", split: str | None = None) -> list[tuple[str, str]]:
    """``(name, text)`` pairs from a ``.txt`` file, a folder of ``.txt`` files, a
    ``.jsonl`` file (one JSON object per line, text under ``text_field``) or a
    ``datasets`` dataset saved with ``save_to_disk``."""
    p = Path(source)
    if not p.exists():
        raise MCError(f"{p} does not exist")
    if p.is_file() and p.suffix == ".txt":
        return _decoded(tasks.read_documents(p))
    if p.is_file() and p.suffix in (".jsonl", ".json"):
        out = []
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MCError(f"{p} line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise MCError(f"{p} line {n} has no string field {text_field!r}")
                out.append((f"{p.name}:{n}", row[text_field]))
        if not out:
            raise MCError(f"{p} holds no documents")
        return out
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        return _from_datasets(p, text_field, split)
    if p.is_dir():
        docs = tasks.read_documents(p)
        if not docs:
            raise MCError(f"{p} has no .txt files and is not a dataset saved with datasets' save_to_disk")
        return _decoded(docs)
    raise MCError(f"{p}: expected a .txt or .jsonl file, a folder of .txt files, or a saved datasets dataset")


def _from_datasets(path: Path, text_field: str, split: str | None) -> list[tuple[str, str]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        names = list(ds)
        pick = split or next((s for s in ("test", "validation", "train") if s in ds), names[0])
        if pick not in ds:
            raise MCError(f"{path} has splits {', '.join(names)}, not {pick!r}")
        ds = ds[pick]
    if text_field not in ds.column_names:
        raise MCError(f"{path} has columns {', '.join(ds.column_names)}, not {text_field!r} (use --text-field)")
    return [(f"{path.name}[{i}]", t) for i, t in enumerate(ds[text_field]) if isinstance(t, str)]


def _decoded(docs: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """``--data`` text as text mode reads it: UTF-8 (bad bytes replaced), universal newlines."""
    return [(name, data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n"))
            for name, data in docs]


def default_texts() -> list[tuple[str, str]]:
    """The evaluation-only Gutenberg books (never used in training), their bytes decoded as
    they are (the committed evaluations were measured on these exact texts)."""
    books = tasks.read_documents(tasks.gutenberg_dir(), "eval")
    return [(name, data.decode("utf-8", errors="replace")) for name, data in books]


def tokenize_documents(texts: list[tuple[str, str]], codec: Codec) -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.tensor(codec.encode(text), dtype=torch.long)) for name, text in texts]
