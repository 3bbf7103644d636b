"""Turning text into token ids for evaluation: the codec and the document sources of
:mod:`mc_retrofit.data` (one data path for ``finetune`` and ``eval``), re-exported here for
the evaluation's callers.

Byte-level models (vocab 256, no tokenizer files: token = UTF-8 byte) are the default;
a checkpoint directory that ships tokenizer files gets its ``AutoTokenizer``.
"""
from __future__ import annotations

import torch

from mc_retrofit.data.codec import TOKENIZER_FILES, Codec, codec_for  # noqa: F401 (this module's face)
from mc_retrofit.data.sources import decoded as _decoded  # noqa: F401
from mc_retrofit.data.sources import default_texts  # noqa: F401
from mc_retrofit.data.sources import load_texts as _load_texts
from mc_retrofit.data.tokens import tokenize

EVAL_STREAM_CHARS = 1 << 22  # a streamed --data dataset: about 4 M characters, plenty for 16x contexts


def load_texts(source, text_field: str = "text", split: str | None = None) -> list[tuple[str, str]]:
    """``(name, text)`` pairs from a ``.txt`` file, a folder of ``.txt`` files, a ``.jsonl``
    file (one JSON object per line, text under ``text_field``), a ``datasets`` dataset saved
    with ``save_to_disk``, or ``hf:NAME[:CONFIG]`` (streamed, its first documents)."""
    return _load_texts(source, text_field, split, max_chars=EVAL_STREAM_CHARS)


def tokenize_documents(texts: list[tuple[str, str]], codec: Codec) -> list[tuple[str, torch.Tensor]]:
    """Each document's ids (a tokenizer's: cached, :mod:`mc_retrofit.data.tokens`)."""
    return list(zip([n for n, _ in texts], tokenize([t for _, t in texts], codec)))
