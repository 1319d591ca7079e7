"""The exception tree of vgs_ckpt.

Every error raised by the library derives from :class:`VgsCkptError` and also
from the builtin exception it refines, so callers may catch either
(``except vgs_ckpt.FormatError`` or ``except ValueError``).
"""

from __future__ import annotations

__all__ = [
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "FormatError",
    "IntegrityError",
    "MissingDependencyError",
    "SchemaError",
    "TreeError",
    "UnsafeCheckpointError",
    "UnsupportedTypeError",
    "UnsupportedVersionError",
    "UsageError",
    "VgsCkptError",
]


class VgsCkptError(Exception):
    """Base class of every error raised by vgs_ckpt."""


class FormatError(VgsCkptError, ValueError):
    """The bytes are not a well-formed checkpoint (truncated, malformed, inconsistent)."""


class IntegrityError(VgsCkptError, ValueError):
    """A tensor's bytes do not match the digest recorded in the header."""


class UnsupportedVersionError(VgsCkptError, ValueError):
    """The checkpoint names a format (or VGS state) version this library does not know."""


class SchemaError(VgsCkptError, ValueError):
    """A header or VGS state does not satisfy the schema of its format version."""


class TreeError(VgsCkptError, ValueError):
    """A parameter tree cannot be stored as given (duplicate tensor names, bad keys)."""


class UnsupportedTypeError(VgsCkptError, TypeError):
    """A leaf or key of a parameter tree has a type the format cannot hold."""


class UnsafeCheckpointError(VgsCkptError, ValueError):
    """A legacy pickle asked for something beyond plain containers, numbers and tensors."""


class CheckpointNotFoundError(VgsCkptError, FileNotFoundError):
    """The checkpoint path does not exist."""


class CheckpointIOError(VgsCkptError, OSError):
    """Reading or writing a checkpoint failed at the operating-system level."""


class UsageError(VgsCkptError, ValueError):
    """A vgs_ckpt function was called with an invalid argument."""


class MissingDependencyError(VgsCkptError, ImportError):
    """An optional integration was used without its extra installed."""
