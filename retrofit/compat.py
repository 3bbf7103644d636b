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

It also holds the one registry of foreign symbols mc-retrofit replaces (:class:`Patch`,
:func:`install`, :func:`uninstall_patches`, :func:`patches`): each with the library version
range it was written against, refused with one line outside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib
import importlib.metadata
import inspect
import warnings
import weakref
from typing import Any, Callable

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
    lines = []
    for dist, window in TESTED.items():
        version = installed(dist) if versions is None else versions.get(dist)
        if version is None:
            continue
        if not _in_window(version, window):
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
# Every attribute of another library that mc-retrofit replaces is declared as a :class:`Patch`
# and goes through :func:`install` / :func:`uninstall_patches`; nothing else sets attributes on
# transformers or fla. :func:`patches` lists them all (installed or not).
#
# Layers, bottom to top. Two patches on one attribute stack in this order (the upper one's
# "original" is the lower one's replacement), so a layer installs after the ones below it and
# uninstalls before them:
#   "fla-cpu": fla's Triton leaf ops routed to PyTorch for CPU tensors. An fla model cannot
#       run on CPU without it, converted or not, so it is installed when an fla model class is
#       first asked for and stays until uninstall_patches() is called explicitly: mc-retrofit
#       cannot know when a process's last fla model is gone.
#   "compat": fixes of a library pairing (fla 0.6 generation under transformers 5.24); the
#       same lifetime as "fla-cpu".
#   "mc": the family op wrappers Memory Caching reads through, and the redirect of a converted
#       model's save_pretrained. Held by the live converted models (hold/release): removed
#       when the last one is unconverted.
LAYERS = ("fla-cpu", "compat", "mc")

