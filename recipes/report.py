"""Tabulate and plot the committed checkpoints' training.json numbers.

    python recipes/report.py [checkpoints] [--png checkpoints/report.png]

Prints two markdown tables (text checkpoints; MQAR recall checkpoints) and writes a PNG:
held-out bits/byte against the unigram baseline, and MQAR recall by length and by pairs.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def records(root: Path) -> list[tuple[str, dict]]:
    return [(p.parent.name, json.loads(p.read_text())) for p in sorted(root.glob("*/training.json"))]


def earlier_runs(r: dict) -> list[dict]:
    """The runs a checkpoint continued (newest first): its ``init`` chain, then the
    training.json of the last ``init_from`` when that directory is at hand."""
    runs = []
    while "init" in r:
        r = r["init"]["training"]
        runs.append(r)
    parent = r.get("recipe", {}).get("init_from")
    if runs and parent and (Path(parent) / "training.json").is_file():
        runs.append(json.loads((Path(parent) / "training.json").read_text()))
    return runs


def _with_earlier(value, earlier, fmt) -> str:
    return f"{value}" + (f" ({' '.join('+' + fmt(v) for v in earlier)} earlier)" if earlier else "")


def text_table(recs) -> str:
    rows = ["| checkpoint | family | params | ctx | steps | minutes | Emma bits/byte | unigram | pass key @ctx |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in recs:
        if "heldout" not in r:
            continue
        h, pk = r["heldout"], r["passkey"]
        runs = earlier_runs(r)
        steps = _with_earlier(r["steps"], [e["steps"] for e in runs], str)
        minutes = _with_earlier(r["minutes"], [e["minutes"] for e in runs], lambda m: f"{m:.0f}")
        rows.append(f"| {name} | {r['family']} | {r['params']:,} | {r['ctx']} | {steps} | {minutes} | "
                    f"{h['bits_per_byte']:.3f} | {h['unigram_bits_per_byte']:.3f} | "
                    f"{pk['accuracy']:.2f} ({pk['samples']}) |")
    return "\n".join(rows)


def mqar_table(recs) -> str:
    mq = [(n, r) for n, r in recs if r.get("task") == "mqar"]
    if not mq:
        return ""
    keys = []
    for _, r in mq:
        for g in r["eval"]["grid"]:
            k = (g["seq_len"], g["n_pairs"], g.get("random_non_queries", False))
            if k not in keys:
                keys.append(k)
    head = "| checkpoint | trained at | steps | " + " | ".join(
        f"L{L} k{k}{' noise' if noise else ''}" for L, k, noise in keys) + " |"
    rows = [head, "|" + "---|" * (3 + len(keys))]
    for name, r in mq:
        acc = {(g["seq_len"], g["n_pairs"], g.get("random_non_queries", False)): g["accuracy"] for g in r["eval"]["grid"]}
        cells = " | ".join(f"{acc[k]:.3f}" if k in acc else "" for k in keys)
        rows.append(f"| {name} | L{r['seq_len']} k{r['n_pairs']} | {r['steps']} | {cells} |")
    return "\n".join(rows)


def plot(recs, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = [(n, r) for n, r in recs if "heldout" in r]
    mq = [(n, r) for n, r in recs if r.get("task") == "mqar"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    xs = range(len(text))
    ax.bar([x - 0.2 for x in xs], [r["heldout"]["bits_per_byte"] for _, r in text], 0.4, label="model")
    ax.bar([x + 0.2 for x in xs], [r["heldout"]["unigram_bits_per_byte"] for _, r in text], 0.4, label="unigram")
    for x, (_, r) in zip(xs, text):  # pass-key accuracy at ctx over each model's bar
        ax.annotate(f"pk {r['passkey']['accuracy']:.2f}", (x - 0.2, r["heldout"]["bits_per_byte"]),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(list(xs), [n for n, _ in text], rotation=30, ha="right")
    ax.set_ylabel("bits/byte, first 64 KB of Emma")
    ax.legend()
    for ax, noise, title in ((axes[1], None, "MQAR recall by length (trained pairs)"),
                             (axes[2], "pairs", "MQAR recall by pairs")):
        for name, r in mq:
            grid = r["eval"]["grid"]
            if noise is None:
                for fill in (False, True):
                    pts = sorted((g["seq_len"], g["accuracy"]) for g in grid if g["n_pairs"] == r["n_pairs"]
                                 and g.get("random_non_queries", False) == fill)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ls="--" if fill else "-",
                                label=f"{name} ({'noise' if fill else 'zeros'})")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("sequence length")
            else:
                shortest = {}  # per pair count: the shortest length measured, gaps filled with zeros
                for g in grid:
                    if not g.get("random_non_queries", False) and g["seq_len"] < shortest.get(g["n_pairs"], (1e9,))[0]:
                        shortest[g["n_pairs"]] = (g["seq_len"], g["accuracy"])
                ax.plot(sorted(shortest), [shortest[k][1] for k in sorted(shortest)], marker="o", label=name)
                ax.set_xlabel("key-value pairs (shortest length measured)")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="checkpoints")
    p.add_argument("--png", help="write the plots here")
    args = p.parse_args(argv)
    recs = records(Path(args.root))
    print(text_table(recs))
    print()
    print(mqar_table(recs))
    if args.png:
        plot(recs, Path(args.png))


if __name__ == "__main__":
    main()
