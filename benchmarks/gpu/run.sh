#!/usr/bin/env bash
# Issue 19's GPU verification run, in one script (benchmarks/gpu/README.md has the device call).
#
#   bash benchmarks/gpu/run.sh OUTDIR                 # on the bare GPU machine, under 8 minutes
#   bash benchmarks/gpu/run.sh OUTDIR --dry-run       # rehearsal on CPU: same steps, tiny sizes
#   bash benchmarks/gpu/run.sh OUTDIR --only bench_mc,pytest   # a rerun of some steps
#
# Steps, each with its own time budget (timeout), log and status; one failing does not stop
# the others, and the whole run stops starting steps MC_GPU_DEADLINE seconds after the start:
#   install       carried wheels (.whl/) + this checkout into a fresh site folder (install.sh)
#   probe         env.json: device, driver, versions, base kernels, measured ceilings (probe.py)
#   bench_mc      read-out kernel vs reference, decode read-out, prefill 4K/16K/32K with
#                 gated, residual and SSC top-4 at segment 256 vs base and SDPA (bench_mc.py)
#   bench_decode  decode step with 0/16/64/128 cached segments vs the base step (bench_decode.py)
#   triton_base   prefill at 32K again with Mamba2's scan swapped for fla's Triton chunk_simple_gla
#                 in base and MC models alike (bench_triton_base.py): the ratios against a Triton base
#   pytest        pytest -m gpu (JUnit XML; skips everything without CUDA)
# After every step OUTDIR holds at most 8 flat files (what the device tool brings back):
#   summary.json env.json mc_bench.json mc_bench.png decode.json decode.png triton_base.json
#   gpu-run.tar.gz (everything: logs, steps.tsv, pytest-gpu.xml, the benchmarks' own files)
# Environment: PYTHON (python3), WHL_DIR (REPO/.whl), MC_GPU_DEADLINE (s, 450; dry run 900),
# T_INSTALL T_PROBE T_BENCH_MC T_BENCH_DECODE T_TRITON_BASE T_PYTEST (per-step budgets, s),
# MC_GPU_PYTEST_WORKERS (xdist workers, 8; dry run 0), MC_GPU_TEST_TIMEOUT (per test, s, 120),
# BENCH_MC_EXTRA / BENCH_DECODE_EXTRA / TRITON_BASE_EXTRA / PYTEST_EXTRA (extra arguments, word-split).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
STEPS_ALL="install probe bench_mc bench_decode triton_base pytest"

usage() { sed -n '2,8p' "$0" >&2; exit 2; }
OUTDIR="" DRY=0 ONLY=""
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|--smoke) DRY=1 ;;
    --only) ONLY=${2:-}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [ -z "$OUTDIR" ] && OUTDIR=$1 || usage ;;
  esac
  shift
done
[ -n "$OUTDIR" ] || usage
for s in ${ONLY//,/ }; do
  case " $STEPS_ALL " in *" $s "*) ;; *) echo "--only: unknown step '$s' (steps: $STEPS_ALL)" >&2; exit 2 ;; esac
