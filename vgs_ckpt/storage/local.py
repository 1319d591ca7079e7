"""``LocalStorage``: checkpoints as files on a POSIX file system.

This module is the only place in vgs_ckpt that creates, renames, links, locks,
syncs or removes files.

Atomic commits: a temp file in the same directory, fsync, rename, fsync of the
directory. A temp file is named ``.<target name>.vgsckpt-<host>-<writer
pid>.<random>.tmp`` (a pin's, ``.<target name>.vgsckpt-<host>-<pid>.link``) and its
writer holds an exclusive ``flock`` on it until the rename. The ``vgsckpt-`` marker
is written by nothing else, so :meth:`LocalStorage.sweep` only ever removes
vgs_ckpt's own files: those of writers that died (SIGKILL, power loss) on this
host, never a live one. Another host's temp files (a directory shared over NFS or
Lustre, where ``flock`` may not work and its pids mean nothing here) are left alone
unless they are more than a day old.

Reads: only a regular file is opened (a FIFO, socket, device or directory is
refused before anything could block on it); tensors are read into memory the
process owns, or with ``mmap=True`` mapped privately from the file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

import numpy as np

from vgs_ckpt._container import Container, Ready, empty_views, notify, runs
from vgs_ckpt.errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    FormatError,
    UsageError,
)
from vgs_ckpt.storage.base import Capabilities, ObjectInfo, key_taken

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCAL", "MARKER", "MIN_TEMP_AGE", "OTHER_HOST_TEMP_AGE", "FileSource",
           "LocalStorage", "host_tag"]

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
_READ_CHUNK = 8 * 1024 * 1024  # tensors are read in runs of about this many bytes
_POPULATE_FROM = 1024 * 1024
_NO_LINKS = (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK)


def host_tag() -> str:
    """This host's name as it appears in temp file names (letters, digits, '-'): the
    ``VGS_CKPT_HOST`` environment variable if set (for hosts whose names are not
    unique, such as containers sharing a host name but not a pid namespace), else
    the host name."""
    raw = os.environ.get("VGS_CKPT_HOST") or socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9-]", "-", raw)[:63]
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
    """The temp name under which a pin is linked before its rename."""
    return target.with_name(f"{temp_prefix(target)}link")


class LocalStorage:
    """Checkpoints as files; keys are file system paths. See the module docstring."""

    capabilities = Capabilities(atomic_rename=True, hard_links=True, locks=fcntl is not None,
                                conditional_create=True, seekable_writes=True, mmap=True)

    def __repr__(self) -> str:
        return "LocalStorage()"

    def join(self, prefix: str, *names: str) -> str:
        return os.path.join(prefix, *names)

    def open(self, key: str, *, mmap: bool = False) -> FileSource:
        return FileSource(_open_regular(key), key, use_mmap=mmap)

    def commit(self, key: str, write: Callable[[IO[bytes]], None], *,
               durable: bool = True, exclusive: bool = False) -> None:
        """Write a file so that ``key`` holds either the old bytes or all of the new
        ones. Missing parent directories are created. ``write`` gets a seekable binary
        file. A reader that has the old file open (or mapped) keeps seeing the old
        bytes: the rename swaps the directory entry, not the file's contents.

        With ``exclusive``, the finished file is hard-linked to ``key`` instead of
        renamed, which fails if ``key`` exists (atomically, on NFS too): a
        CheckpointExistsError, and nothing is written. Where links are not possible
        the name is checked just before the rename."""
        target = Path(key)
        directory = target.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp",
                                       dir=directory)
        except OSError as exc:
            raise CheckpointIOError(exc.errno, f"cannot create a temporary file in {directory} "
                                    f"to write {target}: {exc.strerror}; check that "
                                    f"{directory} is a writable directory",
                                    str(directory)) from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                _lock(handle.fileno(), blocking=True)  # released when the file is closed
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
                write(handle)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            if exclusive:
                _link_new(tmp, target)
            else:
                os.replace(tmp, target)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointIOError):
                raise CheckpointIOError(exc.errno, f"writing {target} failed: {exc.strerror}; "
                                        "the previous file, if any, is intact",
                                        str(target)) from exc
            raise
        if durable:
            _fsync_dir(directory)

    def entries(self, prefix: str, *, recursive: bool = False) -> list[ObjectInfo]:
        if recursive:
            found = []
            for directory, _, names in os.walk(prefix, followlinks=False):
                found += [info for name in names
                          if (info := _info(os.path.join(directory, name))) is not None]
            return sorted(found, key=lambda i: i.key)
        try:
            entries = list(os.scandir(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise CheckpointIOError(exc.errno, f"cannot list {prefix}: {exc.strerror}",
                                    prefix) from None
        found = [info for entry in entries if (info := _info(entry.path)) is not None]
        return sorted(found, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        try:
            os.unlink(key)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CheckpointIOError(exc.errno, f"cannot remove {key}: {exc.strerror}",
                                    key) from None

    def pin(self, source: str, target: str, *, overwrite: bool = True) -> None:
        """A hard link (no bytes copied), or an atomic copy where links are not
        possible; the donor may remove ``source`` at any moment."""
        if not overwrite:
            self._pin_new(source, target)
            return
        tmp = link_name(Path(target))
        tmp.unlink(missing_ok=True)
        if not _link(source, tmp, target):
            with self.open(source) as src:  # an open file survives the donor's unlink
                self.commit(target, lambda f: shutil.copyfileobj(src.stream(), f))
            return
        os.replace(tmp, target)

    def _pin_new(self, source: str, target: str) -> None:
        """``pin`` that never replaces an existing ``target`` (FileExistsError). Where
        links are not possible the copy is written under ``target`` itself, created
        exclusively (a failed copy is removed, so nothing partial stays)."""
        if _link(source, target, target):
            return
        with self.open(source) as src, open(target, "xb") as dst:  # never clobbers
            try:
                shutil.copyfileobj(src.stream(), dst)
            except BaseException:
                dst.close()
                os.unlink(target)  # no partial copy under the new name
                raise

    def move(self, source: str, target: str) -> None:
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        except OSError as exc:
            raise CheckpointIOError(exc.errno, f"cannot move {source} to {target}: "
                                    f"{exc.strerror}", source) from None

    def makedirs(self, prefix: str) -> None:
        try:
            Path(prefix).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointIOError(exc.errno, f"cannot create the directory {prefix}: "
                                    f"{exc.strerror}", prefix) from None

    def writable(self, prefix: str) -> bool:
        return os.access(prefix, os.W_OK | os.X_OK)

    def sweep(self, prefix: str, *, recursive: bool = False, dry_run: bool = False,
              min_age: float | None = None) -> list[str]:
        """Remove the temp files that dead vgs_ckpt writers left in ``prefix`` (with
        ``recursive``, in every directory below it; symlinks are not followed). Only
        names with the ``vgsckpt-`` marker are considered; nothing else is touched.

        A ``.tmp`` file of this host is removed only when no process holds its lock
        and either its writer's pid is gone or it is older than ``min_age`` seconds
        (default :data:`MIN_TEMP_AGE`; pid reuse); a ``.link`` file of an interrupted
        pin when its pid is gone or it is older than ``min_age``. Another host's files
        are removed only when unlocked and older than a day. A file that cannot be
        removed (a read-only or foreign directory) is skipped with a warning.
        """
        age = MIN_TEMP_AGE if min_age is None else min_age
        if not recursive:
            return [str(p) for p in _sweep_directory(Path(prefix), dry_run, age)]
        directories = sorted(Path(d) for d, _, _ in os.walk(prefix, followlinks=False))
        return [str(p) for directory in directories
                for p in _sweep_directory(directory, dry_run, age)]


LOCAL = LocalStorage()


def _missing(source: str, target: str) -> CheckpointIOError:
    """Why a link failed with ENOENT: the source is gone, or the target's directory."""
    if not os.path.lexists(source):
        return CheckpointNotFoundError(f"{source} does not exist (removed before it could be "
                                       f"pinned as {target})")
    directory = os.path.dirname(target) or "."
    return CheckpointIOError(f"cannot pin {source} as {target}: the directory {directory} does "
                             "not exist; create it first (storage.makedirs)")


