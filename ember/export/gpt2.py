"""Compatibility names: the GPT-2 family file is ember/models/gpt2.py."""
from ember.models.gpt2 import GPT2Block, GPT2Step  # noqa: F401
from ember.models.layers import gelu_tanh  # noqa: F401
