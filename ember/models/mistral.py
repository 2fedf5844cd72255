"""Mistral: LLaMA's block with a sliding window on every layer (``sliding_window``, null = none).

A window that covers ``max_position_embeddings`` is full attention (DecoderConfig drops it).
"""
from __future__ import annotations

from typing import Any

from ember.models.family import RotaryFamily, sliding_types, windows_from_hf


class Mistral(RotaryFamily):
    name = "mistral"
    model_types = ("mistral",)

    def extend(self, cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> None:
        windows_from_hf(cfg, where, kw, sliding_types(cfg, kw["num_layers"], use_key=None))


FAMILY = Mistral()
