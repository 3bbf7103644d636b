#!/usr/bin/env bash
# Download, here (where PyPI is reachable), exactly the wheels benchmarks/gpu/run.sh installs
# on the bare GPU machine, which has no package index. Into .whl/ at the repo root (ignored by
# git through .git/info/exclude; the device tool's `run` carries it with carry=[".whl"]).
#
#   bash benchmarks/gpu/fetch_wheels.sh            # PYTHON=python3, .whl/, CPython 3.12 x86-64
#
# The nvidia-h200 machine (/work/.library/device/KINDS.md): python3 is CPython 3.12.3 with torch
# 2.11, triton 3.6, transformers 5.17, accelerate, safetensors 0.8.0, click, pytest, hypothesis,
# einops, huggingface_hub 1.33, tokenizers 0.23.2, matplotlib, rich, tqdm, packaging, ...; it lacks
# fla. What mc_retrofit, kernels/, benchmarks/ and the gpu tests import that it lacks or has in a
# version outside the project's window:
#   fla-core, flash-linear-attention  - not there (fla-core needs einops; fla needs transformers>=5.6.2)
#   transformers 5.24.0               - the project's tested window is >=5.23,<5.25 (the machine's 5.17
#                                       is older than the cache-argument rename the adapters handle);
#                                       5.24 needs huggingface-hub>=1.31,<3 and tokenizers>=0.23.1,<0.24
#                                       (the machine's 1.33 and 0.23.2 fit) and regex>=2025.10.22:
#   regex                             - version there unknown, and transformers checks it at import
#   einops                            - there already; carried anyway (64 KB) so fla-core's need is fixed
# Not carried: datasets (only mc_retrofit.eval.text and a CPU test import it, lazily), torch and
# triton (the machine's builds go with its driver; far over the 64 MiB the tree may carry).
# run.sh falls back to the machine's transformers if the carried one does not import there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
DEST=${WHL_DIR:-.whl}
PYVER=${GPU_PYTHON_VERSION:-3.12}
WHEELS=(
  fla-core==0.6.0
  flash-linear-attention==0.6.0
  einops==0.8.2
  transformers==5.24.0
  regex==2026.11.19
)
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >>"$exclude"
rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
for w in "${WHEELS[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$DEST" "$w"
done
n=$(ls "$DEST"/*.whl | wc -l)
[ "$n" -eq "${#WHEELS[@]}" ] || { echo "expected ${#WHEELS[@]} wheels in $DEST, found $n" >&2; exit 1; }
ls -l "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$n wheels, $((total / 1024)) KiB in $DEST (the tree carried to the device may be 64 MiB in all)"
[ "$total" -lt $((40 * 1024 * 1024)) ] || { echo "wheels over 40 MiB: leave room for the tree" >&2; exit 1; }
