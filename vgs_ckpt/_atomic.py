"""Atomic file replacement: temp file in the same directory, fsync, rename, fsync dir.

A temp file is named ``.<target name>.vgsckpt-<host>-<writer pid>.<random>.tmp``
(an exploit's pin, ``.<target name>.vgsckpt-<host>-<pid>.link``) and its writer holds
an exclusive ``flock`` on it until the rename. The ``vgsckpt-`` marker is written by
nothing else, so :func:`sweep_temp_files` only ever removes vgs_ckpt's own files:
those of writers that died (SIGKILL, power loss) on this host, never a live one.
Another host's temp files (a directory shared over NFS or Lustre, where ``flock``
may not work and its pids mean nothing here) are left alone unless they are more
than a day old.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from vgs_ckpt.errors import CheckpointIOError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("vgs_ckpt")
_UMASK_LOCK = threading.Lock()
_UMASK_LINE = re.compile(rb"^Umask:\s*([0-7]+)$", re.MULTILINE)
MARKER = "vgsckpt"
_TAG = rf"\.{MARKER}-(?P<host>[A-Za-z0-9-]*)-(?P<pid>\d+)"  # who wrote it, where
_TEMP = re.compile(rf"^\.(?P<target>.+?){_TAG}\.[A-Za-z0-9_]+\.tmp\Z")
_LINK = re.compile(rf"^\.(?P<target>.+?){_TAG}\.link\Z")
# A temp file whose lock is free but whose writer pid is alive may be a writer between
# creating the file and locking it (microseconds); it is only swept after this long.
MIN_TEMP_AGE = 60.0
# Another host's temp file is only swept after this long (its pid cannot be checked).
OTHER_HOST_TEMP_AGE = 86400.0


def host_tag() -> str:
    """This host's name as it appears in temp file names (letters, digits, '-')."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63]
    return name or "host"


def _umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``); where that
    is unavailable, set-and-restore under a lock."""
    try:
        with open("/proc/self/status", "rb") as status:
            found = _UMASK_LINE.search(status.read())
        if found:
            return int(found.group(1), 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # restrictive meanwhile, should another thread create a file
        os.umask(mask)
    return mask


def temp_prefix(target: Path) -> str:
    """``.<target name>.vgsckpt-<host>-<pid>.``: what every temp name of this writer
    starts with (the marker the sweep looks for)."""
    return f".{target.name}.{MARKER}-{host_tag()}-{os.getpid()}."


def link_name(target: Path) -> Path:
    """The temp name under which an exploit's pin is linked before its rename."""
    return target.with_name(f"{temp_prefix(target)}link")


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
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CheckpointIOError(exc.errno, f"cannot create a temporary file in {directory} to "
                                f"write {target}: {exc.strerror}; check that {directory} is a "
                                "writable directory", str(directory)) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            _lock(handle.fileno(), blocking=True)  # released when the file is closed
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


def _lock(fd: int, *, blocking: bool) -> bool:
    """An exclusive flock on ``fd``; False if another holder has it (non-blocking)."""
    if fcntl is None:  # no flock on this platform: sweeping relies on pid and age
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock support
        return True
    return True


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_temp_files(directory: str | os.PathLike[str], *, dry_run: bool = False,
                     min_age: float = MIN_TEMP_AGE) -> list[Path]:
    """Remove the temp files that dead vgs_ckpt writers left in ``directory`` (not
    recursive). Only names with the ``vgsckpt-`` marker are considered; nothing else
    is ever touched.

    A ``.tmp`` file of this host is removed only when no process holds its lock and
    either its writer's pid is gone or it is older than ``min_age`` seconds (pid
    reuse); a ``.link`` file of an interrupted exploit checkout when its pid is gone
    or it is older than ``min_age``. Another host's files are removed only when
    unlocked and older than a day. A file that cannot be removed (a read-only or
    foreign directory) is skipped with a warning.

    Returns:
        The removed files (or, with ``dry_run``, those that would be removed).
    """
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:  # gone, not a directory, or not readable: nothing of ours to sweep
        return removed
    now = time.time()
    here = host_tag()
    for name in names:
        temp, link = _TEMP.match(name), _LINK.match(name)
        found = temp or link
        if found is None:
            continue
        path = Path(directory) / name
        pid = int(found["pid"])
        try:
            age = now - path.lstat().st_mtime
        except OSError:
            continue
        if found["host"] != here:
            stale = age >= OTHER_HOST_TEMP_AGE
        else:
            stale = not _pid_alive(pid) or age >= min_age
        if not stale:
            continue
        try:
            # A link is a hard link nobody writes to; a temp file may have a live writer.
            if link is not None:
                if not dry_run:
                    path.unlink(missing_ok=True)
                removed.append(path)
            elif _unlocked_unlink(path, dry_run):
                removed.append(path)
        except OSError as exc:
            logger.warning("cannot remove the stale temp file %s (%s); remove it by hand",
                           path, exc.strerror or exc)
    return removed


def _unlocked_unlink(path: Path, dry_run: bool) -> bool:
    """Remove ``path`` if no process holds its lock (the check and the removal happen
    under our own lock); True if it was (or, with ``dry_run``, would be) removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        if not _lock(fd, blocking=False):
            return False  # a live writer holds it
        if not dry_run:
            path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def sweep_tree(root: str | os.PathLike[str], *, dry_run: bool = False,
               min_age: float = MIN_TEMP_AGE) -> list[Path]:
    """:func:`sweep_temp_files` in ``root`` and every directory below it (symlinks
    are not followed; unreadable directories are skipped)."""
    directories = sorted(Path(d) for d, _, _ in os.walk(root, followlinks=False))
    return [path for directory in directories
            for path in sweep_temp_files(directory, dry_run=dry_run, min_age=min_age)]
