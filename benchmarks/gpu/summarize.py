"""Summary of a benchmarks/gpu/run.sh run: which steps passed, the tests, and the
issue-19 targets read off the benchmark JSONs.

    python benchmarks/gpu/summarize.py WORK [--mode gpu|dry-run] [--started ISO]

Reads WORK/steps.tsv (one line per finished step, written by run.sh), WORK/env.json
(probe.py), WORK/mc_bench/*.json (bench_mc.py), WORK/decode/*.json (bench_decode.py)
and WORK/pytest-gpu.xml or WORK/logs/pytest.log; writes WORK/summary.json and prints a
short table. Standard library only (runs even when torch does not import), and safe on
a half-finished run: what is missing is reported as missing.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

# issue 19's targets: (key, description, comparison, threshold)
TARGETS = [
    ("prefill_gated_vs_base", "gated MC prefill at 32K, segment 256, time / base model's", "<=", 1.25),
    ("prefill_ssc_vs_base", "SSC top-4 MC prefill at 32K, segment 256, time / base model's", "<=", 1.10),
    ("prefill_speedup_vs_sdpa", "same-size SDPA Transformer prefill time / gated MC's, at 32K", ">=", 3.0),
    ("readout_kernel_speedup", "read-out kernel vs PyTorch reference (slowest row of the grid)", ">=", 3.0),
    ("readout_roofline_fraction", "read-out kernel, fraction of roofline at the largest N (worst aggregation; "
                                  "the larger of bandwidth and tf32 fractions)", ">=", 0.60),
    ("decode_128_vs_base", "decode step with 128 cached segments (gated, uncapped), time / base step", "<=", 1.30),
    # the same prefill targets with Mamba2's scan swapped for fla's Triton kernel in base and MC (triton_base step)
    ("prefill_gated_vs_triton_base", "gated MC prefill at 32K, segment 256, / base, both on fla's Triton scan", "<=", 1.25),
    ("prefill_ssc_vs_triton_base", "SSC top-4 MC prefill at 32K, segment 256, / base, both on fla's Triton scan", "<=",
     1.10),
    ("prefill_speedup_vs_sdpa_triton_base", "SDPA Transformer prefill / gated MC's on fla's Triton scan, at 32K", ">=",
     3.0),
]


def _load(path: Path | None):
    if path is None or not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"_error": f"{path.name}: {e}"}


def _newest(folder: Path, pattern: str) -> Path | None:
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime) if folder.exists() else []
    return files[-1] if files else None


def steps(work: Path) -> list[dict]:
    out = []
    f = work / "steps.tsv"
    if not f.exists():
        return out
    for line in f.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 6:
            continue
        name, status, rc, seconds, budget, cmd = parts[:6]
        log = work / "logs" / f"{name}.log"
        rec = dict(name=name, status=status, rc=None if rc == "" else int(rc), seconds=int(seconds),
                   budget_s=int(budget), command=cmd, log=f"logs/{name}.log")
        if status not in ("pass", "skipped") and log.exists():
            rec["log_tail"] = log.read_text(errors="replace").splitlines()[-25:]
        out.append(rec)
    return out


def tests(work: Path) -> dict:
    xml = work / "pytest-gpu.xml"
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
            res = dict(source="pytest-gpu.xml", passed=0, failed=0, errors=0, skipped=0, failures=[], skip_reasons=[])
            for case in root.iter("testcase"):
                name = f"{case.get('classname')}::{case.get('name')}"
                kinds = {child.tag for child in case}
                if "failure" in kinds:
                    res["failed"] += 1
                    msg = case.find("failure").get("message", "")
                    res["failures"].append(f"{name}: {msg[:300]}")
                elif "error" in kinds:
                    res["errors"] += 1
                    res["failures"].append(f"{name}: ERROR {case.find('error').get('message', '')[:300]}")
                elif "skipped" in kinds:
                    res["skipped"] += 1
                    reason = case.find("skipped").get("message", "")
                    if reason not in res["skip_reasons"]:
                        res["skip_reasons"].append(reason[:200])
                else:
                    res["passed"] += 1
            return res
        except ET.ParseError as e:
            return dict(source="pytest-gpu.xml", error=str(e))
    log = work / "logs" / "pytest.log"
    if not log.exists():
        return dict(source=None, note="no pytest output")
    # a run cut off before it wrote its XML: count the per-test lines of -v output
    text = log.read_text(errors="replace")
    found = re.findall(r"(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED)|(PASSED|FAILED|ERROR|SKIPPED)\s+(tests/\S+::\S+)",
                       text)
    status = {}
    for a, b, c, d in found:
        status[a or d] = b or c
    counts = {k.lower(): sum(1 for v in status.values() if v == k) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return dict(source="logs/pytest.log (no XML: cut off?)", **counts,
                failures=[k for k, v in status.items() if v in ("FAILED", "ERROR")])


def _target(key, value, detail=None):
    desc, op, thr = next((d, o, t) for k, d, o, t in TARGETS if k == key)
    if value is None:
        status = "no data"
    else:
        status = "met" if (value <= thr if op == "<=" else value >= thr) else "missed"
    return dict(target=f"{op} {thr}", what=desc, value=None if value is None else round(value, 4), status=status,
                **({"detail": detail} if detail else {}))


def prefill_targets(mc: dict | None, suffix: str = "") -> dict:
    out = {}
    pre = (mc or {}).get("prefill") or []
    settings = (mc or {}).get("settings") or {}
    seg = 256 if 256 in settings.get("segments", []) else (settings.get("segments") or [None])[0]
    entry = max(pre, key=lambda e: e["length"]) if pre else None
    want = 32768
    note = None
    if entry and entry["length"] != want:
        note = f"longest length measured is {entry['length']}, not {want}"
    extra = lambda **kw: {k: v for k, v in dict(kw, note=note).items() if v is not None}  # noqa: E731
    g = entry and entry.get(f"mc_gated_{seg}_vs_base")
    out["prefill_gated_vs_base"] = _target("prefill_gated_vs_base", g, extra(
        length=entry and entry["length"], segment=seg, base_s=entry and entry.get("base_s"),
        mc_s=entry and entry.get(f"mc_gated_{seg}_s"), residual_vs_base=entry and entry.get(f"mc_residual_{seg}_vs_base"),
        error=entry and entry.get(f"mc_gated_{seg}_error")))
    s = entry and entry.get(f"mc_ssc_{seg}_vs_base")
    out["prefill_ssc_vs_base"] = _target("prefill_ssc_vs_base", s, extra(
        length=entry and entry["length"], segment=seg, top_k=settings.get("top_k"),
        error=entry and entry.get(f"mc_ssc_{seg}_error")))
    sp = entry and entry.get(f"mc_gated_{seg}_speedup_vs_sdpa")
    out["prefill_speedup_vs_sdpa"] = _target("prefill_speedup_vs_sdpa", sp, extra(
        length=entry and entry["length"], sdpa_s=entry and entry.get("sdpa_transformer_s"),
        base_speedup_vs_sdpa=(entry["sdpa_transformer_s"] / entry["base_s"])
        if entry and entry.get("sdpa_transformer_s") and entry.get("base_s") else None,
        all_aggregations={a: entry.get(f"mc_{a}_{seg}_speedup_vs_sdpa") for a in settings.get("aggs", [])}
        if entry else None))
    if suffix:  # same measurements, other keys and descriptions
        renamed = {}
        for key, v in out.items():
            new = key.replace("_vs_base", f"_vs{suffix}") if "_vs_base" in key else key + suffix
            desc = next(d for k, d, _, _ in TARGETS if k == new)
            renamed[new] = dict(v, what=desc)
        out = renamed
    return out


def targets(mc: dict | None, dec: dict | None, env: dict | None, tb_mc: dict | None = None,
            tb: dict | None = None) -> dict:
    out = prefill_targets(mc)
    rows = [r for r in (mc or {}).get("readout") or [] if r.get("speedup")]
    if rows:
        worst = min(rows, key=lambda r: r["speedup"])
        out["readout_kernel_speedup"] = _target("readout_kernel_speedup", worst["speedup"], dict(
            slowest_row=dict(N=worst["N"], aggregation=worst["aggregation"], T=worst["T"]),
            median=statistics.median(r["speedup"] for r in rows),
            rows={f"{r['aggregation']}_N{r['N']}": round(r["speedup"], 3) for r in rows}))
    else:
        out["readout_kernel_speedup"] = _target("readout_kernel_speedup", None, dict(
            note="no kernel timings (CPU run: the reference stands in)") if mc else None)
    big = [r for r in (mc or {}).get("readout") or [] if r.get("kernel_s")]
    if big:
        nmax = max(r["N"] for r in big)
        big = [r for r in big if r["N"] == nmax]
        ceil = (env or {}).get("ceilings") if isinstance((env or {}).get("ceilings"), dict) else None
        per = {}
        for r in big:
            d = dict(bound=r.get("bound"), bw_fraction_datasheet=r.get("bw_fraction"),
                     tf32_fraction_datasheet=r.get("tf32_fraction"), GBps=r.get("GBps"), TFLOPs=r.get("TFLOPs"))
            if ceil and r.get("GBps"):
                d["bw_fraction_measured_copy"] = r["GBps"] / ceil["copy_GBps"]
                d["tf32_fraction_measured_matmul"] = r["TFLOPs"] / ceil["matmul_tf32_TFLOPs"]
            fr = [v for v in (r.get("bw_fraction"), r.get("tf32_fraction")) if v is not None]
            d["fraction"] = max(fr) if fr else None
            per[r["aggregation"]] = d
        vals = [d["fraction"] for d in per.values() if d["fraction"] is not None]
        out["readout_roofline_fraction"] = _target("readout_roofline_fraction", min(vals) if vals else None, dict(
            N=nmax, peaks_datasheet=(mc or {}).get("peaks"), ceilings_measured=ceil, per_aggregation=per,
            note="fractions against bench_mc.py's datasheet peaks; *_measured_* against probe.py's copy/matmul"))
    else:
        out["readout_roofline_fraction"] = _target("readout_roofline_fraction", None)
    drows = (dec or {}).get("rows") or []
    d128 = next((r for r in drows if r["N"] == 128), None)
    note = None
    if d128 is None and drows:
        d128, note = max(drows, key=lambda r: r["N"]), "no N=128 row: the largest N measured instead"
    names = (dec or {}).get("names") or []
    out["decode_128_vs_base"] = _target("decode_128_vs_base", d128 and d128.get("gated_vs_base"), {k: v for k, v in dict(
        N=d128 and d128["N"], base_step_s=d128 and d128.get("base_s"),
        all={n: d128.get(f"{n}_vs_base") for n in names} if d128 else None,
        cached={n: d128.get(f"{n}_cached") for n in names} if d128 else None,
        model=(dec or {}).get("model"), note=note).items() if v is not None})
    # the decode read-out kernel alone (bench_mc.py's section c), at N=128
    krows = [r for r in (mc or {}).get("decode") or [] if r["N"] == 128 and r.get("speedup")]
    if krows:
        out["decode_readout_kernel_at_N128"] = {r["aggregation"]: dict(kernel_s=r["kernel_s"], reference_s=r["reference_s"],
                                                                       speedup=r["speedup"]) for r in krows}
    out.update(prefill_targets(tb_mc, suffix="_triton_base"))
    if tb:
        out["triton_base_scan"] = {k: tb.get(k) for k in ("scan", "replaces", "check", "scan_timings",
                                                          "mc_wraps_the_triton_scan")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work")
    ap.add_argument("--mode", default="gpu")
    ap.add_argument("--started")
    ap.add_argument("--args", default="")
    args = ap.parse_args(argv)
    work = Path(args.work)
    env = _load(work / "env.json")
    mc_path, dec_path = _newest(work / "mc_bench", "*.json"), _newest(work / "decode", "*.json")
    mc, dec = _load(mc_path), _load(dec_path)
    tb_path, tb_mc_path = _newest(work / "triton_base", "triton_base-*.json"), _newest(work / "triton_base", "mc_bench-*.json")
    tb, tb_mc = _load(tb_path), _load(tb_mc_path)
    ok = lambda d: d if isinstance(d, dict) and "_error" not in d else None  # noqa: E731
    st = steps(work)
    summary = dict(
        issue=19, mode=args.mode, run_sh_args=args.args, started=args.started,
        device=(env or {}).get("device"), date=(env or {}).get("date"), versions=(env or {}).get("versions"),
        git_commit=(env or {}).get("git_commit"), base_kernels=(env or {}).get("base_kernels"),
        ceilings=(env or {}).get("ceilings"),
        steps=st, all_steps_passed=bool(st) and all(s["status"] in ("pass", "skipped") for s in st),
        tests=tests(work), targets=targets(ok(mc), ok(dec), env, ok(tb_mc), ok(tb)),
        files=dict(env="env.json", mc_bench=mc_path and mc_path.name, decode=dec_path and dec_path.name,
                   triton_base=tb_path and tb_path.name, triton_base_mc_bench=tb_mc_path and tb_mc_path.name),
    )
    if args.mode != "gpu":
        summary["note"] = "dry run on CPU with tiny sizes: the numbers mean nothing; gpu tests skip without CUDA"
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    # the short table the run tool's output tail carries back
    print(f"== issue 19 GPU run ({args.mode}) on {summary['device']}")
    for s in st:
        print(f"  step {s['name']:<12} {s['status']:<8} rc={s['rc']} {s['seconds']:>4}s / {s['budget_s']}s")
    t = summary["tests"]
    print(f"  tests: passed {t.get('passed')} failed {t.get('failed')} errors {t.get('errors')} "
          f"skipped {t.get('skipped')}  ({t.get('source')})")
    for f in (t.get("failures") or [])[:10]:
        print(f"    FAIL {f[:200]}")
    for k, v in summary["targets"].items():
        if "status" in v:
            val = "-" if v["value"] is None else f"{v['value']:.3f}"
            print(f"  {k:<36} {val:>8} target {v['target']:<7} {v['status']}")
    return summary


if __name__ == "__main__":
    main()
