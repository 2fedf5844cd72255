"""Qwen2 / Qwen2.5: LLaMA's block with q/k/v biases (no output bias) and optional sliding windows.

Windows apply when ``use_sliding_window`` is true, to the layers ``layer_types`` marks
``sliding_attention`` (or, in older configs without it, layers from ``max_window_layers`` on).
"""
from __future__ import annotations

from typing import Any

from ember.models.family import RotaryFamily, sliding_types, windows_from_hf
from ember.models.hf_fields import bool_field, int_field


class Qwen2(RotaryFamily):
    name = "qwen2"
    model_types = ("qwen2",)

    def extend(self, cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> None:
        kw["qkv_bias"] = True
        qwen_windows(cfg, where, kw)

    def to_hf(self, cfg):
        return {**super().to_hf(cfg), "use_sliding_window": bool(cfg.layer_windows), "max_window_layers": 0}


def qwen_windows(cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> None:
    """Qwen's sliding windows (shared with Qwen3)."""
    if not bool_field(cfg, "use_sliding_window", where, False):
        return
    first = int_field(cfg, "max_window_layers", where, minimum=0, default=kw["num_layers"])
    windows_from_hf(cfg, where, kw, sliding_types(cfg, kw["num_layers"], "use_sliding_window", first))


FAMILY = Qwen2()
