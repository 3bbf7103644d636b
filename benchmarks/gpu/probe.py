"""What the GPU run ran on: device, driver, versions, where each package was imported
from, which base kernels the benchmarks' models take, and the measured ceilings.

    python benchmarks/gpu/probe.py OUT.json [--measure]

``--measure`` (on CUDA) times a device-to-device copy (bytes read + written) and an
8192^3 matrix product in bf16 and in tf32, each the median of 10 event-timed runs after
3 warm-ups on random data: the roofline denominators to read the read-out kernel
against, beside the datasheet peaks that bench_mc.py uses.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DISTS = ["torch", "triton", "transformers", "flash-linear-attention", "fla-core", "einops", "mc-retrofit",
         "safetensors", "accelerate", "tokenizers", "huggingface-hub", "regex", "numpy", "matplotlib", "click",
         "rich", "tqdm", "packaging", "pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "mamba-ssm",
         "causal-conv1d", "kernels", "datasets"]
MODULES = ["torch", "triton", "transformers", "fla", "einops", "mc_retrofit", "regex", "tokenizers"]


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _origin(mod):
    try:
        m = importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        return f"import failed: {type(e).__name__}: {e}"[:300]
    return str(Path(getattr(m, "__file__", "") or "?").parent)


def _cmd(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout.rstrip()
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {type(e).__name__}"


def base_kernels(torch):
    """Which implementation each model in the benchmarks runs on."""
    out = {}
    have = {m: importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d", "kernels")}
    out["mamba_ssm_installed"], out["causal_conv1d_installed"] = have["mamba_ssm"], have["causal_conv1d"]
    out["hf_kernels_hub_installed"] = have["kernels"]
    try:
        from transformers.models.mamba2 import modeling_mamba2 as m2

        fast = getattr(m2, "is_fast_path_available", None)  # older transformers; 5.2x resolve per function
        out["transformers_mamba2_is_fast_path_available"] = fast
        fast = bool(fast) if fast is not None else (have["mamba_ssm"] and have["causal_conv1d"])
        out["transformers_mamba2_prefill"] = (
            "mamba_ssm + causal_conv1d CUDA kernels" if fast else
            "transformers' pure-PyTorch path (chunked SSD in einsums, torch conv1d; no mamba_ssm/causal_conv1d): "
            "slower than the mamba_ssm kernels, so MC/base ratios look better than against a fused base")
    except Exception as e:  # noqa: BLE001
        out["transformers_mamba2_prefill"] = f"unknown: {type(e).__name__}: {e}"
    try:
        import fla.layers.mamba2 as fm2

        out["fla_mamba2_is_fast_path_available"] = bool(fm2.is_fast_path_available)
        if not fm2.is_fast_path_available:
            out["fla_mamba2_note"] = ("fla's Mamba2 layer also needs mamba_ssm for its fast path; without it it "
                                      "takes its own torch_forward, so it is no Triton base either")
    except Exception as e:  # noqa: BLE001
        out["fla_mamba2_is_fast_path_available"] = f"unknown: {type(e).__name__}: {e}"
    out["sdpa_transformer"] = "transformers Llama, attn_implementation='sdpa' (torch.nn.functional.scaled_dot_product_attention)"
    try:
        b = torch.backends.cuda
        out["sdpa_backends_enabled"] = dict(flash=b.flash_sdp_enabled(), mem_efficient=b.mem_efficient_sdp_enabled(),
                                            math=b.math_sdp_enabled(),
                                            cudnn=getattr(b, "cudnn_sdp_enabled", lambda: None)())
    except Exception as e:  # noqa: BLE001
        out["sdpa_backends_enabled"] = f"unknown: {type(e).__name__}"
    try:
        from mc_retrofit.kernels import use_triton

        probe = torch.empty(1, device="cuda") if torch.cuda.is_available() else torch.empty(1)
        out["mc_readout"] = "Triton kernels (kernels/readout_op.py, decode.py)" if use_triton(probe) else \
            "PyTorch reference (mc_retrofit.core.readout_reference)"
    except Exception as e:  # noqa: BLE001
        out["mc_readout"] = f"unknown: {type(e).__name__}: {e}"
    out["env"] = {k: v for k, v in os.environ.items() if k.startswith(("MC_RETROFIT_", "TRITON_", "FLA_"))}
    return out


def ceilings(torch):
    dev = torch.device("cuda")

    def bench(fn, n=10, warmup=3):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return statistics.median(ts)

    out = {}
    x = torch.randn(2**28, device=dev)  # 1 GiB fp32
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    out["copy_GBps"] = 2 * x.numel() * 4 / t / 1e9
    del x, y
    n = 8192
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True)):
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            t = bench(lambda: a @ b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out[f"matmul_{name}_TFLOPs"] = 2 * n**3 / t / 1e12
        del a, b
    torch.cuda.empty_cache()
    out["how"] = "median of 10 CUDA-event timed runs after 3 warm-ups, random data; copy counts read + write bytes"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--measure", action="store_true", help="time copy bandwidth and matmul rates (CUDA only)")
    args = ap.parse_args(argv)
    import torch

    rec = dict(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), host=socket.gethostname(),
               python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
               cpu_count=os.cpu_count(), cuda_available=torch.cuda.is_available(),
               versions={d: _version(d) for d in DISTS}, imported_from={m: _origin(m) for m in MODULES})
    rec["git_commit"] = _cmd(["git", "-C", str(REPO), "rev-parse", "HEAD"]) or None
    if rec["git_commit"].startswith("unavailable") or len(rec["git_commit"]) != 40:
        rec["git_commit"] = None  # the device's copy of the tree may have no .git
    else:
        status = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
        rec["git_modified_files"] = [line[3:] for line in status.splitlines() if line.strip()]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   multiprocessors=p.multi_processor_count, memory_GiB=round(p.total_memory / 2**30, 1),
                   torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        rec["nvidia_smi"] = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                                  "clocks.mem,power.limit,temperature.gpu,utilization.gpu", "--format=csv"])
    else:
        rec["device"] = "cpu (" + (platform.processor() or platform.machine()) + ")"
    try:
        import mc_retrofit.compat as compat

        rec["outside_tested_window"] = compat.outside_window()
    except Exception as e:  # noqa: BLE001
        rec["outside_tested_window"] = f"unknown: {type(e).__name__}: {e}"
    rec["base_kernels"] = base_kernels(torch)
    if args.measure and torch.cuda.is_available():
        try:
            rec["ceilings"] = ceilings(torch)
        except Exception as e:  # noqa: BLE001
            rec["ceilings"] = f"failed: {type(e).__name__}: {e}"
    Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps({k: rec.get(k) for k in ("device", "versions", "ceilings")}, indent=1)[:3000])


if __name__ == "__main__":
    main()
