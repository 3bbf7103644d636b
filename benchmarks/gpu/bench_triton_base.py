"""MC prefill against a Triton base: bench_mc.py's prefill with Mamba2's chunk scan done by
fla's Triton ``chunk_simple_gla`` instead of transformers' PyTorch path.

    python benchmarks/gpu/bench_triton_base.py --out DIR [bench_mc.py prefill arguments]

Without ``mamba_ssm`` (no wheel exists; building it takes far longer than the GPU lease)
transformers' Mamba2 runs its scan in PyTorch einsums, which makes the base slow and the
MC/base ratios look good. The SSD scan of Mamba2 is simple GLA: with q = C, k = B,
v = dt * x and the per-head log decay g = A * dt (scale 1),
``y_t = sum_{s<=t} (C_t . B_s) exp(sum_{s<r<=t} A dt_r) dt_s x_s``, which fla computes with
Triton (state [H, V=head_dim, K=state] with ``state_v_first``). This script

1. checks the replacement against transformers' ``mamba2_chunk_scan`` on random inputs
   (D skip, dt bias, softplus, limits, initial and final states) and refuses to go on when
   they disagree beyond bf16 tolerance;
2. times the two scans alone on bench_mc's layer shape at each length;
3. swaps ``transformers.models.mamba2.modeling_mamba2.mamba2_chunk_scan`` before
   mc_retrofit wraps it, so the base model and the MC models both run the Triton scan,
   and runs bench_mc.py's prefill grid (``--skip-readout``) into ``--out``.

On CPU (``--smoke``) fla's pure-PyTorch ``naive_recurrent_simple_gla`` stands in for the
Triton kernel: that checks the mapping exactly, not the speed. Writes
``triton_base-<device>-<date>.json`` (check, scan timings) beside bench_mc's JSON and PNG.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
MODULE = "transformers.models.mamba2.modeling_mamba2"


def make_scan(use_triton: bool):
    """A drop-in for transformers' ``mamba2_chunk_scan`` (same arguments and returns)."""
    if use_triton:
        from fla.ops.simple_gla import chunk_simple_gla
    else:
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    def fla_mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                              dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        heads = hidden_states.shape[2]
        if dt_bias is not None:
            dt = dt + dt_bias.to(dt.dtype)
        if dt_softplus:
            dt = F.softplus(dt)
        dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
        rep = heads // B.shape[2]
        dtype = hidden_states.dtype if hidden_states.dtype in (torch.bfloat16, torch.float16) else torch.float32
        q = C.repeat_interleave(rep, dim=2).to(dtype)
        k = B.repeat_interleave(rep, dim=2).to(dtype)
        v = (hidden_states.float() * dt[..., None]).to(dtype)
        g = dt * A.float()[None, None, :]
        init = None if initial_states is None else initial_states.float()  # [b, h, head_dim, state] = V-first
        if use_triton:
            y, final = chunk_simple_gla(q, k, v, g=g, scale=1.0, initial_state=init,
                                        output_final_state=return_final_states, state_v_first=True)
        else:
            y, final = naive_recurrent_simple_gla(q, k, v, g, scale=1.0,
                                                  initial_state=None if init is None else init.transpose(-1, -2),
                                                  output_final_state=return_final_states)
            final = None if final is None else final.transpose(-1, -2)
        y = y.float()
        if D is not None:
            y = y + D.float()[..., None] * hidden_states.float()
        return (y, final.float()) if return_final_states else y

    return fla_mamba2_chunk_scan


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def problem(L, H, P, N, G, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(hidden_states=r(1, L, H, P).to(device, dtype), dt=(r(1, L, H) - 2).to(device, dtype),
                A=-torch.exp(r(H) * 0.5).to(device), B=(r(1, L, G, N) / math.sqrt(N)).to(device, dtype),
                C=(r(1, L, G, N) / math.sqrt(N)).to(device, dtype), D=r(H).to(device), dt_bias=(r(H) * 0.1).to(device),
                initial_states=(r(1, H, P, N) * 0.1).to(device))


def check(orig, new, device, dtype, model, L, tolerance):
    """Replacement vs transformers' own scan on one random problem (final states too)."""
    x = problem(L, model["num_heads"], model["head_dim"], model["state_size"], model["n_groups"], device, dtype)
    kw = dict(chunk_size=model["chunk_size"], dt_softplus=True, dt_limit=(0.0, float("inf")), return_final_states=True)
    with torch.no_grad():
        y0, f0 = orig(**x, **kw)
        y1, f1 = new(**x, **kw)
    out = dict(length=L, dtype=str(dtype), output_rel_err=_rel(y1, y0), final_state_rel_err=_rel(f1, f0),
               tolerance=tolerance)
    out["ok"] = out["output_rel_err"] <= tolerance and out["final_state_rel_err"] <= tolerance  # NaN fails
    return out


def time_scans(orig, new, device, dtype, model, lengths, repeats):
    from bench_mc import timeit

    rows = []
    for L in lengths:
        x = problem(L, model["num_heads"], model["head_dim"], model["state_size"], model["n_groups"], device, dtype, 1)
        kw = dict(chunk_size=model["chunk_size"], dt_softplus=True)
        row = dict(length=L)
        for name, fn in (("torch_scan_s", orig), ("fla_scan_s", new)):
            try:
                with torch.no_grad():
                    row[name] = timeit(lambda: fn(**x, **kw), device, repeats)
            except torch.OutOfMemoryError:
                row[name] = None
        if row.get("torch_scan_s") and row.get("fla_scan_s"):
            row["torch_over_fla"] = row["torch_scan_s"] / row["fla_scan_s"]
        rows.append(row)
        del x
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (bench_mc's default grid otherwise)")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest relative error accepted in fp32 (CPU)")
    ap.add_argument("--bf16-tolerance", type=float, default=5e-2, help="the same on the GPU, bf16 inputs")
    args, rest = ap.parse_known_args(argv)  # the rest goes to bench_mc.py (--segments, --aggs, --top-k, ...)
    sys.path.insert(0, str(HERE.parent))
    import bench_mc
    from transformers.models.mamba2 import modeling_mamba2 as m2

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.smoke:
        ap.error("needs a CUDA GPU; use --smoke on CPU")
    from mc_retrofit import compat

    if compat.patched(m2, "mamba2_chunk_scan") is not None:
        raise SystemExit("mc_retrofit wrapped mamba2_chunk_scan before this script could swap it")
    orig = m2.mamba2_chunk_scan
    new = make_scan(use_triton=cuda)
    cfg = bench_mc.SMOKE if args.smoke else bench_mc.FULL
    dtype = getattr(torch, cfg["dtype"]) if cuda else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(benchmark="mc_prefill_vs_triton_base", date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               device=torch.cuda.get_device_name(0) if cuda else "cpu", smoke=args.smoke,
               scan="fla.ops.simple_gla.chunk_simple_gla (Triton)" if cuda else
               "fla.ops.simple_gla.naive.naive_recurrent_simple_gla (PyTorch stand-in on CPU)",
               replaces=f"{MODULE}.mamba2_chunk_scan (transformers' PyTorch path)", model=cfg["model"])
    stem = out / f"triton_base-{res['device'].replace(' ', '_')}-{res['date'][:10]}.json"
    # CPU: the PyTorch stand-in in fp32 checks the mapping exactly; GPU: the Triton kernel in the model's dtype
    # only (each dtype costs fla an autotuning round, and the lease is short)
    tol = args.tolerance if dtype == torch.float32 else args.bf16_tolerance
    res["check"] = [check(orig, new, device, dtype, cfg["model"], 512 if cuda else 48, tol)]
    stem.write_text(json.dumps(res, indent=1) + "\n")
    print("check:", res["check"])
    if not all(c["ok"] for c in res["check"]):
        raise SystemExit(f"the Triton scan disagrees with transformers' ({res['check']}): not benchmarking it")
    lengths = args.lengths or cfg["lengths"]
    t0 = time.perf_counter()
    res["scan_timings"] = time_scans(orig, new, device, dtype, cfg["model"], lengths, cfg["repeats"])
    res["scan_timing_s"] = time.perf_counter() - t0
    stem.write_text(json.dumps(res, indent=1) + "\n")
    print("scans:", res["scan_timings"])
    m2.mamba2_chunk_scan = new  # before mc_retrofit wraps it: base and MC models both run it
    bench_argv = (["--smoke"] if args.smoke else []) + ["--skip-readout", "--out", str(out),
                                                        "--lengths", *map(str, lengths), *rest]
    result = bench_mc.main(bench_argv)
    wrapped = getattr(m2.mamba2_chunk_scan, "__wrapped__", None)  # the op under mc_retrofit's wrapper
    res["mc_wraps_the_triton_scan"] = wrapped is new
    res["bench_mc_argv"] = bench_argv
    res["prefill"] = result["prefill"]
    stem.write_text(json.dumps(res, indent=1) + "\n")
    if wrapped is not new:
        raise SystemExit("mc_retrofit's prefill hook does not wrap the swapped scan: MC numbers are not comparable")
    print(f"wrote {stem}")
    return res


if __name__ == "__main__":
    main()
