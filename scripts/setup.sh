#!/usr/bin/env bash
# Install Ember with everything the CPU path, the tests and the benchmarks need (idempotent).
# torch is pinned to 2.13.0 first: an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
