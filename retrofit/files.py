"""Writing outputs safely: build in a temporary sibling, then rename into place.

What this module promises (``tests/hostile/test_files.py`` holds a test for each):

- Nothing is ever left half-written: an output appears in one rename, or not at all.
- Nothing of the user's is ever lost. An existing target is replaced only with ``force``, and
  even then only when it is an earlier mc-retrofit output of the same kind that holds no file
  mc-retrofit did not write. Every output directory records what it holds in a marker file
  (``.mc-retrofit.json``); an exported file says so in its safetensors metadata. The current
  directory, its parents, and a run's sources (or folders that contain them) are never targets.
- The final rename is exclusive: if the target appeared while a run was writing (another run
  finished first), the run fails and leaves the other output as it is; its own finished output
  is kept beside it (``NAME-2``, ...) and the error says where. Where the system has an
  atomic no-replace rename (``renameat2`` on Linux, ``renamex_np`` on macOS) it is used; elsewhere a
  lock file next to the target (``.NAME.tmp-lock``, created with O_EXCL) keeps mc-retrofit runs
  from finishing the same target at once. With ``force`` the replacement is one atomic exchange
  where the system has one.
- A folder that cannot be written is reported before any work, naming the folder.
- Outputs follow the umask, like every other file the user makes.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import MCError

MARKER = ".mc-retrofit.json"
# What each kind of output is called in messages. "output" is a generic mc-retrofit directory
# (the training recipes' checkpoints).
KINDS = {"converted": "a converted model", "eval": "a folder of evaluation results",
         "checkpoint": "a fine-tuning checkpoint", "output": "an output", "exported": "an exported model"}
# Outputs written before the marker existed: the files that identify each kind, and the names
# such a directory could hold (anything else in it is the user's and is never deleted).
_LEGACY = {
    "converted": (("mc_config.json", "mc_gates.safetensors"),
                  ("config.json", "generation_config.json", "mc_config.json", "mc_gates.safetensors",
                   "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "training.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "LICENSE", "README.md")),
    "eval": (("results.json",), ("results.json", "results.md", "*.png", "records.json.gz")),  # split records: recipes/studies
    "checkpoint": (("state.pt",), ("state.pt", "carry.pt")),
    "output": (("config.json", "training.json"),
               ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                "model.safetensors.index.json", "training.json")),
}
LOCK_WAIT_S = 30.0  # a lock is held only for one rename: waiting longer means it is stale
_NOREPLACE, _EXCHANGE = "noreplace", "exchange"


# -- recognising mc-retrofit's own outputs ---------------------------------------------------
def output_kind(path: str | Path) -> str | None:
    """The kind of mc-retrofit output at ``path`` (a key of ``KINDS``), or None if it is not one."""
    p = Path(path)
    if p.is_file():
        return "exported" if _is_export(p) else None
    if not p.is_dir():
        return None
    marker = _read_marker(p)
    if marker is not None:
        return marker["kind"]
    for kind, (needed, _) in _LEGACY.items():  # converted before output: a converted dir may hold training.json
        if all((p / n).is_file() for n in needed) and _legacy_confirmed(kind, p):
            return kind
    return None


def _legacy_confirmed(kind: str, p: Path) -> bool:
    if kind == "eval":  # results.json is a common name: only mc-retrofit's schema counts
        try:
            return str(json.loads((p / "results.json").read_text()).get("schema", "")).startswith("mc-retrofit-eval")
        except (OSError, ValueError, AttributeError):
            return False
    if kind == "checkpoint":
        return p.name.endswith(".checkpoint")
    return True


def _is_export(p: Path) -> bool:
    """An exported model: safetensors metadata with mc_retrofit's format and an mc_config (the
    gate file ``mc_gates.safetensors`` has the format but no config: it is not an export)."""
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100_000_000:
                return False
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return str(meta.get("mc_retrofit", "")).startswith("mc-retrofit") and "mc_config" in meta


def _read_marker(p: Path) -> dict | None:
    try:
        m = json.loads((p / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(m, dict) and m.get("written_by") == "mc-retrofit" and m.get("kind") in KINDS
            and isinstance(m.get("files"), list) and all(isinstance(f, str) for f in m["files"])):
        return None
    return m


def _write_marker(tmp: Path, kind: str) -> None:
    written = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if not f.is_dir())
    (tmp / MARKER).write_text(json.dumps({"written_by": "mc-retrofit", "kind": kind, "files": written}, indent=1) + "\n")


def foreign_files(p: Path, kind: str) -> list[str]:
    """Files in the output directory ``p`` that mc-retrofit did not write (sorted)."""
    marker = _read_marker(p)
    written = set(marker["files"]) if marker is not None else None
    patterns = _LEGACY.get(kind, ((), ()))[1]
    foreign = []
    for dirpath, dirs, names in os.walk(p):
        here = Path(dirpath)
        links = [d for d in dirs if (here / d).is_symlink()]  # not followed by os.walk: count as entries
        for name in names + links:
            rel = str((here / name).relative_to(p))
            if rel == MARKER:
                continue
            ours = rel in written if written is not None else (
                os.sep not in rel and any(fnmatch.fnmatchcase(rel, pat) for pat in patterns))
            if not ours:
                foreign.append(rel)
    return sorted(foreign)


# -- checking a target -------------------------------------------------------------------------
def check_target(out: str | Path, force: bool = False, *, kind: str | None = None, sources=(), want_dir: bool = True,
                 make_parents: bool = False) -> None:
    """Refuse, before any work, an output path whose writing could lose something, or that
    cannot be written. ``kind``: what will be written (a key of ``KINDS``); None for a plain file
    the caller vouches for (``force`` then replaces any file), or for a directory of any
    kind. ``sources``: paths the run reads (never written over, nor anything containing them).
    ``make_parents``: missing parent folders will be created (checked: the nearest existing one
    must be writable)."""
    out = Path(out).absolute()
    real = Path(os.path.realpath(out))
    try:
        here = Path(os.path.realpath(os.getcwd()))
    except FileNotFoundError:  # the current directory was deleted: there is nothing left to protect
        here = None
    if here is not None and (real == here or real in here.parents):
        raise MCError(f"--out {out} is the current directory or one of its parents; name a new folder for the output")
    for src in sources:
        if src is None or not os.path.exists(src):  # not a path (e.g. "bytes"), or nothing there to lose
            continue
        s = Path(os.path.realpath(src))
        if real == s or real in s.parents:
            raise MCError(f"--out {out} is the source {src} or contains it; choose another --out")
    if os.path.islink(out):  # replacing a link would surprise either way: the user says which path is meant
        raise MCError(f"--out {out} is a symbolic link; pass the path it points to, or another --out")
    if os.path.lexists(out):
        _check_existing(out, force, kind, want_dir)
    parent = out.parent
    if make_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        raise MCError(f"parent directory {out.parent} does not exist; create it first")
    _check_writable(parent)


def _check_existing(out: Path, force: bool, kind: str | None, want_dir: bool) -> None:
    if want_dir and out.is_dir() and not any(out.iterdir()):
        return  # an empty folder (made for this output): nothing in it to lose
    if not want_dir and out.is_dir():
        raise MCError(f"{out} is a directory; name a file (for an export, one ending in .safetensors)")
    if want_dir and not out.is_dir():
        raise MCError(f"{out} is a file, not a folder; choose another --out")
    if kind is None and not want_dir:
        if not force:
            raise MCError(f"{out} already exists; pass --force to overwrite it")
        return
    found = output_kind(out)
    if found is None or (kind is not None and found != kind):
        what = KINDS[kind] if kind is not None else "an output"
        raise MCError(f"{out} exists and is not {what} written by mc-retrofit; choose another --out "
                      "(--force replaces only an earlier mc-retrofit output of the same kind)")
    foreign = foreign_files(out, found) if want_dir else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MCError(f"{out} holds files mc-retrofit did not write ({shown}); move them out first, or choose another --out")
    if not force:
        raise MCError(f"{out} already exists; pass --force to overwrite it")


def _check_writable(folder: Path) -> None:
    """Create and remove a file: the only reliable test (permissions, read-only mounts, quotas)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".mc-retrofit.tmp-probe-", dir=folder)
    except OSError as e:
        raise MCError(f"cannot write in {folder} ({e.strerror or e}); choose a writable --out") from None
    os.close(fd)
    os.unlink(name)


