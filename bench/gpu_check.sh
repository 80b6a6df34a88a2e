#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`): `bash .gpu/check.sh [options]` after `make gpu-pack`.
# Installs the packed wheels (no network), then bench/gpu_check.py runs every stage and writes
# $OUT/gpu_check.json (OUT defaults to PACK/out). PACK is this script's folder; the repository is
# its parent unless REPO says otherwise; PYTHON is the interpreter holding torch (default python3).
# Options go to bench/gpu_check.py: --device cuda|cpu, --tiny (a few steps: tests the script on a CPU).
set -uo pipefail
PACK=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "${REPO:-$PACK/..}" && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$PACK/out}
mkdir -p "$OUT"
if ls "$PACK"/wheels/*.whl > /dev/null 2>&1; then
  if ! "$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
      --target "$PACK/site" --upgrade "$PACK"/wheels/*.whl; then
    echo "gpu check: installing the packed wheels failed" >&2
  fi
  export PYTHONPATH="$PACK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO" && exec "$PY" bench/gpu_check.py --pack "$PACK" --out "$OUT" "$@"
