"""One error hierarchy for pocketpeft.

Every error is a :class:`PocketPeftError` and also the builtin that matches what went
wrong, so ``except ValueError`` keeps working for callers who don't know about us.
Messages name the offending input and say what was expected.
"""

from __future__ import annotations


class PocketPeftError(Exception):
    """Root of every error raised by pocketpeft."""


class ConfigError(PocketPeftError, ValueError):
    """A configuration value is invalid (LoraConfig, export options, CLI flags)."""


class InputTextError(PocketPeftError, ValueError):
    """User text is empty, not UTF-8, binary, or otherwise unusable."""


class SequenceTooLongError(PocketPeftError, ValueError):
    """A token sequence is longer than the model's context or the exported length."""


class UnsupportedModelError(PocketPeftError, ValueError):
    """The base model's architecture or tensor layout is not one we support."""


class ModelFileNotFoundError(PocketPeftError, FileNotFoundError):
    """A model, bundle, adapter or data file is missing."""


class CorruptFileError(PocketPeftError, ValueError):
    """A file exists but cannot be parsed, is truncated, or fails its hash check."""


class BaseModelMismatchError(PocketPeftError, ValueError):
    """An adapter, store or bundle belongs to a different base model."""


class AdapterShapeError(PocketPeftError, ValueError):
    """Adapter tensors don't match the names or shapes the bundle expects."""


class QuantizationError(PocketPeftError, ValueError):
    """A tensor cannot be quantized in the requested format (shape, dtype, format)."""


class BackendNotFoundError(PocketPeftError, KeyError):
    """The requested backend name is not registered."""

    def __str__(self) -> str:  # KeyError repr-quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(PocketPeftError, ImportError):
    """The backend is registered but cannot run here (missing extra, no device)."""


class MissingDependencyError(PocketPeftError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


class StoreError(PocketPeftError, OSError):
    """The adapter store or text store cannot be read or written."""
