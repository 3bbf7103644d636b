"""Hugging Face Hub ids: ``org/name[@revision]`` becomes a folder in the Hugging Face cache.

:func:`resolve_hub` (what :func:`mc_retrofit.checkpoints.locate` calls for a Hub id) and
:func:`resolve_tokenizer` (``--tokenizer org/name``) download with
``huggingface_hub.snapshot_download`` and return the snapshot folder, which is then read
exactly like a local directory. Only the files a model needs are fetched (configs,
safetensors weights, tokenizer, MC gates, README/LICENSE); pickle weights
(``pytorch_model*.bin``) only when the repository has no safetensors weights. No code from
a repository is ever fetched or run (nothing here, nor in the loaders, passes
``trust_remote_code``).

Where: ``cache_dir`` (``--cache-dir``), else ``HF_HUB_CACHE``, else ``HF_HOME``/hub, as
huggingface_hub chooses; ``HF_HUB_OFFLINE=1`` reads the cache only; ``HF_ENDPOINT``: another
Hub (a mirror). huggingface_hub reads those variables once, when it is imported (and
transformers imports it early); they are read again here on every call, so a variable set
later in the same process (a notebook, a test) still counts. Every huggingface_hub failure becomes one :class:`MCError` line that
says what to do.
"""
from __future__ import annotations

import os
from fnmatch import fnmatch
from pathlib import Path

from .errors import MCError

