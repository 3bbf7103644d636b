"""Helpers for testing the Triton kernels on machines without a GPU.

Triton decides at decoration time (``@triton.jit``) and at its own first import whether
it interprets kernels (``TRITON_INTERPRET=1``). In a pytest run other test modules
import triton (through fla) long before the kernel tests run, so the kernel tests cannot
switch the interpreter on in-process. ``run_under_interpreter`` runs a test file in a
fresh Python process with the interpreter on and fails with that run's output.
"""
from __future__ import annotations

import os
import subprocess
import sys


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def run_under_interpreter(path: str, timeout: float = 600.0, extra_args: tuple[str, ...] = ()) -> str:
    """Run ``pytest path`` in a subprocess with ``TRITON_INTERPRET=1``; raise AssertionError
    with the tail of its output when any test fails. Returns the output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("MC_RETROFIT_FORCE_REFERENCE", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning", path,
           *extra_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"kernel tests under TRITON_INTERPRET=1 failed (rc={proc.returncode}):\n{out[-6000:]}")
    return out
