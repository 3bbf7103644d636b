"""Memory Caching cost benchmark: kernels, prefill, decode, attention baseline, memory.

    python benchmarks/bench_mc.py                 # GPU: full run, H100-sized settings
    python benchmarks/bench_mc.py --smoke         # any machine: tiny sizes, checks the script

Measures in one run, as ratios:
 (a) the Triton read-out vs the PyTorch reference on the same inputs, with achieved
     memory bandwidth and FLOP rate against the device's peak (roofline fraction);
 (b) MC prefill vs the base model's own prefill (a randomly initialised transformers
     Mamba2 of the given size; nothing downloaded) for each aggregation and segment size;
 (c) decode-step read-out latency vs the number of cached segments;
 (d) a Llama of the same width and depth with PyTorch SDPA attention at the same lengths;
 (e) peak memory of every prefill.
Writes ``results/mc_bench-<device>-<date>.json`` (device, versions, date, settings,
every number) and a PNG with the prefill ratios and decode latencies. Timings are
medians of CUDA-event timed repeats after warm-up (CPU: wall clock). In ``--smoke`` the
PyTorch reference path stands in for the kernels unless a GPU is present.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# peak numbers used for the roofline fraction (dense, no sparsity); keyed by a device-name fragment
PEAKS = {"H100": {"hbm_GBps": 3350.0, "tf32_TFLOPs": 494.7, "bf16_TFLOPs": 989.4},
         "H200": {"hbm_GBps": 4800.0, "tf32_TFLOPs": 494.7, "bf16_TFLOPs": 989.4},
         "A100": {"hbm_GBps": 2039.0, "tf32_TFLOPs": 156.0, "bf16_TFLOPs": 312.0}}

FULL = dict(lengths=[4096, 16384, 32768, 65536], segments=[128, 256, 512], aggs=["gated", "residual", "ssc"],
            top_k=4, model=dict(hidden_size=1024, num_hidden_layers=24, num_heads=32, head_dim=64, state_size=128,
                                n_groups=1, expand=2, chunk_size=256, vocab_size=32000),
            readout=dict(B=1, T=256, H=32, K=128, V=64, N=[16, 64, 128]), decode_N=[1, 4, 16, 64, 128, 256, 512],
            repeats=5, dtype="bfloat16")
SMOKE = dict(lengths=[64, 128], segments=[16, 32], aggs=["gated", "residual", "ssc"], top_k=2,
             model=dict(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8, n_groups=1,
                        expand=2, chunk_size=16, vocab_size=64),
             readout=dict(B=1, T=32, H=2, K=8, V=8, N=[2, 4]), decode_N=[1, 4], repeats=1, dtype="float32")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeats, warmup=1):
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_mem(fn, device):
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def peaks_for(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


# ---- (a) read-out kernel vs reference -------------------------------------------------
def bench_readout(cfg, device, dtype, use_kernel):
    from mc_retrofit.core import ReadInputs, readout_reference
    from mc_retrofit.kernels import readout

    r = cfg["readout"]
    B, T, H, K, V = r["B"], r["T"], r["H"], r["K"], r["V"]
    rows = []
    for N in r["N"]:
        for agg in ("gated", "residual", "ssc"):
            q = torch.randn(B, T, H, K, device=device, dtype=dtype)
            S = torch.randn(B, N, H, V, K, device=device) * 0.05  # Mamba2-style V-first fp32 cache
            o = torch.randn(B, T, H, V, device=device, dtype=dtype)
            u = torch.randn(B, T, H, K, device=device, dtype=dtype)
            p = torch.randn(B, N, H, K, device=device)
            op = torch.randn(B, T, H, K, device=device)
            nv = torch.full((T,), N, device=device, dtype=torch.long)
            kw = dict(aggregation=agg, top_k=cfg["top_k"], scale=1.0, gate_scale=torch.full((H,), K ** -0.5,
                      device=device), mix=torch.ones(H, device=device), layout="vk")
            with torch.no_grad():
                x = ReadInputs(q, S, o, u, p, op, nv, **kw)
                t_ref = timeit(lambda: readout_reference(x), device, cfg["repeats"])
                t_k = timeit(lambda: readout(x), device, cfg["repeats"]) if use_kernel \
                    else None
            # bytes a perfect kernel must move: every state once, q/o/u/op in, y out
            nbytes = S.numel() * 4 + p.numel() * 4 + (q.numel() + o.numel() * 2 + u.numel()) * q.element_size() \
                + op.numel() * 4
            flops = 2 * B * T * N * H * K * V
            row = dict(N=N, aggregation=agg, T=T, reference_s=t_ref, kernel_s=t_k,
                       speedup=(t_ref / t_k) if t_k else None, bytes=nbytes, flops=flops)
            pk = peaks_for(device)
            if t_k and pk:
                bw = nbytes / t_k / 1e9
                tf = flops / t_k / 1e12
                row.update(GBps=bw, TFLOPs=tf, bw_fraction=bw / pk["hbm_GBps"], tf32_fraction=tf / pk["tf32_TFLOPs"],
                           bound="memory" if bw / pk["hbm_GBps"] >= tf / pk["tf32_TFLOPs"] else "compute")
            rows.append(row)
    return rows


# ---- (b) MC prefill vs base, (d) SDPA transformer, (e) memory ---------------------------
def build_mamba2(cfg, device, dtype):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    return Mamba2ForCausalLM(Mamba2Config(**cfg["model"], use_cache=False)).to(device, dtype).eval()


def build_llama(cfg, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg["model"]
    heads = max(1, m["hidden_size"] // 64) if m["hidden_size"] >= 64 else 2
    lc = LlamaConfig(hidden_size=m["hidden_size"], intermediate_size=int(m["hidden_size"] * 8 / 3) // 8 * 8,
                     num_hidden_layers=m["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=heads,
                     vocab_size=m["vocab_size"], max_position_embeddings=max(cfg["lengths"]) + 1,
                     attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(lc).to(device, dtype).eval()


def prefill(model, ids):
    with torch.no_grad():
        # hidden states only: the LM head over every position costs the same for all models
        return model.base_model(ids).last_hidden_state


def bench_prefill(cfg, device, dtype, progress, checkpoint=None):
    from mc_retrofit.config import MCConfig
    from mc_retrofit.model import convert

    rows = []
    base = build_mamba2(cfg, device, dtype)
    llama = build_llama(cfg, device, dtype)
    for L in cfg["lengths"]:
        ids = torch.randint(0, cfg["model"]["vocab_size"], (1, L), device=device)
        entry = dict(length=L)
        for name, model in (("base", base), ("sdpa_transformer", llama)):
            try:
                entry[f"{name}_s"] = timeit(lambda: prefill(model, ids), device, cfg["repeats"])
                entry[f"{name}_peak_GiB"] = peak_mem(lambda: prefill(model, ids), device)
            except torch.OutOfMemoryError:
                entry[f"{name}_s"] = None
                entry[f"{name}_error"] = "out of memory"
            progress()
        for agg in cfg["aggs"]:
            for C in cfg["segments"]:
                mc = convert(build_mamba2(cfg, device, dtype), MCConfig(segment_size=C, aggregation=agg,
                                                                         top_k=cfg["top_k"]))
                key = f"mc_{agg}_{C}"
                try:
                    entry[f"{key}_s"] = timeit(lambda: prefill(mc, ids), device, cfg["repeats"])
                    entry[f"{key}_peak_GiB"] = peak_mem(lambda: prefill(mc, ids), device)
                    if entry.get("base_s"):
                        entry[f"{key}_vs_base"] = entry[f"{key}_s"] / entry["base_s"]
                    if entry.get("sdpa_transformer_s"):
                        entry[f"{key}_speedup_vs_sdpa"] = entry["sdpa_transformer_s"] / entry[f"{key}_s"]
                except torch.OutOfMemoryError:
                    entry[f"{key}_s"] = None
                    entry[f"{key}_error"] = "out of memory"
                del mc
                progress()
        rows.append(entry)
        if checkpoint:
            checkpoint(rows)  # each finished length is on disk even if a later one never ends
    return rows


# ---- (c) decode step ---------------------------------------------------------------
def bench_decode(cfg, device, dtype, use_kernel):
    from mc_retrofit.core import ReadInputs, readout_reference
    from mc_retrofit.kernels import readout

    r = cfg["readout"]
    B, H, K, V = r["B"], r["H"], r["K"], r["V"]
    rows = []
    for N in cfg["decode_N"]:
        for agg in ("gated", "ssc"):
            q = torch.randn(B, 1, H, K, device=device, dtype=dtype)
            S = torch.randn(B, N, H, V, K, device=device) * 0.05
            o = torch.randn(B, 1, H, V, device=device, dtype=dtype)
            p = torch.randn(B, N, H, K, device=device)
            op = torch.randn(B, 1, H, K, device=device)
            nv = torch.full((1,), N, device=device, dtype=torch.long)
            kw = dict(aggregation=agg, top_k=cfg["top_k"], scale=1.0, gate_scale=torch.full((H,), K ** -0.5,
                      device=device), mix=torch.ones(H, device=device), layout="vk")
            with torch.no_grad():
                x = ReadInputs(q, S, o, q, p, op, nv, **kw)
                t_ref = timeit(lambda: readout_reference(x), device, cfg["repeats"] * 4)
                t_k = timeit(lambda: readout(x), device, cfg["repeats"] * 4) \
                    if use_kernel else None
            rows.append(dict(N=N, aggregation=agg, reference_s=t_ref, kernel_s=t_k,
                             speedup=(t_ref / t_k) if t_k else None))
    return rows


def versions():
    import transformers
    out = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__)
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    pre = result["prefill"]
    Ls = [e["length"] for e in pre]
    for agg in result["settings"]["aggs"]:
        for C in result["settings"]["segments"]:
            ys = [e.get(f"mc_{agg}_{C}_vs_base") for e in pre]
            if any(y is not None for y in ys):
                ax.plot(Ls, [math.nan if y is None else y for y in ys], marker="o", label=f"{agg} C={C}")
    sd = [(e["sdpa_transformer_s"] / e["base_s"]) if e.get("sdpa_transformer_s") and e.get("base_s") else math.nan
          for e in pre]
    ax.plot(Ls, sd, "k--", marker="s", label="SDPA transformer")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prefill tokens")
    ax.set_ylabel("time / base model prefill")
    ax.set_title("prefill cost relative to the base model")
    ax.legend(fontsize=7)
    ax = axes[1]
    for agg in ("gated", "ssc"):
        rows = [r for r in result["decode"] if r["aggregation"] == agg]
        ax.plot([r["N"] for r in rows], [r["reference_s"] * 1e6 for r in rows], marker="o", label=f"{agg} reference")
        if any(r["kernel_s"] for r in rows):
            ax.plot([r["N"] for r in rows], [(r["kernel_s"] or math.nan) * 1e6 for r in rows], marker="s",
                    label=f"{agg} kernel")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached segments N")
    ax.set_ylabel("decode read-out latency (us)")
    ax.set_title("decode step read-out")
    ax.legend(fontsize=7)
    fig.suptitle(f"{result['device']}  {result['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script; numbers mean nothing)")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for the JSON and PNG")
    ap.add_argument("--lengths", type=int, nargs="*", help="override prefill lengths")
    ap.add_argument("--segments", type=int, nargs="+", help="override the MC segment sizes of the prefill grid")
    ap.add_argument("--aggs", nargs="+", choices=["gated", "residual", "ssc"], help="override the aggregations")
    ap.add_argument("--top-k", type=int, help="override SSC's top-k")
    ap.add_argument("--repeats", type=int, help="override the timed repeats")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--skip-readout", action="store_true", help="skip (a) and (c), the read-out kernel timings")
    args = ap.parse_args(argv)
    from mc_retrofit.distributed import cpu_numerics

    cpu_numerics()
    cfg = dict(SMOKE if args.smoke else FULL)
    for key, value in (("lengths", args.lengths), ("segments", args.segments), ("aggs", args.aggs),
                       ("top_k", args.top_k), ("repeats", args.repeats)):
        if value:
            cfg[key] = value
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        ap.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
    dtype = getattr(torch, cfg["dtype"]) if device.type == "cuda" else torch.float32
    use_kernel = device.type == "cuda"
    saved = os.environ.get("MC_RETROFIT_FORCE_REFERENCE")
    if not use_kernel:
        os.environ["MC_RETROFIT_FORCE_REFERENCE"] = "1"  # CPU: the kernels need the (slow) interpreter
    try:
        return _run(args, cfg, device, dtype, use_kernel)
    finally:
        if saved is None:
            os.environ.pop("MC_RETROFIT_FORCE_REFERENCE", None)
        else:
            os.environ["MC_RETROFIT_FORCE_REFERENCE"] = saved


def _run(args, cfg, device, dtype, use_kernel):
    from tqdm import tqdm

    n_prefill = 0 if args.skip_prefill else len(cfg["lengths"]) * (2 + len(cfg["aggs"]) * len(cfg["segments"]))
    bar = tqdm(total=(0 if args.skip_readout else 2) + n_prefill, desc="mc bench", file=sys.stderr)
    step = lambda: bar.update(1)  # noqa: E731
    result = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), versions=versions(),
                  smoke=args.smoke, kernel_used=use_kernel, dtype=str(dtype), peaks=peaks_for(device),
                  settings={k: v for k, v in cfg.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("smoke-" if args.smoke else "") + result["device"].replace(" ", "_").replace("/", "_")
    stem = out / f"mc_bench-{tag}-{result['date'][:10]}"
    save = lambda: stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")  # noqa: E731
    result["readout"], result["decode"], result["prefill"] = [], [], []
    if not args.skip_readout:
        result["readout"] = bench_readout(cfg, device, dtype, use_kernel)
        step()
        result["decode"] = bench_decode(cfg, device, dtype, use_kernel)
        step()
        save()
    if not args.skip_prefill:
        result["prefill"] = bench_prefill(cfg, device, dtype, step,
                                          checkpoint=lambda rows: (result.__setitem__("prefill", rows), save()))
    bar.close()
    save()
    if result["prefill"]:
        plot(result, stem.with_suffix(".png"))
    print_table(result)
    print(f"wrote {stem.with_suffix('.json')}")
    return result


def print_table(result):
    from rich.console import Console
    from rich.table import Table

    t = Table(title="read-out: kernel vs reference")
    for c in ("N", "agg", "reference ms", "kernel ms", "speedup", "bw frac", "tf32 frac"):
        t.add_column(c)
    f = lambda x, s=1e3: "-" if x is None else f"{x * s:.3f}"  # noqa: E731
    for r in result["readout"]:
        t.add_row(str(r["N"]), r["aggregation"], f(r["reference_s"]), f(r["kernel_s"]), f(r["speedup"], 1),
                  f(r.get("bw_fraction"), 1), f(r.get("tf32_fraction"), 1))
    Console().print(t)
    if result["prefill"]:
        t = Table(title="prefill time / base model")
        keys = [k[:-8] for k in result["prefill"][0] if k.endswith("_vs_base")]
        t.add_column("length")
        t.add_column("base s")
        t.add_column("sdpa / base")
        for k in keys:
            t.add_column(k)
        for e in result["prefill"]:
            sd = e["sdpa_transformer_s"] / e["base_s"] if e.get("sdpa_transformer_s") and e.get("base_s") else None
            t.add_row(str(e["length"]), f(e.get("base_s"), 1), f(sd, 1), *[f(e.get(k + "_vs_base"), 1) for k in keys])
        Console().print(t)


if __name__ == "__main__":
    main()
