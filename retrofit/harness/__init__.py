"""lm-evaluation-harness integration: the ``mc-retrofit`` lm-eval model (base or MC), the
``mc-retrofit lm-eval`` hand-over to lm-eval's own command line, and base-vs-MC comparison.

Optional: ``pip install 'mc-retrofit[harness]'`` (lm-eval). Importing :mod:`.lm` registers the
model with lm-eval's registry under the name ``mc-retrofit``.
"""
from __future__ import annotations

from mc_retrofit.errors import MCError

LM_EVAL = "lm-eval"


def require_lm_eval():
    """lm_eval, or one line saying how to install it."""
    try:
        import lm_eval  # noqa: F401
    except ModuleNotFoundError:
        raise MCError("lm-evaluation-harness is not installed: pip install 'mc-retrofit[harness]'") from None
    return lm_eval
