"""Describe the machine a benchmark ran on (for the results files): ``ember.bench.host``'s, which
``ember bench`` shares, under the name the benchmark scripts import (some before they put the
checkout on ``sys.path``, hence the line below)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.bench.host import machine_info, machine_line  # noqa: E402,F401