# -- writing -----------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, kind: str = "output", sources=()):
    """Yield a temporary directory; on success it becomes ``out`` in one rename, with a marker
    listing what it holds. ``force`` replaces an earlier output of this ``kind`` only."""
    out = Path(out).absolute()
    check_target(out, force, kind=kind, sources=sources)
    tmp = _made(out, lambda: Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)))
    try:
        with _named_errors(tmp, out):
            yield tmp
        _write_marker(tmp, kind)
        _follow_umask(tmp)
        _commit(tmp, out, force, kind)
    except BaseException:
        if tmp.exists():  # gone if it was kept beside the target (a lost race): then it stays
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path, force: bool = False, kind: str | None = None, sources=()):
    """Yield a temporary file path; on success it becomes ``out`` in one rename. With ``kind``
    ("exported"), ``force`` replaces only a file of that kind; without, any file."""
    out = Path(out).absolute()
    check_target(out, force, kind=kind, sources=sources, want_dir=False)

    def make():
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        os.close(fd)
        return Path(name)

    tmp = _made(out, make)
    try:
        with _named_errors(tmp, out):
            yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the output should not be
        _commit(tmp, out, force, kind)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _made(out: Path, make):
    try:
        return make()
    except OSError as e:  # name the output, not the temporary sibling
        raise MCError(f"cannot write {out} ({e.strerror or e}); choose a writable --out") from None