def _link(source: str, link: str | Path, target: str) -> bool:
    """Hard-link ``source`` as ``link`` (on the way to pinning it as ``target``); False
    where this file system cannot link, so the caller copies instead. An existing
    ``link`` is FileExistsError."""
    try:
        os.link(source, link)
    except FileExistsError:
        raise
    except FileNotFoundError:
        raise _missing(source, target) from None
    except OSError as exc:
        if exc.errno in _NO_LINKS:
            return False
        raise CheckpointIOError(exc.errno, f"cannot pin {source} as {target}: "
                                f"{exc.strerror}", target) from None
    return True


def _link_new(tmp: str, target: Path) -> None:
    """Publish the finished ``tmp`` as ``target`` only if ``target`` does not exist."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise key_taken(str(target)) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(target):
            raise key_taken(str(target)) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _info(path: str) -> ObjectInfo | None:
    try:
        found = os.lstat(path)
    except OSError:  # removed meanwhile
        return None
    return ObjectInfo(path, found.st_size, found.st_mtime_ns, stat.S_ISDIR(found.st_mode))


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


def _sweep_directory(directory: Path, dry_run: bool, min_age: float) -> list[Path]:
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
        path = directory / name
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


def _open_regular(path: str) -> IO[bytes]:
    """Open a file for reading, turning OS errors into vgs_ckpt errors. Only a regular
    file is opened: a FIFO, socket, device or directory is refused before anything
    could block on it."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise block forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist") from None
    except OSError as exc:
        raise CheckpointIOError(exc.errno, f"cannot open checkpoint {path}: "
                                f"{exc.strerror}", path) from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid checkpoint path {path!r:.80}: {exc}; pass a str or "
                         "os.PathLike (use load_bytes for bytes)") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device"
                    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
            raise UsageError(f"{path} is {kind}, not a checkpoint file; pass the path of a "
                             "regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _read_into(fd: int, buffer: memoryview, offset: int, where: str) -> None:
    """Fill ``buffer`` from the file at ``offset`` (pread, so the fd's position is
    untouched); a short file is a FormatError."""
    done = 0
    while done < len(buffer):
        try:
            count = os.preadv(fd, [buffer[done:]], offset + done)
        except OSError as exc:
            raise CheckpointIOError(exc.errno, f"cannot read {where}: {exc.strerror}",
                                    where) from None
        if count == 0:
            raise FormatError(f"{where}: truncated file: expected {len(buffer)} bytes at "
                              f"offset {offset}, got {done}; the file is incomplete (or "
                              "was cut short while being read) - re-save it")
        done += count


def owned_buffer(size: int) -> memoryview:
    """Writable memory of ``size`` bytes, not zero-filled by us. Large buffers are
    anonymous mappings populated by the kernel in one go (``MAP_POPULATE``): much
    cheaper than faulting each page in while reading into it, and returned to the
    system when the last tensor using them goes."""
    flags = getattr(mmap, "MAP_POPULATE", 0)
    if size >= _POPULATE_FROM and flags:
        try:
            return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                                        | flags))
        except OSError:
            pass  # e.g. no overcommit for a populated mapping: the heap will do
    return np.empty(size, dtype=np.uint8).data.cast("B")


