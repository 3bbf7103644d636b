"""Study for issue 17 item 6: why gate tuning misses MQAR +0.30 on the delta-rule families.

    python recipes/studies/oracle_mqar.py --model checkpoints/mqar-delta_net \
        --tuned lowrank=../evidence-work/mqar-delta_net/models/lowrank
    python recipes/studies/oracle_mqar.py --model checkpoints/mqar-delta_net --segment 4
    python recipes/studies/oracle_mqar.py --report          # results.md and oracle.png over every run

On the MQAR checkpoints (trained with 8 pairs), gate-tuned SSC top-2 at segments of 8 lifts
recall at 32 pairs and 256 tokens by +0.23 (DeltaNet) and +0.22 (Gated DeltaNet); the issue
asks +0.30. Either the gates do not pick the right cache, or a cached state cannot deliver the
value even when it is picked. As ``oracle_gate.py`` does for pass keys, an **oracle gate**
separates the two. For a query asking pair ``p`` (its value at position ``2p + 1``), the
freshest cache holding the pair is ``S_j`` with ``j = (2p + 1 + lag) // segment``: the state
after the segment that stored it, which holds about ``(j + 1) segment / 2`` pairs instead of
all 32. ``lag`` 0 assumes the model writes the pair at its value; 1, a token later (Gated
DeltaNet does: see results). At the query token only (the one that predicts the value), the
oracle replaces the gates by ``1 - w`` on the online read and ``w`` on ``S_j`` (0 on every other
cache), in every layer or in one; every other token reads its online memory only, so ``w = 0``
is the base exactly.

Also measured, on the same sequences: how often a router puts ``S_j`` first / in its top 2 at
the query tokens, per layer (the model with MC on that layer only): the training-free SSC top-2
query router at this segment size, and each ``--tuned`` model's. A query-source gate cannot
change the order (its temperature, bias and cache weight only rescale), so only lowrank and
learned gates are worth naming there.

The oracle is a patch of ``mc_retrofit.segments.readout`` for this process (CPU reference path,
one segment per call); it is not a product option and uses what no model knows (which pair is
asked), so it bounds what gate learning over this read can reach. Sequences: the evidence
study's test split (``evidence_mqar.TEST``, seed ``TEST_SEED``), so the base and free rows
reproduce its numbers; intervals: 95% bootstrap over sequences (queries within a sequence
share its state).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mc_retrofit
from mc_retrofit import MCConfig, core
from mc_retrofit.distributed import cpu_numerics
from mc_retrofit.eval import retrieval
from mc_retrofit.files import atomic_file

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this script
from evidence_mqar import TEST, TEST_SEED, mean_interval  # noqa: E402
from rwkv7_read_norm import cached_reads, readout  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "oracle-mqar"
# Per forward: the cache index the oracle reads at each query token ([B, L], -1 elsewhere), the
# oracle's weight, and the router hits recorded by ``measure`` (one list per read-out call).
STATE: dict = {"j": None, "w": 0.0, "ranks": [], "seg": 8, "lag": 0}


def freshest_cache(ids: torch.Tensor, targets: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """``[B, L]``: at each query token the index of the cache read for the asked pair, else -1.

    The pairs sit at the start (key at ``2p``, value at ``2p + 1``); a query token repeats a key.
    With ``STATE["lag"] = 0`` it is the first cache after the pair's value; a model may write
    the association a token later (its short convolution lets it), and then a pair whose value
    ends a segment is only in the next cache: ``lag = 1`` reads the cache after position ``2p + 2``."""
    keys = ids[:, 0:2 * n_pairs:2]  # [B, P]
    j = torch.full_like(ids, -1)
    for b, t in (targets != -100).nonzero().tolist():
        p = int((keys[b] == ids[b, t]).nonzero()[0])
        j[b, t] = (2 * p + 1 + STATE["lag"]) // STATE["seg"]
    return j


def piece(x: core.ReadInputs) -> tuple[int, torch.Tensor]:
    """This read-out call's segment index ``k`` and the oracle's cache index for its tokens ``[B, T]``."""
    nv = x.n_visible if x.n_visible.dim() == 1 else x.n_visible[0]
    k = int(nv.max())
    assert int(nv.min()) == k, "the oracle expects one segment per read-out call"
    T = x.q.shape[1]
    seg = STATE["seg"]
    return k, STATE["j"][:, k * seg:k * seg + T].to(x.q.device)


def oracle_readout(x: core.ReadInputs) -> torch.Tensor:
    """``y = (1 - w) o + w read(S_j, q)`` at the query tokens whose pair is cached; ``o`` elsewhere."""
    if x.states is None or STATE["w"] == 0.0:
        return x.online
    k, j = piece(x)
    on = (j >= 0) & (j < k)  # [B,T]: a query token whose freshest cache is visible
    if not bool(on.any()):
        return x.online
    reads = cached_reads(x, k)  # [B,T,H,k,V]
    idx = j.clamp(0, k - 1)[:, :, None, None, None].expand(-1, -1, reads.shape[2], 1, reads.shape[-1])
    r = reads.gather(3, idx)[:, :, :, 0]  # [B,T,H,V]
    w = STATE["w"]
    y = torch.where(on[..., None, None], (1.0 - w) * x.online.float() + w * r, x.online.float())
    return y.to(x.online.dtype)


def measure(x: core.ReadInputs) -> torch.Tensor:
    """The read-out as it is, recording where the router ranks ``S_j`` at the query tokens."""
    if x.states is not None and int(x.n_visible.max()) > 0:
        k, j = piece(x)
        on = (j >= 0) & (j < k)
        if bool(on.any()):
            scores = torch.einsum("bthu,bnhu->bthn", x.u.float(), x.pooled[:, :k].float())  # [B,T,H,k]
            mine = scores.gather(3, j.clamp(0, k - 1)[:, :, None, None].expand(-1, -1, scores.shape[2], 1))
            rank = (scores > mine).sum(-1)  # [B,T,H]: 0 = first
            STATE["ranks"][-1].append(rank[on].flatten())
    return core.readout_reference(x)


def batches(items, batch: int = 32):
    """``(ids, targets)`` per batch of one cell's sequences, with ``STATE["j"]`` set for it (the
    read-out patches need each batch's query positions, so eval's own ``score_mqar`` loop, which
    batches internally, cannot be used)."""
    for a in range(0, len(items), batch):
        chunk = items[a:a + batch]
        ids = torch.stack([it.ids for it in chunk])
        targets = torch.stack([it.meta["targets"] for it in chunk])
        STATE["j"] = freshest_cache(ids, targets, chunk[0].meta["n_pairs"])
        yield ids, targets


@torch.no_grad()
def recall(model, items) -> list[float]:
    """Each sequence's recall (share of its queries whose value is the argmax), eval's definition."""
    out = []
    for ids, targets in batches(items):
        logits = model(input_ids=ids).logits
        hit = (logits.argmax(-1) == targets) & (targets != -100)
        out += (hit.sum(1) / (targets != -100).sum(1)).tolist()
    return out


def cell_stats(x: list[float]) -> dict:
    ci = mean_interval(x)
    return {"recall": sum(x) / len(x), "ci95": [ci.low, ci.high], "per_sequence": [round(v, 6) for v in x]}


def router_hits(load, items, layers: int) -> dict:
    """Per layer (``load(layer)``: the model with MC on that layer only): the share of (query
    token, head) where the router ranks ``S_j`` first / in its top 2."""
    out = {}
    for layer in range(layers):
        STATE["ranks"] = []
        model = load(layer)
        with readout(measure), torch.no_grad():
            for ids, _ in batches(items):
                STATE["ranks"].append([])
                model(input_ids=ids)
        ranks = torch.cat([r for call in STATE["ranks"] for r in call])
        out[str(layer)] = {"top1": float((ranks == 0).float().mean()), "top2": float((ranks < 2).float().mean()),
                           "n": int(ranks.numel())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/mqar-delta_net")
    ap.add_argument("--tuned", default="", help="NAME=DIR,...: gate-tuned MC directories of the same model "
                    "and segment (their recall and router)")
    ap.add_argument("--segment", type=int, default=8, help="segment size (the evidence study's gate rows: 8)")
    ap.add_argument("--cells", default="L256-P24,L256-P32,L1024-P32", help="test cells (L = length, P = pairs)")
    ap.add_argument("--weights", default="0.5,1")
    ap.add_argument("--lags", default="0,1", help="which cache the oracle reads: the first after the pair's "
                    "value (0) or after the token that follows it (1)")
    ap.add_argument("--report", action="store_true", help="only the table and plot over the runs written")
    a = ap.parse_args()
    if a.report:
        report(RESULTS)
        return
    cpu_numerics()
    torch.set_num_threads(1)
    STATE["seg"] = a.segment
    t0 = time.time()
    base = mc_retrofit.load_base(a.model)
    n_layers = base.config.num_hidden_layers
    items = retrieval.make_mqar_items(TEST, base.config.vocab_size, TEST_SEED)
    by_cell = {c: [it for it in items if f"L{it.length}-P{int(it.depth)}" == c] for c in a.cells.split(",")}
    tuned = dict(t.split("=", 1) for t in a.tuned.split(",") if t)
    free = {"segment_size": a.segment, "aggregation": "ssc", "top_k": 2}

    def mc(layers=None):
        return mc_retrofit.convert(mc_retrofit.load_base(a.model), MCConfig(**free, layers=layers))

    name = Path(a.model).name
    out = {"model": a.model, "segment_size": a.segment, "test_seed": TEST_SEED, "tuned": tuned, "lags": a.lags,
           "cells": {}}
    path = RESULTS / f"{name}-seg{a.segment}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for c, its in by_cell.items():
        res = out["cells"].setdefault(c, {"recall": {}, "router": {}})
        t = time.time()
        res["recall"]["base"] = cell_stats(recall(base, its))
        res["recall"][f"free ssc2-{a.segment}"] = cell_stats(recall(mc(), its))
        for tname, d in tuned.items():
            res["recall"][f"tuned {tname}"] = cell_stats(recall(mc_retrofit.load(d), its))
        for lag in (int(x) for x in a.lags.split(",")):
            STATE["lag"] = lag
            for scope, layers in [("all", None)] + [(f"layer{i}", [i]) for i in range(n_layers)]:
                model = mc(layers)
                for w in (float(x) for x in a.weights.split(",")):
                    STATE["w"] = w
                    with readout(oracle_readout):
                        res["recall"][f"oracle lag{lag} {scope} w{w:g}"] = cell_stats(recall(model, its))
            STATE["w"] = 0.0
            res["router"][f"free ssc2-{a.segment}, lag{lag}"] = router_hits(lambda layer: mc([layer]), its, n_layers)
            for tname, d in tuned.items():
                res["router"][f"tuned {tname}, lag{lag}"] = router_hits(lambda layer, d=d: _tuned_on(d, layer),
                                                                        its, n_layers)
        STATE["lag"] = 0
        print(f"{c} ({time.time() - t:.0f} s):", flush=True)
        for k, v in res["recall"].items():
            print(f"  {k}: {v['recall']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]", flush=True)
        for k, v in res["router"].items():
            print(f"  router {k}: " + ", ".join(f"layer {i} top-1 {h['top1']:.2f} top-2 {h['top2']:.2f}"
                                                for i, h in v.items()), flush=True)
        out["seconds"] = round(time.time() - t0)
        with atomic_file(path, force=True) as tmp:  # after each cell: a stopped run keeps them
            tmp.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({out['seconds']} s)")


def _tuned_on(directory: str, layer: int):
    """The tuned model with MC on ``layer`` only: every other layer's cache weight set to 0 (the base)."""
    model = mc_retrofit.load(directory)
    for pname, p in model.named_parameters():
        if pname.endswith("mc_gate.cache_weight") and f".layers.{layer}." not in pname:
            p.data.zero_()
    return model


