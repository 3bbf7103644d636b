"""Base vs training-free MC vs gate-tuned MC vs full-weight tuning, on one checkpoint.

    python recipes/studies/finetune_evidence.py --model checkpoints/mamba2-byte \\
        --out recipes/studies/results/finetune-mamba2-byte --steps 150 --seq-len 2048

Runs, with the same data and the same number of steps for both tuned models:

1. ``mc-retrofit finetune`` (gates only; starts from ``cache_weight=0``, i.e. exactly the
   base model, with a learned connector) on the training books at ``--seq-len``;
2. the same number of steps of ordinary full-weight training at ``--seq-len`` on the same
   books (``recipes/train_lm.py`` continuing from the checkpoint, plain text only);
3. ``mc-retrofit eval`` (one recipe, one seed, so every model sees the same windows and
   prompts) of: the base model with the training-free variants, the gate-tuned model,
   the full-weight model;

then writes one comparison table (``results.md``), the merged numbers (``results.json``)
and a plot (``comparison.png``). Each step's own output stays in its folder, each evaluation's
per-record data in its ``records.json.gz`` (``split_records.py``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from split_records import load_results, split  # beside this script

ROOT = Path(__file__).resolve().parents[2]


def sh(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (its output to ``log``); seconds taken. Stops on failure."""
    t = time.time()
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t


def rows_of(results: dict, rename: dict[str, str]) -> dict[str, dict]:
    """variant -> {"ppl": {L: bits}, "passkey": {L: acc}, "multikey": {L: acc}} for the renamed variants."""
    out = {}
    for old, new in rename.items():
        row = {"ppl": {L: r["bits_per_token"] for L, r in results["perplexity"]["by_length"].get(old, {}).items()}}
        for task in ("passkey", "multikey"):
            if task in results:
                row[task] = {L: r["accuracy"] for L, r in results[task]["by_length"].get(old, {}).items()}
        out[new] = row
    return out


def table(rows: dict[str, dict], ctx: int) -> str:
    lab = lambda L: f"{int(L)} ({int(L) / ctx:g}x)"  # noqa: E731
    first = next(iter(rows.values()))
    cols = [("ppl", L) for L in sorted(first["ppl"], key=int)] + \
           [(t, L) for t in ("passkey", "multikey") if t in first for L in sorted(first[t], key=int)]
    head = "| model | " + " | ".join(f"{'bits/byte' if t == 'ppl' else t} {lab(L)}" for t, L in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    base = rows.get("base")
    for name, row in rows.items():
        cells = []
        for t, L in cols:
            v = row.get(t, {}).get(L)
            if v is None:
                cells.append("")
                continue
            d = "" if name == "base" or base is None else f" ({v - base[t][L]:+.3f})"
            cells.append(f"{v:.3f}{d}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], ctx: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mc_retrofit.eval.report import line_style

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in rows.items():
        Ls = sorted(row["ppl"], key=int)
        style = dict(marker="o", **line_style(name))
        axes[0].plot([int(L) for L in Ls], [row["ppl"][L] for L in Ls], label=name, **style)
        if "passkey" in row:
            Ps = sorted(row["passkey"], key=int)
            axes[1].plot([int(L) for L in Ps], [row["passkey"][L] for L in Ps], label=name, **style)
    for ax, title, yl in ((axes[0], "bits/byte by context length", "bits per byte"),
                          (axes[1], "pass-key accuracy", "accuracy")):
        ax.set_xscale("log", base=2)
        ax.axvline(ctx, ls="--", color="grey", lw=1)
        ax.set(title=title, xlabel="context length (bytes)", ylabel=yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/mamba2-byte")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gutenberg"))
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2, help="gate learning rate")
    p.add_argument("--full-lr", type=float, default=3e-4, help="full-weight learning rate")
    p.add_argument("--segment-size", type=int, default=256)
    p.add_argument("--recipe", default="default")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    mc = ["mc-retrofit"]
    seconds = {}
    gate_dir, full_dir = out / "gate-tuned", out / "full-weight"
    if not gate_dir.exists():
        seconds["finetune_gates"] = sh(mc + ["finetune", a.model, "--data", a.data, "--out", str(gate_dir),
                                             "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--batch",
                                             str(a.batch), "--lr", str(a.lr), "--segment-size", str(a.segment_size),
                                             "--aggregation", "gated", "--seed", str(a.seed)], out / "finetune.log")
    if not full_dir.exists():
        seconds["train_full_weights"] = sh(
            [sys.executable, "recipes/train_lm.py", "--out", str(full_dir), "--set", f"init_from={a.model}",
             "--set", f"ctx={a.seq_len}", "--set", f"steps={a.steps}", "--set", f"batch_size={a.batch}",
             "--set", f"lr={a.full_lr}", "--set", "passkey_frac=0", "--set", "multikey_frac=0",
             "--set", "max_minutes=null", "--set", "warmup=10", "--set", f"seed={a.seed}"], out / "full-weight.log")
    def ev(model, name, *extra):  # an evaluation already in out is kept (delete its folder to redo it)
        if (out / name / "results.json").is_file():
            return None
        return sh(mc + ["eval", model, "--recipe", a.recipe, "--seed", str(a.seed), "--out", str(out / name), *extra],
                  out / f"{name}.log")

    seconds["eval_base"] = ev(a.model, "eval-base", "--variant",
                              f"name=training-free-gated,segment_size={a.segment_size},aggregation=gated",
                              "--variant", f"name=training-free-ssc2,segment_size={a.segment_size},aggregation=ssc,top_k=2")
    seconds["eval_gate_tuned"] = ev(str(gate_dir), "eval-gate-tuned")
    seconds["eval_full_weight"] = ev(str(full_dir), "eval-full-weight", "--no-recipe-variants",
                                     "--train-context", str(json.loads((Path(a.model) / "training.json").read_text())["ctx"]))
    load = lambda name: load_results(out / name)  # noqa: E731
    base = load("eval-base")
    ctx = base["train_context"]
    rows = rows_of(base, {"base": "base", "training-free-gated": "training-free gated",
                          "training-free-ssc2": "training-free ssc2"})
    rows.update(rows_of(load("eval-gate-tuned"), {"model": "gate-tuned gated"}))
    rows.update(rows_of(load("eval-full-weight"), {"base": "full-weight tuned"}))
    gate_train = json.loads((gate_dir / "finetune.json").read_text()) if (gate_dir / "finetune.json").is_file() else None
    merged = {"model": a.model, "train_context": ctx, "settings": vars(a), "seconds": seconds, "rows": rows,
              "gate_finetune": gate_train}
    (out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    md = table(rows, ctx)
    (out / "results.md").write_text(md + "\n")
    plot(rows, ctx, out / "comparison.png")
    for name in ("eval-base", "eval-gate-tuned", "eval-full-weight"):
        split(out / name)  # summaries stay in results.json, the per-record data goes to records.json.gz
    print(md)


if __name__ == "__main__":
    main()