class _LazyViews(dict[str, memoryview]):
    """Each tensor's bytes read into memory of its own on first access (the lazy
    reader: only what is asked for is read, once; hashing and decoding then use the
    same bytes)."""

    def __init__(self, fd: int, container: Container, where: str) -> None:
        super().__init__()
        self._fd, self._container, self._where = fd, container, where

    def __missing__(self, name: str) -> memoryview:
        entry = self._container.entries[name]
        buffer = owned_buffer(entry.nbytes)
        _read_into(self._fd, buffer, entry.start, self._where)
        self[name] = buffer
        return buffer


class FileSource:
    """An open regular file as a :class:`~vgs_ckpt._container.Source`."""

    def __init__(self, handle: IO[bytes], where: str, *, use_mmap: bool = False) -> None:
        self._handle = handle
        self._fd = handle.fileno()
        self.where = where
        self._mmap = use_mmap

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def modified(self) -> float | None:
        return os.fstat(self._fd).st_mtime

    def stream(self) -> IO[bytes]:
        self._handle.seek(0)
        return self._handle

    def read(self, offset: int, count: int) -> bytes:
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise FormatError(f"{self.where}: truncated file: expected {count} bytes at offset "
                              f"{offset}, got {len(data)}; the file is incomplete - re-save it")
        return data

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def views(self, container: Container, readahead: bool = True,
              on_ready: Ready | None = None) -> tuple[dict[str, memoryview], bool]:
        if container.total_bytes == container.header_bytes:
            return empty_views(container, on_ready)
        if readahead:  # without: a lazy reader, only what it asks for is read
            with contextlib.suppress(OSError, AttributeError):  # hints only: the disk
                # reads ahead while memory is prepared and the first bytes are hashed
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                os.posix_fadvise(self._fd, container.header_bytes, 0, os.POSIX_FADV_WILLNEED)
        if not self._mmap:
            # Memory this process owns: the bytes verified are the bytes returned, and
            # a later change to the file (an in-place rewrite, a truncation) cannot
            # change them or raise SIGBUS.
            if not readahead:
                return _LazyViews(self._fd, container, self.where), True
            return self._read_all(container, on_ready), True
        # mmap=True: a private (copy-on-write) mapping: tensors are views of the page
        # cache and a write to a tensor never reaches the file, but a non-atomic writer
        # that rewrites the file in place changes them, and truncating it raises SIGBUS.
        try:
            mapping = mmap.mmap(self._fd, container.total_bytes, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise FormatError(f"{self.where}: cannot map the tensor data ({exc}); the file "
                              "changed while being read, or is truncated") from None
        whole = memoryview(mapping)
        views = {n: whole[e.start:e.end] for n, e in container.entries.items()}
        notify(views, on_ready)
        return views, True

    def _read_all(self, container: Container, on_ready: Ready | None
                  ) -> dict[str, memoryview]:
        """The data region read in runs of about :data:`_READ_CHUNK` bytes, each into
        memory of its own that a helper thread allocates (pre-faulted) ahead of the
        reads, each tensor announced as it lands."""
        grouped = runs(container, _READ_CHUNK)
        views: dict[str, memoryview] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="vgs_ckpt-alloc") as alloc:
            buffers = [alloc.submit(owned_buffer, run[-1].end - run[0].start)
                       for run in grouped]
            for run, buffer in zip(grouped, buffers, strict=True):
                data = buffer.result()
                _read_into(self._fd, data, run[0].start, self.where)
                for e in run:
                    views[e.name] = data[e.start - run[0].start:e.end - run[0].start]
                    if on_ready is not None:
                        on_ready(e.name, views[e.name])
        return views
