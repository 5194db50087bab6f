#!/usr/bin/env bash
# Install into .venv/ and run the main job on the embedded default model: calibrate SmolLM2-135M on
# the first half of the Wikipedia sample, then print the eval table on the second half.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
. .venv/bin/activate
mkdir -p out
kvarn calibrate --output out/kvarn_recipe.safetensors
kvarn inspect out/kvarn_recipe.safetensors --plot out/kvarn_recipe_bits.png | tail -n 3
kvarn eval --recipe out/kvarn_recipe.safetensors