@contextlib.contextmanager
def _named_errors(tmp: Path, out: Path):
    """An OS error on a file inside the temporary output (disk full, ...) names the output."""
    try:
        yield
    except OSError as e:
        if str(getattr(e, "filename", None) or "").startswith(str(tmp)):
            raise MCError(f"could not write {out}: {e.strerror or e}; nothing was written") from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(tmp: Path) -> None:
    """mkdtemp makes the folder private and safetensors its files (0600); outputs should not be."""
    mask = _umask()
    for p in [tmp, *tmp.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _commit(tmp: Path, out: Path, force: bool, kind: str | None) -> None:
    """The final step: ``tmp`` becomes ``out``, never over something that appeared meanwhile
    (unless ``force`` and it is an earlier output of this kind). When it cannot, this run's
    finished output is kept under the next free name beside ``out`` (hours of evaluation or
    training are not thrown away) and the error says where."""
    try:
        _commit_once(tmp, out, force, kind)
    except MCError as e:
        kept = _keep_beside(tmp, out)
        raise MCError(f"{e}; this run's output is kept at {kept}" if kept else str(e)) from None


def _commit_once(tmp: Path, out: Path, force: bool, kind: str | None) -> None:
    is_dir = tmp.is_dir()
    for _ in range(5):  # a few rounds: the target may appear or vanish between two looks
        if not os.path.lexists(out):
            try:
                _rename_noreplace(tmp, out)
                return
            except FileExistsError:
                continue  # it appeared just now: look at what it is
        if is_dir and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            with contextlib.suppress(OSError):  # empty: nothing to lose (rmdir refuses if it filled meanwhile)
                os.rmdir(out)
            continue
        if not force:
            raise MCError(f"{out} appeared while this run was writing it (another run?) and was left as it is")
        _check_existing(out, True, kind, is_dir)  # still mc-retrofit's, with nothing of the user's in it
        try:
            _replace(tmp, out, is_dir)
            return
        except (FileNotFoundError, FileExistsError):
            continue  # it vanished, or another run's output arrived, meanwhile: look again
    raise MCError(f"{out} keeps changing while this run writes it (is another run writing it?)")


def _keep_beside(tmp: Path, out: Path) -> Path | None:
    """Move the finished ``tmp`` to the first free name ``NAME-2``, ``NAME-3``, ... beside ``out``
    (``m-2.safetensors`` for a file)."""
    stem, suffix = (out.name, "") if tmp.is_dir() else (out.stem, out.suffix)
    for i in range(2, 100):
        candidate = out.with_name(f"{stem}-{i}{suffix}")
        if os.path.lexists(candidate):
            continue
        try:
            _rename_noreplace(tmp, candidate)
            return candidate
        except (FileExistsError, MCError):
            continue
        except OSError:
            return None
    return None


def _replace(tmp: Path, out: Path, is_dir: bool) -> None:
    if not is_dir:
        os.replace(tmp, out)  # one atomic step for files
        return
    if _native_rename(tmp, out, _EXCHANGE):  # one atomic swap: out is never missing
        shutil.rmtree(tmp, ignore_errors=True)  # the earlier output, now at tmp
        return
    # No atomic exchange here: move the earlier output aside, put the new one in, drop the old.
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, aside / "old")
    try:
        _rename_noreplace(tmp, out)
    except BaseException:
        try:
            os.rename(aside / "old", out)
        except OSError:
            raise MCError(f"{out} was replaced by another run meanwhile; the earlier output is kept at {aside / 'old'}") from None
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError (and nothing changed) if ``dst`` exists."""
    if _native_rename(src, dst, _NOREPLACE):
        return
    if src.is_file():
        try:
            os.link(src, dst)  # a hard link is exclusive: it fails if dst exists
        except FileExistsError:
            raise
        except OSError:
            pass  # no hard links on this filesystem: the lock below
        else:
            os.unlink(src)
            return
    with _lock(dst):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)


@contextlib.contextmanager
def _lock(dst: Path):
    """An O_EXCL lock file next to ``dst`` for the check-then-rename (mc-retrofit runs only)."""
    lock = dst.parent / f".{dst.name}.tmp-lock"
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise MCError(f"{lock} exists: another mc-retrofit run is finishing {dst}; "
                              "if none is, delete the lock file and try again") from None
            time.sleep(0.05)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)


def _native_rename(src: Path, dst: Path, flag: str) -> bool:
    """renameat2 (Linux) or renamex_np (macOS) with no-replace or exchange semantics. False
    where neither exists, or the filesystem does not support the flag (then the caller falls back)."""
    native = _native()
    if native is None:
        return False
    call, flags = native
    if call(os.fsencode(src), os.fsencode(dst), flags[flag]) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(err, os.strerror(err), str(dst))
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    if err == errno.ENOENT:
        raise FileNotFoundError(err, os.strerror(err), str(dst))
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@functools.lru_cache(maxsize=None)
def _native():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # Windows: no such libc (its os.rename never replaces anyway)
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):  # glibc >= 2.28
        f = libc.renameat2
        f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        f.restype = ctypes.c_int
        at_fdcwd = -100
        return (lambda s, d, fl: f(at_fdcwd, s, at_fdcwd, d, fl)), {_NOREPLACE: 1, _EXCHANGE: 2}
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # macOS >= 10.12
        f = libc.renamex_np
        f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        f.restype = ctypes.c_int
        return f, {_NOREPLACE: 0x4, _EXCHANGE: 0x2}  # RENAME_EXCL, RENAME_SWAP
    return None
