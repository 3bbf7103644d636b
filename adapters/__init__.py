"""Family adapters: one file per family, all sharing ``mc_retrofit``'s core.

``ADAPTERS`` lists every supported family; :func:`adapter_for` picks one from a config.
"""
from __future__ import annotations

from mc_retrofit.errors import MCError

from .transformers.mamba import MambaAdapter
from .transformers.mamba2 import Mamba2Adapter
from .transformers.rwkv4 import Rwkv4Adapter

ADAPTERS = [Mamba2Adapter(), MambaAdapter(), Rwkv4Adapter()]

# transformers' hybrids on the Mamba2/Mamba scans, and Falcon-Mamba (their own copies of the ops)
from .transformers.bamba import BambaAdapter  # noqa: E402
from .transformers.falcon_h1 import FalconH1Adapter  # noqa: E402
from .transformers.falcon_mamba import FalconMambaAdapter  # noqa: E402
from .transformers.granitemoehybrid import GraniteMoeHybridAdapter  # noqa: E402
from .transformers.jamba import JambaAdapter  # noqa: E402
from .transformers.nemotron_h import NemotronHAdapter  # noqa: E402
from .transformers.zamba2 import Zamba2Adapter  # noqa: E402

ADAPTERS += [BambaAdapter(), FalconH1Adapter(), NemotronHAdapter(), GraniteMoeHybridAdapter(), Zamba2Adapter(),
             JambaAdapter(), FalconMambaAdapter()]


def register(adapter) -> None:
    """Add a family (used by the optional families, e.g. flash-linear-attention's)."""
    if all(a.family != adapter.family for a in ADAPTERS):
        ADAPTERS.append(adapter)


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def adapter_for(config):
    """The adapter whose family matches ``config.model_type``, or a one-line MCError."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if adapter.matches(config):
            return adapter
    raise MCError(
        f"model type {model_type!r} is not a recurrent family mc-retrofit supports "
        f"(supported: {', '.join(supported_model_types())})"
    )


def adapter_by_family(family: str):
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise MCError(f"unknown family {family!r} (known: {', '.join(a.family for a in ADAPTERS)})")


def _register_fla_families() -> None:
    """flash-linear-attention families: registered only when fla is importable, so the
    transformers families keep working without it. Importing the adapters does not
    import fla itself (that happens when a model class is asked for)."""
    import importlib.util

    if importlib.util.find_spec("fla") is None:
        return
    from .fla.delta_net import DeltaNetAdapter
    from .fla.gated_deltanet import GatedDeltaNetAdapter
    from .fla.gla import GLAAdapter
    from .fla.retnet import RetNetAdapter
    from .fla.rwkv6 import Rwkv6Adapter
    from .fla.rwkv7 import Rwkv7Adapter
    from .transformers.qwen3_next import Qwen3NextAdapter

    for adapter in (DeltaNetAdapter(), GatedDeltaNetAdapter(), RetNetAdapter(), GLAAdapter(), Rwkv6Adapter(),
                    Rwkv7Adapter(), Qwen3NextAdapter()):
        register(adapter)
    # the gated-delta-rule families of 2026 (their CPU routing is fla's, see adapters/fla/cpu.py)
    from .fla.kda import KDAAdapter
    from .transformers.kimi_linear import KimiLinearAdapter
    from .transformers.olmo_hybrid import OlmoHybridAdapter
    from .transformers.qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter

    for adapter in (KDAAdapter(), Qwen3_5Adapter(), Qwen3_5MoeAdapter(), OlmoHybridAdapter(), KimiLinearAdapter()):
        register(adapter)


_register_fla_families()
