"""Issue 17's evidence on one byte-level checkpoint: every row on the same data, steps and prompts.

    python recipes/studies/evidence.py --model builtin:mamba2-byte-v2 --rows base,free,calibrated
    python recipes/studies/evidence.py --model builtin:mamba2-byte-v2 --rows lowrank      # another process
    python recipes/studies/evidence.py --model builtin:mamba2-byte-v2 --report            # the table

Rows (each written to ``OUT/rows/ROW.json`` when done, so rows run in separate processes and a
stopped run resumes; ``--report`` assembles whatever rows exist):

- ``base``: the checkpoint as it is.
- ``free``: training-free MC. The candidates below run on the validation split only; the one
  with the highest mean validation pass-key accuracy (ties: lower validation bits/byte) is
  the row, and only it is scored on the test split. Chosen by that rule, declared here first.
- ``calibrated``: ``mc-retrofit calibrate`` on the tuning books (its defaults: margin 0.01).
- ``query`` / ``lowrank`` / ``learned``: ``mc-retrofit finetune --mix`` (gates only, from cache
  weight 0 = the base), with the gate source named; the same rows, steps, lr and seed for all three.
- ``full``: every weight of the base tuned (no MC) on the same rows, steps and seed, AdamW at
  ``--full-lr``. The rows are independent windows, so there is no state to pass between steps.
  ``full500``: the same for 500 steps (the length of Buitrago Ruiz & Gu 2025's baseline).
- ``full+mc``: the ``full`` model with the training-free MC that ``free`` chose on validation.

Splits: tuning and calibration read only ``TUNE_BOOKS`` (training books). **Validation**: pass
keys in the evaluation phrasing (``mc_retrofit.tasks``, never used in tuning) on filler from
``VAL_BOOK`` (a training-side book no row is built from) at 4x/8x/16x, and bits/byte on its
windows. **Test**: the same phrasing on filler from the evaluation-only Emma: pass keys at
1x..32x and multi-key recall at 1x/4x (``--prompts`` each, depths spread evenly over
0..1), and bits/byte on windows of 1x/4x/16x with a paired bootstrap against the base.
Accuracies carry 95% Wilson intervals.
Caveat: two tuning books and the test book are Austen. Full-weight rows, which move the whole
model towards the tuning prose, are in-domain on test and not on validation (the Bible), and
their two splits disagree (``results/evidence-rwkv7-byte/README.md``); gate rows cannot do that.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mc_retrofit
from mc_retrofit import MCConfig, tasks
from mc_retrofit.adapters import adapter_for
from mc_retrofit.distributed import cpu_numerics
from mc_retrofit.eval.stats import paired_bootstrap, wilson
from mc_retrofit.finetune.data import read_texts
from mc_retrofit.finetune.mix import MixBuilder

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "recipes"))  # families.speed_context (recipes/ is not a package)
import families  # noqa: E402
TUNE_BOOKS = ("austen-persuasion.txt", "austen-sense.txt", "chesterton-ball.txt", "chesterton-brown.txt",
              "chesterton-thursday.txt", "carroll-alice.txt", "milton-paradise.txt")
VAL_BOOK = "bible-kjv.txt"
TEST_BOOK = "austen-emma.txt"
MIX = "text=0.4,passkey=0.3,multikey=0.15,kv=0.15"  # the pilot's (recipes/studies/pilot_lowrank_mix.py)
ROWS = ("base", "free", "calibrated", "query", "lowrank", "learned", "full", "full500", "full+mc")
# Training-free candidates (segment = half the context). Declared before any was run.
CANDIDATES = {
    "gated": {"aggregation": "gated"},
    "ssc2": {"aggregation": "ssc", "top_k": 2},
    "ssc4": {"aggregation": "ssc", "top_k": 4},
    "gated-bias2": {"aggregation": "gated", "online_bias": 2.0},
    "ssc2-bias2": {"aggregation": "ssc", "top_k": 2, "online_bias": 2.0},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def hits(model, samples: list[tasks.TextSample], batch: int = 2) -> list[int]:
    """1/0 per sample: greedy (teacher-forced argmax) gives every answer byte."""
    out = []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        ids = torch.stack([tasks.encode(s)[0] for s in chunk])
        logits = model(input_ids=ids).logits.float()
        out += [int(tasks.score_logits(lg, s)) for lg, s in zip(logits, chunk)]
    return out


@torch.no_grad()
def window_bits(model, windows: torch.Tensor) -> list[float]:
    """Bits/byte of each window ``[N, L+1]`` (next-byte cross-entropy)."""
    out = []
    for w in windows:
        logits = model(w[None, :-1], use_cache=False).logits.float()
        out.append(float(F.cross_entropy(logits[0], w[1:])) / math.log(2.0))
    return out


def windows_of(book: bytes, length: int, n: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(book) - length - 1) for _ in range(n)]
    return torch.tensor([list(book[s:s + length + 1]) for s in starts], dtype=torch.long)


def prompts(kind: str, book: bytes, length: int, n: int, seed: int) -> list[tasks.TextSample]:
    """``n`` samples, depths spread evenly over 0..1 (5 depths), each with its own seed."""
    make = tasks.passkey_sample if kind == "passkey" else tasks.multikey_sample
    return [make(book, length, random.Random(f"{seed}-{kind}-{length}-{i}"), depth=(i % 5) / 4) for i in range(n)]


class Splits:
    def __init__(self, ctx: int, n_val: int, n_test: int):
        self.ctx = ctx
        val, test = tasks.load_book(VAL_BOOK), tasks.load_book(TEST_BOOK)
        self.val = {
            "passkey": {m: prompts("passkey", val, m * ctx, n_val, 1) for m in (4, 8, 16)},
            "bits": {4: windows_of(val, 4 * ctx, 6, 1)},
        }
        self.test = {
            "passkey": {m: prompts("passkey", test, m * ctx, n_test, 2) for m in (1, 4, 8, 16, 32)},
            "multikey": {m: prompts("multikey", test, m * ctx, n_test, 2) for m in (1, 4)},
            "bits": {m: windows_of(test, m * ctx, 8, 2) for m in (1, 4, 16)},
        }

    def score(self, model, split: str) -> dict:
        data = self.val if split == "val" else self.test
        out: dict = {}
        for task in ("passkey", "multikey"):
            for m, samples in data.get(task, {}).items():
                t = time.time()
                out.setdefault(task, {})[str(m)] = hits(model, samples)
                acc = sum(out[task][str(m)]) / len(samples)
                log(f"  {split} {task} {m}x: {acc:.2f} ({time.time() - t:.0f} s)")
        for m, w in data["bits"].items():
            out.setdefault("bits", {})[str(m)] = window_bits(model, w)
            log(f"  {split} bits/byte {m}x: {sum(out['bits'][str(m)]) / len(w):.4f}")
        return out


# -- the rows ---------------------------------------------------------------------------------------
def tune_dir(work: Path) -> Path:
    """A folder holding only the tuning books (links), for the commands' ``--data``."""
    d = work / "tune-books"
    d.mkdir(parents=True, exist_ok=True)
    src = tasks.gutenberg_dir()
    for b in TUNE_BOOKS:
        if not (d / b).exists():
            os.symlink(src / b, d / b)
    return d


