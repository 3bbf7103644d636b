"""mc-retrofit: Memory Caching for already-trained recurrent language models.

    import mc_retrofit
    model = mc_retrofit.convert(model, mc_retrofit.MCConfig(segment_size=256, aggregation="gated"))
    model.save_pretrained("out")            # a converted directory (or mc_retrofit.save(model, "out"))
    model = mc_retrofit.load("out")         # or an exported .safetensors file
"""
from . import compat
from .compat import cache_argument, forward_with_cache, returned_cache
from .config import MCConfig
from .errors import MCError
from .generation import cache_stats
from .describe import describe
from .model import convert, export, load, load_base, save, unconvert

__all__ = ["MCConfig", "MCError", "convert", "unconvert", "save", "load", "load_base", "export", "describe",
           "cache_stats", "cache_argument", "forward_with_cache", "returned_cache"]
__version__ = "0.1.0"

compat.warn_outside_window()  # one line per dependency outside the tested window
