"""Decoder configs: parsed from a Hugging Face ``config.json`` (through the family registry,
ember/models/) or taken from the built-in table.

Unsupported architectures and config fields fail here, at compile time, with the field named.
"""
from __future__ import annotations

from typing import Any

from ember.errors import ConfigError
from ember.models.description import DecoderConfig
from ember.models.hf_fields import bool_field, float_field, int_field, json_kind, read_json_object  # noqa: F401 (re-exported)
from ember.models.registry import family, family_for_model_type, supported_model_types


def config_from_hf(cfg: Any, where: str = "config.json") -> DecoderConfig:
    """Map a Hugging Face config dict to a DecoderConfig through its family file, rejecting what
    Ember cannot run. Every field is type- and range-checked, so a malformed config.json fails
    with the field named instead of deep inside the model build."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} holds {json_kind(cfg)}, not a JSON object; a Hugging Face config.json is "
                          "an object such as {\"model_type\": \"llama\", ...}: restore the model's original file")
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ConfigError(f"{where}: no 'model_type'; Ember supports {', '.join(supported_model_types())}")
    return family_for_model_type(model_type, where).from_hf(cfg, where)


# --- built-in configs (seeded random weights) ---------------------------------------------

BUILTIN: dict[str, DecoderConfig] = {
    "gpt2-tiny": DecoderConfig(
        family="gpt2", model_type="gpt2", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=4, intermediate_size=256, max_positions=256, norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "gpt2-124m": DecoderConfig(
        family="gpt2", model_type="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
        num_kv_heads=12, intermediate_size=3072, max_positions=1024, norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "llama-tiny": DecoderConfig(
        family="llama", model_type="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, intermediate_size=176, max_positions=256, norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    # TinyLlama-1.1B's shape: 22 layers, GQA 32 query / 4 key-value heads.
    "llama-1b": DecoderConfig(
        family="llama", model_type="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
        num_kv_heads=4, intermediate_size=5632, max_positions=2048, norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
}


def to_hf_config(cfg: DecoderConfig) -> dict[str, Any]:
    """The equivalent Hugging Face config dict (used to build reference models in tests and benchmarks)."""
    return family(cfg.family).to_hf(cfg)
