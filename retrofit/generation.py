"""Generation helpers: what the cache holds, and streaming text to a terminal.

Generation itself is transformers' own ``model.generate``: with ``use_cache=True`` the
family's cache object carries the MC memory (cached states and key summaries), so the
prompt is prefilled segment by segment and each new token reads the cached states; a
segment that completes while decoding is cached at its boundary.
"""
from __future__ import annotations

import codecs
import sys

from .memory import LayerMemory


def _holder(cache):
    """The object the MC memory hangs on: the cache itself, or for a family whose cache is a
    list of tensors (the adapter's ``cache_reader`` says which), the element that carries it."""
    from .compat import returned_cache

    cache = returned_cache(cache)  # a forward's or generate's output: its cache
    if isinstance(cache, (list, tuple)):
        return next((t for t in cache if hasattr(t, "_mc_memory")), None)
    return cache


def cache_stats(cache) -> dict:
    """Cached segments and bytes per MC layer of the cache of a forward with
    ``use_cache=True``: pass the output itself (``cache_stats(out)``, whatever this
    transformers version calls its cache field) or the cache object."""
    store: dict[int, LayerMemory] = getattr(_holder(cache), "_mc_memory", None) or {}
    layers = {
        idx: {"segments": mem.n, "bytes": mem.nbytes(), "tokens": mem.pos, "dropped": mem.dropped}
        for idx, mem in sorted(store.items())
    }
    return {
        "layers": layers,
        "segments": sum(v["segments"] for v in layers.values()),
        "bytes": sum(v["bytes"] for v in layers.values()),
    }


class ByteStreamer:
    """A transformers streamer for byte-level models (token = UTF-8 byte, no tokenizer):
    prints new bytes as they come, decoding UTF-8 incrementally."""

    def __init__(self, out=None, skip_prompt: bool = True):
        self.out = out or sys.stdout
        self.skip_prompt = skip_prompt
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._prompt_seen = False

    def put(self, value):
        if self.skip_prompt and not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.out.write(self.decoder.decode(bytes(int(i) % 256 for i in ids)))
        self.out.flush()

    def end(self):
        self.out.write(self.decoder.decode(b"", final=True) + "\n")
        self.out.flush()
