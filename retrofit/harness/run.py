"""``mc-retrofit lm-eval ARGS`` / ``python -m mc_retrofit.harness ARGS``: lm-eval's own command
line (every flag of ``lm-eval run``) with the ``mc-retrofit`` model registered, plus
``--compare``: the same tasks for ``mc=off`` and the given MC settings, one table of both.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from mc_retrofit.errors import MCError

from . import require_lm_eval


def _value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _lm_eval(argv: list[str]) -> None:
    """Hand ``argv`` to lm-eval's command line, in this process (so the registration holds)."""
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    import mc_retrofit.harness.lm  # noqa: F401 - registers the "mc-retrofit" model

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" not in argv:
        _lm_eval(argv)
        return
    argv.remove("--compare")
    out = _value(argv, "--output_path") or _value(argv, "-o")
    if out is None:
        raise MCError("--compare writes two lm-eval results and a table: give --output_path DIR")
    if (_value(argv, "--model") or _value(argv, "-M")) not in ("mc-retrofit", "mc_retrofit"):
        raise MCError("--compare compares mc=off with MC settings of --model mc-retrofit: give --model mc-retrofit")
    root = Path(out)
    table_path = root / "compare.md"
    if table_path.exists():  # checked before the (long) runs: an earlier table is never replaced
        raise MCError(f"{table_path} exists (an earlier --compare): choose another --output_path or remove it")
    rest = _without(argv, ("--output_path", "-o"))
    runs = {}
    for name, extra in (("base", ["--model_args", "mc=base"]), ("mc", [])):
        _lm_eval([*rest, *extra, "--output_path", str(root / name)])
        runs[name] = newest_results(root / name)
    table = compare_table(runs["base"], runs["mc"])
    from mc_retrofit.files import atomic_file

    with atomic_file(table_path) as tmp:
        tmp.write_text(table + "\n")
    print(table)
    print(f"wrote {table_path} (lm-eval results: {root / 'base'}, {root / 'mc'})")


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def newest_results(folder: Path) -> dict:
    files = sorted(folder.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise MCError(f"lm-eval wrote no results under {folder}")
    return json.loads(files[-1].read_text())


def compare_table(base: dict, mc: dict) -> str:
    """Markdown: each task's metrics for base and MC, the change, and lm-eval's standard errors."""
    rows = ["| task | metric | base | MC | MC - base |", "|---|---|---:|---:|---:|"]
    for task in sorted(base.get("results", {})):
        b, m = base["results"][task], mc.get("results", {}).get(task, {})
        for key in sorted(b):
            if key == "alias" or "_stderr," in key or not isinstance(b[key], (int, float)):
                continue
            metric, _, filt = key.partition(",")
            vb, vm = b[key], m.get(key)
            err_b = b.get(f"{metric}_stderr,{filt}")
            err_m = m.get(f"{metric}_stderr,{filt}")
            rows.append(f"| {task} | {metric} | {_fmt(vb, err_b)} | {_fmt(vm, err_m)} | "
                        f"{'' if vm is None else f'{vm - vb:+.4f}'} |")
    return "\n".join(rows)


def _fmt(value, err) -> str:
    if value is None:
        return "n/a"
    if isinstance(err, (int, float)) and math.isfinite(err):
        return f"{value:.4f} ± {err:.4f}"
    return f"{value:.4f}"
