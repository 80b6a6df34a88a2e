#!/usr/bin/env bash
# The prepared GPU check (`make gpu-check`): `bash .gpu/check.sh [options]` after `make gpu-pack`.
# bench/gpu_check.py first checks every library the pipeline imports (unzipping packed wheels
# into PACK/site only for what the interpreter lacks), then runs every stage within --deadline
# (default 480 s) and writes $OUT/gpu_check.json (OUT defaults to PACK/out). PACK is this
# script's folder; the repository is its parent unless REPO says otherwise; PYTHON is the
# interpreter holding torch (default python3). Options go to bench/gpu_check.py: --device
# cuda|cpu, --tiny (a few steps: tests the script on a CPU), --deadline SECONDS, --stages a,b.
# Exits 1 when a stage failed or was skipped, 2 when PYTHON cannot run the check at all.
set -uo pipefail
PACK=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "${REPO:-$PACK/..}" && pwd)
PY=${PYTHON:-python3}
OUT=${OUT:-$PACK/out}
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "error: no interpreter $PY here: run with PYTHON=/path/to/the/python/that/has/torch bash $0" >&2
    exit 2
fi
# Found without importing it (seconds): the preflight imports everything once, properly.
if ! "$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)' 2>/dev/null; then
    found=$(for candidate in /opt/conda/bin/python /usr/local/bin/python3 /usr/bin/python3 python; do
                command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' 2>/dev/null \
                    && command -v "$candidate"; done | head -1)
    echo "error: $PY ($(command -v "$PY")) has no torch: run with PYTHON=<the python that has torch> bash $0${found:+ (torch is in $found: PYTHON=$found)}" >&2
    exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO" && exec "$PY" bench/gpu_check.py --pack "$PACK" --out "$OUT" "$@"
