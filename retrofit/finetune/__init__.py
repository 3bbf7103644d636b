"""Gate-only fine-tuning of a converted model (``mc-retrofit finetune``).

    from mc_retrofit.finetune import finetune
    finetune(model, "books/", steps=200, seq_len=2048, out="tuned")

- ``data``: text and token sequences into training windows; samplers (state passing);
- ``step``: one step's forward and backward (whole windows or TBPTT through the cache);
- ``loop``: :func:`finetune`, the training loop;
- ``checkpoint``: resumable checkpoints (plain tensors, run id); ``carry``: a carried cache
  as plain tensors.
"""
from ..model import gate_parameters
from .checkpoint import checkpoint_dir
from .data import labelled_rows, read_texts, sample_windows
from .loop import _schedule, check_reads_cache, finetune, lm_loss

__all__ = ["finetune", "gate_parameters", "lm_loss", "checkpoint_dir", "labelled_rows", "read_texts",
           "sample_windows", "check_reads_cache", "_schedule"]
