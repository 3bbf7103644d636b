"""One table and one plot over every ``eval-mqar-*-mqar`` result: training-free MC vs
base recall on the MQAR checkpoints, by number of pairs (averaged over lengths).

    python recipes/studies/summarise_mqar.py       # writes results/mqar-summary.{md,json,png}

Reads only the summaries in each ``results.json`` (split or not: the records are not needed).
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent / "results"


def load() -> dict[str, dict]:
    out = {}
    for p in sorted(HERE.glob("eval-mqar-*-mqar/results.json")):
        out[p.parent.name.removeprefix("eval-").removesuffix("-mqar")] = json.loads(p.read_text())
    return out


def by_pairs(results: dict) -> dict[str, dict[float, float]]:
    """variant -> pairs -> recall averaged over the lengths that have the cell."""
    out: dict[str, dict[float, float]] = {}
    for variant, lengths in results["mqar"]["grid"].items():
        acc: dict[float, list[float]] = {}
        for cells in lengths.values():
            for p, cell in cells.items():
                acc.setdefault(float(p), []).append(cell["accuracy"])
        out[variant] = {p: sum(v) / len(v) for p, v in sorted(acc.items())}
    return out


def main() -> None:
    runs = load()
    if not runs:
        raise SystemExit(f"no eval-mqar-*-mqar results under {HERE}")
    names = [v["name"] for v in next(iter(runs.values()))["variants"]]
    lines = ["| checkpoint | pairs | " + " | ".join(names) + " | best MC vs base |", "|---|---:|" + "---:|" * (len(names) + 1)]
    summary = {}
    for ckpt, res in runs.items():
        table = by_pairs(res)
        summary[ckpt] = table
        for p in sorted(table["base"]):
            row = [table[n].get(p) for n in names]
            best = max((table[n][p], n) for n in names[1:] if p in table[n])
            lines.append(f"| {ckpt} | {p:g} | " + " | ".join("" if v is None else f"{v:.3f}" for v in row)
                         + f" | {best[0] - table['base'][p]:+.3f} ({best[1]}) |")
    text = ("MQAR recall (share of queried keys answered), averaged over the lengths 1x/4x/16x the training length "
            "(64 tokens; 32 pairs do not fit in 64 tokens, so that row averages 4x and 16x). Models trained with "
            "8 pairs.\n\n" + "\n".join(lines) + "\n")
    (HERE / "mqar-summary.md").write_text(text)
    (HERE / "mqar-summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mc_retrofit.eval.report import line_style

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False)
    for ax, (ckpt, table) in zip(axes[0], summary.items()):
        for n in names:
            ps = sorted(table[n])
            ax.plot(ps, [table[n][p] for p in ps], marker="o", label=n, **line_style(n))
        ax.set(title=ckpt, xlabel="key-value pairs (trained: 8)", ylabel="recall", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Training-free Memory Caching on MQAR checkpoints: recall vs pairs (mean over lengths)")
    fig.tight_layout()
    fig.savefig(HERE / "mqar-summary.png", dpi=110)
    print(text)


if __name__ == "__main__":
    main()
