"""Study for issue 17 item 4: can a cached state deliver a pass key at all, given perfect gates?

    python recipes/studies/oracle_gate.py --model checkpoints/rwkv7-byte
    python recipes/studies/oracle_gate.py --model checkpoints/rwkv7-byte --layers 2 --scopes after
    python recipes/studies/oracle_gate.py --model builtin:mamba2-byte-v2     # the control

Gate tuning never lifted RWKV-7's pass keys, while the same recipe lifts Mamba2's to 0.87 at
16x. Either the gates never learn to pick the right cache on RWKV-7, or reading a cached
RWKV-7 state (in every layer at once, with the current token's receptance) does not carry the
key even when the right cache is picked. This separates the two: an **oracle gate** that knows
where the needle is. For each prompt, let ``j`` be the segment holding the needle's end; its
cached state ``S_j`` is the freshest copy of the key. The oracle replaces the gates' weights by
``1 - w`` on the online memory and ``w`` on ``S_j`` (0 on every other cache), in every layer,
for the tokens of

- ``last``: the prompt's final segment only (it holds the question and the answer);
- ``after``: every segment after ``j``.

``w = 0`` is the base exactly. The oracle is a patch of ``mc_retrofit.segments.readout`` for this
process (CPU reference path; segment by segment, batch 1); it is not a product option and it
uses information no model has (where the needle is), so it bounds what gate learning can reach
with this read. Pass keys in the evaluation phrasing on Emma filler (evaluation-only), depths
spread over 0..1, with 95% Wilson intervals.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import mc_retrofit
from mc_retrofit import MCConfig, core, tasks
from mc_retrofit.distributed import cpu_numerics
from mc_retrofit.eval.stats import wilson
from rwkv7_read_norm import readout  # beside this script

NEEDLE_END = b" is the pass key. "
ORACLE = {"j": 0, "w": 0.0, "scope": "last", "last": 0}


def oracle_readout(x: core.ReadInputs) -> torch.Tensor:
    """The read-out with the oracle's weights: ``y = (1 - w) o + w r_j`` on the tokens in scope."""
    nv = x.n_visible if x.n_visible.dim() == 1 else x.n_visible[0]
    k = int(nv.max())  # this piece's segment index: the call runs one segment at a time
    assert int(nv.min()) == k, "the oracle expects one segment per read-out call"
    j, w = ORACLE["j"], ORACLE["w"]
    in_scope = k > j and (ORACLE["scope"] == "after" or k == ORACLE["last"])
    if x.states is None or not in_scope or w == 0.0:
        return x.online
    eq = "bthk,bhkv->bthv" if x.layout == "kv" else "bthk,bhvk->bthv"
    read = torch.einsum(eq, x.q.float(), x.states[:, j].float()) * x.scale  # [B,T,H,V]
    return ((1.0 - w) * x.online.float() + w * read).to(x.online.dtype)


@torch.no_grad()
def hit(model, sample: tasks.TextSample, seg: int) -> int:
    ids = tasks.encode(sample)[0]
    end = sample.prompt.index(NEEDLE_END) + len(NEEDLE_END)  # bytes = ids for a byte model
    ORACLE["j"] = (end - 1) // seg
    ORACLE["last"] = (len(ids) - 2) // seg  # the segment of the last position that predicts an answer byte
    logits = model(input_ids=ids[None]).logits.float()[0]
    return int(tasks.score_logits(logits, sample))


COLOURS = {"0.25": "tab:blue", "0.5": "tab:orange", "0.75": "tab:green", "1": "tab:red"}


