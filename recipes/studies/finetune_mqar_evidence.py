"""Gate-tuned MC vs training-free MC vs full-weight tuning on an MQAR recall checkpoint.

    python recipes/studies/finetune_mqar_evidence.py --model checkpoints/mqar-delta_net \\
        --out recipes/studies/results/finetune-mqar-delta_net

Same data and steps for both tuned models: MQAR sequences of ``--seq-len`` tokens with
8..``--max-pairs`` key-value pairs (more than the checkpoint was trained with, so the
fixed state overflows). Gate-only tuning (``mc_retrofit.finetune.finetune`` on labelled
sequences; starts from ``cache_weight=0``, exactly the base model) vs ordinary full-weight
training of the base model (AdamW on every weight, no MC). Then ``mc-retrofit eval
--recipe mqar`` of both, and of the training-free variants, on the same sequences
(fresh seeds, never trained on). Writes ``results.md`` / ``results.json`` / ``comparison.png``;
each evaluation's per-record data goes to its ``records.json.gz`` (``split_records.py``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from split_records import join, load_results, split  # beside this script

ROOT = Path(__file__).resolve().parents[2]


def data(n: int, seq_len: int, max_pairs: int, vocab: int, seed: int):
    """``n`` labelled MQAR sequences, pairs spread over 8..max_pairs (a mixed curriculum)."""
    from mc_retrofit import tasks

    ids, labels = [], []
    sizes = list(range(8, max_pairs + 1, 8))
    for i, P in enumerate(sizes):
        b = tasks.mqar(n // len(sizes), seq_len, P, vocab_size=vocab, seed=seed + i, random_non_queries=False)
        ids.append(b.inputs)
        labels.append(b.targets)
    perm = torch.randperm(sum(len(x) for x in ids), generator=torch.Generator().manual_seed(seed))
    return torch.cat(ids)[perm], torch.cat(labels)[perm]


def full_weight(model, ids, labels, steps, batch, lr, seed):
    """Plain AdamW on every weight, the same batches the gate run samples (same seed)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    n_train = len(ids) - max(1, int(len(ids) * 0.05))  # finetune's held-out share, for equal data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, n_train, (batch,), generator=gen)
        logits = model(ids[rows], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[rows].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def sh(cmd, log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
            sys.exit(f"failed: {' '.join(cmd)}; see {log}")


def main(argv=None):
    import mc_retrofit as mr
    from mc_retrofit.distributed import cpu_numerics
    from mc_retrofit.finetune import finetune

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/mqar-delta_net")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-pairs", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05, help="gate learning rate")
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--segment-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=100)
    a = p.parse_args(argv)
    cpu_numerics()
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    vocab = mr.load_base(a.model).config.vocab_size
    ids, labels = data(2048, a.seq_len, a.max_pairs, vocab, a.seed)
    seconds = {}

    t = time.time()
    gated = mr.convert(mr.load_base(a.model), mr.MCConfig(segment_size=a.segment_size, aggregation="ssc", top_k=2,
                                                           cache_weight=0.0, gate_source="learned"))
    run = finetune(gated, (ids, labels), steps=a.steps, seq_len=a.seq_len, batch=a.batch, lr=a.lr, warmup=10,
                   seed=a.seed, eval_every=max(1, a.steps // 5), out=out / "gate-tuned", force=True)
    seconds["gate_tuning"] = time.time() - t
    n_gate = sum(p.numel() for n, p in gated.named_parameters() if ".mc_gate." in f".{n}")

    t = time.time()
    full = full_weight(mr.load_base(a.model), ids, labels, a.steps, a.batch, a.full_lr, a.seed)
    full.save_pretrained(out / "full-weight")
    (out / "full-weight" / "training.json").write_text(json.dumps(
        {"task": "mqar", "seq_len": json.loads((Path(a.model) / "training.json").read_text())["seq_len"],
         "note": "full-weight tuning of the base for the comparison; see ../results.md"}))
    seconds["full_weight_tuning"] = time.time() - t

    ctx = json.loads((Path(a.model) / "training.json").read_text())["seq_len"]
    ev = ["mc-retrofit", "eval", "--recipe", "mqar", "--quiet", "--force", "--train-context", str(ctx)]
    for name in ("eval-gate-tuned", "eval-full-weight"):  # an earlier split folder: back to what eval wrote,
        join(out / name)  # so that --force replaces it (records.json.gz is no file of eval's)
    sh(ev + [str(out / "gate-tuned"), "--recipe-variants", "--out", str(out / "eval-gate-tuned")], out / "eval-gate-tuned.log")
    sh(ev + [str(out / "full-weight"), "--no-recipe-variants", "--out", str(out / "eval-full-weight")],
       out / "eval-full-weight.log")

    res_g, res_f = load_results(out / "eval-gate-tuned"), load_results(out / "eval-full-weight")
    split(out / "eval-gate-tuned")
    split(out / "eval-full-weight")
    rows = {"base": res_g["mqar"]["grid"]["base"]}
    rows.update({f"training-free {k}": v for k, v in res_g["mqar"]["grid"].items() if k not in ("base", "model")})
    rows[f"gate-tuned ssc2-{a.segment_size} ({n_gate} params)"] = res_g["mqar"]["grid"]["model"]
    n_all = sum(p.numel() for p in full.parameters())
    rows[f"full-weight tuned, no MC ({n_all} params)"] = res_f["mqar"]["grid"]["base"]
    lengths = sorted({int(L) for g in rows.values() for L in g})
    pairs = sorted({float(P) for g in rows.values() for L in g.values() for P in L})
    lines = [f"MQAR recall on fresh sequences; {a.steps} steps x {a.batch} sequences of {a.seq_len} tokens with "
             f"8..{a.max_pairs} pairs for both tuned models. Training length {ctx}.", "",
             "| model | " + " | ".join(f"L{L} P{P:g}" for L in lengths for P in pairs
                                      if str(P) in rows["base"].get(str(L), {})) + " |"]
    cols = [(L, P) for L in lengths for P in pairs if str(P) in rows["base"].get(str(L), {})]
    lines.append("|---|" + "---:|" * len(cols))
    for name, g in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{g[str(L)][str(P)]['accuracy']:.3f}" for L, P in cols) + " |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"settings": vars(a), "seconds": seconds, "gate_params": n_gate,
                                                  "all_params": n_all, "gate_history": run["history"],
                                                  "rows": rows}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mc_retrofit.eval.report import line_style

    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for name, g in rows.items():
            ps = [P for P in pairs if str(P) in g.get(str(L), {})]
            ax.plot(ps, [g[str(L)][str(P)]["accuracy"] for P in ps], marker="o", label=name, **line_style(name))
        ax.set(title=f"length {L}", xlabel="pairs", ylabel="recall", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{a.model}: base vs training-free vs gate-tuned MC vs full-weight tuning")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    print(text)


if __name__ == "__main__":
    main()