def cli(args: list[str], logfile: Path) -> float:
    t = time.time()
    cmd = [sys.executable, "-m", "mc_retrofit"] + args
    log("$ mc-retrofit " + " ".join(args))
    with open(logfile, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        sys.exit(f"failed ({r.returncode}); see {logfile}")
    return time.time() - t


def tune_args(a, length: int = 4) -> list[str]:
    """The tuning command's data and schedule: rows of ``length`` x the context (4 unless a row names -lenM)."""
    return ["--mix", MIX, "--mix-rows", str(a.mix_rows), "--steps", str(a.steps), "--seq-len", str(length * a.ctx),
            "--batch", "4", "--warmup", "10", "--eval-every", "0", "--device", "cpu"]


GATE_ROW = re.compile(r"^(query|lowrank|learned)(?:-ssc(\d+))?(?:-bias(-?\d+(?:\.\d+)?))?(?:-len(\d+))?(?:-seed(\d+))?"
                      r"(?:-clr(\d+(?:\.\d+)?(?:e-?\d+)?))?$")


def gate_row(a, out: Path, row: str) -> tuple[object, dict]:
    """``SOURCE[-sscK][-biasB][-lenM][-seedS][-clrY]``: gates of that source tuned from cache weight 0,
    with the gated aggregation (or SSC top-K), the (trainable, per-head) online bias starting at
    B (default 0), on rows of M x the context (default 4: not the same data as the other rows),
    rows and sampling drawn with seed S (default 0), the connector at its own lr Y
    (``finetune --connector-lr``; default: the gates' lr)."""
    source, top_k, bias, length, seed, clr = GATE_ROW.match(row).groups()
    mult = int(length or 4)
    d = a.work / "models" / row
    info = {"gate_source": source, "aggregation": f"ssc-{top_k}" if top_k else "gated",
            "online_bias_init": float(bias or 0), "seed": int(seed or 0), "lr": a.lr, "steps": a.steps,
            "seq_len": mult * a.ctx, **({"connector_lr": float(clr)} if clr else {})}
    if not (d / "mc_config.json").is_file():
        extra = ["--gate-rank", str(a.rank)] if source == "lowrank" else []
        extra += ["--aggregation", "ssc", "--top-k", top_k] if top_k else []
        extra += ["--online-bias", bias or "0"]  # 0 when unnamed, as the committed rows ran (not the family's default)
        extra += ["--seed", seed] if seed else []
        extra += ["--connector-lr", clr] if clr else []
        info["tune_seconds"] = round(cli(["finetune", a.model, "--data", str(tune_dir(a.work)), "--out", str(d),
                                          "--gate-source", source, "--cache-weight", "0", "--lr", str(a.lr),
                                          "--force"] + extra + tune_args(a, mult), a.work / f"finetune-{row}.log"))
    model = mc_retrofit.load(d)
    gates = [p for n, p in model.named_parameters() if ".mc_gate." in f".{n}"]
    info["gate_parameters"] = sum(p.numel() for p in gates)
    info["share_of_model"] = info["gate_parameters"] / sum(p.numel() for p in model.parameters())
    return model, info


def full_row(a, out: Path, base, steps: int, name: str) -> tuple[object, dict]:
    d = a.work / "models" / name
    info = {"lr": a.full_lr, "steps": steps}
    if not (d / "config.json").is_file():
        t = time.time()
        text = read_texts(tune_dir(a.work))
        ids, labels = MixBuilder(text, 4 * a.ctx, MIX, vocab_size=256).tensors(a.mix_rows, seed=0)  # the CLI's rows
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=a.full_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
        g = torch.Generator().manual_seed(0)
        # CPU speed only: the chunkwise recurrences, same loss and gradients (tests/adapters/test_fast_chunk.py);
        # 6 s a step instead of 55 on rwkv7-byte at batch 4 x 2048 bytes
        with families.speed_context(adapter_for(model.config).family):
            for step in range(steps):
                idx = torch.randint(0, len(ids), (4,), generator=g)
                logits = model(input_ids=ids[idx], use_cache=False).logits.float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[idx].reshape(-1), ignore_index=-100)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                if step % 20 == 0 or step == steps - 1:
                    log(f"  full step {step + 1}/{steps}: loss {float(loss):.4f}")
        model.eval().save_pretrained(d)
        info["tune_seconds"] = round(time.time() - t)
    model = mc_retrofit.load_base(d)
    info["tuned_parameters"] = sum(p.numel() for p in model.parameters())
    return model, info


