#!/usr/bin/env bash
# The GPU run: mixprec probe, then the lm recipe at a GPU-sized configuration in fp32, tf32,
# bf16-mixed, fp16-mixed and fp8-mixed (benchmarks/gpu_lm.py): tokens/s, model FLOP
# utilization against the probe's measured bf16 peak and the datasheet's, peak memory and,
# where NVML is available, energy per step. Writes OUT/gpu_probe.json, OUT/gpu.json and
# OUT/gpu.md. Under 8 minutes on one H100/H200 once the environment exists.
#
#   bash benchmarks/gpu.sh [--smoke] [--out DIR]      (DIR defaults to benchmarks/results)
#
# On a machine without a CUDA GPU it runs the tiny --smoke configuration and skips what
# needs a GPU (tf32, fp8, energy), so CI can check that it still works.
# The Python: $PYTHON if set, else .venv/bin/python, else a new .venv set up as the
# Makefile does (torch 2.13.0 first; a CUDA torch already installed system-wide is reused).
set -euo pipefail

cd "$(dirname "$0")/.."
SMOKE=0
OUT=benchmarks/results
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (valid: --smoke, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    echo "gpu.sh: creating .venv" >&2
    if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        python3 -m venv --system-site-packages .venv   # reuse the CUDA torch already here
    else
        python3 -m venv .venv
        .venv/bin/python -m pip install -q torch==2.13.0
    fi
    PY=.venv/bin/python
fi
if ! "$PY" -c 'import mixprec' 2>/dev/null; then
    "$PY" -m pip install -q -c constraints.txt -e .
fi

if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    DEVICE=cuda
    # Energy per step needs NVML's Python bindings (the project's `bench` extra).
    "$PY" -c 'import pynvml' 2>/dev/null || "$PY" -m pip install -q -c constraints.txt nvidia-ml-py \
        || echo "gpu.sh: nvidia-ml-py not installed: energy per step will not be reported" >&2
else
    DEVICE=cpu
    if [ "$SMOKE" = 0 ]; then
        echo "gpu.sh: no CUDA GPU here: running the --smoke configuration (GPU-only parts skipped)" >&2
        SMOKE=1
    fi
fi

SIZE=()
PROBE=(--refresh)
if [ "$SMOKE" = 1 ]; then
    SIZE=(--smoke)
    PROBE=(--quick)
fi

echo "== mixprec probe ($DEVICE)" >&2
"$PY" -m mixprec probe --device "$DEVICE" ${PROBE[@]+"${PROBE[@]}"} --json "$OUT/gpu_probe.json"
echo "== lm recipe, every precision ($DEVICE)" >&2
"$PY" benchmarks/gpu_lm.py --device "$DEVICE" ${SIZE[@]+"${SIZE[@]}"} --probe "$OUT/gpu_probe.json" \
    --json "$OUT/gpu.json" --md "$OUT/gpu.md"
echo "gpu.sh: wrote $OUT/gpu_probe.json, $OUT/gpu.json and $OUT/gpu.md in ${SECONDS} s" >&2
