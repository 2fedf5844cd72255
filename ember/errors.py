"""Ember's error types. Every error names the input at fault and the fix."""


class EmberError(Exception):
    """Base class: an error a user can act on (the CLI prints it without a traceback)."""


class ConfigError(EmberError):
    """A model source or its config is unsupported or malformed (raised at compile time)."""


class ArtifactError(EmberError):
    """An engine folder is missing, corrupt, truncated, or from an incompatible build."""


class InputError(EmberError):
    """A request's input is invalid (prompt too long, bad sampling parameters, ...)."""


class OverloadedError(EmberError):
    """The request queue is full; retry later."""
