"""A checkpoint store for a PBT population: one directory per member, atomic files,
retention, latest/best lookup, exploit-time checkout by hard link, and the
archive of earlier runs. The store owns the whole layout (spec section 11); it
reaches the bytes through a :class:`~vgs_ckpt.storage.Storage`."""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Unpack

from vgs_ckpt import loading, reader, writer
from vgs_ckpt.async_save import AsyncSaver, SaveHandle, default_saver
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    UsageError,
    VgsCkptError,
)
from vgs_ckpt.models import CheckpointHeader, HeaderFields, check_fields
from vgs_ckpt.storage import LocalStorage, Storage, StorageOptions, resolve

__all__ = ["CheckpointRef", "CheckpointStore", "check_member_id", "unreadable_checkpoints"]

logger = logging.getLogger("vgs_ckpt")
_MEMBER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # used with fullmatch
# step_<step>_w<write number>.safetensors; files of vgs_ckpt < 0.6 have no write number.
_FILE = re.compile(r"step_(\d{12})(?:_w(\d{12}))?\.safetensors")
_EXPLOITS = "_exploits"
PREVIOUS_RUNS = "_previous_runs"  # earlier runs moved aside by archive_run()
_CHECKOUT_RETRIES = 20


def check_member_id(member_id: str) -> str:
    """``member_id`` if it is safe as a directory name, else :class:`UsageError`.

    Allowed: letters, digits, ``_``, ``.``, ``-``; 1 to 128 characters; not starting
    with ``.`` or ``-``; never ``..``. So no id can escape the store's directory.
    """
    if type(member_id) is not str or not _MEMBER_ID.fullmatch(member_id) or ".." in member_id:
        raise UsageError(f"invalid member id {member_id!r}: use 1-128 letters, digits, '_', "
                         "'.', '-', starting with a letter or digit, and no '..'")
    return member_id


@dataclass(frozen=True)
class CheckpointRef:
    """One stored checkpoint of one member."""

    member_id: str
    step: int
    path: Path | str  # a Path in a local store, the key (URL) in an object store
    performance: float | None
    # For a save still running in the background (``async_save=True``): its handle.
    pending: SaveHandle | None = field(default=None, compare=False, repr=False)
    # The file's header, when the store read it (checkpoints(), latest(), best()).
    header: CheckpointHeader | None = field(default=None, compare=False, repr=False)


