#!/usr/bin/env bash
# Device calls after vLLM is staged (../shared/gpu/README.md), one part per call (a call may run 600 s):
#   bash bench/h200_check.sh checks              GPU tests of the serving path + compile count of the decode kernels
#                                                + the Gluon mma decode against Triton and bf16 (~6 min)
#   bash bench/h200_check.sh serve [B] [KVS]     burst B (default A) for caches KVS (default fp16,kvarn-k4v2+graphs; ~6 min for A)
#   bash bench/h200_check.sh calib               calibration of the Llama-3.1-8B shape, 128 x 2048 (no vLLM needed; goal <= 3 min)
# Results under $OUT (else bench/results); tables printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
out=${OUT:-bench/results}
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | grep -v WARN | tail -2
case "${1:-checks}" in
  checks)
    timeout 200 python3 -m pytest -q tests/ops tests/test_runtime_paged.py tests/test_host_inputs.py 2>&1 | tail -4
    timeout 120 python3 bench/decode_variants_gpu.py --out "$out" 2>&1 | grep -v Warning | tail -4
    timeout 200 python3 bench/decode_mma_gpu.py --out "$out" 2>&1 | grep -v Warning | tail -40 ;;
  serve)
    timeout 580 python3 bench/serve_gpu.py --bursts "${2:-A}" --kv "${3:-fp16,kvarn-k4v2+graphs}" --out "$out" 2>&1 \
      | grep -v "^INFO\|it/s\]\|^(EngineCore\|WARNING\|^\[\|^2026" | tail -12 ;;
  calib)
    timeout 580 python3 bench/calibrate_gpu.py --out "$out" 2>&1 | grep -v "Warn\|calibrating:" | tail -16 ;;
  *) echo "usage: bash bench/h200_check.sh checks|serve [BURST] [KVS]|calib" >&2; exit 2 ;;
esac
