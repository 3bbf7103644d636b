#!/usr/bin/env bash
# run.sh's install step: the carried wheels and this checkout into SITE (a fresh folder that
# run.sh puts first on PYTHONPATH). No index, no build, no network.
#   bash benchmarks/gpu/install.sh SITE WHEEL_DIR [--dry-run]
# --dry-run (CPU rehearsal, any Python): installs only the pure-Python wheels (py3-none-any);
# the compiled ones are for the GPU machine's CPython 3.12. A missing wheel folder is an
# error on the GPU machine and a note in a dry run (CI has no .whl/).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
SITE=$1
WHL=$2
DRY=${3:-}
fail=0
rm -rf "$SITE"
mkdir -p "$SITE"
shopt -s nullglob
wheels=("$WHL"/*.whl)
if [ "$DRY" = --dry-run ]; then
  wheels=("$WHL"/*-none-any.whl)
fi
if [ ${#wheels[@]} -gt 0 ]; then
  echo "installing ${#wheels[@]} wheels into $SITE:"
  printf '  %s\n' "${wheels[@]##*/}"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" || { echo "pip install failed"; fail=1; }
elif [ "$DRY" = --dry-run ]; then
  echo "note: no wheels in $WHL (dry run: using the packages installed here)"
else
  echo "ERROR: no wheels in $WHL: run 'bash benchmarks/gpu/fetch_wheels.sh' on the CPU machine and carry .whl"
  fail=1
fi
echo "installing the checkout (pyproject's package-dir mapping) into $SITE:"
"$PYTHON" "$HERE/install_tree.py" "$SITE" | sed 's/^/  /' || { echo "install_tree failed"; fail=1; }

check() {
  PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'PY'
import warnings
warnings.simplefilter("ignore")
import importlib.metadata as md
import einops, fla, transformers  # noqa: F401
import mc_retrofit, mc_retrofit.cli, mc_retrofit.kernels, mc_retrofit.kernels.capture  # noqa: F401
for mod, dist in (("transformers", "transformers"), ("fla", "flash-linear-attention"), ("einops", "einops"),
                  ("mc_retrofit", "mc-retrofit")):
    m = __import__(mod)
    print(f"  import {mod:<13} {md.version(dist):<10} from {m.__file__}")
PY
}
echo "import check:"
if ! check; then
  if [ -d "$SITE/transformers" ]; then
    echo "the carried transformers does not import here: falling back to the machine's own"
    rm -rf "$SITE"/transformers "$SITE"/transformers-*.dist-info
    echo "carried transformers removed: it did not import" >"$SITE/FALLBACK"
    check || fail=1
  else
    fail=1
  fi
fi
exit $fail
