#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`): `bash .gpu/check.sh [options]` after `make gpu-pack`.
# bench/gpu_check.py installs the packed wheels (no network, one at a time, into PACK/site),
# runs every stage within --deadline (default 480 s) and writes $OUT/gpu_check.json (OUT
# defaults to PACK/out). PACK is this script's folder; the repository is its parent unless REPO
# says otherwise; PYTHON is the interpreter holding torch (default python3). Options go to
# bench/gpu_check.py: --device cuda|cpu, --tiny (a few steps: tests the script on a CPU),
# --deadline SECONDS, --stages a,b. Exits 1 when a stage failed or was skipped.
set -uo pipefail
PACK=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "${REPO:-$PACK/..}" && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$PACK/out}
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO" && exec "$PY" bench/gpu_check.py --pack "$PACK" --out "$OUT" "$@"
