"""Saving and loading checkpoints: safetensors container, JSON header, digests."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pydantic
import torch
import xxhash

from vgs_ckpt import _header
from vgs_ckpt._atomic import atomic_write
from vgs_ckpt._container import (
    BytesSource,
    Container,
    FileSource,
    Source,
    layout,
    read_container,
)
from vgs_ckpt._tree import Array, Decoder, array_kinds, encode_tree
from vgs_ckpt._version import __version__
from vgs_ckpt.errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    IntegrityError,
    SchemaError,
    TreeError,
    UsageError,
)
from vgs_ckpt.models import (
    DIGEST_ALGORITHM,
    CheckpointFormat,
    CheckpointV1,
    CheckpointV2,
    Lineage,
    header_adapter,
)

__all__ = ["Checkpoint", "load", "load_bytes", "read_header", "save", "save_bytes"]

PRODUCER = "vgs_ckpt"
_CHUNK = 16 * 1024 * 1024  # hashing is overlapped with I/O chunk by chunk
_INLINE_HASH = 256 * 1024  # smaller arrays are hashed on the calling thread
_PLACEHOLDER = f"{DIGEST_ALGORITHM}:{'0' * 32}"

Header = CheckpointV1 | CheckpointV2


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the parameter tree and the validated header."""

    parameters: dict[Any, Any]
    header: Header
    container: str = "safetensors"
    path: str | None = None

    @property
    def format(self) -> CheckpointFormat:
        """The format version of the header, e.g. ``"v2_full_parameters"``."""
        return self.header.format_version


def _digest(data: memoryview) -> str:
    return f"{DIGEST_ALGORITHM}:{xxhash.xxh3_128_hexdigest(data)}"


def _build_header(parameters: Mapping[Any, Any], *, step: int, performance: float | None,
                  member_id: str | None, hyperparams: Mapping[str, Any] | None,
                  lineage: Lineage | Mapping[str, Any] | None, format: CheckpointFormat,
                  created_at: datetime | None, where: str) -> tuple[Header, dict[str, Array]]:
    tree, arrays = encode_tree(parameters)
    fields: dict[str, Any] = {
        "format_version": format, "step": step, "performance": performance,
        "member_id": member_id, "producer": {"name": PRODUCER, "version": __version__},
        "created_at": created_at or datetime.now(UTC), "tree": tree,
        "tensors": {name: {"dtype": a.dtype.code, "shape": list(a.shape), "digest": _PLACEHOLDER}
                    for name, a in arrays.items()},
    }
    if format is CheckpointFormat.V2_FULL_PARAMETERS:
        fields["hyperparams"] = dict(hyperparams or {})
        fields["lineage"] = lineage if lineage is not None else Lineage()
        fields["vgs"] = _header.vgs_summary(parameters, tree, where)
    else:
        if hyperparams or lineage is not None:
            raise UsageError(f"{where}: {format.value} files hold no hyperparams or lineage; "
                             "save as v2_full_parameters instead")
        fields["has_optimizer_state"] = "optimizer_state" in parameters
    try:
        header = header_adapter.validate_python(fields)
    except pydantic.ValidationError as exc:
        raise SchemaError(f"{where}: invalid checkpoint header: "
                          f"{_header.describe_validation(exc)}") from None
    return header, arrays


