"""Exceptions that the CLI turns into one-line messages.

Library code raises these with a message that names the offending thing (file, key, model) and
says what to do; only `cli.py` prints them and exits non-zero.
"""


class ConfuError(Exception):
    """A user-facing error: bad input, missing file, incompatible artefacts."""


class ConfigError(ConfuError, ValueError):
    """A configuration key is unknown, mistyped or out of range."""


class TargetError(ConfuError):
    """A target model cannot be found, fetched, converted or used as configured."""


class DataError(ConfuError, ValueError):
    """A data source or record set cannot be read, parsed or tokenised as configured."""


class CacheError(ConfuError):
    """A hidden-state cache is missing, incomplete, corrupt or built for another target."""


class DraftError(ConfuError):
    """A draft model is configured, built, fed or loaded inconsistently (shapes, vocabulary, RoPE, masks)."""
