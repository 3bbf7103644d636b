"""Text for tuning and evaluation: where documents come from, how they become token ids, and
the windows a model sees (one data path for ``finetune``, ``eval --data`` and ``calibrate``)."""

from .codec import BYTES, TOKENIZER_FILES, Codec, codec_for, has_tokenizer_files
from .sources import HUB_PREFIX, check_source, default_texts, is_streamed, iter_texts, load_texts
from .tokens import Corpus, cache_root, load_corpus, pack, tokenize

__all__ = ["BYTES", "TOKENIZER_FILES", "Codec", "codec_for", "has_tokenizer_files", "HUB_PREFIX", "check_source",
           "default_texts", "is_streamed", "iter_texts", "load_texts", "Corpus", "cache_root", "load_corpus", "pack",
           "tokenize"]
