#!/usr/bin/env bash
# Every GPU figure of the project in one run (under 12 minutes on one H200), installing nothing it can avoid:
#   1. benchmarks/router_kernel.py   fused Triton router vs eager PyTorch (T=16384, d=2048, E=64, k=8, bf16)
#   2. benchmarks/gpu_cache_policies.py   (six cache policies at T = 8,192: FlexAttention and block-sparse vs dense)
#   2b. benchmarks/pikv_tables.py --device cuda   (the seed's performance and compression tables, bf16, 8k context)
#   3. the CUDA tests (pytest -m gpu: FlexAttention training forward/backward vs the CPU masks), when
#      pytest and lightning are importable
# Results land in benchmarks/results/*.json and on stdout.
#   bash benchmarks/gpu.sh             # on a CUDA machine
#   bash benchmarks/gpu.sh --dry-run   # CPU dry runs (interpreted Triton, tiny shapes)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Use the checkout directly (no install): pikv_kernels is mapped from ./kernels by the benchmark itself.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import torch, triton" 2>/dev/null; then
  echo "gpu.sh: installing triton (torch must already be installed)" >&2
  "$PY" -m pip install -q "triton>=3.0" || { echo "gpu.sh: torch + triton are required" >&2; exit 1; }
fi

DRY=()
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); fi

start=$(date +%s)
status=0
echo "== router kernel =="
timeout 120 "$PY" benchmarks/router_kernel.py "${DRY[@]}" || status=$?
if [ -f benchmarks/gpu_cache_policies.py ]; then
  echo "== cache policies =="
  timeout 240 "$PY" benchmarks/gpu_cache_policies.py --reps 5 "${DRY[@]}" || status=$?
else
  echo "== cache policies: benchmarks/gpu_cache_policies.py not present, skipped =="
fi
if [ ${#DRY[@]} -eq 0 ]; then
  # The seed's two tables on the GPU: bf16 decoding at an 8,192-token context, fits in bf16 mixed precision
  # (benchmarks/results/pikv_tables_gpu.{json,md}); fewer steps than the CPU run to fit the device budget.
  echo "== PiKV tables (benchmarks/pikv_tables.py --device cuda) =="
  timeout 420 "$PY" benchmarks/pikv_tables.py --device cuda --dtype bf16 --context 8192 --steps 40 --val-batches 4 \
    --decode-steps 32 || status=$?
fi
if [ ${#DRY[@]} -eq 0 ] && "$PY" -c "import pytest, lightning" 2>/dev/null; then
  echo "== GPU tests (pytest -m gpu) =="
  timeout 180 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider || status=$?
fi
echo "gpu.sh: done in $(( $(date +%s) - start )) s (exit $status)"
exit $status
