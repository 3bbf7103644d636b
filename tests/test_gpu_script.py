"""benchmarks/gpu/: issue 19's prepared GPU run. CI has no GPU, so this checks the script's
plumbing on CPU, cheaply: bash syntax, a dry run of its two smallest steps (install without
wheels + probe: the steps file, the summary, the flat files and the tarball), the target
read-out on GPU-shaped benchmark JSON, and the bench_mc.py flags the GPU grid uses. The full
rehearsal (every step, ~1-2 minutes here) is `bash benchmarks/gpu/run.sh /tmp/gpu-dry --dry-run`."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shell_scripts_parse():
    for script in ("run.sh", "install.sh", "fetch_wheels.sh"):
        proc = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_dry_run_smallest_steps(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "WHL_DIR": str(tmp_path / "no-wheels"), "TMPDIR": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(GPU / "run.sh"), str(out), "--dry-run", "--only", "probe"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["install", "probe", "bench_mc", "bench_decode", "triton_base", "pytest"]
    assert steps["install"]["status"] == "pass" and steps["probe"]["status"] == "pass", proc.stdout
    assert {steps[n]["status"] for n in ("bench_mc", "bench_decode", "triton_base", "pytest")} == {"skipped"}
    assert summary["mode"] == "dry-run" and summary["all_steps_passed"] is True
    assert summary["versions"]["torch"] and summary["base_kernels"]["mc_readout"].startswith("PyTorch reference")
    assert set(summary["targets"]) >= {"prefill_gated_vs_base", "prefill_ssc_vs_base", "prefill_speedup_vs_sdpa",
                                       "readout_kernel_speedup", "readout_roofline_fraction", "decode_128_vs_base"}
    env_json = json.loads((out / "env.json").read_text())
    assert env_json["imported_from"]["mc_retrofit"].startswith(str(tmp_path))  # the copy install.sh made
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.json", "gpu-run.tar.gz", "summary.json"] and len(files) <= 8
    with tarfile.open(out / "gpu-run.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./steps.tsv", "./summary.json", "./summary.txt", "./logs/install.log", "./logs/probe.log"} <= names
    assert "install" in proc.stdout and "targets" not in proc.stderr
    assert not list(tmp_path.glob("mc-gpu-*"))  # work and site folders cleaned up


def test_targets_read_off_gpu_shaped_results():
    s = _module(GPU / "summarize.py", "gpu_summarize")
    pre = {"length": 32768, "base_s": 1.0, "sdpa_transformer_s": 4.0, "mc_gated_256_s": 1.2, "mc_gated_256_vs_base": 1.2,
           "mc_gated_256_speedup_vs_sdpa": 4.0 / 1.2, "mc_ssc_256_vs_base": 1.15, "mc_residual_256_vs_base": 1.1}
    mc = {"settings": {"segments": [256], "aggs": ["gated", "residual", "ssc"], "top_k": 4},
          "prefill": [dict(pre, length=4096), pre], "peaks": {"hbm_GBps": 4800.0},
          "readout": [{"N": 128, "aggregation": a, "T": 256, "reference_s": 1e-3, "kernel_s": 1e-4, "speedup": sp,
                       "GBps": 3000.0, "TFLOPs": 100.0, "bw_fraction": 0.625, "tf32_fraction": 0.2, "bound": "memory"}
                      for a, sp in (("gated", 10.0), ("ssc", 2.5))],
          "decode": [{"N": 128, "aggregation": "gated", "reference_s": 2e-4, "kernel_s": 2e-5, "speedup": 10.0}]}
    dec = {"names": ["gated", "gated_cap8"], "model": "builtin:mamba2-byte",
           "rows": [{"N": 0, "base_s": 1e-3, "gated_vs_base": 1.1}, {"N": 128, "base_s": 1e-3, "gated_vs_base": 1.4,
                                                                     "gated_cap8_vs_base": 1.2, "gated_cached": 128}]}
    env = {"ceilings": {"copy_GBps": 4300.0, "matmul_tf32_TFLOPs": 400.0, "matmul_bf16_TFLOPs": 780.0}}
    tb_mc = {"settings": mc["settings"], "prefill": [dict(pre, mc_gated_256_vs_base=1.3, mc_ssc_256_vs_base=1.05)]}
    tb = {"scan": "fla", "check": [{"ok": True}], "mc_wraps_the_triton_scan": True}
    t = s.targets(mc, dec, env, tb_mc, tb)
    assert t["prefill_gated_vs_triton_base"]["status"] == "missed" and t["prefill_ssc_vs_triton_base"]["status"] == "met"
    assert t["prefill_speedup_vs_sdpa_triton_base"]["status"] == "met" and t["triton_base_scan"]["check"][0]["ok"]
    assert t["prefill_gated_vs_base"]["status"] == "met" and t["prefill_gated_vs_base"]["value"] == 1.2
    assert t["prefill_ssc_vs_base"]["status"] == "missed"
    assert t["prefill_speedup_vs_sdpa"]["status"] == "met"
    assert t["readout_kernel_speedup"]["status"] == "missed" and t["readout_kernel_speedup"]["value"] == 2.5
    roof = t["readout_roofline_fraction"]
    assert roof["status"] == "met" and abs(roof["detail"]["per_aggregation"]["gated"]["bw_fraction_measured_copy"]
                                           - 3000 / 4300) < 1e-9
    assert t["decode_128_vs_base"]["status"] == "missed" and t["decode_128_vs_base"]["detail"]["N"] == 128
    assert t["decode_readout_kernel_at_N128"]["gated"]["speedup"] == 10.0
    empty = s.targets(None, None, None)
    assert {v["status"] for v in empty.values()} == {"no data"}


def test_bench_mc_grid_flags(tmp_path, monkeypatch):
    bench = _module(ROOT / "benchmarks" / "bench_mc.py", "bench_mc_gpu_flags")
    monkeypatch.delenv("MC_RETROFIT_FORCE_REFERENCE", raising=False)
    result = bench.main(["--smoke", "--out", str(tmp_path), "--lengths", "32", "--segments", "16", "--aggs", "ssc",
                         "--top-k", "3", "--skip-readout"])
    assert result["readout"] == [] and result["decode"] == [] and result["settings"]["top_k"] == 3
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    (entry,) = data["prefill"]
    assert entry["mc_ssc_16_vs_base"] > 0 and not any(k.startswith(("mc_gated", "mc_residual")) for k in entry)


def test_tests_counted_from_a_cut_off_log(tmp_path):
    """No JUnit XML (pytest killed at its budget): the -v lines of the log still count."""
    s = _module(GPU / "summarize.py", "gpu_summarize_log")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "pytest.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_fla_gpu.py::test_cpu_routing_equals_triton[gla]\n"
        "[gw1] [ 20%] FAILED tests/test_kernels_readout.py::test_forward[ssc-vk]\n"
        "tests/test_one_pass.py::test_cuda_default_path_equals_the_cpu_loop[gated] SKIPPED (needs CUDA)\n")
    t = s.tests(tmp_path)
    assert (t["passed"], t["failed"], t["skipped"]) == (1, 1, 1)
    assert t["failures"] == ["tests/test_kernels_readout.py::test_forward[ssc-vk]"]
