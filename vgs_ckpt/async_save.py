"""Non-blocking saves: snapshot the tensors, then write on a background thread.

:func:`save_async` takes the same arguments as :func:`vgs_ckpt.save`. It validates
the tree and the header and copies every tensor into a reusable host buffer (a
*snapshot*) on the calling thread, and returns a :class:`SaveHandle`. Encoding
the header, writing, hashing, both fsyncs and the rename then run on one
background thread, so training may change its tensors as soon as the call
returns.

Rules (docs/spec.md section 11 and docs/performance.md):

- **Order.** Saves run one at a time on one background thread, in call order. A
  second save to the same path waits for the first and then replaces its file.
- **Back-pressure.** At most ``max_pending`` snapshots (default 1) are held in
  memory; a call that would exceed it waits for the oldest save to finish.
  Snapshot buffers are kept and reused from save to save (they are resized only
  when a tree needs more bytes).
- **Failures.** A save that fails on the background thread raises at
  :meth:`SaveHandle.result`; like :func:`vgs_ckpt.save`, it leaves the old file
  (or none), never a partial one.
- **Exit.** Pending saves finish before the interpreter exits. A process killed
  with SIGKILL loses its pending saves; their targets keep their old files.
- **CUDA.** Tensors on a GPU are copied into pinned host buffers with
  non-blocking copies on a side stream that waits for the current one; the call
  returns after the copies completed (untested here: the project's machines have
  no GPU).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Unpack

import numpy as np
import torch

from vgs_ckpt._tree import Array
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import UsageError
from vgs_ckpt.models import CheckpointHeader, HeaderFields
from vgs_ckpt.storage import Storage, StorageOptions, resolve
from vgs_ckpt.writer import check_path, commit, commit_new, prepare

__all__ = ["AsyncSaver", "SaveHandle", "save_async"]

logger = logging.getLogger("vgs_ckpt")
_ALIGN = 64  # each array starts at a multiple of this in its snapshot buffer


class SaveHandle:
    """A save running in the background; see :func:`save_async`."""

    def __init__(self, path: str, future: Future[CheckpointHeader], snapshot_seconds: float
                 ) -> None:
        self.path = path
        self._future = future
        self.snapshot_seconds = snapshot_seconds  # how long the caller was blocked

    def done(self) -> bool:
        """Whether the save finished (committed, or failed)."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> CheckpointHeader:
        """Wait for the save; the header written, or the save's error re-raised.

        Raises:
            TimeoutError: still running after ``timeout`` seconds.
            CheckpointIOError, ...: what the background write raised.
        """
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Wait for the save; its error, or None when it committed."""
        return self._future.exception(timeout)

    def add_done_callback(self, callback: Callable[[SaveHandle], object]) -> None:
        """Call ``callback(handle)`` when the save finishes (on the writer thread, or
        now if it already has)."""
        self._future.add_done_callback(lambda _: callback(self))

    def __repr__(self) -> str:
        state = "pending" if not self.done() else (
            "failed" if self.exception() else "committed")
        return f"SaveHandle({self.path!r}, {state})"


class _Buffer:
    """A reusable host buffer that snapshots are copied into."""

    def __init__(self) -> None:
        self.memory = torch.empty(0, dtype=torch.uint8)
        self.pinned = False

    def reserve(self, nbytes: int, pinned: bool) -> torch.Tensor:
        if self.memory.numel() < nbytes or (pinned and not self.pinned):
            self.memory = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self.memory = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            self.pinned = pinned
        return self.memory


def _offsets(arrays: Mapping[str, Array]) -> tuple[dict[str, int], int]:
    offsets, total = {}, 0
    for name, array in arrays.items():
        offsets[name] = total
        total += -(-array.nbytes // _ALIGN) * _ALIGN
    return offsets, total


def _snapshot(arrays: Mapping[str, Array], buffer: _Buffer) -> dict[str, memoryview]:
    """Copy every array into ``buffer``; the bytes of each, as memoryviews of it."""
    offsets, total = _offsets(arrays)
    cuda = [a.value for a in arrays.values()
            if isinstance(a.value, torch.Tensor) and a.value.is_cuda]
    memory = buffer.reserve(total, pinned=bool(cuda))
    stream = None
    if cuda:
        stream = torch.cuda.Stream(device=cuda[0].device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(cuda[0].device))
    views: dict[str, memoryview] = {}
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for name, array in arrays.items():
            start = offsets[name]
            raw = memory[start:start + array.nbytes]
            value = array.value
            if array.nbytes == 0:
                pass
            elif isinstance(value, torch.Tensor):
                source = value.detach().resolve_conj().resolve_neg()
                target = raw.view(array.dtype.torch).view(source.shape)
                target.copy_(source, non_blocking=source.is_cuda)
            else:
                numpy_dtype = array.dtype.numpy
                if numpy_dtype is None:  # the encoder only admits numpy dtypes
                    raise AssertionError(f"{name}: no numpy dtype for {array.dtype.code}")
                target_np = raw.numpy().view(numpy_dtype).reshape(array.shape)
                np.copyto(target_np, np.asarray(value), casting="equiv")
            views[name] = raw.numpy().data.cast("B")
    if stream is not None:
        stream.synchronize()  # the caller may change the originals once we return
    return views


@dataclass
class _Job:
    """One snapshotted save waiting for the writer thread."""

    storage: Storage
    target: str
    header: CheckpointHeader
    arrays: Mapping[str, Array]
    data: dict[str, memoryview]
    buffer: _Buffer
    durable: bool
    # For keys that must be new (the store's): the next key to try when another
    # writer took this one; the handle's path follows.
    retarget: Callable[[str], str] | None = None
    handle: SaveHandle | None = None

    def run(self) -> CheckpointHeader:
        if self.retarget is None:
            return commit(self.storage, self.target, self.header, self.arrays, self.data,
                          durable=self.durable)
        header, self.target = commit_new(self.storage, self.target, self.header,
                                         self.arrays, self.data, next_key=self.retarget,
                                         durable=self.durable)
        if self.handle is not None:
            self.handle.path = self.target
        return header


class AsyncSaver:
    """One background writer thread with at most ``max_pending`` snapshots in memory.

    :func:`save_async` uses a process-wide default saver; make your own for a
    different ``max_pending`` (each saver has its own thread and buffers). A saver is
    a context manager: leaving the ``with`` block is :meth:`close`.
    """

    def __init__(self, max_pending: int = 1) -> None:
        if type(max_pending) is not int or max_pending < 1:
            raise UsageError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.max_pending = max_pending
        self._reset()
        _SAVERS.add(self)

    def _reset(self) -> None:
        """A saver with nothing pending (at creation, and in a forked child)."""
        self._free = [_Buffer() for _ in range(self.max_pending)]
        self._slots = threading.Semaphore(self.max_pending)
        self._lock = threading.Lock()
        self._queue: list[tuple[Future[CheckpointHeader], _Job]] = []
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._pending: list[SaveHandle] = []  # not finished yet, in call order
        self._closed = False

    def save(self, path: str | os.PathLike[str], parameters: Mapping[Any, Any] | Checkpoint, *,
             storage: Storage | None = None, storage_options: StorageOptions | None = None,
             durable: bool = True, **fields: Unpack[HeaderFields]) -> SaveHandle:
        """:func:`save_async` on this saver."""
        backend, target = resolve(check_path(path, parameters, "save_async"), storage,
                                  storage_options=storage_options, function="save_async")
        header, arrays = prepare(parameters, target, fields, "save_async")
        return self.submit(backend, target, header, arrays, durable=durable)

    def submit(self, backend: Storage, target: str, header: CheckpointHeader,
               arrays: Mapping[str, Array], *, durable: bool = True,
               retarget: Callable[[str], str] | None = None) -> SaveHandle:
        """Snapshot a prepared checkpoint and queue its write (what :meth:`save` does
        after validating). With ``retarget``, the key must be new: when another writer
        created it first, the write goes to ``retarget(key)`` instead (up to
        :data:`~vgs_ckpt.writer.CREATE_RETRIES` keys)."""
        started = time.perf_counter()
        self._slots.acquire()  # back-pressure: wait for a free snapshot buffer
        try:
            with self._lock:
                if self._closed:
                    raise UsageError("this AsyncSaver is closed (close() was called, or the "
                                     "interpreter is exiting); save with a new AsyncSaver "
                                     "or with vgs_ckpt.save")
                buffer = self._free.pop()
            try:
                data = _snapshot(arrays, buffer)
            except BaseException:
                self._release(buffer)
                raise
        except BaseException:
            self._slots.release()
            raise
        future: Future[CheckpointHeader] = Future()
        # The job keeps the snapshot, not the caller's tensors (they may be freed now).
        described = {name: Array(a.dtype, a.shape, None) for name, a in arrays.items()}
        handle = SaveHandle(target, future, time.perf_counter() - started)
        job = _Job(backend, target, header, described, data, buffer, durable, retarget, handle)
        with self._lock:
            self._queue.append((future, job))
            self._pending.append(handle)
            self._start()
            self._wake.notify()
        return handle

    def _release(self, buffer: _Buffer) -> None:
        with self._lock:
            self._free.append(buffer)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="vgs_ckpt-async-save",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    if self._closed:
                        return
                    self._wake.wait()
                future, job = self._queue.pop(0)
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(job.run())
            except BaseException as exc:  # re-raised at SaveHandle.result()
                future.set_exception(exc)
            finally:
                job.data.clear()  # the views of the buffer go before the buffer is reused
                self._release(job.buffer)
                self._slots.release()
                with self._lock:
                    self._pending = [h for h in self._pending if not h.done()]

    def pending(self) -> int:
        """How many saves have not finished yet."""
        with self._lock:
            return sum(not handle.done() for handle in self._pending)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every save started so far has finished (errors stay in their
        handles)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            handles = list(self._pending)
        for handle in handles:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                handle.exception(left)
            except TimeoutError:
                raise TimeoutError(f"{self.pending()} background saves still pending after "
                                   f"{timeout} s") from None

    def close(self) -> None:
        """Finish every pending save, then stop the thread."""
        self.wait()
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


_DEFAULT: list[AsyncSaver] = []  # the process-wide saver, made on first use
_DEFAULT_LOCK = threading.Lock()
_SAVERS: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()


def _forget_in_child() -> None:
    """After fork, in the child: the parent's pending saves are the parent's (its
    writer thread finishes them); the child starts with none, so it never waits at
    exit for a future that no thread of its own will complete, and never inherits a
    lock the writer thread held at the fork."""
    global _DEFAULT_LOCK  # noqa: PLW0603  (a lock held at the fork stays held)
    _DEFAULT_LOCK = threading.Lock()
    for saver in list(_SAVERS):
        saver._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def default_saver() -> AsyncSaver:
    """The process-wide saver behind :func:`save_async` (``max_pending=1``)."""
    with _DEFAULT_LOCK:
        if not _DEFAULT:
            _DEFAULT.append(AsyncSaver())
            _at_exit(_DEFAULT[0])
        return _DEFAULT[0]


def _at_exit(saver: AsyncSaver) -> None:
    """Finish the saver's pending saves when the interpreter exits: in the hooks that
    ``threading`` runs before ``concurrent.futures`` stops accepting work (the writer
    hashes on a thread pool), else with ``atexit``."""
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading._register_atexit")
        register(_finish_at_exit, saver)
    except RuntimeError:
        atexit.register(_finish_at_exit, saver)


def _finish_at_exit(saver: AsyncSaver) -> None:
    with saver._lock:
        pending = list(saver._pending)
    if pending:
        logger.info("vgs_ckpt: finishing %d pending background save(s) before exit",
                    len(pending))
    saver.close()
    for handle in pending:
        error = handle.exception()
        if error is not None:  # nobody is left to call result(): say it plainly
            print(f"vgs_ckpt: the background save of {handle.path} did NOT complete before "
                  f"exit: {type(error).__name__}: {error}; the file keeps its previous "
                  "content (or does not exist)", file=sys.stderr)


def save_async(path: str | os.PathLike[str], parameters: Mapping[Any, Any] | Checkpoint, *,
               storage: Storage | None = None, storage_options: StorageOptions | None = None,
               durable: bool = True, **fields: Unpack[HeaderFields]) -> SaveHandle:
    """Save like :func:`vgs_ckpt.save`, blocking only while the tensors are copied.

    Arguments as for :func:`vgs_ckpt.save`. Invalid arguments raise here (as
    ``save`` would); the write's own failures raise at ``handle.result()``. See the
    module docstring for ordering, back-pressure and exit.

    Returns:
        A :class:`SaveHandle`: ``done()``, ``result(timeout=None)`` (the header
        written), ``snapshot_seconds``.

    Example:
        >>> handle = vgs_ckpt.save_async("m.safetensors", model.get_parameters(), step=150)
        >>> train_more(model)          # the snapshot is already taken
        >>> handle.result()            # committed (or the write's error)
    """
    return default_saver().save(path, parameters, storage=storage,
                                storage_options=storage_options, durable=durable, **fields)