def report(folder: Path) -> None:
    """One table (``results.md``) and one plot (``oracle.png``) over every run in ``folder``."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    lines = []
    for stem, r in runs.items():
        cells = list(r["cells"])
        lines += [f"## {stem}: recall [95% bootstrap over sequences]", "", "| setting | " + " | ".join(cells) + " |",
                  "|---|" + "---:|" * len(cells)]
        for key in r["cells"][cells[0]]["recall"]:
            lines.append(f"| {key} | " + " | ".join(
                "{0:.3f} [{1:.3f}, {2:.3f}]".format(v["recall"], *v["ci95"]) for v in
                (r["cells"][c]["recall"][key] for c in cells)) + " |")
        lines += ["", f"## {stem}: where the router ranks the oracle's cache (``S_j`` at that lag) "
                  "(share of query tokens x heads: first / in the top 2)", "",
                  "| router | layer | " + " | ".join(cells) + " |", "|---|---|" + "---:|" * len(cells)]
        for key, by_layer in r["cells"][cells[0]]["router"].items():
            for layer in by_layer:
                lines.append(f"| {key} | {layer} | " + " | ".join(
                    "{top1:.2f} / {top2:.2f}".format(**r["cells"][c]["router"][key][layer]) for c in cells) + " |")
        lines.append("")
    (folder / "results.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 3.8), squeeze=False)  # each its own rows
    for ax, (stem, r) in zip(axes[0], runs.items()):
        c = "L256-P32" if "L256-P32" in r["cells"] else next(iter(r["cells"]))
        rec = r["cells"][c]["recall"]
        keys = [k for k in rec if not k.startswith("oracle") or (k.endswith(" w1") and " all " in k)]
        est = [rec[k]["recall"] for k in keys]
        err = [[e - rec[k]["ci95"][0] for k, e in zip(keys, est)], [rec[k]["ci95"][1] - e for k, e in zip(keys, est)]]
        ax.barh(range(len(keys)), est, xerr=err, color=["black" if k == "base" else "tab:red" if k.startswith("oracle")
                                                        else "tab:blue" for k in keys])
        ax.axvline(rec["base"]["recall"] + 0.30, color="grey", ls="--", lw=1, label="base + 0.30")
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ax.set(title=f"{stem}, {c}", xlabel="recall (test)", xlim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "oracle.png", dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
