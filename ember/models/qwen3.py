"""Qwen3 (dense): LLaMA's block with an RMSNorm on every query and key head before the rotary
embedding (``q_norm``/``k_norm``), an explicit ``head_dim`` and Qwen's optional sliding windows.

This is the worked example of docs/models.md: the config mapping is LLaMA's plus one flag,
and the weight table is LLaMA's, whose ``q_norm``/``k_norm`` entries the flag brings in.
"""
from __future__ import annotations

from typing import Any

from ember.models.family import RotaryFamily
from ember.models.qwen2 import qwen_windows


class Qwen3(RotaryFamily):
    name = "qwen3"
    model_types = ("qwen3",)

    def extend(self, cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> None:
        kw["qk_norm"] = True
        qwen_windows(cfg, where, kw)

    def to_hf(self, cfg):
        return {**super().to_hf(cfg), "use_sliding_window": bool(cfg.layer_windows), "max_window_layers": 0}


FAMILY = Qwen3()