def report(folder: Path) -> None:
    """One table (``results.md``) and one plot (``oracle.png``) over every run in ``folder``."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    lines = ["| run | setting | " + " | ".join(f"{m}x" for m in (2, 4, 8, 16)) + " |", "|---|---|" + "---:|" * 4]
    for stem, r in runs.items():
        for key, by_len in r["passkey"].items():
            cells = []
            for m in ("2", "4", "8", "16"):
                c = by_len.get(m)
                cells.append("" if c is None else f"{c['accuracy']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]")
            lines.append(f"| {stem} | {key} | " + " | ".join(cells) + " |")
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.4), sharey=True, squeeze=False)
    for ax, (stem, r) in zip(axes[0], runs.items()):
        for key, by_len in r["passkey"].items():
            if not (key == "base" or key.startswith("after")):
                continue
            ms = sorted(by_len, key=int)
            w = key.rsplit("-w", 1)[-1]  # one colour per weight in every panel
            ax.plot([int(m) for m in ms], [by_len[m]["accuracy"] for m in ms], marker="o", label=key,
                    color="black" if key == "base" else COLOURS.get(w), ls="--" if key == "base" else "-")
        ax.set(title=stem, xlabel="prompt length (x context)", ylim=(-0.02, 1.02))
        ax.set_xscale("log", base=2)
    axes[0][0].set_ylabel("pass-key accuracy (oracle gate)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "oracle.png", dpi=110)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/rwkv7-byte")
    ap.add_argument("--ctx", type=int, default=512, help="the model's training context in bytes")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--lengths", default="4,8,16", help="multiples of the context")
    ap.add_argument("--weights", default="0,0.5,1")
    ap.add_argument("--scopes", default="last,after")
    ap.add_argument("--layers", default=None, help="comma-separated mixer layers that read (default: all)")
    ap.add_argument("--report", action="store_true", help="only the table and plot over the runs written")
    ap.add_argument("--out", default=None, help="a JSON file (default recipes/studies/results/oracle-gate/MODEL[-layersL].json)")
    a = ap.parse_args()
    if a.report:
        report(Path(__file__).resolve().parent / "results" / "oracle-gate")
        return
    cpu_numerics()
    torch.set_num_threads(1)
    t0 = time.time()
    seg = a.ctx // 2
    emma = tasks.load_book("austen-emma.txt")
    model = mc_retrofit.convert(mc_retrofit.load_base(a.model), MCConfig(
        segment_size=seg, aggregation="gated", layers=None if a.layers is None else [int(i) for i in a.layers.split(",")]))
    weights = [float(w) for w in a.weights.split(",")]
    settings = [("base", 0.0)] + [(s, w) for s in a.scopes.split(",") for w in weights if w > 0]
    name = Path(a.model.replace("builtin:", "")).name
    out = {"model": a.model, "layers": a.layers, "segment_size": seg, "prompts": a.prompts, "passkey": {}}
    stem = name + (f"-layers{a.layers.replace(',', '')}" if a.layers else "")
    path = Path(a.out or Path(__file__).resolve().parent / "results" / "oracle-gate" / f"{stem}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    for m in (int(x) for x in a.lengths.split(",")):
        L = m * a.ctx
        samples = [tasks.passkey_sample(emma, L, random.Random(f"oracle-{L}-{i}"), depth=(i % 5) / 4)
                   for i in range(a.prompts)]
        for scope, w in settings:
            ORACLE.update(scope=scope, w=w)
            t = time.time()
            with readout(oracle_readout):  # rwkv7_read_norm's patch of the segment loop's read-out
                hits = [hit(model, s, seg) for s in samples]
            ci = wilson(sum(hits), len(hits))
            key = scope if scope == "base" else f"{scope}-w{w:g}"
            out["passkey"].setdefault(key, {})[str(m)] = {"hits": hits, "accuracy": ci.estimate, "ci95": [ci.low, ci.high]}
            print(f"{m}x {key}: {ci.estimate:.2f} [{ci.low:.2f}, {ci.high:.2f}] ({time.time() - t:.0f} s)", flush=True)
        out["seconds"] = round(time.time() - t0)
        path.write_text(json.dumps(out, indent=1) + "\n")  # after each length: a stopped run keeps them
    print(f"wrote {path} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