def free_config(ctx: int, mc: dict) -> MCConfig:
    """A candidate's settings; its online bias is 0 unless it names one (as the committed rows
    ran, before families had their own default)."""
    return MCConfig(segment_size=ctx // 2, **{"online_bias": 0.0, **mc})


def free_row(a, splits: Splits, base, out: Path) -> tuple[object, dict]:
    cands = {}
    path = out / "rows" / "free-candidates.json"
    if path.is_file():
        cands = json.loads(path.read_text())
    for name, mc in CANDIDATES.items():
        if name in cands:
            continue
        log(f"candidate {name} (validation)")
        model = mc_retrofit.convert(copy.deepcopy(base), free_config(a.ctx, mc))
        cands[name] = {"mc": mc, "val": splits.score(model, "val")}
        path.write_text(json.dumps(cands, indent=1) + "\n")

    def key(name):
        v = cands[name]["val"]
        acc = sum(sum(h) / len(h) for h in v["passkey"].values()) / len(v["passkey"])
        return (acc, -sum(v["bits"]["4"]))

    best = max(cands, key=key)
    log(f"chosen on validation: {best}")
    model = mc_retrofit.convert(copy.deepcopy(base), free_config(a.ctx, cands[best]["mc"]))
    return model, {"chosen": best, "mc": cands[best]["mc"], "rule": "highest mean validation pass-key accuracy",
                   "candidates": {n: c["mc"] for n, c in cands.items()}, "val": cands[best]["val"]}


def run_row(row: str, a, out: Path, splits: Splits, base) -> None:
    path = out / "rows" / f"{row}.json"
    if path.is_file():
        log(f"{row}: done before ({path})")
        return
    t = time.time()
    log(f"row {row}")
    if row == "base":
        model, info = base, {}
    elif row == "free":
        model, info = free_row(a, splits, base, out)
    elif row == "calibrated":
        d = a.work / "models" / "calibrated"
        if not (d / "mc_config.json").is_file():
            cli(["calibrate", a.model, "--data", str(tune_dir(a.work)), "--out", str(d), "--seq-len", str(4 * a.ctx),
                 "--segment-sizes", f"{a.ctx // 2},{a.ctx // 4}", "--device", "cpu", "--force"],
                a.work / "calibrate.log")
        model = mc_retrofit.load(d)
        info = {"calibration": json.loads((d / "calibration.json").read_text())}
        info["calibration"].pop("candidates", None)
    elif row in ("full", "full500"):
        model, info = full_row(a, out, base, a.steps if row == "full" else 500, row)
    elif row == "full+mc":
        free = out / "rows" / "free.json"
        if not free.is_file():
            sys.exit("full+mc needs the free row first (its training-free choice goes on the full model)")
        chosen = json.loads(free.read_text())["info"]
        full, info = full_row(a, out, base, a.steps, "full")
        model = mc_retrofit.convert(full, free_config(a.ctx, chosen["mc"]))
        info = {**info, "mc": chosen["mc"], "chosen": chosen["chosen"]}
    else:
        model, info = gate_row(a, out, row)
    val = info.pop("val") if row == "free" else splits.score(model, "val")  # the chosen candidate's, already scored
    result = {"row": row, "info": info, "val": val, "test": splits.score(model, "test")}
    result["seconds"] = round(time.time() - t)
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"{row}: written {path} ({result['seconds']} s)")


