"""Issue 17's evidence on one MQAR recall checkpoint: every row on the same data, steps and sequences.

    python recipes/studies/evidence_mqar.py --model checkpoints/mqar-delta_net --rows base,free,query
    python recipes/studies/evidence_mqar.py --model checkpoints/mqar-delta_net --report      # the tables

Rows (each written to ``OUT/rows/ROW.json`` when done, so a stopped run resumes and rows can
run in separate processes; ``--report`` assembles whatever rows exist):

- ``base``: the checkpoint as it is.
- ``free``: training-free MC. The ``CANDIDATES`` below (declared before any was run; named as
  the ``mqar`` eval suite's variants) are scored on the validation split only; the one with the
  best mean validation recall at ``SELECT_PAIRS`` pairs (4x the trained 8) is the row (ties:
  mean validation recall over every cell, then the order below), and only it is scored on test.
- ``query`` / ``lowrank`` / ``learned``: gate-only tuning, ``mc_retrofit.finetune.finetune`` on
  the tuning sequences, SSC top-2, segments of 8, from cache weight 0 (exactly the base), lr
  0.05, the gate source named; the same data, steps, batch and seed for the three.
- ``full`` / ``full500``: every weight of the base tuned, no MC, on the same sequences and
  batches (``finetune_mqar_evidence.full_weight``: AdamW, same seed), 200 and 500 steps (500:
  the Buitrago Ruiz & Gu 2025 baseline length).
- ``full+mc``: the ``full`` model with the training-free MC that ``free`` chose on top.
- Added after ``oracle_mqar.py`` (the segment-8 router misses the right cache for half the
  queries): ``free-wide`` (``free`` over ``CANDIDATES`` and ``CANDIDATES_LATE``, the latter with
  segments of 4), gate rows ``SOURCE-seg4`` (``GATE`` with segments of 4, all else equal) and
  ``full+mc-wide`` (``full`` with ``free-wide``'s choice).
- ``recheck`` (not a row): the base and the chosen candidate on the committed
  ``results/eval-mqar-FAMILY-mqar`` sequences (its seed 0, 64 per cell), beside its numbers.

Splits, never sharing a generator seed (checked before anything runs): tuning sequences from
``finetune_mqar_evidence.data`` (256 tokens, 8/16/24/32 pairs mixed, seeds ``TUNE_SEED``..+3);
validation and test sequences from ``mc_retrofit.eval.retrieval.make_mqar_items`` (the
generator and the per-cell seeds of ``mc-retrofit eval --recipe mqar``) with seeds
``VAL_SEED`` / ``TEST_SEED``; scoring is eval's ``score_mqar`` (recall: the share of a
sequence's queried keys whose value is the argmax). The queries of one sequence share its
state and its keys, so they are not independent: every interval is a bootstrap over
sequences (a cell's mean recall; a row's change from the base, paired on the same sequences).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mc_retrofit
from mc_retrofit import MCConfig
from mc_retrofit.eval import retrieval
from mc_retrofit.eval.stats import paired_bootstrap
from mc_retrofit.files import atomic_file
from mc_retrofit.model import gate_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this script
from finetune_mqar_evidence import data, full_weight  # noqa: E402
from split_records import load_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("base", "free", "query", "lowrank", "learned", "full", "full500", "full+mc",
        "free-wide", "query-seg4", "lowrank-seg4", "learned-seg4", "full+mc-wide")
# Training-free candidates, declared before any was run (the mqar suite's names and settings).
CANDIDATES = {
    "gated-8": {"segment_size": 8, "aggregation": "gated"},
    "gated-16": {"segment_size": 16, "aggregation": "gated"},
    "ssc1-8": {"segment_size": 8, "aggregation": "ssc", "top_k": 1},
    "ssc1-16": {"segment_size": 16, "aggregation": "ssc", "top_k": 1},
    "ssc2-8": {"segment_size": 8, "aggregation": "ssc", "top_k": 2},
    "ssc2-16": {"segment_size": 16, "aggregation": "ssc", "top_k": 2},
}
# Added in session 7, after ``oracle_mqar.py`` found that at segments of 8 the query router puts
# the cache holding the asked pair in its top 2 for only about half the queries (the pair's key
# is one of 8 in the segment's mean-pooled key), while reading that cache answers 0.98: a
# segment of 4 pools 2 pairs. Row ``free-wide`` chooses among these and ``CANDIDATES`` together,
# on validation by the same rule; row ``free`` keeps the declared set.
CANDIDATES_LATE = {
    "gated-4": {"segment_size": 4, "aggregation": "gated"},
    "ssc1-4": {"segment_size": 4, "aggregation": "ssc", "top_k": 1},
    "ssc2-4": {"segment_size": 4, "aggregation": "ssc", "top_k": 2},
    "ssc4-4": {"segment_size": 4, "aggregation": "ssc", "top_k": 4},
}
SELECT_PAIRS = 32
GATE = {"segment_size": 8, "aggregation": "ssc", "top_k": 2, "cache_weight": 0.0}  # every gate row
GATE_SOURCES = ("query", "lowrank", "learned")


ROW_OPTIONS = (("seg", "segment_size", int), ("clr", "connector_lr", float), ("lr", "lr", float))  # "clr" before "lr"


def gate_row(row: str) -> tuple[str, dict, dict] | None:
    """``SOURCE[-segS][-lrX][-clrY]`` -> (source, GATE with segments of S, the finetune rates
    given: ``lr`` X, ``connector_lr`` Y; the others are ``--lr`` and unset); None when ``row`` is not a
    gate row."""
    source, *opts = row.split("-")
    if source not in GATE_SOURCES:
        return None
    gate, rates = dict(GATE), {}
    for o in opts:
        prefix, key, cast = next(((p, k, c) for p, k, c in ROW_OPTIONS if o.startswith(p)), ("", None, None))
        try:
            value = cast(o[len(prefix):])
        except (TypeError, ValueError):  # no known prefix (cast None), or no number after it
            return None
        (gate if key == "segment_size" else rates)[key] = value
    return source, gate, rates
TUNE = {"n": 2048, "seq_len": 256, "max_pairs": 32}  # finetune_mqar_evidence.data's arguments
TUNE_SEED, VAL_SEED, TEST_SEED = 100, 1, 2
VAL = {"lengths": [256, 1024], "pairs": [16, 32], "samples": 64}
TEST = {"lengths": [64, 256, 1024], "pairs": [8, 16, 24, 32], "samples": 128}
BATCH = 32  # scoring batch (the mqar suite's)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- splits and scores -----------------------------------------------------------------------------
def cell(L: int, P) -> str:
    return f"L{int(float(L))}-P{int(float(P))}"


def split_seeds() -> dict[str, set[int]]:
    """The numpy seeds each split's sequences are drawn with (tuning: ``data``'s seed + i per
    pair count; validation/test: eval's per-cell seeds)."""
    n_sizes = len(range(8, TUNE["max_pairs"] + 1, 8))
    out = {"tune": {TUNE_SEED + i for i in range(n_sizes)}}
    for name, body, seed in (("val", VAL, VAL_SEED), ("test", TEST, TEST_SEED)):
        out[name] = {cell_seed for *_, cell_seed in retrieval.mqar_cells(body, seed)}
    return out


