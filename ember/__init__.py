"""Ember: ahead-of-time compiler and runtime for generative-model inference."""
from __future__ import annotations

__version__ = "0.1.0"

from ember.errors import ArtifactError, ConfigError, EmberError, InputError, OverloadedError  # noqa: E402


def load(path, **kwargs):
    """Load a compiled engine folder (decoder or diffusion) and return its engine object.

    See :func:`ember.runtime.loader.load` for options.
    """
    from ember.runtime.loader import load as _load

    return _load(path, **kwargs)


__all__ = ["load", "EmberError", "ArtifactError", "ConfigError", "InputError", "OverloadedError", "__version__"]
