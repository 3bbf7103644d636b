"""The library versions mc-retrofit is tested with, and the one place that knows how
they differ.

``TESTED`` is the window CI runs (the lock file's versions up to the newest that passed);
``pyproject.toml`` declares the same bounds (a test keeps the two equal). A version
outside it still runs, with one warning line at import naming the window.

transformers 5.24 renamed the recurrent cache argument: ``cache_params`` (Mamba, Mamba2,
the hybrids' mixers) and ``past_key_values`` (the hybrids' models) became ``cache``, the
old names deprecated until 5.40, and the outputs carry it as ``cache``. Each adapter
declares the names its family has used (newest first); :func:`argument_name` picks the
one the installed forward takes and refuses, naming the version and the window, when it
takes none of them. Passing the old name to 5.24 still works at the model level, but a
layer hook that reads ``kwargs["cache_params"]`` finds nothing there: the memory would
silently not ride on the cache, which is exactly what this module exists to prevent.
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect
import warnings

from .errors import MCError

# distribution -> the tested window (PEP 440), the same bounds as pyproject.toml's.
TESTED = {
    "torch": ">=2.13,<2.14",
    "transformers": ">=5.23,<5.25",
    "flash-linear-attention": ">=0.6.0,<0.6.1",
    "triton": ">=3.9,<3.10",
}

# Every key a transformers output (forward or generate) has returned the recurrent cache
# under: 5.24+ ``cache``; before, ``cache_params`` (Mamba/Mamba2), ``past_key_values``
# (attention, hybrids and fla models), ``state`` (RWKV-4, unchanged in 5.24).
OUTPUT_CACHE_KEYS = ("cache", "cache_params", "past_key_values", "state")


class VersionWarning(UserWarning):
    """A dependency outside the tested window."""


def installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def outside_window(versions: dict[str, str | None] | None = None) -> list[str]:
    """One line per installed dependency whose version lies outside ``TESTED``."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    lines = []
    for dist, window in TESTED.items():
        version = installed(dist) if versions is None else versions.get(dist)
        if version is None:
            continue
        try:
            # local labels (2.13.0+cpu) are builds of the same release
            ok = Version(version).public in SpecifierSet(window) if "+" in version else version in SpecifierSet(window)
        except InvalidVersion:
            ok = False
        if not ok:
            lines.append(f"{dist} {version} is outside the window mc-retrofit is tested with ({dist}{window}); "
                         f"if something breaks, install a version in it (pip install '{dist}{window}')")
    return lines


def warn_outside_window() -> None:
    """At import: one warning line per dependency outside the tested window."""
    for line in outside_window():
        # warn_explicit with a pseudo file name: one line, no source line echoed after it
        warnings.warn_explicit(line, VersionWarning, filename="mc-retrofit", lineno=0)


def window_text(dist: str = "transformers") -> str:
    return f"{dist} {installed(dist) or '(not installed)'}; mc-retrofit supports {dist}{TESTED[dist]}"


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def argument_name(fn, candidates: tuple[str, ...], what: str, dist: str = "transformers") -> str:
    """The first of ``candidates`` that ``fn``'s signature takes (``inspect.signature``
    follows transformers' ``deprecate_kwarg`` wrapper to the real parameters), or a
    one-line MCError naming the installed version and the supported window."""
    params = _parameters(fn)
    for name in candidates:
        if name in params:
            return name
    raise MCError(f"{what} takes none of the cache arguments mc-retrofit knows ({', '.join(candidates)}): "
                  f"{window_text(dist)}")


def cache_argument(model) -> str:
    """The keyword ``model``'s forward takes its recurrent cache as, from its adapter's
    declaration (``Adapter.cache_names``)."""
    from mc_retrofit.adapters import adapter_for

    model = getattr(model, "module", model)  # DistributedDataParallel keeps the model as .module
    adapter = adapter_for(model.config)
    return argument_name(type(model).forward, adapter.cache_names, f"{type(model).__name__}.forward")


