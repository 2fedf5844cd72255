"""The model registry: one small file per decoder family, built from shared layers (docs/models.md).

``DecoderConfig`` is the typed description every consumer builds from; ``family(name)`` and
``family_for_model_type(model_type)`` return a family file's ``FAMILY``.
"""
from ember.models.description import DecoderConfig, RopeScaling
from ember.models.registry import FAMILY_MODULES, family, family_for_model_type, supported_model_types

__all__ = ["DecoderConfig", "RopeScaling", "FAMILY_MODULES", "family", "family_for_model_type",
           "supported_model_types"]
