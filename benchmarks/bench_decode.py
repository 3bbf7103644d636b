"""Decode-step latency of a converted model vs the number of cached segments.

    python benchmarks/bench_decode.py                       # builtin:mamba2-byte, CPU or GPU
    python benchmarks/bench_decode.py --model DIR --segments 0 4 16 64 --segment-size 128
    python benchmarks/bench_decode.py --smoke               # tiny sizes: checks the script

For each N, a prompt of ``N * segment_size`` tokens is prefilled with a cache (so N
segments are cached in every MC layer), then ``--steps`` single-token steps are timed;
the median step is reported next to the base model's own decode step after the same
prompt, measured in the same process (ratios, not absolute speed, are what compare
across machines). Each aggregation is measured without a cap and with
``--cap`` segments under the ``log`` policy (the bounded-memory setting).

Writes ``decode-<device>-<date>.json`` (device, versions, date, settings, every number),
a table (``.md``) and a plot (``.png``) to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_latency(model, prompt: torch.Tensor, steps: int) -> tuple[float, dict]:
    """Median seconds of one decode step after prefilling ``prompt [1, L]``; the MC cache
    stats after the prefill (segments that close while decoding are not counted)."""
    from mc_retrofit import cache_stats, forward_with_cache

    with torch.no_grad():
        out, cache = forward_with_cache(model, prompt)
        tok = out.logits[:, -1:].argmax(-1)
        stats = cache_stats(cache)
        pos = prompt.shape[1]
        times = []
        for i in range(steps + 3):  # the first three steps warm up
            _sync(prompt.device)
            t = time.perf_counter()
            out, cache = forward_with_cache(model, tok, cache, cache_position=torch.tensor([pos], device=prompt.device))
            _sync(prompt.device)
            if i >= 3:
                times.append(time.perf_counter() - t)
            tok, pos = out.logits[:, -1:].argmax(-1), pos + 1
    return statistics.median(times), stats


def versions() -> dict:
    import transformers

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__)


def run(args) -> dict:
    import mc_retrofit as mr

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    base = mr.load_base(args.model).to(device).eval()
    vocab = base.config.vocab_size
    settings = [(agg, None) for agg in args.aggregations] + [(agg, args.cap) for agg in args.aggregations]
    models = {
        (agg, cap): mr.convert(mr.load_base(args.model).to(device).eval(), mr.MCConfig(
            segment_size=args.segment_size, aggregation=agg, top_k=args.top_k, max_cached_segments=cap,
            cache_policy="log"))
        for agg, cap in settings
    }
    rows = []
    bar = tqdm(total=len(args.segments) * (1 + len(settings)), desc="decode latency", dynamic_ncols=True)
    for N in args.segments:
        prompt = torch.randint(1, vocab, (1, max(1, N * args.segment_size)), device=device)
        t_base, _ = decode_latency(base, prompt, args.steps)
        bar.update(1)
        row = dict(N=N, prompt_tokens=prompt.shape[1], base_s=t_base)
        for (agg, cap), model in models.items():
            t, stats = decode_latency(model, prompt, args.steps)
            name = f"{agg}" + (f"_cap{cap}" if cap else "")
            row[f"{name}_s"] = t
            row[f"{name}_vs_base"] = t / t_base
            row[f"{name}_cached"] = max((v["segments"] for v in stats["layers"].values()), default=0)
            row[f"{name}_cache_bytes"] = stats["bytes"]
            bar.update(1)
        rows.append(row)
    bar.close()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return dict(benchmark="decode_step_latency", model=args.model, device=name, date=_dt.date.today().isoformat(),
                smoke=bool(getattr(args, "smoke", False)),
                versions=versions(), settings=dict(segment_size=args.segment_size, steps=args.steps, top_k=args.top_k,
                                                   cap=args.cap, cap_policy="log", aggregations=args.aggregations,
                                                   segments=args.segments),
                names=[f"{a}" + (f"_cap{c}" if c else "") for a, c in settings], rows=rows)


def table(result) -> str:
    names = result["names"]
    head = "| cached N | prompt | base step (ms) | " + " | ".join(f"{n} (x base)" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for r in result["rows"]:
        cells = [f"{r[f'{n}_vs_base']:.2f} ({r[f'{n}_cached']} seg)" for n in names]
        lines.append(f"| {r['N']} | {r['prompt_tokens']} | {r['base_s'] * 1e3:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    Ns = [r["N"] for r in result["rows"]]
    for n in result["names"]:
        ax.plot(Ns, [r[f"{n}_vs_base"] for r in result["rows"]], marker="o", ls="--" if "cap" in n else "-", label=n)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xlabel("cached segments before decoding (N)")
    ax.set_ylabel("decode step time / base model's")
    ax.set_title(f"{result['model']} decode step, {result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:mamba2-byte")
    p.add_argument("--segments", type=int, nargs="+", help="default 0 1 2 4 8 16 32 64 (--smoke: 0 2)")
    p.add_argument("--segment-size", type=int, help="default 64 (--smoke: 16)")
    p.add_argument("--aggregations", nargs="+", default=["residual", "gated", "ssc"])
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--cap", type=int, default=8, help="max_cached_segments of the capped runs (log policy)")
    p.add_argument("--steps", type=int, help="default 30 (--smoke: 2)")
    p.add_argument("--device")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script; numbers mean nothing)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    for name, full, smoke in (("segments", [0, 1, 2, 4, 8, 16, 32, 64], [0, 2]), ("segment_size", 64, 16),
                              ("steps", 30, 2)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decode-{'cuda' if 'cpu' not in result['device'] else 'cpu'}-{result['date']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table(result) + "\n")
    plot(result, out / f"{stem}.png")
    print(table(result))
    print(f"wrote {out / stem}.{{json,md,png}}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