def returned_cache(output, required: bool = True):
    """The recurrent cache a forward or ``generate`` output carries (whatever this
    transformers version calls it). A bare cache object comes back as it is."""
    keys = getattr(output, "keys", None)
    if keys is None or not callable(keys) or not hasattr(output, "to_tuple"):
        return output  # not a ModelOutput: already the cache
    for key in OUTPUT_CACHE_KEYS:
        if key in output.keys() and output[key] is not None:
            return output[key]
    if required:
        raise MCError("this output carries no cache: run the model with use_cache=True")
    return None


def forward_with_cache(model, ids, cache=None, **kwargs):
    """``model(ids, <cache argument>=cache, use_cache=True, **kwargs)``: one step of split
    prefill or decoding on any supported family and transformers version. Returns
    (output, the cache to pass to the next step)."""
    out = model(ids, **{cache_argument(model): cache}, use_cache=True, **kwargs)
    return out, returned_cache(out)


# -- foreign symbols mc-retrofit replaces ---------------------------------------------------
class Patch:
    """One foreign attribute replaced by mc-retrofit: where, why, for which versions, and
    the original to put back. ``PATCHES`` lists every one installed in this process."""

    def __init__(self, owner, name: str, replacement, *, dist: str, window: str, why: str):
        self.owner, self.name, self.replacement = owner, name, replacement
        self.dist, self.window, self.why = dist, window, why
        self.original = owner.__dict__[name]

    @property
    def where(self) -> str:
        return f"{getattr(self.owner, '__module__', '?')}.{getattr(self.owner, '__qualname__', self.owner)}.{self.name}"

    def install(self) -> None:
        setattr(self.owner, self.name, self.replacement)

    def uninstall(self) -> None:
        setattr(self.owner, self.name, self.original)


PATCHES: dict[tuple[int, str], Patch] = {}


def install_patch(owner, name: str, make, *, dist: str, window: str, why: str) -> Patch:
    """Replace ``owner.name`` by ``make(original)`` once (idempotent), recorded in PATCHES."""
    key = (id(owner), name)
    if key not in PATCHES:
        patch = Patch(owner, name, make(owner.__dict__[name]), dist=dist, window=window, why=why)
        patch.install()
        PATCHES[key] = patch
    return PATCHES[key]


def uninstall_patches() -> None:
    """Put every replaced attribute back (the libraries exactly as imported)."""
    for patch in reversed(list(PATCHES.values())):
        patch.uninstall()
    PATCHES.clear()


def generate_passes_cache() -> bool:
    """transformers >= 5.24: ``generate`` hands the cache to the model as ``cache=``."""
    from transformers.generation import GenerationMixin

    return "cache" in _parameters(GenerationMixin.prepare_inputs_for_generation)


def fix_fla_generation() -> None:
    """fla 0.6.0's models take their cache as ``past_key_values``, while transformers 5.24's
    ``generate`` passes it as ``cache``: fla's forward swallows the unknown keyword in
    ``**kwargs`` and every decoding step starts from an empty state, silently (about 1.2 in
    logits on a tiny DeltaNet, with or without Memory Caching). The fix renames the key in
    the inputs fla's generation mixin prepares, for models whose forward has no ``cache``."""
    if not generate_passes_cache():
        return
    from fla.models.generation_utils import FLAGenerationMixin

    def make(original):
        @functools.wraps(original)
        def prepare_inputs_for_generation(self, *args, **kwargs):
            inputs = original(self, *args, **kwargs)
            if "cache" in inputs and "cache" not in _parameters(type(self).forward):
                inputs["past_key_values"] = inputs.pop("cache")
            return inputs

        return prepare_inputs_for_generation

    install_patch(FLAGenerationMixin, "prepare_inputs_for_generation", make, dist="transformers",
                  window=">=5.24", why="generate passes cache= but fla 0.6 models take past_key_values=")
