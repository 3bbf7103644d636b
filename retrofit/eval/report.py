"""Results out: a Markdown table for the terminal, a JSON file with every number and the
exact configuration, and PNG plots (bits per token by position and by length; pass-key
heatmaps, base vs MC; recall accuracy by length)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from mc_retrofit.files import atomic_file

from .recipes import TASKS

TASK_TITLES = {"passkey": "pass-key retrieval", "multikey": "multi-key recall (distractors)",
               "variable_tracking": "variable tracking (multi-hop)", "mqar": "MQAR recall (share of queried keys)"}

# The JSON's top level: key -> type(s). The test suite checks results against it.
SCHEMA_KEYS = {
    "schema": str, "model": str, "family": (str, type(None)), "parameters": int, "train_context": (int, type(None)),
    "tokenizer": str, "data": str, "seed": int, "batch_size": int, "recipe": dict, "sections": list,
    "variants": list, "environment": dict, "seconds": dict, "records": list,
}


def validate_results(results: dict) -> list[str]:
    """Problems with a results dictionary (empty when it matches the schema)."""
    problems = [f"missing {k}" for k in SCHEMA_KEYS if k not in results]
    problems += [f"{k} is {type(results[k]).__name__}" for k, t in SCHEMA_KEYS.items()
                 if k in results and not isinstance(results[k], t)]
    names = [v.get("name") for v in results.get("variants", [])]
    if names[:1] != ["base"]:
        problems.append("the first variant must be base")
    for sec in results.get("sections", []):
        if sec not in results:
            problems.append(f"section {sec} has no summary")
            continue
        by_length = results[sec].get("by_length", {})
        if set(by_length) != set(names):
            problems.append(f"{sec} summary lacks variants {sorted(set(names) - set(by_length))}")
        metric = "bits_per_token" if sec == "perplexity" else "accuracy"
        for v, rows in by_length.items():
            for L, row in rows.items():
                x = row.get(metric)
                if not isinstance(x, float) or not math.isfinite(x):
                    problems.append(f"{sec}.{v}.{L}.{metric} is {x!r}")
    for k in ("versions", "device", "world_size"):
        if k not in results.get("environment", {}):
            problems.append(f"environment lacks {k}")
    return problems


def _len_label(L: str | int, ctx) -> str:
    L = int(L)
    return f"{L} ({L / ctx:g}x)" if ctx else str(L)


def markdown(results: dict) -> str:
    ctx = results.get("train_context")
    names = [v["name"] for v in results["variants"]]
    out = [f"# mc-retrofit eval: {results['model']} ({results.get('family')}, "
           f"training context {ctx or 'unknown'}, recipe {results['recipe'].get('name')}, seed {results['seed']})", ""]
    out.append("Variants: " + "; ".join(_variant_line(v) for v in results["variants"]))
    out.append("")
    if "perplexity" in results:
        rows = results["perplexity"]["by_length"]
        lengths = sorted({int(L) for v in rows.values() for L in v})
        out += ["## Bits per token by context length (lower is better; change vs base [95% paired bootstrap "
                "interval over the same windows])", "",
                "| variant | " + " | ".join(_len_label(L, ctx) for L in lengths) + " |",
                "|---|" + "---:|" * len(lengths)]
        base = rows.get("base", {})
        for n in names:
            cells = []
            for L in lengths:
                r = rows.get(n, {}).get(str(L))
                if r is None:
                    cells.append("")
                    continue
                cell = f"{r['bits_per_token']:.4f}"
                if n != "base" and str(L) in base:
                    cell += f" ({r['bits_per_token'] - base[str(L)]['bits_per_token']:+.4f}"
                    ci = r.get("delta_ci95")  # paired bootstrap over the same windows
                    cell += f" [{ci[0]:+.4f}, {ci[1]:+.4f}])" if ci else ")"
                cells.append(cell)
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    for task in TASKS:
        if task not in results:
            continue
        if task == "mqar":
            out += _mqar_markdown(results["mqar"], names, ctx)
            continue
        rows = results[task]["by_length"]
        lengths = sorted({int(L) for v in rows.values() for L in v})
        n_samples = next(iter(next(iter(rows.values())).values()))["samples"] if rows else 0
        out += [f"## {TASK_TITLES[task]}: exact-match accuracy [95% Wilson interval] (answer bits/token), "
                f"{n_samples} samples per length", "",
                "| variant | " + " | ".join(_len_label(L, ctx) for L in lengths) + " |",
                "|---|" + "---:|" * len(lengths)]
        for n in names:
            cells = []
            for L in lengths:
                r = rows.get(n, {}).get(str(L))
                ci = None if r is None else r.get("ci95")
                cells.append("" if r is None else f"{r['accuracy']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                             + f" ({r['answer_bits_per_token']:.2f})")
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _mqar_markdown(mqar: dict, names: list[str], ctx) -> list[str]:
    """Rows = (variant, pairs), columns = lengths: recall, and its change vs base."""
    grid = mqar["grid"]
    lengths = sorted({int(L) for v in grid.values() for L in v})
    pairs = sorted({float(p) for v in grid.values() for L in v.values() for p in L})
    n = next(iter(next(iter(next(iter(grid.values())).values())).values()))["samples"] if grid else 0
    out = [f"## {TASK_TITLES['mqar']}, {n} sequences per cell (change vs base)", "",
           "| variant | pairs | " + " | ".join(_len_label(L, ctx) for L in lengths) + " |",
           "|---|---:|" + "---:|" * len(lengths)]
    base = grid.get("base", {})
    for p in pairs:
        for name in names:
            cells = []
            for L in lengths:
                cell = grid.get(name, {}).get(str(L), {})
                r = cell.get(_dkey(p, cell)) if cell else None
                if r is None:
                    cells.append("")
                    continue
                text = f"{r['accuracy']:.3f}"
                b = base.get(str(L), {})
                rb = b.get(_dkey(p, b)) if b else None
                if name != "base" and rb is not None:
                    text += f" ({r['accuracy'] - rb['accuracy']:+.3f})"
                cells.append(text)
            out.append(f"| {name} | {p:g} | " + " | ".join(cells) + " |")
    return out + [""]


def _variant_line(v: dict) -> str:
    c = v.get("mc_config")
    if c is None:
        return "base = the unconverted checkpoint"
    parts = [c["aggregation"] + (f" top-{c['top_k']}" if c["aggregation"] == "ssc" else ""),
             f"segment {c['segment_size']}" if c["segmentation"] == "constant" else "log segments",
             f"gate {c['gate_source']}"]
    if c["temperature"] != 1.0:
        parts.append(f"T={c['temperature']:g}")
    if c["online_bias"]:
        parts.append(f"online_bias={c['online_bias']:g}")
    if c["cache_weight"] != 1.0:
        parts.append(f"cache_weight={c['cache_weight']:g}")
    if c.get("max_cached_segments"):
        policy = "" if c.get("cache_policy", "recent") == "recent" else f" ({c['cache_policy']})"
        parts.append(f"max {c['max_cached_segments']} cached{policy}")
    return f"{v['name']} = " + ", ".join(parts)


def write_json(results: dict, path: Path) -> Path:
    """``results`` as strict JSON: Python's ``json`` writes bare ``NaN``/``Infinity``, which
    strict parsers (browsers, jq, most other languages) refuse. A non-finite number is
    written as ``null`` and its place listed under ``non_finite`` (dotted keys, list
    positions as numbers), so that a reader can tell it from a missing value."""
    flagged: list[str] = []
    clean = strict_json_value(results, "", flagged)
    clean["non_finite"] = flagged
    with atomic_file(path, force=True) as tmp:
        Path(tmp).write_text(json.dumps(clean, indent=1, sort_keys=False, allow_nan=False) + "\n")
    return path


def strict_json_value(value, where: str, flagged: list[str]):
    """A copy of ``value`` with every non-finite float replaced by None (its dotted path
    appended to ``flagged``); the input is left as it is (the Markdown table shows nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        flagged.append(where)
        return None
    if isinstance(value, dict):
        return {k: strict_json_value(v, f"{where}.{k}" if where else str(k), flagged) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v, f"{where}.{i}" if where else str(i), flagged) for i, v in enumerate(value)]
    return value


