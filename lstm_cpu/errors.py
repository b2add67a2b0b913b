"""The exception hierarchy of lstm-cpu.

Everything the package raises on purpose derives from :class:`LSTMError`, so a service can catch
one type at its boundary. Input errors also derive from the builtin ``ValueError`` / ``TypeError``
so that ordinary Python code that catches those keeps working.
"""

from __future__ import annotations


class LSTMError(Exception):
    """Root of every error lstm-cpu raises on purpose."""


class FormatError(LSTMError):
    """A file is unreadable, corrupt, truncated, hostile or internally inconsistent."""


class UnsupportedModelError(LSTMError):
    """A well-formed model uses a feature lstm-cpu cannot run; the message names the feature."""


class InputError(LSTMError, ValueError):
    """A value passed to the API has the wrong shape, size or content."""


class InputTypeError(LSTMError, TypeError):
    """A value passed to the API has the wrong type (e.g. a non-numeric array)."""


__all__ = ["LSTMError", "FormatError", "UnsupportedModelError", "InputError", "InputTypeError"]
