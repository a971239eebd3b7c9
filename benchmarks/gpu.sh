#!/usr/bin/env bash
# Throughput table on one GPU: collect, PCA, CKA matrix, TopK SAE (tokens/s, % of bf16 peak).
#   benchmarks/gpu.sh                 # GPU sizes; finishes in under 8 minutes on one H100/H200
#   benchmarks/gpu.sh --cpu-smoke     # tiny sizes on the CPU: checks that the script works
# Extra arguments go to benchmarks/gpu_bench.py (--tokens, --d-sae, --k, --sae-steps, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
if [ "${1:-}" != "--cpu-smoke" ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# the whole run is capped at 8 minutes (GPU sizes are chosen to take well under that)
exec timeout "${GPU_BENCH_TIMEOUT:-480}" "$PY" benchmarks/gpu_bench.py "$@"
