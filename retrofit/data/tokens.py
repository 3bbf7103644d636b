"""Documents -> token ids, once: tokenized, cached on disk, and packed into one stream.

The cache (``$MC_RETROFIT_CACHE/tokens``, default ``~/.cache/mc-retrofit/tokens``) holds one
safetensors file per (tokenizer, documents) pair, named by the hash of the tokenizer's
identity (:attr:`Codec.identity`) and of every document's text. A file is used only if its
recorded key and the SHA-256 of its ids match and its offsets are consistent; anything
else (truncated, foreign, edited) is tokenized again and rewritten, atomically. Bytes are
never cached (encoding them is cheaper than reading a file).

Packing joins the documents with the tokenizer's EOS (so a window that spans two documents
is told where one ends), or, without one, with the ids of a blank line (as the byte
stream joins files with ``\\n\\n``).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MCError
from .codec import Codec
from .sources import is_streamed, iter_texts, load_texts

FORMAT = "mc-retrofit-tokens/1"
CACHE_ENV = "MC_RETROFIT_CACHE"
SEPARATOR = "\n\n"  # between documents when the tokenizer has no EOS


def cache_root() -> Path:
    """``$MC_RETROFIT_CACHE``, else ``$XDG_CACHE_HOME/mc-retrofit``, else ``~/.cache/mc-retrofit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mc-retrofit"


def cache_key(codec: Codec, texts: list[str]) -> str | None:
    if codec.identity is None:
        return None
    h = hashlib.sha256(f"{FORMAT}\0{codec.identity}\0{len(texts)}\0".encode())
    for t in texts:
        data = t.encode("utf-8", "surrogatepass")
        h.update(f"{len(data)}\0".encode())  # length-prefixed: documents cannot run into each other
        h.update(data)
    return h.hexdigest()


def cache_file(key: str) -> Path:
    return cache_root() / "tokens" / f"{key}.safetensors"


def tokenize(texts: list[str], codec: Codec, *, cache: bool = True) -> list[torch.Tensor]:
    """The ids of each text (1-D int64 tensors), from the cache when it holds them."""
    key = cache_key(codec, texts) if cache and not codec.byte_level else None
    if key is not None:
        found = _read(cache_file(key), key, len(texts))
        if found is not None:
            return found
    ids = [torch.tensor(x, dtype=torch.long) for x in codec.encode_many(texts)]
    if key is not None:
        _write(cache_file(key), key, ids)
    return ids


def _digest(flat: torch.Tensor, offsets: torch.Tensor) -> str:
    h = hashlib.sha256(flat.numpy().tobytes())
    h.update(offsets.numpy().tobytes())
    return h.hexdigest()


def _read(path: Path, key: str, n_docs: int) -> list[torch.Tensor] | None:
    """The cached ids, or None if the file is absent or not exactly what was written for ``key``."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            flat, offsets = f.get_tensor("ids").long(), f.get_tensor("offsets").long()
    except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, never an error
        return None
    if meta.get("format") != FORMAT or meta.get("key") != key or offsets.dim() != 1 or flat.dim() != 1:
        return None
    if len(offsets) != n_docs + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != len(flat) \
            or bool((offsets[1:] < offsets[:-1]).any()):
        return None
    if meta.get("sha256") != _digest(flat, offsets):
        return None
    return [flat[a:b].clone() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _write(path: Path, key: str, ids: list[torch.Tensor]) -> None:
    """Best effort: a cache that cannot be written (read-only home, full disk) costs only time."""
    from safetensors.torch import save_file

    from ..files import atomic_file

    flat = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    offsets = torch.tensor([0] + [len(x) for x in ids], dtype=torch.long).cumsum(0)
    meta = {"format": FORMAT, "key": key, "sha256": _digest(flat, offsets)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, force=True) as tmp:
            save_file({"ids": flat, "offsets": offsets}, str(tmp), metadata=meta)
    except (MCError, OSError):
        pass


def separator(codec: Codec) -> list[int]:
    eos = codec.eos_id
    return [int(eos)] if eos is not None else codec.encode(SEPARATOR)


def pack(ids: list[torch.Tensor], codec: Codec) -> torch.Tensor:
    """One stream: the documents in order, each followed (but the last) by :func:`separator`."""
    sep = torch.tensor(separator(codec), dtype=torch.long)
    parts = []
    for i, x in enumerate(ids):
        if i:
            parts.append(sep)
        parts.append(x.long())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


@dataclass
class Corpus:
    """Documents and their ids; :attr:`stream` packs them."""

    codec: Codec
    names: list[str]
    texts: list[str]
    ids: list[torch.Tensor] = field(repr=False)

    @property
    def stream(self) -> torch.Tensor:
        return pack(self.ids, self.codec)

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def load_corpus(source, codec: Codec, *, text_field: str = "text", split: str | None = None, training: bool = False,
                max_tokens: int | None = None, cache: bool = True) -> Corpus:
    """The documents of ``source`` and their ids. A streamed dataset is read until its
    documents hold ``max_tokens`` tokens (tokenized as they arrive: the stream is the cost,
    so they are not cached); a local one is tokenized whole (cached) and, with
    ``max_tokens``, cut to the documents that reach it."""
    names, texts, ids = [], [], []
    if is_streamed(source):
        if max_tokens is None:
            raise MCError(f"{source} is streamed and has no end: it needs a token budget (--max-tokens)")
        total = 0
        for name, text in iter_texts(source, text_field, split, training=training):
            x = torch.tensor(codec.encode(text), dtype=torch.long)
            names.append(name), texts.append(text), ids.append(x)
            total += len(x)
            if total >= max_tokens:
                break
    else:
        docs = load_texts(source, text_field, split, training=training)
        names, texts = [n for n, _ in docs], [t for _, t in docs]
        ids = tokenize(texts, codec, cache=cache)
        if max_tokens is not None:
            total, keep = 0, 0
            while keep < len(ids) and total < max_tokens:
                total, keep = total + len(ids[keep]), keep + 1
            names, texts, ids = names[:keep], texts[:keep], ids[:keep]
    if not texts:
        raise MCError(f"{source} holds no documents")
    return Corpus(codec, names, texts, ids)
