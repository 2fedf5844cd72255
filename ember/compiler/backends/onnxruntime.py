"""ONNX Runtime backend: the engine is the (rewritten) ONNX file itself.

ONNX Runtime optimizes the graph when a session is created, for the provider it runs on,
so the portable graph is what we ship; ``check_loads`` proves it loads here at compile time.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ember.errors import EmberError

NAME = "onnxruntime"


def check_loads(path: Path) -> None:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        raise EmberError(f"ONNX Runtime could not load the compiled graph {path.name}: {e}") from e
