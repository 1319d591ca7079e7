"""The storage protocol: what vgs_ckpt needs from wherever checkpoints live.

Everything above this layer (the writer, the readers, background saves, the
checkpoint store, the scheduler, the upgrade command) reaches bytes through a
:class:`Storage`; nothing above it opens, renames, links, locks or syncs a file.

Keys are ``/``-separated strings in the backend's namespace (for
:class:`~vgs_ckpt.storage.LocalStorage`, file system paths). A backend says what
it can do in :attr:`Storage.capabilities`; callers that need more than the
protocol's guarantees (a pin that costs no bytes, a lock a sweep can test) ask
there first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Protocol, runtime_checkable

from vgs_ckpt._container import Source
from vgs_ckpt.errors import CheckpointExistsError

__all__ = ["Capabilities", "ObjectInfo", "Storage", "key_taken"]


def key_taken(key: str) -> CheckpointExistsError:
    """The error of an exclusive commit (or pin) whose key exists already."""
    return CheckpointExistsError(f"{key} already exists (another writer created it first); "
                                 "nothing was written")


@dataclass(frozen=True)
class Capabilities:
    """What a backend supports beyond the protocol's guarantees."""

    atomic_rename: bool  # commit() replaces an object in one step (a temp file and a rename)
    hard_links: bool  # pin() shares the bytes instead of copying them
    locks: bool  # a writer holds a lock that a sweep can test (temp files of live writers)
    conditional_create: bool  # pin(..., overwrite=False) is atomic: never clobbers a name
    seekable_writes: bool  # the stream commit() passes can seek (the writer's fast path)
    mmap: bool  # open(key, mmap=True) maps the object's bytes


@dataclass(frozen=True)
class ObjectInfo:
    """One entry of a listing."""

    key: str
    size: int
    modified_ns: int  # 0 where the backend has no modification time
    directory: bool = False

    @property
    def name(self) -> str:
        """The last segment of the key."""
        return self.key.rstrip("/").rsplit("/", 1)[-1]


@runtime_checkable
class Storage(Protocol):
    """A place to keep checkpoints.

    Guarantees every backend gives: :meth:`commit` is all-or-nothing (a reader sees
    the old object or the whole new one, never a part), :meth:`open` reads a
    consistent object, a failed call raises a :class:`~vgs_ckpt.CheckpointIOError`
    (or :class:`~vgs_ckpt.CheckpointNotFoundError`) naming the key.
    """

    capabilities: Capabilities

    def join(self, prefix: str, *names: str) -> str:
        """The key of ``names`` below ``prefix``."""
        ...

    def open(self, key: str, *, mmap: bool = False) -> Source:
        """The object at ``key``, for ranged reads (a missing key is a
        CheckpointNotFoundError; anything that is not a plain object, a UsageError)."""
        ...

    def commit(self, key: str, write: Callable[[IO[bytes]], None], *,
               durable: bool = True, exclusive: bool = False) -> None:
        """Create or replace ``key`` atomically with what ``write(stream)`` writes to a
        forward stream (seekable only if ``capabilities.seekable_writes``). With
        ``durable``, the object survives a power loss once this returns. With
        ``exclusive``, only create: if ``key`` exists (or another writer creates it
        first), raise CheckpointExistsError and leave it as it is (atomic where
        ``capabilities.conditional_create``)."""
        ...

    def entries(self, prefix: str, *, recursive: bool = False) -> list[ObjectInfo]:
        """The entries directly below ``prefix`` (with ``recursive``, every object
        below it), sorted by key; a missing prefix lists as empty."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        ...

    def pin(self, source: str, target: str, *, overwrite: bool = True) -> None:
        """Make ``target`` a complete copy of ``source`` (a hard link where possible),
        atomically. Raises CheckpointNotFoundError if ``source`` is gone, and
        FileExistsError if ``target`` exists and not ``overwrite``."""
        ...

    def move(self, source: str, target: str) -> None:
        """Rename ``source`` (an object or a prefix) to ``target``."""
        ...

    def makedirs(self, prefix: str) -> None:
        """Make ``prefix`` exist as a place for objects (a no-op where prefixes are
        implicit)."""
        ...

    def writable(self, prefix: str) -> bool:
        """Whether this process can create objects below ``prefix``."""
        ...

    def sweep(self, prefix: str, *, recursive: bool = False, dry_run: bool = False,
              min_age: float | None = None) -> list[str]:
        """Remove what vgs_ckpt writers that died left below ``prefix`` (temp objects,
        interrupted pins), never anything else; the keys removed (or, with
        ``dry_run``, that would be)."""
        ...