CONFIG_FILES = ("config.json", "mc_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")
# training.json: what a model finetuned by mc-retrofit records (eval reads its train context).
MODEL_FILES = (*CONFIG_FILES, "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               *TOKENIZER_FILES, "training.json", "README.md", "LICENSE*")
PICKLE_FILES = ("pytorch_model*.bin", "pytorch_model*.bin.index.json")
# A model folder is its top level: subfolders (onnx/, original/, checkpoint-*/ ...) hold
# other formats or copies, often as big as the model itself.
TOP_LEVEL_ONLY = ("*/*",)
GATES_NAME = "mc_gates.safetensors"  # the MC gates: not weights of the base model
_TRUE = {"1", "ON", "YES", "TRUE"}


def resolve_hub(repo: str, revision: str | None = None, *, cache_dir: str | os.PathLike | None = None,
                config_only: bool = False) -> Path:
    """The snapshot folder of Hub model ``repo`` at ``revision`` (default: main), downloaded
    into the cache if it is not there. ``config_only``: config.json and mc_config.json only
    (what ``inspect`` reads)."""
    spec = repo + (f"@{revision}" if revision else "")
    cache = cache_folder(cache_dir)
    folder = _download(repo, revision, cache, CONFIG_FILES if config_only else MODEL_FILES, spec)
    if not config_only and _pickle_only(repo, folder, cache):
        # at the commit just fetched (folder.name): a branch that moved meanwhile must not
        # give weights of another commit than the configs
        folder = _download(repo, folder.name, cache, PICKLE_FILES, spec)
    if not (folder / "config.json").is_file():
        raise MCError(f"{spec} on the Hugging Face Hub has no config.json at its top level: not a Hugging Face-format "
                      "model (mc-retrofit reads transformers and fla checkpoints)")
    return folder


def resolve_tokenizer(spec, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of tokenizer ``spec``: a local path as it is, or a Hub id ``org/name[@rev]``
    (``@rev`` wins over ``revision``) downloaded with its tokenizer files only (and its
    config.json, which AutoTokenizer reads when tokenizer_config.json names no class).
    'bytes' is no tokenizer: the caller handles it before calling this."""
    from .checkpoints import HUB_ID

    text = str(spec)
    if Path(text).exists():
        return Path(text)
    hub = HUB_ID.fullmatch(text)
    if hub is None:
        raise MCError(f"--tokenizer {text} does not exist: give 'bytes', a folder with tokenizer files, or a Hugging "
                      "Face Hub id org/name")
    repo, rev = hub["repo"], hub["revision"] or revision
    folder = _download(repo, rev, cache_folder(cache_dir), (*TOKENIZER_FILES, "config.json"), text,
                       what="--tokenizer ")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise MCError(f"--tokenizer {text}: the Hugging Face Hub repository has no tokenizer files at its top level "
                      f"({', '.join(TOKENIZER_FILES)})")
    return folder


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.upper() in _TRUE


def cache_folder(cache_dir=None) -> Path:
    """The Hugging Face hub cache in use: ``cache_dir``, else the variables huggingface_hub
    reads, in its order (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub), as set now."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _pickle_only(repo: str, folder: Path, cache: Path) -> bool:
    """Whether the repository has pickle weights and no safetensors weights, by the file
    listing the first download cached (no network). Without a cached listing (offline, on a
    cache filled by an older huggingface_hub) the snapshot holds what it holds."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        files = [f.path for f in get_cached_repo_tree(repo, revision=folder.name, cache_dir=cache)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return False
    top = [f for f in files if "/" not in f]
    safetensors = [f for f in top if f.endswith(".safetensors") and f != GATES_NAME]
    return not safetensors and any(fnmatch(f, PICKLE_FILES[0]) for f in top)


def _download(repo: str, revision: str | None, cache: Path, patterns, spec: str, what: str = "") -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=list(patterns),
                                      ignore_patterns=list(TOP_LEVEL_ONLY), local_files_only=offline(),
                                      endpoint=(os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None,
                                      tqdm_class=_transient_bars()))
    except Exception as e:  # noqa: BLE001 - every failure is one line (their messages span several)
        raise MCError(what + _explain(e, repo, revision, cache, spec)) from None


def _transient_bars():
    """huggingface_hub's progress bars, erased when they close: a download shows its
    progress, and a failed one leaves only its one-line error on the terminal."""
    from huggingface_hub.utils import tqdm

    class Transient(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("leave", False)
            super().__init__(*args, **kwargs)

    return Transient


def _explain(e: Exception, repo: str, revision: str | None, cache: Path, spec: str) -> str:
    """One line for a huggingface_hub failure: what happened and what to do."""
    from huggingface_hub import errors

    from .checkpoints import first_line

    rev = revision or "main"
    get = f"`hf download {repo}" + (f" --revision {revision}" if revision else "") + "`"
    cause = e.__cause__
    if isinstance(e, errors.IncompleteSnapshotError):
        why = "HF_HUB_OFFLINE=1 is set" if offline() else f"the Hugging Face Hub could not be reached ({_brief(cause)})"
        return (f"{spec}: the Hugging Face cache ({cache}) holds an incomplete copy of it (an interrupted download?) "
                f"and {why}: run once online to complete it, or {get}")
    if isinstance(e, errors.LocalEntryNotFoundError):
        if offline() or isinstance(cause, errors.OfflineModeIsEnabled):
            cached = _cached_revisions(cache, repo)
            if cached:
                return (f"revision {rev} of {repo} is not in the Hugging Face cache ({cache}; cached: "
                        f"{', '.join(cached)}) and HF_HUB_OFFLINE=1 is set: run once online, or {get}")
            return (f"{spec} does not exist locally, is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 "
                    f"is set: run once online, or {get}")
        return (f"{spec} does not exist locally, and the Hugging Face Hub could not be reached ({_brief(cause)}) "
                f"while the cache ({cache}) has no copy of it: check the network (or HF_ENDPOINT, the proxy), "
                "or set HF_HUB_OFFLINE=1 to use only the cache")
    if isinstance(e, errors.GatedRepoError):
        return (f"{repo} is a gated model on the Hugging Face Hub: accept its terms on its Hub page, then log in "
                "with `hf auth login` (or set HF_TOKEN)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return (f"{spec} does not exist locally, and the Hugging Face Hub has no model {repo} you can see: check "
                "the name; for a private or gated model, log in with `hf auth login` (or set HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{repo} on the Hugging Face Hub has no revision {rev!r}: give a branch, tag or commit it has"
    if isinstance(e, errors.DisabledRepoError):
        return f"{repo} is disabled on the Hugging Face Hub: it cannot be downloaded"
    if isinstance(e, errors.HfHubHTTPError):
        status = getattr(e.response, "status_code", "?")
        hint = ("; if your token is invalid or expired, log in again with `hf auth login`" if status in (401, 403)
                else "; try again later")
        return f"the Hugging Face Hub refused {spec} (HTTP {status}: {first_line(e)}){hint}"
    if isinstance(e, errors.HFValidationError):
        return f"{spec} does not exist locally and is not a valid Hugging Face Hub id ({first_line(e)})"
    if isinstance(e, OSError):  # a cache folder that cannot be written, a full disk
        return f"could not download {spec} into the Hugging Face cache {cache}: {first_line(e)} (or pick --cache-dir)"
    return f"could not download {spec} from the Hugging Face Hub: {type(e).__name__}: {first_line(e)}"


def _brief(e) -> str:
    if e is None:
        return "no answer"
    from .checkpoints import first_line

    return f"{type(e).__name__}: {first_line(e)}"


def _cached_revisions(cache: Path, repo: str) -> list[str]:
    """The branch/tag names and commits of ``repo`` in the cache (to say what is there)."""
    from huggingface_hub.file_download import repo_folder_name

    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    refs = sorted(str(p.relative_to(storage / "refs")) for p in (storage / "refs").rglob("*") if p.is_file()) \
        if (storage / "refs").is_dir() else []
    snaps = sorted(p.name for p in (storage / "snapshots").iterdir() if p.is_dir()) \
        if (storage / "snapshots").is_dir() else []
    return refs + snaps
