"""LLaMA (1/2/3.x, TinyLlama): RMSNorm, rotary GQA attention, SwiGLU.

Llama 3.1+ checkpoints carry ``rope_scaling`` (``rope_type: llama3``); ``linear`` and ``yarn``
scaling read the same way (ember/models/family.py ``parse_rope``). LLaMA attention has no
sliding window, so a ``sliding_window`` field is ignored, as transformers does.
"""
from __future__ import annotations

from ember.models.family import RotaryFamily


class Llama(RotaryFamily):
    name = "llama"
    model_types = ("llama",)


FAMILY = Llama()
