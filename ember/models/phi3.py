"""Phi-3 / Phi-3.5 / Phi-4-mini: LLaMA's block with fused ``qkv_proj`` and ``gate_up_proj``
weights (split at load), partial rotary (``partial_rotary_factor``), LongRoPE (``su``) scaling
and an optional sliding window on every layer.

LongRoPE follows transformers' ``generate``: every token of a sequence no longer than
``original_max_position_embeddings`` is rotated with the short factors, every token of a longer
one with the long factors (the step graph's ``rope_long`` input, per row); the runtime recomputes
a sequence's cache when its generation crosses that length (docs/models.md).
"""
from __future__ import annotations

from typing import Any

from ember.models.family import RotaryFamily, sliding_types, windows_from_hf


class Phi3(RotaryFamily):
    name = "phi3"
    model_types = ("phi3",)
    eps_default = 1e-5
    size_tensors = (("vocab_size", "embed_tokens.weight", 0, 1), ("hidden_size", "embed_tokens.weight", 1, 1),
                    ("intermediate_size", "layers.0.mlp.gate_up_proj.weight", 0, 2))
    kv_proj = None  # K rows live inside qkv_proj
    fused = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}

    def extend(self, cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> None:
        kw["qkv_bias"] = kw["o_bias"] = False  # Phi-3 has no attention_bias field: its projections have none
        windows_from_hf(cfg, where, kw, sliding_types(cfg, kw["num_layers"], use_key=None))

    def to_hf(self, cfg):
        out = super().to_hf(cfg)
        out.pop("attention_bias")
        out["partial_rotary_factor"] = cfg.partial_rotary_factor
        out["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
        if cfg.rope_scaling is not None:
            out["original_max_position_embeddings"] = cfg.rope_scaling.original_max_positions
        out["sliding_window"] = max(cfg.layer_windows) if cfg.layer_windows else None
        out.pop("layer_types", None)
        out["pad_token_id"] = 0
        return out


FAMILY = Phi3()
