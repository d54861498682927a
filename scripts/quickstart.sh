#!/usr/bin/env bash
# The main job on a built-in default: build SmolLM2-135M-Instruct (shipped on PyPI) to int4, then ask it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh host
model="${EDGELLM_QUICKSTART_MODEL:-out/smollm2-int4}"
if [ ! -f "$model/manifest.json" ]; then
  .venv/bin/edgellm model build smollm2 --out "$model" --quant int4
fi
.venv/bin/edgellm generate --model "$model" --temperature 0 --max-tokens 120 --verbose \
  "Explain the difference between a sales contract and a service contract."
