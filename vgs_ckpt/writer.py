"""Writing checkpoints: a parameter tree into a safetensors file with a JSON header.

This is the only place where a tree is turned into bytes. The bytes go to a
:class:`~vgs_ckpt.storage.Storage` (default: local files); reading is in
:mod:`vgs_ckpt.reader`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, Unpack

from vgs_ckpt import _header
from vgs_ckpt._container import MAX_HEADER_BYTES, layout, loads_json
from vgs_ckpt._header import META_HEADER
from vgs_ckpt._tree import Array
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import CheckpointExistsError, FormatError, UsageError, VgsCkptError
from vgs_ckpt.models import CheckpointHeader, HeaderFields, Producer, check_fields
from vgs_ckpt.storage import Storage, StorageOptions, resolve

__all__ = ["HeaderFields", "describe", "save", "save_bytes"]


def write(stream: IO[bytes], header: CheckpointHeader, arrays: Mapping[str, Array],
          data: Mapping[str, memoryview] | None = None, *, seekable: bool = False
          ) -> CheckpointHeader:
    """Write header and data (``data``, or each array's own bytes) to ``stream``;
    returns the header as written.

    The default is one forward pass: every digest is computed first (the bytes are
    in memory already), then the header and the data are written in order, with no
    seek, so any stream will do. With ``seekable`` (a local file), hashing overlaps
    writing instead: a placeholder header goes first and is rewritten at the end.
    """
    sizes = [(n, a.dtype, a.shape, a.nbytes) for n, a in arrays.items()]
    head, order = layout(sizes, _header.metadata(header))
    check_readable(head)  # before anything is written (digests have a fixed length)

    def raw(name: str) -> memoryview:
        return data[name] if data is not None else arrays[name].data()

    if not seekable:
        header = _header.with_digests(header, _header.digests((n, raw(n)) for n in order))
        head, _ = layout(sizes, _header.metadata(header))
        stream.write(head)
        for name in order:
            stream.write(raw(name))
        return header
    stream.write(head)

    def written() -> Iterator[tuple[str, memoryview]]:
        for name in order:  # each view is hashed while the next ones are written
            view = raw(name)
            stream.write(view)
            yield name, view

    header = _header.with_digests(header, _header.digests(written()))
    real_head, _ = layout(sizes, _header.metadata(header))
    if len(real_head) != len(head):  # digests have a fixed length, so this cannot happen
        raise AssertionError("header length changed when digests were filled in")
    stream.seek(0)
    stream.write(real_head)
    stream.seek(0, io.SEEK_END)
    return header


def check_readable(head: bytes) -> None:
    """Refuse a header that this library's reader would refuse: over the size cap, or
    JSON that does not parse back (an integer beyond the digit limit, too deep)."""
    if len(head) - 8 > MAX_HEADER_BYTES:
        raise UsageError(
            f"the header would be {len(head) - 8} bytes, over the {MAX_HEADER_BYTES}-byte "
            "limit that readers (and the safetensors library) enforce (spec section 2); "
            "store large strings or many small values as tensors or arrays instead")
    try:
        meta = loads_json(head[8:], "<header>", "safetensors header")["__metadata__"]
        loads_json(meta[META_HEADER], "<header>", "vgs_ckpt header")
    except FormatError as exc:
        raise UsageError(f"the header would not read back ({exc}); nothing was "
                         "written") from None


def unpack(parameters: Mapping[Any, Any] | Checkpoint, fields: Mapping[str, Any],
           drop: tuple[str, ...] = ()) -> tuple[Mapping[Any, Any], dict[str, Any]]:
    """The tree and header arguments to write: a :class:`Checkpoint` gives its tree and
    its header's fields (``Checkpoint.save_fields``, provenance included, but ``drop``),
    which the given ``fields`` override."""
    if isinstance(parameters, Checkpoint):
        carried = {k: v for k, v in parameters.save_fields().items() if k not in drop}
        return parameters.parameters, {**carried, **fields}
    return parameters, dict(fields)


def prepare(parameters: Mapping[Any, Any] | Checkpoint, where: str, fields: Mapping[str, Any],
            function: str) -> tuple[CheckpointHeader, dict[str, Array]]:
    """The validated header (placeholder digests) and the arrays of a tree (or of a
    :class:`Checkpoint`) to write, from ``function``'s header arguments. Shared by every
    writer."""
    tree, fields = unpack(parameters, fields)
    return _header.describe(tree, check_fields(fields, function), where=where,
                            vgs_fix="fix the scaler's configuration")


def commit(storage: Storage, key: str, header: CheckpointHeader, arrays: Mapping[str, Array],
           data: Mapping[str, memoryview] | None = None, *, durable: bool = True,
           exclusive: bool = False) -> CheckpointHeader:
    """Write a checkpoint to ``key`` of ``storage`` atomically; the header written.
    With ``exclusive``, only if ``key`` does not exist (else CheckpointExistsError)."""
    seekable = storage.capabilities.seekable_writes
    written: list[CheckpointHeader] = []
    storage.commit(key, lambda f: written.append(write(f, header, arrays, data,
                                                       seekable=seekable)),
                   durable=durable, exclusive=exclusive)
    return written[0]


CREATE_RETRIES = 20  # keys a save whose key must be new tries (others may take them first)


def commit_new(storage: Storage, key: str, header: CheckpointHeader,
               arrays: Mapping[str, Array], data: Mapping[str, memoryview] | None = None, *,
               next_key: Callable[[str], str], durable: bool = True
               ) -> tuple[CheckpointHeader, str]:
    """:func:`commit` to a key nobody else has: where another writer created ``key``
    first, the write goes to ``next_key(key)`` instead (up to :data:`CREATE_RETRIES`
    keys). The header and the key written."""
    for attempt in range(CREATE_RETRIES):
        try:
            return commit(storage, key, header, arrays, data, durable=durable,
                          exclusive=True), key
        except CheckpointExistsError:
            if attempt == CREATE_RETRIES - 1:
                raise
            key = next_key(key)
    raise AssertionError("unreachable")


def check_path(path: Any, parameters: Any, function: str = "save") -> str:
    """``path`` as a string, or a clear error when the arguments look swapped."""
    if isinstance(path, Mapping) or isinstance(parameters, str | os.PathLike):
        raise UsageError(f"{function}(path, parameters, ...): got a "
                         f"{type(path).__qualname__} as the path and a "
                         f"{type(parameters).__qualname__} as the parameters; the path comes "
                         "first - did you swap the arguments?")
    if not isinstance(path, str | os.PathLike):
        raise UsageError(f"{function}(): the path must be a str or os.PathLike, got "
                         f"{type(path).__qualname__} (use save_bytes for bytes)")
    return os.fspath(path)


def save(path: str | os.PathLike[str], parameters: Mapping[Any, Any] | Checkpoint, *,
         storage: Storage | None = None, storage_options: StorageOptions | None = None,
         durable: bool = True, **fields: Unpack[HeaderFields]) -> CheckpointHeader:
    """Save a parameter tree atomically as a safetensors checkpoint.

    Args:
        path: the file (or, with ``storage``, the key) to write; missing parent
            directories are created.
        parameters: a dict tree (e.g. ``model.get_parameters()``) whose leaves are
            None, bool, int, float, str, torch tensors, numpy arrays or scalars; or a
            :class:`~vgs_ckpt.Checkpoint` (from ``load``): its tree, and its header's
            fields (step, performance, member id, hyperparameters, lineage, format,
            created_at, provenance) unless given here.
        storage: where to write (default: the local file system; a URL such as
            ``s3://bucket/key`` writes to its object store: one PUT, or a multipart
            upload completed last, so no reader sees a part of it).
        storage_options: options of a URL's filesystem (fsspec's: credentials,
            ``endpoint_url``, ...).
        durable: fsync the file and its directory (default True).
        **fields: the header's fields (:class:`~vgs_ckpt.HeaderFields`): ``step``
            (required, >= 0), ``performance`` (finite or None), ``member_id``,
            ``hyperparams``, ``lineage`` (PBT bookkeeping), ``format``
            (``v2_full_parameters``, the default, or the legacy ``v1_policy_only``),
            ``created_at`` (default: now, UTC), ``provenance`` (upgrade history).
            docs/integration.md section "save's keyword arguments" is the reference.

    Returns:
        The header that was written.

    Raises:
        UsageError: a header field or the VGS state is invalid, a field is unknown,
            tensor names collide, or the arguments are swapped.
        UnsupportedTypeError: a leaf or key cannot be stored (the path is named).
        CheckpointIOError: the file could not be written; the old file is intact.

    Example:
        >>> vgs_ckpt.save(tmp / "m.safetensors", {"policy": {"w": torch.ones(2)}}, step=1)
    """
    backend, key = resolve(check_path(path, parameters), storage,
                           storage_options=storage_options, function="save")
    header, arrays = prepare(parameters, key, fields, "save")
    return commit(backend, key, header, arrays, durable=durable)


def save_bytes(parameters: Mapping[Any, Any] | Checkpoint,
               **fields: Unpack[HeaderFields]) -> bytes:
    """The bytes :func:`save` would write, as a ``bytes`` object."""
    header, arrays = prepare(parameters, "<bytes>", fields, "save_bytes")
    buffer = io.BytesIO()
    write(buffer, header, arrays)
    return buffer.getvalue()


def describe(parameters: Mapping[Any, Any], *,
             producer: Producer | Mapping[str, str] | None = None, where: str = "<memory>",
             invalid: type[VgsCkptError] = UsageError, fix: str = "",
             **fields: Unpack[HeaderFields]) -> CheckpointHeader:
    """The header :func:`save` would write for ``parameters``, with every tensor digest
    None: no tensor byte is read, copied or hashed (tensors may be on any device, even
    ``meta``). Invalid fields or VGS settings raise ``invalid`` (with ``fix``)."""
    header, _ = _header.describe(
        parameters, check_fields(fields, "describe"), producer=producer, where=where,
        for_writing=False, error=invalid, vgs_error=invalid, vgs_fix=fix)
    return header
