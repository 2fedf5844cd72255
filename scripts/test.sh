#!/usr/bin/env bash
# The README's test command: install, then the CPU tier (GPU/TensorRT tests skip with their reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -q -rs "$@"
