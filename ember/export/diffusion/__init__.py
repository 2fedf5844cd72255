"""Diffusion export: SD-1.x pipeline sources (built-ins, diffusers folders), the UNet split
into full/shallow cache-branch graphs, and torch -> ONNX of every engine part (docs/design.md §5.1)."""
from __future__ import annotations

from ember.export.diffusion.config import BUILTIN, DiffusionConfig, builtin_config
from ember.export.diffusion.source import DiffusionSource, load_source, save_pipeline_folder

__all__ = ["BUILTIN", "DiffusionConfig", "DiffusionSource", "builtin_config", "load_source", "save_pipeline_folder"]