# The versions the patched symbols of each library were written against: the names exist and
# take the arguments the replacements assume. Outside them ``install`` refuses with one line
# (instead of an AttributeError or a wrong keyword deep in a forward). fla's CPU references
# follow fla 0.6's op signatures; transformers' ops are the tested window's.
PATCH_WINDOWS = {"transformers": TESTED["transformers"], "flash-linear-attention": ">=0.6.0,<0.7"}
_DISTS = {"transformers": "transformers", "fla": "flash-linear-attention"}  # top package -> distribution
_ABSENT = object()  # "not in the owner's own __dict__" (e.g. an inherited Function.apply)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One foreign attribute mc-retrofit replaces, declared (installed by :func:`install`).

    owner: import path of a module (``"fla.layers.gla"``) or ``"module:Class"``; name: the
    attribute; make(current) -> the replacement (``current`` is what the attribute resolves to
    now: the library's own, or the patch of the layer below); why: one line for the docs;
    layer: one of LAYERS; group: who declares it (a family, ``fla-cpu``, ``compat``, ``save``);
    applies: a condition checked at install (None: always); dist/window: the library it
    belongs to and the versions it was written against (default: from the owner's package)."""

    owner: str
    name: str
    make: Callable = dataclasses.field(repr=False, compare=False)
    why: str = ""
    layer: str = "mc"
    group: str = ""
    applies: Callable[[], bool] | None = dataclasses.field(default=None, repr=False, compare=False)
    dist: str = ""
    window: str = ""

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"patch layer {self.layer!r} is not one of {LAYERS}")
        dist = self.dist or _DISTS[self.owner.split(".", 1)[0]]
        object.__setattr__(self, "dist", dist)
        object.__setattr__(self, "window", self.window or PATCH_WINDOWS[dist])

    @property
    def where(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.name}"

    @property
    def key(self) -> tuple[str, str, str]:
        return self.owner, self.name, self.layer

    @property
    def installed(self) -> bool:
        return self.key in PATCHES

    def resolve_owner(self):
        module_name, _, qualname = self.owner.partition(":")
        owner = importlib.import_module(module_name)
        for part in filter(None, qualname.split(".")):
            owner = getattr(owner, part)
        return owner


@dataclasses.dataclass
class Installed:
    """An installed patch: the owner object, its own attribute before (``_ABSENT`` when it was
    inherited, e.g. ``Function.apply``: uninstall then deletes the attribute) and the replacement."""

    patch: Patch
    owner: Any
    original: Any
    replacement: Any

    where = property(lambda self: self.patch.where)
    window = property(lambda self: f"{self.patch.dist}{self.patch.window}")
    why = property(lambda self: self.patch.why)

    def uninstall(self) -> None:
        name = self.patch.name
        if vars(self.owner).get(name) is not self.replacement:
            raise MCError(f"{self.where} was replaced by someone else after mc-retrofit patched it; "
                          "undo that replacement first, then uninstall mc-retrofit's patches")
        if self.original is _ABSENT:
            delattr(self.owner, name)
        else:
            setattr(self.owner, name, self.original)


# Every installed patch, in install order (keyed by Patch.key).
PATCHES: dict[tuple[str, str, str], Installed] = {}
_HOLDERS: dict[str, weakref.WeakSet] = {layer: weakref.WeakSet() for layer in LAYERS}


def _in_window(version: str, window: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:  # local labels (2.13.0+cpu) are builds of the same release
        return (Version(version).public if "+" in version else version) in SpecifierSet(window)
    except InvalidVersion:
        return False


def check_window(dist: str, window: str, version: str | None = None) -> str:
    """The installed (or given) version of ``dist``, or a one-line MCError naming ``window``."""
    version = installed(dist) if version is None else version
    if version is None:
        raise MCError(f"{dist} is not installed: pip install '{dist}{window}'")
    if not _in_window(version, window):
        raise MCError(f"{dist} {version} is outside the versions mc-retrofit's patches of it were written against "
                      f"({dist}{window}); install one in that range: pip install '{dist}{window}'")
    return version


@functools.lru_cache(maxsize=None)
def _checked(dist: str, window: str) -> str:
    return check_window(dist, window)  # the installed version cannot change in a process


def install(patches) -> None:
    """Install every patch of ``patches`` that is not installed yet (idempotent), lower layers
    first; each library's version is checked against the patch's window before anything of it
    is touched."""
    todo = sorted((p for p in patches if p.key not in PATCHES), key=lambda p: LAYERS.index(p.layer))
    for patch in todo:
        _checked(patch.dist, patch.window)
    for patch in todo:
        if patch.key in PATCHES or (patch.applies is not None and not patch.applies()):
            continue
        owner = patch.resolve_owner()
        above = [p for p in PATCHES.values() if p.owner is owner and p.patch.name == patch.name
                 and LAYERS.index(p.patch.layer) > LAYERS.index(patch.layer)]
        if above:
            raise MCError(f"{patch.where} already carries mc-retrofit's {above[0].patch.layer!r} patch and the "
                          f"{patch.layer!r} one goes below it: call mc_retrofit.compat.uninstall_patches() first")
        original = vars(owner).get(patch.name, _ABSENT)
        replacement = patch.make(getattr(owner, patch.name))
        setattr(owner, patch.name, replacement)
        PATCHES[patch.key] = Installed(patch, owner, original, replacement)


@contextlib.contextmanager
def temporarily(patches):
    """Install ``patches`` for the block only: on exit the ones it installed are removed
    (newest first); any that were installed before stay."""
    fresh = [p for p in patches if p.key not in PATCHES]
    try:
        install(fresh)
        yield
    finally:
        for patch in reversed(fresh):
            entry = PATCHES.get(patch.key)
            if entry is not None:
                entry.uninstall()
                del PATCHES[patch.key]


def patched(owner, name: str) -> Installed | None:
    """The topmost installed patch on ``owner.name`` (an object), or None."""
    found = [p for p in PATCHES.values() if p.owner is owner and p.patch.name == name]
    return found[-1] if found else None


def hold(layer: str, holder) -> None:
    """``holder`` (weakly referenced: a converted model's state) needs ``layer``'s patches."""
    _HOLDERS[layer].add(holder)


def release(layer: str, holder) -> None:
    """``holder`` no longer needs ``layer``: when no live holder remains, uninstall the layer."""
    _HOLDERS[layer].discard(holder)
    if not _HOLDERS[layer]:
        uninstall_patches(layer)


def uninstall_patches(*layers: str) -> None:
    """Put the replaced attributes of ``layers`` (default: every layer) back, newest first: the
    libraries exactly as imported. Refused while a converted model still needs them
    (``mc_retrofit.unconvert`` it first), and for a layer whose attributes carry a patch of a
    layer above it that stays."""
    layers = layers or LAYERS
    for layer in layers:
        if _HOLDERS[layer]:
            gc.collect()  # converted models dropped without unconvert, still in reference cycles
        if _HOLDERS[layer]:
            raise MCError(f"{len(_HOLDERS[layer])} converted model(s) still use mc-retrofit's {layer!r} patches: "
                          "call mc_retrofit.unconvert(model) on each (or drop them) first")
    going = [p for p in PATCHES.values() if p.patch.layer in layers]
    for entry in going:
        staying = patched(entry.owner, entry.patch.name)
        if staying is not None and staying.patch.layer not in layers:
            raise MCError(f"{entry.where}: its {staying.patch.layer!r} patch sits on the {entry.patch.layer!r} one; "
                          f"uninstall both layers together")
    for entry in reversed(going):
        entry.uninstall()
        del PATCHES[entry.patch.key]


def patches() -> list[Patch]:
    """Every foreign symbol mc-retrofit may replace in this installation, installed or not
    (``Patch.installed`` says which): each family's op wrappers and the support they need
    (fla's CPU routing, the generation fix), the save redirect, and the chunkwise CPU forms the
    training recipes install for a block (``adapters.fla.chunk.patched``)."""
    import importlib.util

    from mc_retrofit import adapters, model

    extra = list(model.SAVE_PATCHES)
    if importlib.util.find_spec("fla") is not None:
        from mc_retrofit.adapters.fla.chunk import FAST_PATCHES

        extra += FAST_PATCHES
    found: dict[tuple, Patch] = {}
    for patch in [*(p for a in adapters.ADAPTERS for p in a.patches()), *extra]:
        found.setdefault(patch.key, patch)
    return list(found.values())


def generate_passes_cache() -> bool:
    """transformers >= 5.24: ``generate`` hands the cache to the model as ``cache=``."""
    from transformers.generation import GenerationMixin

    return "cache" in _parameters(GenerationMixin.prepare_inputs_for_generation)


def _rename_generation_cache(original):
    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = original(self, *args, **kwargs)
        if "cache" in inputs and "cache" not in _parameters(type(self).forward):
            inputs["past_key_values"] = inputs.pop("cache")
        return inputs

    return prepare_inputs_for_generation


# fla 0.6.0's models take their cache as ``past_key_values``, while transformers 5.24's
# ``generate`` passes it as ``cache``: fla's forward swallows the unknown keyword in ``**kwargs``
# and every decoding step starts from an empty state, silently (about 1.2 in logits on a tiny
# DeltaNet, with or without Memory Caching). The fix renames the key in the inputs fla's
# generation mixin prepares, for models whose forward has no ``cache``.
FLA_GENERATION = Patch("fla.models.generation_utils:FLAGenerationMixin", "prepare_inputs_for_generation",
                       _rename_generation_cache, layer="compat", group="compat", applies=lambda: generate_passes_cache(),
                       why="transformers>=5.24's generate passes cache= but fla 0.6 models take past_key_values=")


def fix_fla_generation() -> None:
    """Install :data:`FLA_GENERATION` (where this transformers passes ``cache=``)."""
    install([FLA_GENERATION])
