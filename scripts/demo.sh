#!/usr/bin/env bash
# The main job: install, compile the built-in demo model (GPT-2 124M shape, seeded random
# weights) for ONNX Runtime's CPU provider, then generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ember compile "${EMBER_DEMO_MODEL:-gpt2-124m}" -o artifacts/demo --overwrite  # a rerun replaces the demo engine
ember inspect artifacts/demo
ember generate artifacts/demo "The quick brown fox" --max-new-tokens 32
ember generate artifacts/demo "Hello" "Once upon a time" "Ember fuses requests" --max-new-tokens 16 --temperature 0.8 --top-p 0.9 --seed 0
