"""The ``backend=`` load option: which library runs a folder's engine parts.

``None`` (default): each part's own backend. ``'onnxruntime'``: TensorRT and TensorRT-RTX
parts run the ONNX graph their plan was built from (``extra["source_onnx"]``, a hash-checked
member of the folder) with ONNX Runtime, on the CPU or CUDA as ``device`` says -- so one
folder serves the GPUs its plans target and every other machine. The folder's own backend
name is accepted too (the same as ``None``); anything else is an InputError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ember.engine_format.manifest import EnginePart, Manifest, resolve_member
from ember.engine_format.tensorrt_part import PLAN_TITLES, is_plan
from ember.errors import ArtifactError, InputError

ONNXRUNTIME = "onnxruntime"


def choose_backend(folder: Path, manifest: Manifest, backend: Any) -> str | None:
    """Check the ``backend`` option against ``manifest``: returns ``'onnxruntime'`` when the
    folder's plans should run on ONNX Runtime, else None (each part's own backend)."""
    own = sorted({p.backend for p in manifest.parts})
    if backend is None or (backend in own and backend != ONNXRUNTIME):
        return None
    if backend == ONNXRUNTIME:
        return ONNXRUNTIME if any(is_plan(p) for p in manifest.parts) else None
    raise InputError(f"backend={backend!r} is not understood for {folder} (its parts run on {', '.join(own)}); "
                     f"use backend='onnxruntime' to run its ONNX graphs with ONNX Runtime (CLI: --backend onnxruntime), "
                     f"or leave it out to use {', '.join(own)}")


def runs_plan(part: EnginePart, backend: str | None) -> bool:
    """Whether ``part`` runs as a plan (not on ONNX Runtime) under the ``backend`` option."""
    return is_plan(part) and backend != ONNXRUNTIME


def onnx_graph(folder: Path, part: EnginePart) -> Path:
    """The ONNX file ONNX Runtime runs for ``part``: its own file, or a plan's source graph."""
    if not is_plan(part):
        return resolve_member(folder, part.file, f"parts[{part.name}]")
    src = part.extra.get("source_onnx")
    if not isinstance(src, dict) or not isinstance(src.get("file"), str):
        raise ArtifactError(f"{folder}/manifest.json: part {part.name!r} ({part.file}) records no source ONNX graph "
                            f"(extra.source_onnx), so ONNX Runtime cannot run it; recompile the folder")
    return resolve_member(folder, src["file"], f"parts[{part.name}].source_onnx")


def plan_needs_gpu(folder: Path, part: EnginePart, device: str) -> InputError:
    """The error for a plan part loaded with a non-CUDA ``device``."""
    title = PLAN_TITLES[part.backend]
    return InputError(f"{folder} holds {title} plans ({part.file}), which need an NVIDIA GPU, not device={device!r}: "
                      f"run the folder's ONNX graphs with ONNX Runtime instead: ember.load(FOLDER, device='cpu', "
                      f"backend='onnxruntime') (CLI: --backend onnxruntime), or load it with device='cuda:0' on a GPU "
                      f"the plans were built for")
