"""``FsspecStorage``: checkpoints in an object store (S3 and S3-compatible servers, GCS,
Azure; ``memory://`` for tests), through `fsspec <https://filesystem-spec.readthedocs.io>`_.

Keys are URLs (``s3://bucket/runs/a/step_150.safetensors``). What each operation
does, and what it guarantees:

- **commit** is all or nothing without a rename. On S3 the object is streamed to
  one PUT (objects below :data:`PART_BYTES`) or to a multipart upload (its parts
  :data:`UPLOADS` at a time) that is completed last; until then no reader can see
  any of it, and a failed write aborts the upload. ``exclusive=True`` sends
  ``If-None-Match: *``, so of two writers of one key exactly one succeeds; a server
  that ignores the header (detected once per bucket with a probe object) falls back
  to checking before the write, with a warning (two writers racing within that
  window can then overwrite each other). GCS and Azure files publish on close too;
  ``memory://`` objects are buffered and stored in one step.
- **open** reads lazily with ranged GETs: the object's first bytes (one GET, which
  also gives its size and ETag; :data:`HEAD_BYTES`, or as many as the last header
  this backend read had when under 4 MiB, so a store's listings read each header in
  one GET and no tensor bytes), the rest of a larger header with one more, and each subtree asked
  for with one GET per run of adjacent tensors. Every later GET carries
  ``If-Match: <ETag>``: an object replaced while it is being read is an error, never
  a mix of two versions. A whole ``load`` streams the data with one GET straight
  into the tensors' memory (runs of :data:`RUN_BYTES`), each tensor hashed as soon
  as it is complete, so memory holds the tensors and one chunk besides.
- **pin** is a server-side copy (S3 CopyObject): no tensor byte passes through
  the client, and the copy is the recipient's own object, so the donor's
  retention can delete its file at any moment after.
- **move** is a copy and a delete of each object (object stores have no rename);
  only :meth:`CheckpointStore.archive_run` moves.
- **sweep** aborts the incomplete multipart uploads of ``.safetensors`` keys below
  a prefix (what a killed writer leaves; never visible as an object) that were
  started more than ``min_age`` seconds ago (default :data:`MIN_UPLOAD_AGE`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime
from typing import IO, Any

from vgs_ckpt._container import (
    SNIFF_BYTES,
    Container,
    Entry,
    Ready,
    empty_views,
    looks_like_safetensors,
    runs,
)
from vgs_ckpt.errors import (
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointNotFoundError,
    FormatError,
    MissingDependencyError,
    UsageError,
)
from vgs_ckpt.storage.base import Capabilities, ObjectInfo, key_taken
from vgs_ckpt.storage.local import owned_buffer

__all__ = ["HEAD_BYTES", "MIN_UPLOAD_AGE", "PART_BYTES", "RUN_BYTES", "UPLOADS", "FsspecStorage",
           "ObjectSource", "for_url", "is_url"]

logger = logging.getLogger("vgs_ckpt")
# The first ranged GET of an object: most headers fit (a larger one takes one more GET),
# and a header-only read (the store's listings) brings few tensor bytes along.
HEAD_BYTES = 16 * 1024
RUN_BYTES = 16 * 1024 * 1024  # a whole load downloads in ranged GETs of this size
PART_BYTES = 64 * 1024 * 1024  # multipart upload part size (one PUT below it)
UPLOADS = 4  # parts of one upload in flight at once
MIN_UPLOAD_AGE = 3600.0  # an incomplete upload younger than this may have a live writer
_HINT_LIMIT = 4 * 1024 * 1024  # a first GET never asks for more (a huge header: two)
_MERGE_GAP = 4096  # tensors asked for together are read in one GET across gaps this small
_CHUNK = 8 * 1024 * 1024  # a streamed GET is copied into the tensors' memory in chunks this big
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Filesystems whose files become visible whole, on close (and never before).
_PUBLISH_ON_CLOSE = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})
_BUFFERED = frozenset({"memory"})  # written whole from memory in one call
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "azure",
           "abfss": "azure", "az": "azure"}


def is_url(path: str) -> bool:
    """Whether ``path`` names an object by URL (``scheme://...``), not a local file."""
    return bool(_URL.match(path))


_BACKENDS: dict[Any, FsspecStorage] = {}
_BACKENDS_LOCK = threading.Lock()


def for_url(url: str, storage_options: Mapping[str, Any] | None = None) -> FsspecStorage:
    """The backend for ``url`` (one per filesystem instance, as fsspec caches them)."""
    try:
        import fsspec
    except ImportError:  # pragma: no cover - torch depends on fsspec
        raise MissingDependencyError(f"{url}: reading and writing URLs needs fsspec: pip "
                                     "install 'vgs_ckpt[s3]'") from None
    protocol = url.split("://", 1)[0].lower()
    _check_protocol(protocol)  # before any filesystem is made (some connect at once)
    try:
        fs, _ = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        hint = (f"pip install 'vgs_ckpt[{extra}]'" if extra else
                "install the fsspec filesystem for it")
        raise MissingDependencyError(f"{url}: the {protocol}:// filesystem is not installed "
                                     f"({exc}); {hint}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{url}: cannot open the {protocol}:// filesystem with "
                         f"storage_options {dict(storage_options or {})!r}: {exc}") from None
    with _BACKENDS_LOCK:
        backend = _BACKENDS.get(fs)
        if backend is None:
            backend = _BACKENDS[fs] = FsspecStorage(fs, protocol=protocol)
        return backend


def _check_protocol(protocol: str) -> None:
    if protocol not in _PUBLISH_ON_CLOSE | _BUFFERED:
        raise UsageError(
            f"{protocol}:// is not supported: vgs_ckpt commits a checkpoint whole or not at "
            "all, which needs a filesystem whose writes publish on close "
            f"({', '.join(sorted(_PUBLISH_ON_CLOSE | _BUFFERED))}); write to a local path "
            "instead")


class FsspecStorage:
    """Checkpoints in an fsspec filesystem; keys are URLs. See the module docstring."""

    def __init__(self, fs: Any, *, protocol: str | None = None) -> None:
        names = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
        self.protocol = (protocol or names[0]).lower()
        _check_protocol(self.protocol)
        self.fs = fs
        self.s3 = self.protocol in ("s3", "s3a") and hasattr(fs, "_call_s3")
        self.capabilities = Capabilities(
            atomic_rename=False, hard_links=False, locks=False, conditional_create=True,
            seekable_writes=False, mmap=False)
        self._conditional: dict[str, bool] = {}  # per bucket: does If-None-Match work?
        self._buckets: set[str] = set()  # buckets seen to exist
        # How many bytes the first GET of an object asks for: the last header's size.
        self.head_hint = HEAD_BYTES

    def __repr__(self) -> str:
        return f"FsspecStorage({self.protocol}://)"

    # -- keys ---------------------------------------------------------------------------

    def path(self, key: str) -> str:
        """The filesystem's own path of ``key`` (the URL without its scheme)."""
        return str(self.fs._strip_protocol(key))

    def join(self, prefix: str, *names: str) -> str:
        if not names:
            return prefix
        return prefix.rstrip("/") + "/" + "/".join(n.strip("/") for n in names)

    def _bucket(self, key: str) -> str:
        return self.path(key).split("/", 1)[0]

    # -- reads --------------------------------------------------------------------------

    def open(self, key: str, *, mmap: bool = False) -> ObjectSource:
        source = ObjectSource(self, key)
        source.prime()  # the first GET: a missing object fails here, as open() would
        return source

    # -- writes -------------------------------------------------------------------------

    def commit(self, key: str, write: Callable[[IO[bytes]], None], *,
               durable: bool = True, exclusive: bool = False) -> None:
        """Create or replace ``key`` whole (see the module docstring); ``durable`` is
        implied (a completed PUT is durable). With ``exclusive``, an existing object
        is a CheckpointExistsError and nothing is written."""
        path = self.path(key)
        if exclusive and not self._conditional_works(key) and self._exists(path):
            raise key_taken(key)
        if self.protocol in _BUFFERED:
            self._commit_buffered(key, path, write, exclusive)
            return
        try:
            handle: Any = (_Upload(self.fs, path, exclusive) if self.s3 else
                           self.fs.open(path, "xb" if exclusive else "wb"))
        except OSError as exc:
            raise _io_error(exc, f"cannot start writing {key}") from None
        try:
            write(handle)
            handle.close()  # completes the upload: the object appears whole, now
        except BaseException as exc:
            _discard(handle)
            if isinstance(exc, FileExistsError) and not isinstance(exc, CheckpointExistsError):
                raise key_taken(key) from None
            if isinstance(exc, OSError) and not isinstance(exc, CheckpointIOError):
                raise _io_error(exc, f"writing {key} failed; nothing was committed (the "
                                "previous object, if any, is intact)") from None
            raise

    def _commit_buffered(self, key: str, path: str, write: Callable[[IO[bytes]], None],
                         exclusive: bool) -> None:
        buffer = io.BytesIO()
        write(buffer)
        try:
            self.fs.pipe_file(path, buffer.getvalue(), mode="create" if exclusive
                              else "overwrite")
        except FileExistsError:
            raise key_taken(key) from None
        except OSError as exc:
            raise _io_error(exc, f"writing {key} failed") from None

    def _conditional_works(self, key: str) -> bool:
        """Whether the server honours ``If-None-Match: *`` (probed once per bucket with
        a small object that is removed again); always True off S3."""
        if not self.s3:
            return True
        bucket = self._bucket(key)
        if bucket not in self._conditional:
            probe = f"{bucket}/.vgsckpt-probe-{uuid.uuid4().hex}"
            try:
                self.fs.pipe_file(probe, b"", mode="create")
                try:
                    self.fs.pipe_file(probe, b"", mode="create")
                    works = False
                except FileExistsError:
                    works = True
            except OSError as exc:
                raise _io_error(exc, f"cannot write to the bucket of {key}") from None
            finally:
                self._quiet_rm(probe)
            if not works:
                logger.warning("%s://%s ignores conditional writes (If-None-Match): "
                               "exclusive commits check for the key first instead, so two "
                               "writers racing for one key can overwrite each other",
                               self.protocol, bucket)
            self._conditional[bucket] = works
        return self._conditional[bucket]

    def _quiet_rm(self, path: str) -> None:
        with contextlib.suppress(OSError):
            self.fs.rm_file(path)

    def _exists(self, path: str) -> bool:
        try:
            self.fs.invalidate_cache(path)
            self.fs.info(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _io_error(exc, f"cannot look up {path}") from None

    # -- listings -----------------------------------------------------------------------

    def entries(self, prefix: str, *, recursive: bool = False) -> list[ObjectInfo]:
        root = self.path(prefix).rstrip("/")
        self.fs.invalidate_cache(root)  # other writers: never answer from a stale listing
        try:
            if recursive:
                found = self.fs.find(root, detail=True, withdirs=False)
                items = list(found.values())
            else:
                items = self.fs.ls(root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _io_error(exc, f"cannot list {prefix}") from None
        out = []
        for item in items:
            name = str(item["name"]).rstrip("/")
            relative = name[len(root):].lstrip("/") if name.startswith(root) else ""
            if not relative:  # the prefix itself (a listing of one object)
                continue
            directory = item.get("type") == "directory"
            out.append(ObjectInfo(self.join(prefix, relative), int(item.get("size") or 0),
                                  _modified_ns(item), directory))
        return sorted(out, key=lambda i: i.key)

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _io_error(exc, f"cannot remove {key}") from None

    def pin(self, source: str, target: str, *, overwrite: bool = True) -> None:
        """A server-side copy of ``source`` to ``target`` (no bytes through this
        process); with ``overwrite=False`` an existing ``target`` is an error."""
        if not overwrite and self._exists(self.path(target)):
            raise key_taken(target)
        try:
            self._copy(source, target)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{source} does not exist (removed before it could "
                                          f"be pinned as {target})") from None
        except OSError as exc:
            raise _io_error(exc, f"cannot copy {source} to {target}") from None

    def _copy(self, source: str, target: str) -> None:
        """One object copied on the server (S3 CopyObject; no listing, no bytes here)."""
        self.fs.cp_file(self.path(source), self.path(target))

    def move(self, source: str, target: str) -> None:
        try:
            self.fs.invalidate_cache()
            if self.fs.isdir(self.path(source)):
                pairs = [(info.key, self.join(target, info.key[len(source.rstrip("/")) + 1:]))
                         for info in self.entries(source, recursive=True)]
            else:
                pairs = [(source, target)]
            for old, new in pairs:
                self._copy(old, new)
                self.fs.rm_file(self.path(old))
        except OSError as exc:
            raise _io_error(exc, f"cannot move {source} to {target}") from None

    def makedirs(self, prefix: str) -> None:
        """Prefixes are implicit; on S3 the bucket must exist (it is never created)."""
        if not self.s3:
            return
        bucket = self._bucket(prefix)
        if bucket in self._buckets:
            return
        try:
            self.fs.invalidate_cache(bucket)
            exists = self.fs.exists(bucket)
        except OSError as exc:
            raise _io_error(exc, f"cannot reach the bucket of {prefix}") from None
        if not exists:
            raise CheckpointNotFoundError(f"the bucket {bucket!r} of {prefix} does not exist; "
                                          "create it first")
        self._buckets.add(bucket)

    def writable(self, prefix: str) -> bool:
        """True: an object store tells about permissions only when writing (a denied
        save is a CheckpointIOError)."""
        return True

    def sweep(self, prefix: str, *, recursive: bool = False, dry_run: bool = False,
              min_age: float | None = None) -> list[str]:
        """Abort the incomplete multipart uploads of ``.safetensors`` keys directly
        below ``prefix`` (with ``recursive``, anywhere below it) started more than
        ``min_age`` seconds ago (default :data:`MIN_UPLOAD_AGE`); the keys they were
        for. Nothing else is touched; other backends have nothing to sweep."""
        if not self.s3:
            return []
        age = MIN_UPLOAD_AGE if min_age is None else min_age
        bucket, _, below = self.path(prefix).rstrip("/").partition("/")
        below = below + "/" if below else ""
        uploads = self._uploads(bucket, below, prefix)
        now = time.time()
        removed = []
        for upload in uploads:
            key = str(upload["Key"])
            rest = key[len(below):]
            if not key.endswith(".safetensors") or (not recursive and "/" in rest):
                continue
            started = upload.get("Initiated")
            if isinstance(started, datetime) and now - started.timestamp() < age:
                continue
            url = self.join(prefix, rest)
            if not dry_run:
                try:
                    self.fs.abort_mpu(bucket, key, upload["UploadId"])
                except OSError as exc:
                    logger.warning("cannot abort the incomplete upload of %s (%s)", url, exc)
                    continue
            removed.append(url)
        return removed

    def _uploads(self, bucket: str, below: str, prefix: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        marker: dict[str, str] = {}
        while True:
            try:
                page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=below,
                                       **marker)
            except OSError as exc:
                raise _io_error(exc, f"cannot list the incomplete uploads below {prefix}"
                                ) from None
            found += page.get("Uploads", [])
            if not page.get("IsTruncated"):
                return found
            marker = {"KeyMarker": page["NextKeyMarker"],
                      "UploadIdMarker": page["NextUploadIdMarker"]}


class ObjectSource:
    """One object as a :class:`~vgs_ckpt._container.Source`, read with ranged GETs."""

    def __init__(self, storage: FsspecStorage, key: str) -> None:
        self._storage, self._fs = storage, storage.fs
        self.where = key
        self._path = storage.path(key)
        self._head = b""  # the first bytes of the object
        self._size: int | None = None
        self._etag: str | None = None
        self._modified: float | None = None

    def prime(self) -> None:
        """The first GET: the object's first bytes (the backend's ``head_hint``), size
        and ETag; then, if that ended inside a safetensors header, the rest of it."""
        if self._size is not None:
            return
        first = self._storage.head_hint
        if self._storage.s3:
            try:
                self._head, self._size = self._s3_get(0, first, first=True)
            except _EmptyObject:
                self._head, self._size = b"", 0
        else:
            info = self._info()
            self._size = int(info.get("size") or 0)
            self._modified = _modified_ns(info) / 1e9 or None
            self._head = self._get(0, min(first, self._size))
        if looks_like_safetensors(self._head[:SNIFF_BYTES]):
            (length,) = struct.unpack_from("<Q", self._head)
            end = 8 + length
            if len(self._head) < end <= self._size:  # at most the readers' header limit
                self._head += self._get(len(self._head), end)
            if end <= min(self._size, _HINT_LIMIT):  # the next header: likely this size
                self._storage.head_hint = max(end, SNIFF_BYTES)

    def _info(self) -> dict[str, Any]:
        try:
            info: dict[str, Any] = self._fs.info(self._path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"checkpoint {self.where} does not exist") from None
        except OSError as exc:
            raise _io_error(exc, f"cannot open checkpoint {self.where}") from None
        if info.get("type") == "directory":
            raise UsageError(f"{self.where} is a prefix (a directory), not a checkpoint "
                             "object; pass the URL of an object")
        return info

    def _s3_request(self, start: int, end: int, *, first: bool = False) -> dict[str, Any]:
        """Send ``GET bytes=start-(end-1)`` (``If-Match`` the ETag of the first GET);
        the response, its body not read yet."""
        from fsspec.asyn import sync

        fs, bucket_key = self._fs, self._path.split("/", 1)
        if len(bucket_key) != 2 or not bucket_key[1]:
            raise UsageError(f"{self.where} names a bucket, not a checkpoint object")
        bucket, key = bucket_key
        match = {} if self._etag is None else {"IfMatch": self._etag}
        try:
            response: dict[str, Any] = sync(
                fs.loop, fs._call_s3, "get_object", Bucket=bucket, Key=key,
                Range=f"bytes={start}-{end - 1}", **match)
        except FileNotFoundError:
            if first and self._is_prefix():
                raise UsageError(f"{self.where} is a prefix (a directory), not a checkpoint "
                                 "object; pass the URL of an object") from None
            raise CheckpointNotFoundError(f"checkpoint {self.where} does not exist") from None
        except OSError as exc:
            text = str(exc)
            if first and "not satisfiable" in text:
                raise _EmptyObject from None
            if "pre-conditions" in text:
                raise FormatError(f"{self.where}: the object was replaced while it was being "
                                  "read (its ETag changed); read it again") from None
            raise _io_error(exc, f"cannot read {self.where}") from None
        if first:
            self._etag = response.get("ETag")
            modified = response.get("LastModified")
            self._modified = modified.timestamp() if isinstance(modified, datetime) else None
        return response

    def _s3_chunks(self, start: int, end: int, *, first: bool = False
                   ) -> Iterator[tuple[bytes, dict[str, Any]]]:
        """Bytes ``start:end`` with one GET, in chunks as they arrive (so a whole load
        never holds more than a chunk besides the tensors' own memory)."""
        from fsspec.asyn import sync

        response = self._s3_request(start, end, first=first)
        body = response["Body"]
        try:
            while True:
                try:
                    chunk: bytes = sync(self._fs.loop, body.read, _CHUNK)
                except (OSError, RuntimeError) as exc:  # the connection broke off
                    raise CheckpointIOError(f"reading {self.where} failed: {exc}") from None
                if not chunk:
                    return
                yield chunk, response
        finally:
            body.close()

    def _s3_get(self, start: int, end: int, *, first: bool = False) -> tuple[bytes, int]:
        """Bytes ``start:end`` (one GET) and the object's size."""
        parts: list[bytes] = []
        responses: list[dict[str, Any]] = []
        for chunk, response in self._s3_chunks(start, end, first=first):
            parts.append(chunk)
            responses[:] = [response]
        data = b"".join(parts)
        total = str(responses[0].get("ContentRange", "") if responses else ""
                    ).rpartition("/")[2]
        return data, int(total) if total.isdigit() else start + len(data)

    def _chunks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start:end`` as they arrive: on S3 one streamed GET, elsewhere GETs
        of at most :data:`RUN_BYTES`."""
        if end <= start:  # all of it came with the first GET
            return
        if self._storage.s3:
            got = 0
            for chunk, _ in self._s3_chunks(start, end):
                got += len(chunk)
                yield chunk
            if got != end - start:
                raise FormatError(f"{self.where}: truncated object: expected {end - start} "
                                  f"bytes at offset {start}, got {got}; it is incomplete or "
                                  "was replaced while being read - read it again")
            return
        for offset in range(start, end, RUN_BYTES):
            yield self._get(offset, min(end, offset + RUN_BYTES))

    def _is_prefix(self) -> bool:
        try:
            return bool(self._fs.isdir(self._path))
        except OSError:
            return False

    def _get(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the object (one ranged GET)."""
        if end <= start:
            return b""
        if self._storage.s3:
            data = self._s3_get(start, end)[0]
        else:
            try:
                data = self._fs.cat_file(self._path, start=start, end=end)
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"checkpoint {self.where} was removed while it "
                                              "was being read") from None
            except OSError as exc:
                raise _io_error(exc, f"cannot read {self.where}") from None
        if len(data) != end - start:
            raise FormatError(f"{self.where}: truncated object: expected {end - start} bytes "
                              f"at offset {start}, got {len(data)}; it is incomplete or was "
                              "replaced while being read - read it again")
        return bytes(data)

    def size(self) -> int:
        self.prime()
        assert self._size is not None
        return self._size

    def modified(self) -> float | None:
        self.prime()
        return self._modified

    def read(self, offset: int, count: int) -> bytes:
        self.prime()
        end = offset + count
        if end > self.size():
            raise FormatError(f"{self.where}: truncated object: expected {count} bytes at "
                              f"offset {offset}, the object has {self.size()}")
        cached = self._head[offset:end]
        if len(cached) == count:
            return cached
        if offset < len(self._head):  # the cached part, then the rest
            return cached + self._get(len(self._head), end)
        return self._get(offset, end)

    def stream(self) -> IO[bytes]:
        """The object as a seekable file (for torch.load of a legacy file)."""
        try:
            handle: IO[bytes] = self._fs.open(self._path, "rb")
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"checkpoint {self.where} does not exist") from None
        except OSError as exc:
            raise _io_error(exc, f"cannot open checkpoint {self.where}") from None
        return handle

    def close(self) -> None:
        self._head = b""

    def __enter__(self) -> ObjectSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fill(self, buffer: memoryview, start: int) -> None:
        """``buffer`` filled from the object at ``start``: the part the first GET already
        holds is copied, the rest streamed in with one GET."""
        done = 0
        if start < len(self._head):
            cached = self._head[start:start + len(buffer)]
            buffer[:len(cached)] = cached
            done = len(cached)
        for chunk in self._chunks(start + done, start + len(buffer)):
            buffer[done:done + len(chunk)] = chunk
            done += len(chunk)

    def views(self, container: Container, readahead: bool = True,
              on_ready: Ready | None = None) -> tuple[dict[str, memoryview], bool]:
        if container.total_bytes == container.header_bytes:
            return empty_views(container, on_ready)
        if not readahead:
            return _LazyObjectViews(self, container), True
        return self._stream_all(container, on_ready), True

    def _stream_all(self, container: Container, on_ready: Ready | None
                    ) -> dict[str, memoryview]:
        """Every tensor, streamed with one GET into runs of about :data:`RUN_BYTES` of
        memory each (the tensors' own), each tensor announced (and hashed) as soon as
        its last byte lands."""
        grouped = runs(container, RUN_BYTES)  # in file order, with no gaps
        buffers = [owned_buffer(run[-1].end - run[0].start) for run in grouped]
        views: dict[str, memoryview] = {}
        ordered = [(e, i) for i, run in enumerate(grouped) for e in run]
        state = {"at": container.header_bytes, "run": 0, "next": 0}

        def place(data: memoryview) -> None:
            while len(data):
                index = state["run"]
                run, buffer = grouped[index], buffers[index]
                offset = state["at"] - run[0].start
                count = min(len(data), len(buffer) - offset)
                buffer[offset:offset + count] = data[:count]
                state["at"] += count
                data = data[count:]
                if offset + count == len(buffer):
                    state["run"] += 1
            while state["next"] < len(ordered):  # announce every tensor now complete
                entry, index = ordered[state["next"]]
                if entry.end > state["at"]:
                    break
                start = entry.start - grouped[index][0].start
                views[entry.name] = buffers[index][start:start + entry.nbytes]
                if on_ready is not None:
                    on_ready(entry.name, views[entry.name])
                state["next"] += 1

        if container.header_bytes < len(self._head):
            place(memoryview(self._head)[container.header_bytes:container.total_bytes])
        for chunk in self._chunks(state["at"], container.total_bytes):
            place(memoryview(chunk))
        return views


class _Upload:
    """A forward-only stream that becomes one S3 object on :meth:`close`: one PUT when
    it is smaller than :data:`PART_BYTES`, else a multipart upload whose parts go up
    :data:`UPLOADS` at a time while the writer goes on (memory: that many parts), and
    whose completion is the last request. ``exclusive`` sends ``If-None-Match: *`` with
    the PUT or the completion. :meth:`discard` aborts the multipart upload."""

    def __init__(self, fs: Any, path: str, exclusive: bool) -> None:
        self._fs, self._path = fs, path
        self._bucket, _, self._key = path.partition("/")
        self._match = {"IfNoneMatch": "*"} if exclusive else {}
        # What was written and not sent yet, as views of the writer's own bytes (they
        # stay valid until commit() returns): copied once, into the request body.
        self._pending: list[memoryview] = []
        self._pending_bytes = 0
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._pending.append(view)
        self._pending_bytes += len(view)
        while self._pending_bytes >= PART_BYTES:
            self._send(self._take(PART_BYTES))
        return len(view)

    def _take(self, count: int) -> bytes:
        """The first ``count`` pending bytes, joined (the one copy)."""
        pieces, taken = [], 0
        while taken < count:
            view = self._pending[0]
            piece = view[:count - taken]
            pieces.append(piece)
            taken += len(piece)
            if len(piece) == len(view):
                self._pending.pop(0)
            else:
                self._pending[0] = view[len(piece):]
        self._pending_bytes -= taken
        return b"".join(pieces)

    def _send(self, part: bytes) -> None:
        if self._upload_id is None:
            self._upload_id = self._fs.call_s3("create_multipart_upload", Bucket=self._bucket,
                                               Key=self._key)["UploadId"]
            self._pool = ThreadPoolExecutor(UPLOADS, thread_name_prefix="vgs_ckpt-upload")
        assert self._pool is not None
        in_flight = [f for f in self._parts if not f.done()]
        if len(in_flight) >= UPLOADS:  # back-pressure: at most UPLOADS parts in memory
            wait(in_flight, return_when=FIRST_COMPLETED)
        for done in self._parts:
            if done.done():
                done.result()  # a failed part fails the write now
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._part, number, part))

    def _part(self, number: int, data: bytes) -> dict[str, Any]:
        out = self._fs.call_s3("upload_part", Bucket=self._bucket, Key=self._key,
                               UploadId=self._upload_id, PartNumber=number, Body=data)
        return {"PartNumber": number, "ETag": out["ETag"]}

    def close(self) -> None:
        if self.closed:
            return
        if self._upload_id is None:  # small: one PUT
            self._fs.call_s3("put_object", Bucket=self._bucket, Key=self._key,
                             Body=self._take(self._pending_bytes), **self._match)
        else:
            if self._pending_bytes:
                self._send(self._take(self._pending_bytes))
            parts = [f.result() for f in self._parts]
            self._fs.call_s3("complete_multipart_upload", Bucket=self._bucket, Key=self._key,
                             UploadId=self._upload_id, MultipartUpload={"Parts": parts},
                             **self._match)
            self._shutdown()
        self.closed = True
        self._fs.invalidate_cache(self._path)

    def discard(self) -> None:
        if self._upload_id is not None:
            for future in self._parts:
                future.cancel()
            self._shutdown()
            self._fs.call_s3("abort_multipart_upload", Bucket=self._bucket, Key=self._key,
                             UploadId=self._upload_id)
            self._upload_id = None
        self._pending, self._pending_bytes = [], 0
        self.closed = True

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _EmptyObject(Exception):
    """A ranged GET of an empty object (HTTP 416)."""


