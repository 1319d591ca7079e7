"""Atomic file replacement: temp file in the same directory, fsync, rename, fsync dir."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from vgs_ckpt.errors import CheckpointIOError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None],
                 *, durable: bool = True) -> None:
    """Write a file so that ``path`` holds either the old bytes or all of the new ones.

    Missing parent directories are created.

    ``write`` gets a seekable binary file. A reader that has the old file open
    (or memory-mapped) keeps seeing the old bytes: the rename swaps the
    directory entry, not the file's contents.
    """
    target = Path(path)
    directory = target.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CheckpointIOError(exc.errno, f"cannot create a temporary file in {directory} to "
                                f"write {target}: {exc.strerror}; check that {directory} is a "
                                "writable directory", str(directory)) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            write(handle)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointIOError):
            raise CheckpointIOError(exc.errno, f"writing {target} failed: {exc.strerror}; "
                                    "the previous file, if any, is intact", str(target)) from exc
        raise
    if durable:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
