"""The model registry: Hugging Face ``model_type`` -> the family file that describes it.

A family file (``ember/models/<name>.py``) defines ``FAMILY``, an instance of
``ember.models.family.Family``: its config mapping, its weight-name table and its step
module. Adding a family is adding a file and its name to ``FAMILY_MODULES`` (docs/models.md).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

from ember.errors import ConfigError

# registry key -> module under ember.models; each module's FAMILY lists the model_types it reads
FAMILY_MODULES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text")


@lru_cache(maxsize=None)
def family(name: str):
    """The family registered as ``name`` (the ``family`` field of a DecoderConfig)."""
    if name not in FAMILY_MODULES:
        raise ConfigError(f"family {name!r} is not supported (supported: {', '.join(FAMILY_MODULES)})")
    return importlib.import_module(f"ember.models.{name}").FAMILY


@lru_cache(maxsize=None)
def _by_model_type() -> dict:
    return {t: family(name) for name in FAMILY_MODULES for t in family(name).model_types}


def family_for_model_type(model_type: str, where: str = "config.json"):
    """The family that reads ``model_type``; ConfigError naming what is supported otherwise."""
    table = _by_model_type()
    if model_type not in table:
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported; Ember compiles "
                          f"{', '.join(sorted(table))} decoders (docs/models.md says how to add a family)")
    return table[model_type]


def supported_model_types() -> list[str]:
    return sorted(_by_model_type())
