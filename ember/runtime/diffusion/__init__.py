"""Diffusion runtime: load a compiled diffusion folder and generate images (docs/design.md §5)."""
from __future__ import annotations

from pathlib import Path

from ember.engine_format.manifest import Manifest


def load_pipeline(folder: Path, manifest: Manifest, *, threads: int | None = None, backend: str | None = None,
                  device: str | None = None, **opts):
    """Build a :class:`~ember.runtime.diffusion.pipeline.DiffusionPipeline` (files already verified by the loader).

    Options: ``threads`` (ONNX Runtime intra-op threads), ``backend`` (``'onnxruntime'``: run
    TensorRT / TensorRT-RTX parts from their source ONNX graphs; checked by ``ember.load``),
    ``device`` ('cpu', the default, or 'cuda[:N]': ONNX Runtime's CUDA provider with device-resident
    buffers). Decoder-only options are rejected.
    """
    from ember.errors import InputError
    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    unknown = {k for k, v in opts.items() if v is not None}
    if unknown:
        raise InputError(f"diffusion engines take only threads=, backend= and device=; got {sorted(unknown)}")
    return DiffusionPipeline(Path(folder), manifest, threads=threads, backend=backend, device=device or "cpu")


__all__ = ["load_pipeline"]