def check_splits(seeds: dict[str, set[int]]) -> None:
    names = list(seeds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if seeds[a] & seeds[b]:
                sys.exit(f"the {a} and {b} splits share generator seeds {sorted(seeds[a] & seeds[b])}: "
                         "change VAL_SEED / TEST_SEED")


def score(model, items, name: str) -> dict[str, list[float]]:
    """Recall of every sequence, by cell (eval's scoring)."""
    out: dict[str, list[float]] = {}
    for r in retrieval.score_mqar(model, items, "cpu", BATCH, name):
        out.setdefault(cell(r["length"], r["depth"]), []).append(round(r["correct"], 6))
    return out


def mean(x) -> float:
    return sum(x) / len(x)


def mean_interval(x: list[float]):
    """95% bootstrap interval of a cell's mean recall over its sequences (the paired bootstrap
    against zeros resamples the sequences, which is all a one-sample bootstrap does)."""
    return paired_bootstrap([0.0] * len(x), x)


def select(cands: dict[str, dict[str, list[float]]], pairs: int = SELECT_PAIRS) -> str:
    """The candidate with the best mean validation recall over the cells at ``pairs`` pairs;
    ties: the mean over every validation cell, then the order of ``cands``."""
    def key(item):
        i, (name, val) = item
        at = [mean(v) for c, v in val.items() if c.endswith(f"-P{pairs}")]
        return (mean(at), mean([mean(v) for v in val.values()]), -i)

    return max(enumerate(cands.items()), key=key)[1][0]


# -- the rows ---------------------------------------------------------------------------------------
class Study:
    def __init__(self, a):
        self.a = a
        self.vocab = mc_retrofit.load_base(a.model).config.vocab_size
        self.val = retrieval.make_mqar_items(VAL, self.vocab, VAL_SEED)
        self.test = retrieval.make_mqar_items(TEST, self.vocab, TEST_SEED)
        self._tune = None

    def base(self):
        return mc_retrofit.load_base(self.a.model)

    def tune_data(self):
        if self._tune is None:
            self._tune = data(TUNE["n"], TUNE["seq_len"], TUNE["max_pairs"], self.vocab, TUNE_SEED)
        return self._tune

    def write(self, path: Path, obj) -> None:
        with atomic_file(path, force=True) as tmp:
            tmp.write_text(json.dumps(obj, indent=1) + "\n")

    def chosen(self, row: str = "free") -> dict:
        path = self.a.out / "rows" / f"{row}.json"
        if not path.is_file():
            sys.exit(f"run the {row} row first: full+mc and recheck use the candidate it chose")
        return json.loads(path.read_text())["info"]

    def free(self, candidates: dict = CANDIDATES):
        """The best of ``candidates`` on validation (each candidate's validation scores are kept in
        one file, so a candidate is scored once whichever row asks)."""
        path = self.a.out / "rows" / "free-candidates.json"
        cands = json.loads(path.read_text()) if path.is_file() else {}
        for name, mc in candidates.items():
            if name not in cands:
                t = time.time()
                cands[name] = score(mc_retrofit.convert(self.base(), MCConfig(**mc)), self.val, name)
                log(f"  candidate {name}: validation P{SELECT_PAIRS} "
                    f"{mean([mean(v) for c, v in cands[name].items() if c.endswith(f'-P{SELECT_PAIRS}')]):.3f} "
                    f"({time.time() - t:.0f} s)")
                self.write(path, cands)
        best = select({n: cands[n] for n in candidates})
        log(f"  chosen on validation: {best}")
        model = mc_retrofit.convert(self.base(), MCConfig(**candidates[best]))
        info = {"chosen": best, "mc": candidates[best], "candidates": candidates,
                "rule": f"best mean validation recall at {SELECT_PAIRS} pairs"}
        return model, info, cands[best]

    def gate(self, row: str):
        """Gate row ``SOURCE[-segS][-lrX]`` (:func:`gate_row`)."""
        from mc_retrofit.finetune import finetune

        source, gate, rates = gate_row(row)
        rates = {"lr": self.a.lr, **rates}
        d = self.a.work / "models" / row
        info = {"gate_source": source, **gate, **rates, "steps": self.a.steps, "batch": self.a.batch,
                "seed": TUNE_SEED}
        if not (d / "mc_config.json").is_file():
            t = time.time()
            model = mc_retrofit.convert(self.base(), MCConfig(gate_source=source, **gate))
            run = finetune(model, self.tune_data(), steps=self.a.steps, seq_len=TUNE["seq_len"], batch=self.a.batch,
                           **rates, warmup=10, seed=TUNE_SEED, eval_every=max(1, self.a.steps // 5), out=d,
                           force=True, log=log, progress=False)
            info["tune_seconds"] = round(time.time() - t)
            info["heldout_history"] = run["history"]
        model = mc_retrofit.load(d)
        info["trainable_parameters"] = sum(p.numel() for _, p in gate_parameters(model))
        info["share_of_model"] = info["trainable_parameters"] / sum(p.numel() for p in model.parameters())
        return model, info

    def full(self, steps: int):
        d = self.a.work / "models" / f"full{steps}"
        info = {"lr": self.a.full_lr, "steps": steps, "batch": self.a.batch, "seed": TUNE_SEED}
        if not (d / "config.json").is_file():
            t = time.time()
            ids, labels = self.tune_data()
            full_weight(self.base(), ids, labels, steps, self.a.batch, self.a.full_lr, TUNE_SEED).save_pretrained(d)
            info["tune_seconds"] = round(time.time() - t)
        model = mc_retrofit.load_base(d)
        info["trainable_parameters"] = sum(p.numel() for p in model.parameters())
        info["share_of_model"] = 1.0
        return model, info

    def run_row(self, row: str) -> None:
        path = self.a.out / "rows" / f"{row}.json"
        if path.is_file():
            log(f"{row}: done before ({path})")
            return
        t = time.time()
        log(f"row {row}")
        val = None
        if row == "base":
            model, info = self.base(), {}
        elif row == "free":
            model, info, val = self.free()
        elif row == "free-wide":
            model, info, val = self.free({**CANDIDATES, **CANDIDATES_LATE})
        elif gate_row(row):
            model, info = self.gate(row)
        elif row in ("full", "full500"):
            model, info = self.full(self.a.steps if row == "full" else 500)
        elif row in ("full+mc", "full+mc-wide"):
            full, info = self.full(self.a.steps)
            chosen = self.chosen("free" if row == "full+mc" else "free-wide")
            model = mc_retrofit.convert(full, MCConfig(**chosen["mc"]))
            info = {**info, "mc": chosen["mc"], "chosen": chosen["chosen"]}
        else:
            raise ValueError(row)
        if val is None:
            val = score(model, self.val, row)
        result = {"row": row, "info": info, "val": val}
        log(f"  {row}: validation " + ", ".join(f"{c} {mean(v):.3f}" for c, v in val.items()))
        result["test"] = score(model, self.test, row)
        log(f"  {row}: test " + ", ".join(f"{c} {mean(v):.3f}" for c, v in result["test"].items()))
        result["seconds"] = round(time.time() - t)
        self.write(path, result)
        log(f"{row}: written {path} ({result['seconds']} s)")

    def recheck(self) -> None:
        """The base and the chosen candidate on the committed eval's own sequences (its seed 0)."""
        committed = ROOT / "recipes/studies/results" / f"eval-{Path(self.a.model).name}-mqar"
        res = load_results(committed)
        items = retrieval.make_mqar_items(res["recipe"]["mqar"], self.vocab, res["seed"])  # eval's own sequences
        chosen, grid = self.chosen()["chosen"], res["mqar"]["grid"]
        names = ["base", chosen]
        if chosen not in grid:  # then also the committed candidate best at SELECT_PAIRS (an MC number to recheck)
            at = {n: mean([g[str(P)]["accuracy"] for g in grid[n].values() for P in (SELECT_PAIRS, float(SELECT_PAIRS))
                           if str(P) in g]) for n in CANDIDATES if n in grid}
            names.append(max(at, key=at.get))
        out = {"committed": str(committed.relative_to(ROOT)), "seed": res["seed"], "variants": {}}
        for name in names:
            model = self.base() if name == "base" else mc_retrofit.convert(self.base(), MCConfig(**CANDIDATES[name]))
            now = {c: mean(v) for c, v in score(model, items, name).items()}
            then = {cell(L, P): v["accuracy"] for L, g in grid.get(name, {}).items() for P, v in g.items()}
            out["variants"][name] = {c: {"today": now[c], "committed": then.get(c)} for c in now}
            log(f"  recheck {name}: " + ", ".join(f"{c} {now[c]:.3f} (committed {then.get(c)})" for c in now))
        self.write(self.a.out / "rows" / "recheck.json", out)


# -- the report --------------------------------------------------------------------------------------
LABEL = {"base": "base", "free": "best training-free", "full": "full-weight, 200 steps",
         "full500": "full-weight, 500 steps", "full+mc": "full-weight 200 + training-free MC",
         "free-wide": "best training-free, segment 4 added",
         "full+mc-wide": "full-weight 200 + training-free MC (segment 4 added)"}


def label(row: str) -> str:
    """A row's name in the tables: ``LABEL``, or a gate row's source and what differs from GATE."""
    g = gate_row(row)
    if g is None:
        return LABEL[row]
    source, gate, rates = g
    seg = "" if gate["segment_size"] == GATE["segment_size"] else f", segment {gate['segment_size']}"
    return f"gate-tuned, {source}{seg}" + "".join(f", {k.replace('_', ' ')} {v:g}" for k, v in rates.items())


def _detail(r: str, d: dict) -> str:
    i = d["info"]
    if "chosen" in i:
        return f" ({i['chosen']})"
    if "trainable_parameters" in i:
        return f" ({i['trainable_parameters']:,} params, {100 * i['share_of_model']:.1f}%)"
    return ""


def summarise(rows: dict) -> dict:
    base = rows["base"]["test"]
    out = {}
    for r, d in rows.items():
        s = {"info": d["info"], "seconds": d.get("seconds"), "val": {c: mean(v) for c, v in d["val"].items()},
             "test": {}}
        for c, v in d["test"].items():
            s["test"][c] = {"recall": mean_interval(v).to_dict(), "n_sequences": len(v)}
            if r != "base":
                s["test"][c]["change_vs_base"] = paired_bootstrap(base[c], v).to_dict()
        out[r] = s
    return out


def report(out: Path, model: str) -> None:
    written = {p.stem for p in (out / "rows").glob("*.json")}
    extra = sorted(r for r in written if r not in ROWS and gate_row(r))  # e.g. lowrank-seg4-lr0.005
    rows = {r: json.loads((out / "rows" / f"{r}.json").read_text()) for r in ROWS + tuple(extra) if r in written}
    if "base" not in rows:
        sys.exit("no base row yet")
    summ = summarise(rows)
    cells = list(rows["base"]["test"])
    n = len(rows["base"]["test"][cells[0]])
    lines = [f"# {model}: MQAR evidence (test split, {n} sequences per cell)", "",
             "Recall = share of a sequence's queried keys answered. Intervals: 95%, bootstrap over sequences "
             "(queries within a sequence are not independent); changes: paired bootstrap against the base on the "
             "same sequences. L = sequence length in tokens (trained: 64), P = key-value pairs (trained: 8).", ""]
    for L in TEST["lengths"]:
        cs = [cell(L, P) for P in TEST["pairs"] if cell(L, P) in cells]
        lines += [f"## Test, length {L}: recall [95%]", "", "| row | " + " | ".join(f"P{c.split('-P')[1]}" for c in cs)
                  + " |", "|---|" + "---:|" * len(cs)]
        for r, d in rows.items():
            lines.append(f"| {label(r)}{_detail(r, d)} | " + " | ".join(str(mean_interval(d["test"][c])) for c in cs)
                         + " |")
        lines += ["", f"## Test, length {L}: change vs base [95% paired]", "",
                  "| row | " + " | ".join(f"P{c.split('-P')[1]}" for c in cs) + " |", "|---|" + "---:|" * len(cs)]
        for r, d in rows.items():
            if r != "base":
                lines.append(f"| {label(r)} | " + " | ".join(
                    "{0.estimate:+.3f} [{0.low:+.3f}, {0.high:+.3f}]".format(paired_bootstrap(rows["base"]["test"][c],
                                                                                            d["test"][c]))
                    for c in cs) + " |")
        lines.append("")
    target = [c for c in cells if c.endswith(f"-P{SELECT_PAIRS}")]
    lines += [f"## Target: recall at {SELECT_PAIRS} pairs >= base + 0.30", "",
              "| row | " + " | ".join(target) + " | met (estimate) | met (whole interval) |", "|---|" + "---:|" * (len(target) + 2)]
    for r, d in rows.items():
        if r == "base":
            continue
        cis = [paired_bootstrap(rows["base"]["test"][c], d["test"][c]) for c in target]
        lines.append(f"| {label(r)} | " + " | ".join(f"{ci.estimate:+.3f}" for ci in cis) + " | "
                     + ("yes" if all(ci.estimate >= 0.30 for ci in cis) else "no") + " | "
                     + ("yes" if all(ci.low >= 0.30 for ci in cis) else "no") + " |")
    vc = list(rows["base"]["val"])
    lines += ["", f"## Validation split (seed {VAL_SEED}, {VAL['samples']} sequences per cell): mean recall", "",
              "| row | " + " | ".join(vc) + " |", "|---|" + "---:|" * len(vc)]
    for r, d in rows.items():
        lines.append(f"| {label(r)} | " + " | ".join(f"{mean(d['val'][c]):.3f}" for c in vc) + " |")
    cpath = out / "rows" / "free-candidates.json"
    if cpath.is_file():
        cands = json.loads(cpath.read_text())
        lines += ["", "## Training-free candidates on validation (the free row is the best declared one at "
                  f"P{SELECT_PAIRS}, free-wide the best of all, segment-4 ones added after the oracle study; "
                  "none was scored on test)", "", "| candidate | " + " | ".join(vc) + " |",
                  "|---|" + "---:|" * len(vc)]
        for name, v in cands.items():
            lines.append(f"| {name} | " + " | ".join(f"{mean(v[c]):.3f}" for c in vc) + " |")
    lines += ["", "## Cost (CPU, 1 thread)", "", "| row | trainable parameters | share | tuning s | row s (with scoring) |",
              "|---|---:|---:|---:|---:|"]
    for r, d in rows.items():
        i = d["info"]
        lines.append(f"| {label(r)} | {i.get('trainable_parameters', 0):,} | {100 * i.get('share_of_model', 0):.1f}% | "
                     f"{i.get('tune_seconds', '')} | {d.get('seconds', '')} |")
    rpath = out / "rows" / "recheck.json"
    if rpath.is_file():
        rc = json.loads(rpath.read_text())
        lines += ["", f"## Recheck: today's scores on the committed `{rc['committed']}` sequences (seed {rc['seed']})",
                  "", "| variant | cell | today | committed | difference |", "|---|---|---:|---:|---:|"]
        for name, g in rc["variants"].items():
            for c, v in g.items():
                diff = "" if v["committed"] is None else f"{v['today'] - v['committed']:+.3f}"
                then = "" if v["committed"] is None else f"{v['committed']:.3f}"
                lines.append(f"| {name} | {c} | {v['today']:.3f} | {then} | {diff} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"model": model, "settings": {
        "candidates": CANDIDATES, "candidates_late": CANDIDATES_LATE, "select_pairs": SELECT_PAIRS, "gate": GATE, "tune": TUNE, "seeds":
        {"tune": TUNE_SEED, "val": VAL_SEED, "test": TEST_SEED}, "val": VAL, "test": TEST}, "rows": summ}, indent=1) + "\n")
    _plot(rows, out / "recall.png", model)
    print(text)


