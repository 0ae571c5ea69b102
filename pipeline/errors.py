"""Exceptions a user sees at the boundary (besides ConfigError and InputError): wrong stage order."""


class StageInputError(RuntimeError):
    """A stage was asked to run without what it needs (e.g. split before ingest)."""
