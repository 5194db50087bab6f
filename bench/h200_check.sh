#!/usr/bin/env bash
# One device call after vLLM is staged (../shared/gpu/README.md): the GPU tests of the serving path,
# the compile count of the decode kernels, and burst A for fp16, kvarn K4V2 and K4V2 with decode
# graphs, all in one lease (~8 min). Results under $OUT; prints the tables last.
#   bash bench/h200_check.sh            (PYTHONPATH must hold the staged vLLM: /tmp/site)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
out=${OUT:-bench/results}
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | grep -v WARN | tail -2
timeout 150 python3 -m pytest -q tests/ops tests/test_runtime_paged.py tests/test_host_inputs.py 2>&1 | tail -4
timeout 90 python3 bench/decode_variants_gpu.py --out "$out" 2>&1 | grep -v Warning | tail -4
timeout 560 python3 bench/serve_gpu.py --bursts A --kv kvarn-k4v2,kvarn-k4v2+graphs,fp16 --out "$out" 2>&1 \
  | grep -v "^INFO\|it/s\]\|^(EngineCore\|WARNING\|^\[\|^2026" | tail -12
