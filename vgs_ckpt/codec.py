"""Saving and loading checkpoints: safetensors container, JSON header, digests."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import IO, Any

import numpy as np
import pydantic
import torch

from vgs_ckpt import _header, legacy
from vgs_ckpt._atomic import atomic_write
from vgs_ckpt._container import (
    BytesSource,
    Container,
    Entry,
    FileSource,
    Source,
    layout,
    open_file,
    read_container,
)
from vgs_ckpt._tree import Array, Decoder
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.detect import sniff_container
from vgs_ckpt.errors import (
    IntegrityError,
    SchemaError,
    TreeError,
    UsageError,
)
from vgs_ckpt.migrations import warn_upgraded
from vgs_ckpt.models import CheckpointFormat, CheckpointV2, Lineage, Provenance
from vgs_ckpt.upgrade import from_legacy
from vgs_ckpt.upgrade import upgrade as upgrade_checkpoint

__all__ = ["Checkpoint", "load", "load_bytes", "read_header", "save", "save_bytes"]

_INLINE_HASH = 256 * 1024  # smaller arrays are hashed on the calling thread
_HASH_THREADS = 2
Header = _header.Header


def _write(stream: IO[bytes], header: Header, arrays: dict[str, Array]) -> Header:
    """Write header and data; digests are computed while the data is written."""
    sizes = [(n, a.dtype, a.shape, len(a.data)) for n, a in arrays.items()]
    head, order = layout(sizes, _header.metadata(header))
    stream.write(head)
    digests: dict[str, str | Future[str]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="vgs_ckpt-hash") as pool:
        for name in order:
            data = arrays[name].data
            digests[name] = (pool.submit(_header.digest, data) if len(data) > _INLINE_HASH
                             else _header.digest(data))
            stream.write(data)
        final = {n: d if isinstance(d, str) else d.result() for n, d in digests.items()}
    header = _header.with_digests(header, final)
    real_head, _ = layout(sizes, _header.metadata(header))
    if len(real_head) != len(head):  # digests have a fixed length, so this cannot happen
        raise AssertionError("header length changed when digests were filled in")
    stream.seek(0)
    stream.write(real_head)
    stream.seek(0, io.SEEK_END)
    return header


def save(path: str | os.PathLike[str], parameters: Mapping[Any, Any], *, step: int,
         performance: float | None = None, member_id: str | None = None,
         hyperparams: Mapping[str, Any] | None = None,
         lineage: Lineage | Mapping[str, Any] | None = None,
         format: CheckpointFormat | str = CheckpointFormat.V2_FULL_PARAMETERS,
         created_at: datetime | None = None, provenance: Provenance | None = None,
         durable: bool = True) -> Header:
    """Save a parameter tree atomically as a safetensors checkpoint.

    Args:
        path: the file to write; missing parent directories are created.
        parameters: a dict tree (e.g. ``model.get_parameters()``) whose leaves are
            None, bool, int, float, str, torch tensors, numpy arrays or scalars.
        step: the training step (>= 0).
        performance: the member's metric, finite or None.
        member_id, hyperparams, lineage: PBT bookkeeping stored in the header.
        format: ``v2_full_parameters`` (default) or the legacy ``v1_policy_only``.
        created_at: timestamp to record (default: now, UTC).
        provenance: upgrade history to record (set by ``vgs-ckpt upgrade``).
        durable: fsync the file and its directory (default True).

    Returns:
        The header that was written.

    Raises:
        UnsupportedTypeError: a leaf or key cannot be stored (the path is named).
        SchemaError: a header field or the VGS state is invalid.
        CheckpointIOError: the file could not be written; the old file is intact.

    Example:
        >>> vgs_ckpt.save(tmp / "m.safetensors", {"policy": {"w": torch.ones(2)}}, step=1)
    """
    target = os.fspath(path)
    header, arrays = _header.build(parameters, step=step, performance=performance,
                                   member_id=member_id, hyperparams=hyperparams,
                                   lineage=lineage, format=format, created_at=created_at,
                                   where=target, provenance=provenance)
    written: list[Header] = []
    atomic_write(target, lambda f: written.append(_write(f, header, arrays)), durable=durable)
    return written[0]


def save_bytes(parameters: Mapping[Any, Any], *, step: int, performance: float | None = None,
               member_id: str | None = None, hyperparams: Mapping[str, Any] | None = None,
               lineage: Lineage | Mapping[str, Any] | None = None,
               format: CheckpointFormat | str = CheckpointFormat.V2_FULL_PARAMETERS,
               created_at: datetime | None = None,
               provenance: Provenance | None = None) -> bytes:
    """The bytes :func:`save` would write, as a ``bytes`` object."""
    header, arrays = _header.build(parameters, step=step, performance=performance,
                                   member_id=member_id, hyperparams=hyperparams,
                                   lineage=lineage, format=format, created_at=created_at,
                                   where="<bytes>", provenance=provenance)
    buffer = io.BytesIO()
    _write(buffer, header, arrays)
    return buffer.getvalue()


def read_header(path: str | os.PathLike[str]) -> Header:
    """The validated header of a vgs_ckpt file, reading no tensor bytes.

    Raises:
        FormatError, SchemaError, UnsupportedVersionError: the file is not a readable
            vgs_ckpt checkpoint.
    """
    with open_file(path) as handle:
        source = FileSource(handle, os.fspath(path))
        return _header.parse(read_container(source), source.where)


def _device(map_location: str | torch.device | None) -> torch.device:
    try:
        return torch.device(map_location if map_location is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"invalid map_location {map_location!r}: {exc}; use e.g. 'cpu' or "
                         "'cuda:0'") from None


def _array(kind: str, entry: Entry, raw: memoryview, shared: bool) -> Any:
    """The array stored in ``raw``: a view of it when ``shared`` (a private file
    mapping, aligned), else a copy."""
    dtype = entry.dtype
    if kind == "numpy":
        if dtype.numpy is None:
            raise TreeError(f"tensor {entry.name!r} of dtype {dtype.code} is marked as a numpy "
                            "array but numpy has no such dtype")
        array = np.frombuffer(raw, dtype=dtype.numpy).reshape(entry.shape)
        return array if shared else array.copy()
    if shared and entry.nbytes and entry.start % dtype.itemsize == 0:
        flat = torch.frombuffer(raw, dtype=torch.uint8)
        return flat.view(dtype.torch).reshape(entry.shape)
    tensor = torch.empty(entry.shape, dtype=dtype.torch)
    if entry.nbytes:
        tensor.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(raw, dtype=np.uint8)
    return tensor


def _check_digests(where: str, header: Header, views: dict[str, memoryview]) -> None:
    """Hash every tensor (in file order, on two threads) and compare with the header."""
    big = [n for n, v in views.items() if len(v) > _INLINE_HASH]
    with ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="vgs_ckpt-hash") as pool:
        digests = dict(zip(big, pool.map(lambda n: _header.digest(views[n]), big), strict=True))
    digests.update({n: _header.digest(v) for n, v in views.items() if n not in digests})
    bad = [n for n in views if digests[n] != header.tensors[n].digest]
    if bad:
        others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise IntegrityError(
            f"{where}: tensor {bad[0]!r}{others} does not match its digest "
            f"{header.tensors[bad[0]].digest}; the file is corrupt - restore it from a "
            "good copy (load with verify=False only to salvage data)")


class _Arrays:
    """Makes each array on its first reference from the tree, in the kind the tree
    asks for, on the requested device; later references get the same object."""

    def __init__(self, container: Container, views: dict[str, memoryview], shared: bool,
                 device: torch.device) -> None:
        self._entries, self._views, self._shared = container.entries, views, shared
        self._device = device
        self._made: dict[str, tuple[str, Any]] = {}

    def get(self, name: str, kind: str) -> Any:
        if name not in self._made:
            if name not in self._entries:
                raise TreeError(f"the tree refers to tensor {name!r}, which is not in the file")
            value = _array(kind, self._entries[name], self._views[name], self._shared)
            if kind == "torch" and self._device.type != "cpu":
                value = value.to(self._device)
            self._made[name] = (kind, value)
        made_kind, value = self._made[name]
        if made_kind != kind:
            raise TreeError(f"tensor {name!r} is referenced both as a torch tensor and as a "
                            "numpy array")
        return value


def _load_safetensors(source: Source, device: torch.device, verify: bool,
                      path: str | None) -> Checkpoint:
    container = read_container(source)
    header = _header.parse(container, source.where)
    views, shared = source.views(container)
    if verify:
        _check_digests(source.where, header, views)
    try:
        arrays = _Arrays(container, views, shared, device)
        parameters = Decoder(arrays.get).decode(header.tree)
        if not isinstance(parameters, dict):
            raise TreeError("the root of the tree is not a dict node")
    except TreeError as exc:
        raise TreeError(f"{source.where}: {exc}; the file is corrupt") from None
    if isinstance(header, CheckpointV2):
        summary = _header.vgs_summary(parameters, header.tree, source.where)
        if _json_or_none(summary) != _json_or_none(header.vgs):
            raise SchemaError(f"{source.where}: the header's VGS summary does not match the "
                              f"stored {_header.VGS_KEY!r}; the file is corrupt")
    return Checkpoint(parameters, header, "safetensors", path)


def _load(source: Source, data: str | bytes | bytearray | memoryview,
          map_location: str | torch.device | None, verify: bool, upgrade: bool,
          path: str | None) -> Checkpoint:
    device = _device(map_location)
    size = source.size()
    kind = sniff_container(source.read(0, min(64, size)), source.where)
    if kind == "safetensors":
        checkpoint = _load_safetensors(source, device, verify, path)
    else:
        found = legacy.read_legacy(data, container=kind, map_location=device)
        mtime = datetime.fromtimestamp(os.stat(path).st_mtime, UTC) if path else None
        checkpoint = from_legacy(found, kind, path, mtime)
    if not upgrade:
        return checkpoint
    upgraded, applied = upgrade_checkpoint(checkpoint)
    if kind != "safetensors":
        warn_upgraded(source.where, f"{checkpoint.format.value} ({kind}, layout "
                      f"{found.layout})", applied or ["read from a torch.save container"])
    elif applied:
        warn_upgraded(source.where, checkpoint.format.value, applied)
    return upgraded


def _json_or_none(model: pydantic.BaseModel | None) -> str | None:
    return None if model is None else model.model_dump_json()  # NaN-safe comparison


def load(path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu",
         verify: bool = True, upgrade: bool = True) -> Checkpoint:
    """Load a checkpoint file: a vgs_ckpt file or a legacy ``torch.save`` one.

    The format is recognised from the bytes. Legacy torch files are read with
    ``torch.load(weights_only=True)`` only, so loading never runs code.

    Args:
        path: the file to read.
        map_location: device for every torch tensor (numpy arrays stay numpy).
        verify: recompute every tensor's digest and compare it with the header.
        upgrade: upgrade an older format (or VGS state) to the latest in memory, with a
            :class:`LegacyFormatWarning`; with False the checkpoint is returned as stored.

    Returns:
        A :class:`Checkpoint` with ``parameters``, ``header`` and ``format``.

    Raises:
        CheckpointNotFoundError: no such file.
        FormatError: the bytes are not a well-formed checkpoint.
        IntegrityError: a tensor's bytes do not match its digest (the tensor is named).
        UnsupportedVersionError: the file has a newer format than this library knows.
        UnsafeCheckpointError: a legacy pickle asks for a forbidden global (nothing runs).

    Example:
        >>> ckpt = vgs_ckpt.load("member_3.safetensors")
        >>> ckpt.header.step, ckpt.format
    """
    where = os.fspath(path)
    with open_file(path) as handle:
        return _load(FileSource(handle, where), where, map_location, verify, upgrade, where)


def load_bytes(data: bytes | bytearray | memoryview, *,
               map_location: str | torch.device | None = "cpu",
               verify: bool = True, upgrade: bool = True) -> Checkpoint:
    """Load a checkpoint from bytes (as :func:`load` does for a file)."""
    return _load(BytesSource(data), data, map_location, verify, upgrade, None)