def _write(stream: IO[bytes], header: Header, arrays: dict[str, Array]) -> Header:
    """Write header and data; digests are computed while the data is written."""
    sizes = [(n, a.dtype, a.shape, len(a.data)) for n, a in arrays.items()]
    head, order = layout(sizes, _header.metadata(header))
    stream.write(head)
    digests: dict[str, str | Future[str]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="vgs_ckpt-hash") as pool:
        for name in order:
            data = arrays[name].data
            digests[name] = (pool.submit(_digest, data) if len(data) > _INLINE_HASH
                             else _digest(data))
            stream.write(data)
        final = {n: d if isinstance(d, str) else d.result() for n, d in digests.items()}
    tensors = {n: info.model_copy(update={"digest": final[n]})
               for n, info in header.tensors.items()}
    header = header.model_copy(update={"tensors": tensors})
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
         format: CheckpointFormat = CheckpointFormat.V2_FULL_PARAMETERS,
         created_at: datetime | None = None, durable: bool = True) -> Header:
    """Save a parameter tree atomically as a safetensors checkpoint.

    Args:
        path: the file to write; its directory must exist.
        parameters: a dict tree (e.g. ``model.get_parameters()``) whose leaves are
            None, bool, int, float, str, torch tensors, numpy arrays or scalars.
        step: the training step (>= 0).
        performance: the member's metric, finite or None.
        member_id, hyperparams, lineage: PBT bookkeeping stored in the header.
        format: ``v2_full_parameters`` (default) or the legacy ``v1_policy_only``.
        created_at: timestamp to record (default: now, UTC).
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
    header, arrays = _build_header(parameters, step=step, performance=performance,
                                   member_id=member_id, hyperparams=hyperparams,
                                   lineage=lineage, format=format, created_at=created_at,
                                   where=target)
    written: list[Header] = []
    atomic_write(target, lambda f: written.append(_write(f, header, arrays)), durable=durable)
    return written[0]


def save_bytes(parameters: Mapping[Any, Any], *, step: int, performance: float | None = None,
               member_id: str | None = None, hyperparams: Mapping[str, Any] | None = None,
               lineage: Lineage | Mapping[str, Any] | None = None,
               format: CheckpointFormat = CheckpointFormat.V2_FULL_PARAMETERS,
               created_at: datetime | None = None) -> bytes:
    """The bytes :func:`save` would write, as a ``bytes`` object."""
    header, arrays = _build_header(parameters, step=step, performance=performance,
                                   member_id=member_id, hyperparams=hyperparams,
                                   lineage=lineage, format=format, created_at=created_at,
                                   where="<bytes>")
    buffer = io.BytesIO()
    _write(buffer, header, arrays)
    return buffer.getvalue()


def _open(path: str | os.PathLike[str]) -> IO[bytes]:
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"checkpoint {os.fspath(path)} does not exist") from None
    except OSError as exc:
        raise CheckpointIOError(exc.errno, f"cannot open checkpoint {os.fspath(path)}: "
                                f"{exc.strerror}", os.fspath(path)) from None


def read_header(path: str | os.PathLike[str]) -> Header:
    """The validated header of a vgs_ckpt file, reading no tensor bytes.

    Raises:
        FormatError, SchemaError, UnsupportedVersionError: the file is not a readable
            vgs_ckpt checkpoint.
    """
    with _open(path) as handle:
        source = FileSource(handle, os.fspath(path))
        return _header.parse(read_container(source), source.where)


def _device(map_location: str | torch.device | None) -> torch.device:
    try:
        return torch.device(map_location if map_location is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"invalid map_location {map_location!r}: {exc}; use e.g. 'cpu' or "
                         "'cuda:0'") from None


def _empty(kind: str, container: Container, name: str) -> tuple[Any, memoryview]:
    entry = container.entries[name]
    if kind == "numpy":
        np_dtype = entry.dtype.numpy
        if np_dtype is None:
            raise TreeError(f"tensor {name!r} of dtype {entry.dtype.code} is marked as a numpy "
                            "array but numpy has no such dtype; the file is corrupt")
        array = np.empty(entry.shape, dtype=np_dtype)
        return array, memoryview(array.reshape(-1).view(np.uint8)).cast("B")
    tensor = torch.empty(entry.shape, dtype=entry.dtype.torch)
    raw = tensor.reshape(-1).view(torch.uint8) if entry.nbytes else torch.empty(0, dtype=torch.uint8)
    return tensor, memoryview(raw.numpy()).cast("B")


def _read_arrays(source: Source, container: Container, header: Header,
                 kinds: dict[str, str], verify: bool) -> dict[str, Any]:
    """Read every array into its own buffer, hashing chunks on a worker thread."""
    out: dict[str, Any] = {}
    hashers: dict[str, Any] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="vgs_ckpt-hash") as pool:
        pending = []
        for name, entry in container.entries.items():  # file order: sequential reads
            value, view = _empty(kinds.get(name, "torch"), container, name)
            hasher = hashers[name] = xxhash.xxh3_128()
            for start in range(0, max(len(view), 1), _CHUNK):
                chunk = view[start:start + _CHUNK]
                source.readinto(entry.start + start, chunk)
                if not verify:
                    continue
                if len(view) <= _INLINE_HASH:
                    hasher.update(chunk)
                else:
                    pending.append(pool.submit(hasher.update, chunk))
            out[name] = value
        for job in pending:
            job.result()
    if verify:
        bad = [n for n, h in hashers.items()
               if f"{DIGEST_ALGORITHM}:{h.hexdigest()}" != header.tensors[n].digest]
        if bad:
            others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise IntegrityError(
                f"{source.where}: tensor {bad[0]!r}{others} does not match its digest "
                f"{header.tensors[bad[0]].digest}; the file is corrupt - restore it from a "
                "good copy (load with verify=False only to salvage data)")
    return out


def _load(source: Source, map_location: str | torch.device | None, verify: bool,
          path: str | None) -> Checkpoint:
    device = _device(map_location)
    container = read_container(source)
    header = _header.parse(container, source.where)
    try:
        kinds = array_kinds(header.tree)
        unknown = set(kinds) - set(container.entries)
        if unknown:
            raise TreeError(f"the tree refers to tensors that are not in the file: "
                            f"{sorted(unknown)[:5]}")
        arrays = _read_arrays(source, container, header, kinds, verify)
        if device.type != "cpu":
            arrays = {n: a.to(device) if isinstance(a, torch.Tensor) else a
                      for n, a in arrays.items()}
        parameters = Decoder(arrays.__getitem__, arrays.__getitem__).decode(header.tree)
    except TreeError as exc:
        raise TreeError(f"{source.where}: {exc}; the file is corrupt") from None
    if isinstance(header, CheckpointV2):
        summary = _header.vgs_summary(parameters, header.tree, source.where)
        if _json_or_none(summary) != _json_or_none(header.vgs):
            raise SchemaError(f"{source.where}: the header's VGS summary does not match the "
                              f"stored {_header.VGS_KEY!r}; the file is corrupt")
    return Checkpoint(parameters, header, "safetensors", path)


def _json_or_none(model: pydantic.BaseModel | None) -> str | None:
    return None if model is None else model.model_dump_json()  # NaN-safe comparison


def load(path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu",
         verify: bool = True) -> Checkpoint:
    """Load a checkpoint file.

    Args:
        path: the file to read.
        map_location: device for every torch tensor (numpy arrays stay numpy).
        verify: recompute every tensor's digest and compare it with the header.

    Returns:
        A :class:`Checkpoint` with ``parameters``, ``header`` and ``format``.

    Raises:
        CheckpointNotFoundError: no such file.
        FormatError: the bytes are not a well-formed checkpoint.
        IntegrityError: a tensor's bytes do not match its digest (the tensor is named).
        UnsupportedVersionError: the file has a newer format than this library knows.

    Example:
        >>> ckpt = vgs_ckpt.load("member_3.safetensors")
        >>> ckpt.header.step, ckpt.format
    """
    with _open(path) as handle:
        return _load(FileSource(handle, os.fspath(path)), map_location, verify,
                     os.fspath(Path(path)))


def load_bytes(data: bytes | bytearray | memoryview, *,
               map_location: str | torch.device | None = "cpu",
               verify: bool = True) -> Checkpoint:
    """Load a checkpoint from bytes made by :func:`save_bytes` (or read from a file)."""
    return _load(BytesSource(data), map_location, verify, None)