# -- the report --------------------------------------------------------------------------------------
def report(out: Path, ctx: int) -> None:
    written = {p.stem for p in (out / "rows").glob("*.json")}
    order = list(ROWS) + sorted(w for w in written if _is_gate_row(w) and w not in ROWS)
    rows = {r: json.loads((out / "rows" / f"{r}.json").read_text()) for r in order if r in written}
    if "base" not in rows:
        sys.exit("no base row yet")
    base = rows["base"]
    label = {"base": "base", "free": "best training-free", "calibrated": "calibrated", "full": "full-weight tuned",
             "full500": "full-weight tuned, 500 steps", "full+mc": "full-weight tuned + training-free MC"}
    for r in rows:
        if _is_gate_row(r):
            source, top_k, bias, length, seed, clr = GATE_ROW.match(r).groups()
            label[r] = f"gate-tuned, {source}" + (f", SSC top-{top_k}" if top_k else "") + \
                (f", online bias from {bias}" if bias else "") + (f", tuned at {length}x" if length else "") + \
                (f", seed {seed}" if seed else "") + (f", connector lr {clr}" if clr else "")

    def acc(h):
        ci = wilson(sum(h), len(h))
        return f"{ci.estimate:.2f} [{ci.low:.2f}, {ci.high:.2f}]"

    lines = [f"## Test split: pass keys on {TEST_BOOK} (evaluation-only), {len(base['test']['passkey']['1'])} prompts "
             "per length, 95% Wilson intervals", ""]
    lens = sorted(base["test"]["passkey"], key=int)
    lines += ["| row | " + " | ".join(f"{int(m) * ctx} ({m}x)" for m in lens) + " |",
              "|---|" + "---:|" * len(lens)]
    for r, d in rows.items():
        lines.append(f"| {label[r]}{_detail(r, d)} | " + " | ".join(acc(d["test"]["passkey"][m]) for m in lens) + " |")
    mk = sorted(base["test"]["multikey"], key=int)
    lines += ["", "## Test split: multi-key recall (4 keys), same prompts for every row", "",
              "| row | " + " | ".join(f"{int(m) * ctx} ({m}x)" for m in mk) + " |", "|---|" + "---:|" * len(mk)]
    for r, d in rows.items():
        lines.append(f"| {label[r]} | " + " | ".join(acc(d["test"]["multikey"][m]) for m in mk) + " |")
    bl = sorted(base["test"]["bits"], key=int)
    lines += ["", f"## Test split: bits/byte on {TEST_BOOK}, {len(base['test']['bits']['1'])} windows per length; "
              "rows other than the base: the change, with a 95% paired bootstrap interval", "",
              "| row | " + " | ".join(f"{int(m) * ctx} ({m}x)" for m in bl) + " |", "|---|" + "---:|" * len(bl)]
    for r, d in rows.items():
        cells = []
        for m in bl:
            a_, b_ = base["test"]["bits"][m], d["test"]["bits"][m]
            if r == "base":
                cells.append(f"{sum(a_) / len(a_):.4f}")
            else:
                ci = paired_bootstrap(a_, b_)
                cells.append(f"{ci.estimate:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]")
        lines.append(f"| {label[r]} | " + " | ".join(cells) + " |")
    vl = sorted(base["val"]["passkey"], key=int)
    lines += ["", f"## Validation split ({VAL_BOOK} filler): pass keys, and bits/byte at 4x", "",
              "| row | " + " | ".join(f"{m}x" for m in vl) + " | bits/byte 4x |", "|---|" + "---:|" * (len(vl) + 1)]
    for r, d in rows.items():
        b = d["val"]["bits"]["4"]
        lines.append(f"| {label[r]} | " + " | ".join(acc(d["val"]["passkey"][m]) for m in vl) + f" | {sum(b) / len(b):.4f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    _plot(rows, label, lens, ctx, out / "passkey.png")
    print("\n".join(lines))


def _is_gate_row(row: str) -> bool:
    return GATE_ROW.match(row) is not None


def _detail(r: str, d: dict) -> str:
    i = d["info"]
    if r in ("free", "full+mc"):
        return f" ({i['chosen']})"
    if "gate_parameters" in i:
        return f" ({i['gate_parameters']:,} params, {100 * i['share_of_model']:.2f}%)"
    return ""


def _plot(rows, label, lens, ctx, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [int(m) * ctx for m in lens]
    for i, (r, d) in enumerate(rows.items()):
        cis = [wilson(sum(d["test"]["passkey"][m]), len(d["test"]["passkey"][m])) for m in lens]
        ax.errorbar(xs, [c.estimate for c in cis], yerr=[[c.estimate - c.low for c in cis], [c.high - c.estimate for c in cis]],
                    marker="o", capsize=3, label=label[r], color="black" if r == "base" else plt.cm.tab10(i % 10),
                    ls="--" if "seed" in r else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (bytes)")
    ax.set_ylabel("pass-key accuracy (test)")
    ax.axvline(ctx, color="grey", ls=":", lw=1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:mamba2-byte-v2", help="a byte-level checkpoint")
    ap.add_argument("--ctx", type=int, default=512, help="its training context in bytes")
    ap.add_argument("--rows", default="base", help=f"comma-separated, of {', '.join(ROWS)} "
                    "(a gate row may add -sscK: SSC top-K instead of gated, -biasB: the online bias starts at B, "
                    "-lenM: tuned on rows of M x the context, -seedS: rows drawn with seed S, "
                    "-clrY: the connector at lr Y)")
    ap.add_argument("--report", action="store_true", help="only assemble the table from the rows written")
    ap.add_argument("--out", default=None, help="default recipes/studies/results/evidence-MODEL")
    ap.add_argument("--work", type=Path, default=None,
                    help="models, logs and the tuning-books folder (default ../evidence-work/MODEL beside the project)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--mix-rows", type=int, default=400)
    ap.add_argument("--lr", type=float, default=0.05, help="gate tuning lr (every gate source)")
    ap.add_argument("--full-lr", type=float, default=2e-4, help="full-weight tuning lr")
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--val-prompts", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=60)
    a = ap.parse_args()
    name = Path(a.model.replace("builtin:", "")).name
    out = Path(a.out or ROOT / "recipes/studies/results" / f"evidence-{name}")
    a.work = a.work or ROOT.parent / "evidence-work" / name
    if a.report:
        report(out, a.ctx)
        return
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS and not _is_gate_row(r)]
    if bad:
        sys.exit(f"unknown row {bad[0]!r}; rows: {', '.join(ROWS)}")
    cpu_numerics()
    torch.set_num_threads(1)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    (a.work / "models").mkdir(parents=True, exist_ok=True)
    splits = Splits(a.ctx, a.val_prompts, a.prompts)
    base = mc_retrofit.load_base(a.model)
    for row in rows:
        run_row(row, a, out, splits, base)


if __name__ == "__main__":
    main()
