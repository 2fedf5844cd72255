"""Compatibility names: the LLaMA-shaped step module now lives in ember/models/ (decoder.py, layers.py)."""
from ember.models.decoder import RotaryDecoderStep as LlamaStep  # noqa: F401
from ember.models.layers import DecoderBlock as LlamaBlock, RMSNorm  # noqa: F401
from ember.models.rope import rotate_half  # noqa: F401