class _LazyObjectViews(dict[str, memoryview]):
    """Tensors read on first access; :meth:`prefetch` reads a set of them (a subtree)
    with one GET per run of adjacent tensors."""

    def __init__(self, source: ObjectSource, container: Container) -> None:
        super().__init__()
        self._source, self._container = source, container

    def __missing__(self, name: str) -> memoryview:
        self.prefetch([name])
        return dict.__getitem__(self, name)

    def prefetch(self, names: list[str]) -> None:
        entries = self._container.entries
        wanted = sorted((entries[n] for n in set(names) if n in entries and n not in self),
                        key=lambda e: e.start)
        for run in _runs(wanted):
            buffer = owned_buffer(run[-1].end - run[0].start)
            self._source.fill(buffer, run[0].start)
            for e in run:
                self[e.name] = buffer[e.start - run[0].start:e.end - run[0].start]


def _runs(entries: list[Entry]) -> Iterator[list[Entry]]:
    """``entries`` (by offset) grouped where the gap to the previous is small."""
    run: list[Entry] = []
    for entry in entries:
        if run and entry.start - run[-1].end > _MERGE_GAP:
            yield run
            run = []
        run.append(entry)
    if run:
        yield run


def _modified_ns(info: Mapping[str, Any]) -> int:
    for name in ("LastModified", "last_modified", "mtime", "updated", "created"):
        value = info.get(name)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value * 1e9)
    return 0


def _discard(handle: Any) -> None:
    """Abandon a half-written upload (S3: abort the multipart upload)."""
    try:
        if hasattr(handle, "discard"):
            handle.discard()
            handle.closed = True  # nothing left to flush (not even when collected)
    except Exception as exc:  # the original error matters more
        logger.warning("could not abort an incomplete upload (%s); the store's sweep will "
                       "(vgs-ckpt sweep)", exc)


def _io_error(exc: OSError, what: str) -> CheckpointIOError:
    if isinstance(exc, CheckpointIOError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(f"{what}: {exc}")
    if exc.errno is None:
        return CheckpointIOError(f"{what}: {exc}")
    return CheckpointIOError(exc.errno, f"{what}: {exc.strerror or exc}")