class CheckpointStore:
    """Per-member checkpoint files under ``root``, safe for several processes at once.

    Layout: ``root/<member_id>/step_<step, 12 digits>_w<write number, 12
    digits>.safetensors``. Every write is atomic (temp file, fsync, rename), so a
    reader never sees a torn file. After each save the member's files are pruned to
    the ``keep_last`` newest plus the ``keep_best`` best by performance (``mode``
    "max" or "min").

    "Newest" means most recently written: the member's write number, one more than
    the highest in its directory at each save, orders its files, whatever the clock
    or the steps say. A run restarted from step 1 in the same directory is newer
    than a dead run's step 208, so its checkpoints are never pruned because of the
    old ones, and :meth:`latest` returns them as soon as it has saved; a clock that
    stepped back changes nothing. Files of vgs_ckpt < 0.6 (``step_<step>.safetensors``,
    no write number) are older than every numbered one, and ordered among
    themselves by modification time, then step.

    A file in a member's directory that cannot be read (empty, corrupt, not a
    regular file) is skipped with a warning: it never blocks a save, retention or a
    resume, and is never deleted (``vgs-ckpt sweep --dry-run`` lists it).

    Opening a store removes the temp files that killed vgs_ckpt writers left in its
    own directories (:func:`sweep`); a temp file a live writer still holds, and any
    file vgs_ckpt did not write, is never touched. A store whose root this process
    cannot write (a read-only mount, another user's directory) opens for reading,
    with a warning; its saves fail with :class:`CheckpointIOError`.

    With ``async_save=True``, :meth:`save` returns once the tensors are snapshotted
    (``vgs_ckpt.save_async``; ``saver`` defaults to the process-wide one) and the
    write, and then retention, run in the background. Every read of a member
    through this store (``latest``, ``best``, ``checkpoints``, ``checkout``,
    ``load_latest``) first waits for that member's saves pending in this process, so
    an exploit always gets the donor's newest state. A background save that failed is
    skipped (the member's last committed file is used, with a warning); :meth:`flush`
    and the save's handle (``ref.pending``) raise its error. Other processes see a
    file only once it is complete, as with synchronous saves.

    ``root`` may be a URL (``s3://bucket/run``, opened with ``storage_options``) or
    ``storage`` a backend (default: the local file system). The store needs no
    rename, link or lock from it: each checkpoint is created once under a key that
    is new (``If-None-Match: *`` on S3, a hard link locally), so two writers of one
    member, on one host or on several sharing the store, never replace each other's
    files (the one that loses the race takes the next write number). Refs, paths and
    :attr:`root` are ``Path`` objects in a local store and ``str`` keys (URLs)
    otherwise. A store is a context manager: leaving the ``with`` block is
    :meth:`close` (wait for pending saves, raise the first failure).

    Example:
        >>> store = CheckpointStore("ckpts", keep_last=2, keep_best=1)
        >>> store.save("3", model.get_parameters(), step=150, performance=0.9)
    """

    def __init__(self, root: str | os.PathLike[str], *, keep_last: int = 2, keep_best: int = 1,
                 mode: Literal["max", "min"] = "max", durable: bool = True,
                 async_save: bool = False, saver: AsyncSaver | None = None,
                 storage: Storage | None = None,
                 storage_options: StorageOptions | None = None) -> None:
        if keep_last < 1 or keep_best < 0:
            raise UsageError(f"keep_last must be >= 1 and keep_best >= 0, got {keep_last} "
                             f"and {keep_best}")
        if mode not in ("max", "min"):
            raise UsageError(f"mode must be 'max' or 'min', got {mode!r}")
        self.storage, self._root = resolve(root, storage, storage_options=storage_options,
                                           function="CheckpointStore")
        self._local = isinstance(self.storage, LocalStorage)
        self.root: Path | str = self._path(self._root)
        self.keep_last, self.keep_best, self.mode = keep_last, keep_best, mode
        self.durable = durable
        self.async_save = async_save
        self._saver = saver
        self._failed: list[BaseException] = []
        self._sequence: dict[str, int] = {}  # the last write number given, per member
        self._forget_pending()
        _STORES.add(self)
        self._warned: set[tuple[str, str]] = set()
        try:
            self.storage.makedirs(self._key())
        except CheckpointNotFoundError:  # e.g. an object store's bucket: the error says
            raise
        except CheckpointIOError as exc:
            message = f"cannot create the store directory {self.root}: {exc.strerror or exc}"
            if exc.errno is None:
                raise CheckpointIOError(message) from None
            raise CheckpointIOError(exc.errno, message, str(self.root)) from None
        self.read_only = not self.storage.writable(self._key())
        if self.read_only:
            logger.warning("%s is not writable by this process: the store is open for "
                           "reading only, and saves to it will fail", self.root)
        # What opening removed.
        self.swept: list[Path | str] = [] if self.read_only else self.sweep()

    def _path(self, key: str) -> Path | str:
        """A key as the store hands it out: a Path locally, the key itself otherwise."""
        return Path(key) if self._local else key

    def sweep(self, *, dry_run: bool = False) -> list[Path | str]:
        """Remove the temp files of dead vgs_ckpt writers in the store's directories
        (the root, each member's directory and its ``_exploits``); returns what was
        (or would be) removed. Nothing else, and nothing deeper, is touched. On an
        object store: abort the incomplete uploads below the root that are older than
        an hour (:data:`~vgs_ckpt.storage.objects.MIN_UPLOAD_AGE`)."""
        if not self._local:  # an object store: one listing of incomplete uploads
            return [self._path(key) for key in
                    self.storage.sweep(self._key(), recursive=True, dry_run=dry_run)]
        directories = [self._key()]
        for member_id in self._member_dirs():
            directories += [self._key(member_id), self._key(member_id, _EXPLOITS)]
        return [self._path(key) for directory in directories
                for key in self.storage.sweep(directory, dry_run=dry_run)]

    def _key(self, *names: str) -> str:
        """The storage key of ``names`` below the root."""
        return self.storage.join(self._root, *names)

    def close(self) -> None:
        """Wait for every pending background save (:meth:`flush`); the store stays
        usable (closing is for the ``with`` statement)."""
        self.flush()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:  # keep the original error; the saves still finish
            self._wait()

    def archive_run(self) -> Path | str | None:
        """Move every member's files (and anything else in the root but earlier
        archives) into ``root/_previous_runs/<UTC time>/``, so a fresh run starts in
        an empty store; the archive's path, or None if there was nothing to move."""
        self._wait()
        entries = [info for info in self.storage.entries(self._key())
                   if info.name != PREVIOUS_RUNS]
        if not entries:
            return None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self._key(PREVIOUS_RUNS, stamp)
        self.storage.makedirs(target)
        for info in entries:
            self.storage.move(info.key, self.storage.join(target, info.name))
        self._sequence.clear()
        return self._path(target)

    def _forget_pending(self) -> None:
        """No background save pending (at creation, and in a forked child, where the
        parent's saves are the parent's)."""
        self._done = threading.Condition()  # notified when a background save is settled
        self._pending: dict[str, list[SaveHandle]] = {}
        self._sequence_lock = threading.Lock()

    def _member_dirs(self) -> list[str]:
        try:
            entries = self.storage.entries(self._key())
        except CheckpointIOError:
            return []
        return sorted(e.name for e in entries if e.directory
                      and _MEMBER_ID.fullmatch(e.name) and ".." not in e.name)

    def member_ids(self) -> list[str]:
        """The ids of the members that have at least one checkpoint, sorted."""
        self._wait()
        return [m for m in self._member_dirs() if self._paths(m)]

    def member_dir(self, member_id: str) -> Path | str:
        return self._path(self._key(check_member_id(member_id)))

    def save(self, member_id: str, parameters: Mapping[Any, Any] | Checkpoint, /,
             **fields: Unpack[HeaderFields]) -> CheckpointRef:
        """Save one checkpoint of a member atomically, then apply retention (in the
        background, after the commit, with ``async_save``).

        ``fields`` are the header's (:class:`~vgs_ckpt.HeaderFields`: ``step``,
        ``performance``, ``hyperparams``, ``lineage``, ``format``, ``created_at``,
        ``provenance``); ``member_id`` is the member's, and may be left out.
        """
        check_member_id(member_id)
        # A Checkpoint brings its header's fields; its member id is this member's now.
        parameters, fields = writer.unpack(parameters, fields,  # type: ignore[assignment]
                                           drop=("member_id",))
        if fields.get("member_id", member_id) != member_id:
            raise UsageError(f"save({member_id!r}, ...): member_id={fields['member_id']!r} "
                             "names another member; leave it out")
        fields = check_fields({**fields, "member_id": member_id}, "CheckpointStore.save")
        step, performance = fields.get("step"), fields.get("performance")
        if type(step) is not int or step < 0:
            raise UsageError(f"save({member_id!r}, ...): step must be an int >= 0, got "
                             f"{step!r:.60}")
        def next_key(_: str = "") -> str:  # another writer took a number: the next one
            return self._new_key(member_id, step)

        key = next_key()
        header, arrays = writer.prepare(parameters, key, fields, "CheckpointStore.save")
        if not self.async_save:
            _, key = writer.commit_new(self.storage, key, header, arrays, durable=self.durable,
                                       next_key=next_key)
            self._prune(member_id)
            return CheckpointRef(member_id, step, self._path(key), performance)
        handle = (self._saver or default_saver()).submit(
            self.storage, key, header, arrays, durable=self.durable,
            retarget=next_key)
        with self._done:
            self._pending.setdefault(member_id, []).append(handle)
        handle.add_done_callback(lambda done: self._committed(member_id, done))
        # The key planned; should another writer take it first, the save goes to the
        # next write number (handle.path is the key written).
        return CheckpointRef(member_id, step, self._path(key), performance, handle)

    def _new_key(self, member_id: str, step: int) -> str:
        number = self._next_write_number(member_id)
        return self._key(member_id, f"step_{step:012d}_w{number:012d}.safetensors")

    def _next_write_number(self, member_id: str) -> int:
        """One more than any write number of the member, on disk or given out by this
        process (a background save may not be on disk yet)."""
        with self._sequence_lock:
            on_disk = max((_write_number(k) for k in self._paths(member_id)), default=0)
            number = max(on_disk, self._sequence.get(member_id, 0)) + 1
            self._sequence[member_id] = number
            return number

    def _committed(self, member_id: str, handle: SaveHandle) -> None:
        """On the writer thread, after a background save: retention, or note the error.
        The save counts as settled (for :meth:`_wait`) only after this."""
        error = handle.exception()
        try:
            if error is None:
                self._prune(member_id)
            else:  # the member's last committed file stays its latest
                logger.warning("background save of %s failed (%s); the member's last "
                               "committed checkpoint stays its latest", handle.path, error)
        except (OSError, VgsCkptError) as exc:  # retention is retried at the next save
            logger.warning("retention for member %s failed: %s", member_id, exc)
        finally:
            with self._done:
                if error is not None:
                    self._failed.append(error)
                self._pending[member_id].remove(handle)
                self._done.notify_all()

    def _wait(self, member_id: str | None = None) -> None:
        """Wait until this process's saves of a member (or of all members) are settled:
        committed and pruned, or failed."""
        with self._done:
            self._done.wait_for(lambda: not any(
                handles for m, handles in self._pending.items() if member_id in (None, m)))

    def flush(self) -> None:
        """Wait for every pending background save of this store; raise the first
        error of any that failed since the last flush."""
        self._wait()
        with self._done:
            failed, self._failed = self._failed, []
        if failed:
            raise failed[0]

    def _ref(self, member_id: str, key: str) -> CheckpointRef | None:
        path = self._path(key)
        try:
            header = reader.read_header(key, storage=self.storage)
        except CheckpointNotFoundError:
            return None  # pruned by another process meanwhile
        except VgsCkptError as exc:
            # Skipped, never deleted: the user decides (vgs-ckpt sweep --dry-run lists it).
            seen = (key, type(exc).__name__)
            if seen not in self._warned:
                self._warned.add(seen)
                logger.warning("member %s: skipping unreadable checkpoint %s (%s)",
                               member_id, path, exc)
            return None
        return CheckpointRef(member_id, header.step, path, header.performance, header=header)

    def checkpoints(self, member_id: str) -> list[CheckpointRef]:
        """The member's readable checkpoints, in the order they were written, oldest
        first (headers are read, not tensors: each ref has its ``header``)."""
        self._wait(member_id)
        return self._refs(member_id)

    def _refs(self, member_id: str) -> list[CheckpointRef]:
        refs = (self._ref(member_id, key) for key in self._paths(member_id))
        return [ref for ref in refs if ref is not None]

    def _paths(self, member_id: str) -> list[str]:
        """The keys of the member's files in write order: by write number; files
        without one (from vgs_ckpt < 0.6) first, by modification time, then step."""
        found = []
        for entry in self.storage.entries(self._key(check_member_id(member_id))):
            match = _FILE.fullmatch(entry.name)
            if match is None or entry.directory:
                continue
            mtime = 0 if match[2] else entry.modified_ns
            found.append((int(match[2] or 0), mtime, int(match[1]), entry.name, entry.key))
        return [item[-1] for item in sorted(found)]

    def latest(self, member_id: str) -> CheckpointRef | None:
        """The member's most recently written checkpoint, or None."""
        self._wait(member_id)
        for key in reversed(self._paths(member_id)):
            ref = self._ref(member_id, key)
            if ref is not None:
                return ref
        return None

    def _best_first(self, refs: list[CheckpointRef]) -> list[CheckpointRef]:
        """The refs with a performance, best first (the newer one wins a tie)."""
        sign = 1 if self.mode == "max" else -1
        return sorted((r for r in refs if r.performance is not None),
                      key=lambda r: (sign * (r.performance or 0.0), r.step), reverse=True)

    def best(self, member_id: str) -> CheckpointRef | None:
        """The member's best checkpoint by performance, or None."""
        ranked = self._best_first(self.checkpoints(member_id))
        return ranked[0] if ranked else None

    def _prune(self, member_id: str) -> None:
        refs = self._refs(member_id)  # not checkpoints(): this may run on the writer thread
        keep = {r.path for r in refs[-self.keep_last:]}
        keep |= {r.path for r in self._best_first(refs)[:self.keep_best]}
        for ref in refs:
            if ref.path not in keep:
                self.storage.delete(os.fspath(ref.path))

    def checkout(self, donor_id: str, recipient_id: str) -> CheckpointRef:
        """Pin the donor's latest checkpoint into the recipient's namespace.

        The file is hard-linked (no bytes copied) to
        ``root/<recipient>/_exploits/<donor>_step_<step>.safetensors``, or copied where
        links are not possible. The donor may prune or replace its files meanwhile:
        a file that vanishes between lookup and link is looked up again.

        Raises:
            CheckpointNotFoundError: the donor has no checkpoint.
        """
        target_dir = self._key(check_member_id(recipient_id), _EXPLOITS)
        self.storage.makedirs(target_dir)
        for old in self.storage.entries(target_dir):  # keep only the newest pin
            if not old.directory and not old.name.startswith("."):
                self.storage.delete(old.key)
        for _ in range(_CHECKOUT_RETRIES):
            ref = self.latest(donor_id)
            if ref is None:
                raise CheckpointNotFoundError(f"member {donor_id!r} has no checkpoint in "
                                              f"{self.root}; it must save one before it can "
                                              "be exploited")
            target = self.storage.join(target_dir,
                                       f"{donor_id}_step_{ref.step:012d}.safetensors")
            try:
                self.storage.pin(os.fspath(ref.path), target)
            except CheckpointNotFoundError:
                continue  # the donor pruned it after we looked: look again
            return CheckpointRef(donor_id, ref.step, self._path(target), ref.performance,
                                 header=ref.header)
        raise VgsCkptError(f"could not pin a checkpoint of member {donor_id!r}: its files "
                           f"kept changing during {_CHECKOUT_RETRIES} attempts")

    def load_latest(self, member_id: str, **load_kwargs: Any) -> tuple[Checkpoint, CheckpointRef]:
        """Load the member's newest checkpoint (retrying if it is pruned meanwhile)."""
        for _ in range(_CHECKOUT_RETRIES):
            ref = self.latest(member_id)
            if ref is None:
                raise CheckpointNotFoundError(f"member {member_id!r} has no checkpoint")
            try:
                return loading.load(os.fspath(ref.path), storage=self.storage,
                                    **load_kwargs), ref
            except CheckpointNotFoundError:
                continue
        raise VgsCkptError(f"member {member_id!r}'s checkpoints kept changing")


def unreadable_checkpoints(root: str | os.PathLike[str], *, storage: Storage | None = None,
                           storage_options: StorageOptions | None = None
                           ) -> list[tuple[Path | str, str]]:
    """Every store checkpoint file (``step_*.safetensors``) under ``root`` that cannot be
    read, with why (for ``vgs-ckpt sweep``)."""
    backend, key = resolve(root, storage, storage_options=storage_options,
                           function="unreadable_checkpoints")
    local = isinstance(backend, LocalStorage)
    found: list[tuple[Path | str, str]] = []
    for info in backend.entries(key, recursive=True):
        if not info.directory and _FILE.fullmatch(info.name):
            try:
                reader.read_header(info.key, storage=backend)
            except CheckpointNotFoundError:
                continue
            except VgsCkptError as exc:
                found.append((Path(info.key) if local else info.key, str(exc)))
    return found


_STORES: weakref.WeakSet[CheckpointStore] = weakref.WeakSet()


def _forget_in_child() -> None:
    for store in list(_STORES):
        store._forget_pending()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def _write_number(key: str) -> int:
    match = _FILE.fullmatch(key.rstrip("/").rsplit("/", 1)[-1])
    return int(match[2]) if match and match[2] else 0