def _plot(rows: dict, path: Path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TEST["lengths"]), figsize=(4.5 * len(TEST["lengths"]), 4), squeeze=False)
    for ax, L in zip(axes[0], TEST["lengths"]):
        for i, (r, d) in enumerate(rows.items()):
            ps = [P for P in TEST["pairs"] if cell(L, P) in d["test"]]
            cis = [mean_interval(d["test"][cell(L, P)]) for P in ps]
            ax.errorbar([P + 0.3 * (i - len(rows) / 2) for P in ps], [c.estimate for c in cis],
                        yerr=[[c.estimate - c.low for c in cis], [c.high - c.estimate for c in cis]], marker="o",
                        capsize=2, label=label(r), color="black" if r == "base" else plt.cm.tab10(i % 10),
                        ls="--" if r.startswith("full") else "-")
        ax.set(title=f"length {L}", xlabel="pairs (trained: 8)", ylabel="recall (test)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{model}: MQAR recall with 95% bootstrap intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    from mc_retrofit.distributed import cpu_numerics

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/mqar-delta_net")
    ap.add_argument("--rows", default="base", help=f"comma-separated, of {', '.join(ROWS)}, recheck")
    ap.add_argument("--report", action="store_true", help="only assemble the tables from the rows written")
    ap.add_argument("--out", type=Path, default=None, help="default recipes/studies/results/evidence-MODEL")
    ap.add_argument("--work", type=Path, default=None, help="tuned models (default ../evidence-work/MODEL)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05, help="gate tuning lr (every gate source)")
    ap.add_argument("--full-lr", type=float, default=1e-3, help="full-weight tuning lr (finetune_mqar_evidence's)")
    a = ap.parse_args(argv)
    name = Path(a.model).name
    a.out = (a.out or ROOT / "recipes/studies/results" / f"evidence-{name}").absolute()
    a.work = (a.work or ROOT.parent / "evidence-work" / name).absolute()
    if a.report:
        report(a.out, a.model)
        return
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS + ("recheck",) and not gate_row(r)]
    if bad:
        sys.exit(f"unknown row {bad[0]!r}; rows: {', '.join(ROWS)}, recheck")
    check_splits(split_seeds())
    cpu_numerics()
    torch.set_num_threads(1)
    (a.out / "rows").mkdir(parents=True, exist_ok=True)
    (a.work / "models").mkdir(parents=True, exist_ok=True)
    study = Study(a)
    for row in rows:
        study.recheck() if row == "recheck" else study.run_row(row)


if __name__ == "__main__":
    main()
