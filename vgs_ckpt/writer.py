"""Writing checkpoints: a parameter tree into a safetensors file with a JSON header.

This is the only place where a tree is turned into bytes and the bytes are
hashed. Reading is in :mod:`vgs_ckpt.reader`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import IO, Any

from vgs_ckpt import _header
from vgs_ckpt._atomic import atomic_write
from vgs_ckpt._container import MAX_HEADER_BYTES, layout, loads_json
from vgs_ckpt._header import META_HEADER
from vgs_ckpt._tree import Array
from vgs_ckpt.errors import FormatError, UsageError, VgsCkptError
from vgs_ckpt.models import CheckpointFormat, CheckpointHeader, Lineage, Producer, Provenance

__all__ = ["describe", "save", "save_bytes"]

INLINE_HASH = 256 * 1024  # smaller arrays are hashed on the calling thread


def write(stream: IO[bytes], header: CheckpointHeader, arrays: Mapping[str, Array],
          data: Mapping[str, memoryview] | None = None) -> CheckpointHeader:
    """Write header and data (``data``, or each array's own bytes); digests are computed
    on a second thread while the data is written, then the header is rewritten with
    them. Returns the header as written."""
    sizes = [(n, a.dtype, a.shape, a.nbytes) for n, a in arrays.items()]
    head, order = layout(sizes, _header.metadata(header))
    check_readable(head)  # before anything is written
    stream.write(head)
    digests: dict[str, str | Future[str]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="vgs_ckpt-hash") as pool:
        for name in order:
            raw = data[name] if data is not None else arrays[name].data()
            digests[name] = (pool.submit(_header.digest, raw) if len(raw) > INLINE_HASH
                             else _header.digest(raw))
            stream.write(raw)
        final = {n: d if isinstance(d, str) else d.result() for n, d in digests.items()}
    header = _header.with_digests(header, final)
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


def prepare(parameters: Mapping[Any, Any], where: str, **fields: Any
            ) -> tuple[CheckpointHeader, dict[str, Array]]:
    """The validated header (placeholder digests) and the arrays of a tree to write;
    ``fields`` are ``save``'s header arguments. Shared by every writer."""
    return _header.describe(parameters, where=where,
                            vgs_fix="fix the scaler's configuration", **fields)


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


def save(path: str | os.PathLike[str], parameters: Mapping[Any, Any], *, step: int,
         performance: float | None = None, member_id: str | None = None,
         hyperparams: Mapping[str, Any] | None = None,
         lineage: Lineage | Mapping[str, Any] | None = None,
         format: CheckpointFormat | str = CheckpointFormat.V2_FULL_PARAMETERS,
         created_at: datetime | None = None, provenance: Provenance | None = None,
         durable: bool = True) -> CheckpointHeader:
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
        UsageError: a header field or the VGS state is invalid, tensor names collide,
            or the arguments are swapped.
        UnsupportedTypeError: a leaf or key cannot be stored (the path is named).
        CheckpointIOError: the file could not be written; the old file is intact.

    Example:
        >>> vgs_ckpt.save(tmp / "m.safetensors", {"policy": {"w": torch.ones(2)}}, step=1)
    """
    target = check_path(path, parameters)
    header, arrays = prepare(
        parameters, target, step=step, performance=performance, member_id=member_id,
        hyperparams=hyperparams, lineage=lineage, format=format, created_at=created_at,
        provenance=provenance)
    written: list[CheckpointHeader] = []
    atomic_write(target, lambda f: written.append(write(f, header, arrays)), durable=durable)
    return written[0]


def save_bytes(parameters: Mapping[Any, Any], *, step: int, performance: float | None = None,
               member_id: str | None = None, hyperparams: Mapping[str, Any] | None = None,
               lineage: Lineage | Mapping[str, Any] | None = None,
               format: CheckpointFormat | str = CheckpointFormat.V2_FULL_PARAMETERS,
               created_at: datetime | None = None,
               provenance: Provenance | None = None) -> bytes:
    """The bytes :func:`save` would write, as a ``bytes`` object."""
    header, arrays = prepare(
        parameters, "<bytes>", step=step, performance=performance, member_id=member_id,
        hyperparams=hyperparams, lineage=lineage, format=format, created_at=created_at,
        provenance=provenance)
    buffer = io.BytesIO()
    write(buffer, header, arrays)
    return buffer.getvalue()


def describe(parameters: Mapping[Any, Any], *, step: int, performance: float | None = None,
             member_id: str | None = None, hyperparams: Mapping[str, Any] | None = None,
             lineage: Lineage | Mapping[str, Any] | None = None,
             format: CheckpointFormat | str = CheckpointFormat.V2_FULL_PARAMETERS,
             created_at: datetime | None = None,
             provenance: Provenance | Mapping[str, Any] | None = None,
             producer: Producer | Mapping[str, str] | None = None, where: str = "<memory>",
             invalid: type[VgsCkptError] = UsageError, fix: str = "") -> CheckpointHeader:
    """The header :func:`save` would write for ``parameters``, with every tensor digest
    None: no tensor byte is read, copied or hashed (tensors may be on any device, even
    ``meta``). Invalid fields or VGS settings raise ``invalid`` (with ``fix``)."""
    header, _ = _header.describe(
        parameters, step=step, performance=performance, member_id=member_id,
        hyperparams=hyperparams, lineage=lineage, format=format, created_at=created_at,
        provenance=provenance, producer=producer, where=where, for_writing=False,
        error=invalid, vgs_error=invalid, vgs_fix=fix)
    return header