def line_style(name: str) -> dict:
    """Plot style of a compared model: the base model is the thick black reference line."""
    return {"lw": 2.2, "color": "black"} if name == "base" else {"lw": 1.2, "color": None}


def plots(results: dict, out_dir: Path) -> list[Path]:
    """PNG plots next to the JSON. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    ctx = results.get("train_context")
    names = [v["name"] for v in results["variants"]]
    if "perplexity" in results:
        pos, by_len = results["perplexity"]["by_position"], results["perplexity"]["by_length"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        longest = max(int(L) for v in pos.values() for L in v)
        for n in names:
            p = pos.get(n, {}).get(str(longest))
            if p:
                xs = [(s + e) / 2 for s, e in zip(p["start"], p["end"])]
                a1.plot(xs, p["bits_per_token"], label=n, **line_style(n))
            rows = by_len.get(n, {})
            Ls = sorted(int(L) for L in rows)
            a2.plot(Ls, [rows[str(L)]["bits_per_token"] for L in Ls], marker="o", label=n, **line_style(n))
        for a in (a1, a2):
            if ctx:
                a.axvline(ctx, ls="--", color="grey", lw=1)
            a.grid(alpha=0.3)
        a1.set(title=f"bits/token by position (windows of {longest} tokens)", xlabel="position (tokens)",
               ylabel="bits per token")
        a2.set(title="bits/token by context length", xlabel="context length (tokens)", ylabel="bits per token",
               xscale="log", )
        a2.set_xscale("log", base=2)
        a1.legend(fontsize=8)
        fig.suptitle(f"{results['model']}: dashed line = training context")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "perplexity.png"))
        plt.close(fig)
    if "passkey" in results and results["passkey"]["grid"]:
        grid = results["passkey"]["grid"]
        fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names) + 1, 6.5), squeeze=False)
        for j, n in enumerate(names):
            g = grid.get(n, {})
            Ls = sorted(int(L) for L in g)
            ds = sorted({float(d) for L in g.values() for d in L})
            for i, (metric, cmap, vmax) in enumerate((("accuracy", "viridis", 1.0), ("answer_bits_per_token", "magma_r", None))):
                m = [[g[str(L)].get(_dkey(d, g[str(L)]), {}).get(metric, math.nan) for L in Ls] for d in ds]
                ax = axes[i][j]
                im = ax.imshow(m, cmap=cmap, vmin=0, vmax=vmax if vmax else max(8.0, max(max(r) for r in m)), aspect="auto")
                ax.set_xticks(range(len(Ls)), [str(L) for L in Ls], rotation=45, fontsize=7)
                ax.set_yticks(range(len(ds)), [f"{d:g}" for d in ds], fontsize=7)
                for yi, row in enumerate(m):
                    for xi, val in enumerate(row):
                        ax.text(xi, yi, f"{val:.2f}" if metric == "accuracy" else f"{val:.1f}", ha="center",
                                va="center", fontsize=6, color="white" if (metric == "accuracy") == (val < 0.5) else "black")
                ax.set_title(f"{n}: {'accuracy' if i == 0 else 'answer bits/token'}", fontsize=9)
                if j == 0:
                    ax.set_ylabel("needle depth")
                if i == 1:
                    ax.set_xlabel("context length")
            fig.colorbar(im, ax=axes[1][j], fraction=0.05) if j == len(names) - 1 else None
        fig.suptitle(f"{results['model']}: pass-key retrieval, base vs MC")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "passkey.png"))
        plt.close(fig)
    if "mqar" in results and results["mqar"]["grid"]:
        grid = results["mqar"]["grid"]
        pairs = sorted({float(p) for v in grid.values() for L in v.values() for p in L})
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
        for ax, p in zip(axes[0], pairs):
            for n in names:
                g = grid.get(n, {})
                Ls = sorted(int(L) for L in g)
                ys = [g[str(L)].get(_dkey(p, g[str(L)]), {}).get("accuracy", math.nan) for L in Ls]
                ax.plot(Ls, ys, marker="o", label=n, **line_style(n))
            ax.set_xscale("log", base=2)
            if ctx:
                ax.axvline(ctx, ls="--", color="grey", lw=1)
            ax.set(title=f"MQAR, {p:g} pairs", xlabel="sequence length (tokens)", ylabel="recall", ylim=(0, 1.02))
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{results['model']}: MQAR recall, base vs MC (dashed: training length)")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "mqar.png"))
        plt.close(fig)
    present = [t for t in TASKS if t in results and t != "mqar"]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
        for ax, task in zip(axes[0], present):
            rows = results[task]["by_length"]
            for n in names:
                Ls = sorted(int(L) for L in rows.get(n, {}))
                ax.plot(Ls, [rows[n][str(L)]["answer_bits_per_token"] for L in Ls], marker="o", label=n,
                        **line_style(n))
            ax.set_xscale("log", base=2)
            if ctx:
                ax.axvline(ctx, ls="--", color="grey", lw=1)
            ax.set(title=TASK_TITLES[task], xlabel="context length (tokens)", ylabel="answer bits/token (lower is better)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "recall.png"))
        plt.close(fig)
    return written


def _dkey(d: float, cells: dict) -> str:
    for k in cells:
        if float(k) == d:
            return k
    return str(d)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
