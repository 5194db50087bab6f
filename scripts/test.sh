#!/usr/bin/env bash
# Install what the tests need into .venv/ and run them (CI calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
. .venv/bin/activate
python -m pytest -q -ra tests "$@"