done

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
OUTFILES="summary.json env.json mc_bench.json mc_bench.png decode.json decode.png triton_base.json gpu-run.tar.gz"
for f in $OUTFILES pytest-gpu.xml; do rm -f "$OUTDIR/$f"; done  # a rerun into one folder shows its own files only
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mc-gpu-run.XXXXXX")
SITE=$(mktemp -d "${TMPDIR:-/tmp}/mc-gpu-site.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
WHL=${WHL_DIR:-$REPO/.whl}
START=$(date +%s)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [ $DRY = 1 ]; then
  MODE=dry-run
  DEADLINE=${MC_GPU_DEADLINE:-900}
  : "${T_INSTALL:=120}" "${T_PROBE:=90}" "${T_BENCH_MC:=240}" "${T_BENCH_DECODE:=120}" "${T_TRITON_BASE:=120}"
  : "${T_PYTEST:=240}"
  WORKERS=${MC_GPU_PYTEST_WORKERS:-0}
else
  MODE=gpu
  DEADLINE=${MC_GPU_DEADLINE:-450}
  : "${T_INSTALL:=60}" "${T_PROBE:=45}" "${T_BENCH_MC:=180}" "${T_BENCH_DECODE:=75}" "${T_TRITON_BASE:=90}"
  : "${T_PYTEST:=200}"
  WORKERS=${MC_GPU_PYTEST_WORKERS:-8}  # 16 cores: Triton compiles and fla's autotuning in parallel
fi
RESERVE=12  # seconds kept back at the deadline for the last summary and pack

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHON
unset MC_RETROFIT_FORCE_REFERENCE MC_RETROFIT_FORCE_TRITON  # the benchmarks pick their paths themselves

echo "== mc-retrofit issue 19 GPU run: mode=$MODE out=$OUTDIR work=$WORK python=$PYTHON deadline=${DEADLINE}s"
if [ $DRY = 0 ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "warning: no nvidia-smi here; did you mean --dry-run?"
fi

selected() {  # install and probe always run: later steps need them, and they are cheap
  [ -z "$ONLY" ] && return 0
  case "$1" in install|probe) return 0 ;; esac
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  return 1
}

collect() {  # summary.json + the flat copies + the tarball, after every step (a kill keeps the last)
  "$PYTHON" "$HERE/summarize.py" "$WORK" --mode "$MODE" --started "$STARTED" --args "$ARGS" \
    >"$WORK/summary.txt" 2>&1 || echo "summarize.py failed: see summary.txt in the tarball" >&2
  local f
  for f in summary.json env.json; do
    [ -f "$WORK/$f" ] && cp -f "$WORK/$f" "$OUTDIR/$f"
  done
  for f in json png; do
    local m d
    m=$(ls -t "$WORK"/mc_bench/*."$f" 2>/dev/null | head -1)
    d=$(ls -t "$WORK"/decode/*."$f" 2>/dev/null | head -1)
    [ -n "$m" ] && cp -f "$m" "$OUTDIR/mc_bench.$f"
    [ -n "$d" ] && cp -f "$d" "$OUTDIR/decode.$f"
  done
  f=$(ls -t "$WORK"/triton_base/triton_base-*.json 2>/dev/null | head -1)
  [ -n "$f" ] && cp -f "$f" "$OUTDIR/triton_base.json"
  # built beside WORK, then moved: a kill mid-pack leaves the last whole tarball and no ninth file in OUTDIR
  tar czf "$WORK.tar.gz" -C "$WORK" . 2>/dev/null && mv -f "$WORK.tar.gz" "$OUTDIR/gpu-run.tar.gz"
}

run_step() {  # NAME BUDGET COMMAND...
  local name=$1 budget=$2
  shift 2
  local cmd t0 secs rc status left t
  cmd=$(printf '%q ' "$@")
  cmd=${cmd% }
  if ! selected "$name"; then
    printf '%s\tskipped\t\t0\t0\t%s\n' "$name" "$cmd" >>"$WORK/steps.tsv"
    return
  fi
  left=$((DEADLINE - ($(date +%s) - START) - RESERVE))
  t=$budget
  [ "$left" -lt "$t" ] && t=$left
  if [ "$t" -lt 5 ]; then
    echo "== [$name] not started: the run's deadline (${DEADLINE}s) is reached"
    printf '%s\tdeadline\t\t0\t%s\t%s\n' "$name" "$budget" "$cmd" >>"$WORK/steps.tsv"
    collect
    return
  fi
  echo "== [$name] budget ${t}s: $cmd"
  t0=$(date +%s)
  (cd "$REPO" && timeout --kill-after=10 "$t" "$@") >"$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  case $rc in
    0) status=pass ;;
    124|137) status=timeout ;;
    *) status=fail ;;
  esac
  echo "   [$name] $status (rc=$rc) in ${secs}s; last lines of logs/$name.log:"
  tail -n 4 "$LOGS/$name.log" | cut -c1-200 | sed 's/^/     | /'
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$t" "$cmd" >>"$WORK/steps.tsv"
  collect
}

# ---- the steps --------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  run_step install "$T_INSTALL" bash "$HERE/install.sh" "$SITE" "$WHL" --dry-run
  run_step probe "$T_PROBE" "$PYTHON" "$HERE/probe.py" "$WORK/env.json"
  # shellcheck disable=SC2086
  run_step bench_mc "$T_BENCH_MC" "$PYTHON" benchmarks/bench_mc.py --smoke --out "$WORK/mc_bench" \
    --lengths 64 128 --segments 16 --aggs gated residual ssc --top-k 4 ${BENCH_MC_EXTRA:-}
  # shellcheck disable=SC2086
  run_step bench_decode "$T_BENCH_DECODE" "$PYTHON" benchmarks/bench_decode.py --smoke --out "$WORK/decode" \
    --aggregations gated ssc ${BENCH_DECODE_EXTRA:-}
  # shellcheck disable=SC2086
  run_step triton_base "$T_TRITON_BASE" "$PYTHON" "$HERE/bench_triton_base.py" --smoke --out "$WORK/triton_base" \
    --lengths 64 --segments 16 --aggs gated ssc --top-k 4 ${TRITON_BASE_EXTRA:-}
else
  run_step install "$T_INSTALL" bash "$HERE/install.sh" "$SITE" "$WHL"
  run_step probe "$T_PROBE" "$PYTHON" "$HERE/probe.py" "$WORK/env.json" --measure
  # shellcheck disable=SC2086
  run_step bench_mc "$T_BENCH_MC" "$PYTHON" benchmarks/bench_mc.py --out "$WORK/mc_bench" \
    --lengths 4096 16384 32768 --segments 256 --aggs gated residual ssc --top-k 4 ${BENCH_MC_EXTRA:-}
  # shellcheck disable=SC2086
  run_step bench_decode "$T_BENCH_DECODE" "$PYTHON" benchmarks/bench_decode.py --out "$WORK/decode" \
    --segments 0 16 64 128 --segment-size 64 --steps 30 --aggregations gated residual ssc ${BENCH_DECODE_EXTRA:-}
  # shellcheck disable=SC2086
  run_step triton_base "$T_TRITON_BASE" "$PYTHON" "$HERE/bench_triton_base.py" --out "$WORK/triton_base" \
    --lengths 32768 --segments 256 --aggs gated residual ssc --top-k 4 ${TRITON_BASE_EXTRA:-}
fi
pytest_args=(-m pytest -m gpu -v -rfEs -p no:cacheprovider --durations=15 --junitxml="$WORK/pytest-gpu.xml")
if [ "$WORKERS" -gt 0 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
  pytest_args+=(-n "$WORKERS")
fi
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
  pytest_args+=(--timeout="${MC_GPU_TEST_TIMEOUT:-120}")
fi
# shellcheck disable=SC2086
run_step pytest "$T_PYTEST" "$PYTHON" "${pytest_args[@]}" ${PYTEST_EXTRA:-} tests

# ---- the end ----------------------------------------------------------------------------
collect
echo "== done in $(($(date +%s) - START))s; $OUTDIR:"
ls -l "$OUTDIR" | tail -n +2 | awk '{printf "   %10d  %s\n", $5, $9}'
n=$(find "$OUTDIR" -maxdepth 1 -type f ! -name '.*' | wc -l)
big=$(find "$OUTDIR" -type f -size +16M | wc -l)
[ "$n" -le 8 ] || echo "warning: $n files in $OUTDIR; the device tool brings back 8"
[ "$big" -eq 0 ] || echo "warning: $big file(s) over 16 MiB in $OUTDIR; the device tool leaves them out"
cat "$WORK/summary.txt" 2>/dev/null || echo "warning: no summary"
rm -rf "$SITE"
[ "${MC_GPU_KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
