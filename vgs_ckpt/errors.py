"""The exception tree of vgs_ckpt: one class per kind of failure.

Every error raised by the library derives from :class:`VgsCkptError` and also
from the builtin exception it refines, so callers may catch either
(``except vgs_ckpt.FormatError`` or ``except ValueError``). docs/spec.md
section 13 is the normative table; in short:

=========================  =================================================  =============
class                      meaning                                            builtin
=========================  =================================================  =============
UsageError                 a call with an invalid argument or value, e.g. an  ValueError
                           invalid VGS setting or header field passed to
                           ``save``, a tree whose tensor names collide
ArgumentError              (a UsageError) an unknown or missing keyword       TypeError
                           argument, e.g. a header field ``save`` has not
UnsupportedTypeError       a leaf, key or tensor kind the format cannot hold  TypeError
MissingDependencyError     an optional integration used without its extra     ImportError
FormatError                a file that is not a valid checkpoint: not one,    ValueError
                           truncated, malformed, inconsistent, or violating
                           the schema of its format version
IntegrityError             (a FormatError) a tensor's bytes do not match the  ValueError
                           digest in the header
UnsupportedVersionError    a format or VGS version newer than this library    ValueError
UnsafeCheckpointError      a legacy pickle asks for code to run (nothing ran) ValueError
CheckpointIOError          the operating system failed a read or a write      OSError
CheckpointNotFoundError    (a CheckpointIOError) no such checkpoint           FileNotFoundError
CheckpointExistsError      (a CheckpointIOError) an exclusive write found     FileExistsError
                           its key taken; nothing was written
=========================  =================================================  =============

``SchemaError`` and ``TreeError`` (earlier development versions) are merged: a schema or tree
violation read from a file is a :class:`FormatError`, one passed to ``save`` a
:class:`UsageError`. The old names still work in ``except`` clauses (they are
the tuple of both, with a :class:`DeprecationWarning`).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

__all__ = [
    "ArgumentError",
    "CheckpointExistsError",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "FormatError",
    "IntegrityError",
    "InvalidVGSStateWarning",
    "LegacyFormatWarning",
    "MissingDependencyError",
    "PartialStateWarning",
    "UnsafeCheckpointError",
    "UnsupportedTypeError",
    "UnsupportedVersionError",
    "UsageError",
    "VgsCkptError",
    "warn",
]


class VgsCkptError(Exception):
    """Base class of every error raised by vgs_ckpt."""


class UsageError(VgsCkptError, ValueError):
    """A vgs_ckpt function was called with an invalid argument or value (the caller's
    mistake, not the file's): a header field or VGS setting out of range, a tree whose
    tensor names collide or that nests too deep, swapped arguments."""


class ArgumentError(UsageError, TypeError):
    """A call with an unknown or missing keyword argument (as Python's own TypeError
    for a signature, and a UsageError): e.g. ``save(..., stp=1)``, or no ``step``."""


class UnsupportedTypeError(VgsCkptError, TypeError):
    """A leaf, key or tensor of a parameter tree has a type the format cannot hold."""


class MissingDependencyError(VgsCkptError, ImportError):
    """An optional integration was used without its extra installed."""


class FormatError(VgsCkptError, ValueError):
    """The bytes are not a valid checkpoint: not a checkpoint at all, truncated,
    malformed, inconsistent with themselves, or violating their format's schema
    (including a VGS state that fails validation on upgrade)."""


class IntegrityError(FormatError):
    """A tensor's bytes do not match the digest recorded in the header (the tensor is
    named)."""


class UnsupportedVersionError(VgsCkptError, ValueError):
    """The checkpoint names a format or VGS state version this library does not know
    (a newer one), or a downgrade was asked for."""


class UnsafeCheckpointError(VgsCkptError, ValueError):
    """A legacy pickle asked for something beyond plain containers, numbers and tensors;
    nothing in it was run."""


class CheckpointIOError(VgsCkptError, OSError):
    """Reading or writing a checkpoint failed at the operating-system level."""


class CheckpointNotFoundError(CheckpointIOError, FileNotFoundError):
    """The checkpoint path does not exist."""


class CheckpointExistsError(CheckpointIOError, FileExistsError):
    """An exclusive write found its key taken (another writer created it first);
    nothing was written."""


class LegacyFormatWarning(UserWarning):
    """A checkpoint in a legacy format (or with an old VGS state) was upgraded on load."""


class PartialStateWarning(UserWarning):
    """A state was restored from a tree that lacks some of its parts (a policy-only
    checkpoint, one saved without the env): those parts keep their current state."""


class InvalidVGSStateWarning(UserWarning):
    """A checkpoint was read whose VGS state fails validation; it is returned as stored,
    and ``upgrade()`` and ``save()`` refuse it until it is fixed."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning]) -> None:
    """Issue a warning attributed to the first caller outside vgs_ckpt, so that
    ``warnings`` filters by module and the reported line are the user's. This is the
    library's only channel for warnings (nothing is logged twice)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the caller of warn()
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back  # type: ignore[assignment]
    warnings.warn(message, category, stacklevel=level)


_MERGED = {"SchemaError": (FormatError, UsageError), "TreeError": (FormatError, UsageError)}


def __getattr__(name: str) -> Any:
    if name in _MERGED:
        warnings.warn(f"vgs_ckpt.{name} is merged into FormatError (files) and UsageError "
                      f"(arguments); catch those instead", DeprecationWarning, stacklevel=2)
        return _MERGED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
