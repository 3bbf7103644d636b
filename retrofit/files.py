"""Writing outputs safely: build in a temporary sibling, then rename into place.

Nothing is ever left half-written, and nothing is overwritten without ``force``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MCError


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise MCError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise MCError(f"parent directory {out.parent} does not exist; create it first")


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False):
    """Yield a temporary directory; on success it replaces ``out`` in one rename."""
    out = Path(out).absolute()
    check_target(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output should not be
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path, force: bool = False):
    """Yield a temporary file path; on success it replaces ``out`` in one rename."""
    out = Path(out).absolute()
    check_target(out, force)
    if out.exists() and out.is_dir():
        raise MCError(f"{out} is a directory; choose a file name ending in .safetensors")
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the output should not be
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    # --force over an existing output: move the old one aside first, then drop it.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "x")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
