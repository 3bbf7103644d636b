"""Text <-> token ids: bytes (token = UTF-8 byte) or a tokenizer, chosen for a model.

The choice (:func:`codec_for`): ``--tokenizer`` (``bytes``, a local folder, or a Hub id
through ``mc_retrofit.hub.resolve_tokenizer``), else the tokenizer files the checkpoint
ships, else bytes when the vocabulary has exactly 256 entries. A model with any other
vocabulary and no tokenizer is refused: feeding it bytes as token ids would train and
evaluate on nonsense without a word of warning.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MCError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
BYTES = "bytes"


@dataclass
class Codec:
    """Text <-> token ids. ``tokenizer`` None means bytes (token = UTF-8 byte).

    ``identity``: a hash of everything that decides the ids a text gets (the token cache's
    key); None when it cannot be told (then nothing is cached)."""

    tokenizer: object | None = None
    name: str = BYTES
    identity: str | None = None

    @property
    def byte_level(self) -> bool:
        return self.tokenizer is None

    @property
    def unit(self) -> str:
        """What one id stands for, in reports (``nats/byte`` or ``nats/token``)."""
        return "byte" if self.byte_level else "token"

    @property
    def eos_id(self) -> int | None:
        return None if self.tokenizer is None else getattr(self.tokenizer, "eos_token_id", None)

    def encode(self, data: bytes | str) -> list[int]:
        if self.tokenizer is None:
            return list(data.encode("utf-8") if isinstance(data, str) else bytes(data))
        text = data if isinstance(data, str) else bytes(data).decode("utf-8", errors="replace")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text (one batched call: a fast tokenizer runs it in parallel)."""
        if self.tokenizer is None:
            return [list(t.encode("utf-8")) for t in texts]
        if not texts:
            return []
        # verbose=False: a long document is the point here, not a mistake to warn about
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)


def has_tokenizer_files(model_dir: Path | None) -> bool:
    return model_dir is not None and Path(model_dir).is_dir() and any(
        (Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def codec_for(model_dir: Path | None, vocab_size: int, tokenizer: str | None = None, *, hint: str | None = None,
              cache_dir: str | None = None) -> Codec:
    """The codec of a model with ``vocab_size`` ids whose files lie in ``model_dir``.

    ``tokenizer``: ``"bytes"``, a tokenizer folder, a Hub id, or None (the checkpoint's own
    tokenizer files, else the tokenizer its format names, else bytes for a 256-entry
    vocabulary). ``hint``: the tokenizer a checkpoint's format names
    (``Checkpoint.tokenizer_hint``: mamba_ssm checkpoints use EleutherAI/gpt-neox-20b's and
    ship none), used when the checkpoint has no tokenizer files of its own."""
    if tokenizer == BYTES:
        if vocab_size < 256:
            raise MCError(f"the model's vocabulary has {vocab_size} entries; a byte-level model needs 256")
        if has_tokenizer_files(model_dir):  # its ids are that tokenizer's, not bytes
            raise MCError(f"{model_dir} ships a tokenizer, so its token ids are not bytes; drop --tokenizer bytes")
        return Codec()
    source = tokenizer
    if source is None and has_tokenizer_files(model_dir):
        source = str(model_dir)
    if source is None and hint is not None:
        source = hint
    if source is None:
        if vocab_size == 256:
            return Codec()
        raise MCError(f"the model has a {vocab_size}-token vocabulary and no tokenizer files, so its ids are not "
                      f"bytes: pass --tokenizer PATH or HUB_ID")
    folder = Path(source) if Path(source).exists() else _from_hub(source, cache_dir)
    tok = _load(folder, source)
    n = len(tok)
    if n > vocab_size:
        raise MCError(f"the tokenizer {source} has {n} tokens but the model's vocabulary has {vocab_size}: "
                      "it is not this model's tokenizer (ids past the vocabulary have no embedding)")
    return Codec(tok, name=str(source), identity=_identity(tok, folder))


def _from_hub(spec: str, cache_dir: str | None) -> Path:
    try:
        from ..hub import resolve_tokenizer
    except ImportError:
        raise MCError(f"--tokenizer {spec} is not a local folder, and this installation cannot fetch Hub "
                      "tokenizers (mc_retrofit.hub is missing): give a folder with tokenizer files") from None
    return Path(resolve_tokenizer(spec, cache_dir=cache_dir))


def _load(folder: Path, source: str):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MCError(f"could not load a tokenizer from {source}: {first}") from None


def _identity(tok, folder: Path) -> str | None:
    """A hash of what decides the ids: a fast tokenizer's full serialisation (model, merges,
    normaliser, pre-tokeniser, added tokens), else the bytes of its files."""
    h = hashlib.sha256(f"{type(tok).__name__}\0".encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    elif folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name in TOKENIZER_FILES + (
            "special_tokens_map.json", "merges.txt", "added_tokens.json"))
        if not files:
            return None
        for p in files:
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
            h.update(p.read_bytes())
    else:
        return None
    h.update(json.dumps(sorted(map(str, getattr(tok, "all_special_tokens", None) or []))).encode())
    return h.hexdigest()
