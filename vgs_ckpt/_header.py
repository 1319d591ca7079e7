"""The vgs_ckpt header inside ``__metadata__``: describing a tree, parsing a stored one.

:func:`describe` is the one place a header is made from a parameter tree: by
``save`` (with placeholder digests that the writer fills in), and in memory for
a legacy file or an upgraded checkpoint (digests None: nothing is hashed and no
tensor byte is read or copied). :func:`parse` validates a stored header.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pydantic
import xxhash

from vgs_ckpt import vgs_state
from vgs_ckpt._container import Container, loads_json
from vgs_ckpt._tree import Array, encode_tree
from vgs_ckpt._version import __version__
from vgs_ckpt.errors import FormatError, UsageError, VgsCkptError
from vgs_ckpt.models import (
    DIGEST_ALGORITHM,
    FORMAT_ORDER,
    CheckpointFormat,
    CheckpointHeader,
    CheckpointV1,
    CheckpointV2,
    HeaderFields,
    Lineage,
    Producer,
    check_format_version,
    describe_validation,
    header_adapter,
)

PRODUCER = Producer(name="vgs_ckpt", version=__version__)
PLACEHOLDER_DIGEST = f"{DIGEST_ALGORITHM}:{'0' * 32}"

META_FORMAT = "format"
META_FORMAT_VERSION = "vgs_ckpt.format_version"
META_HEADER = "vgs_ckpt.header"


def describe(parameters: Mapping[Any, Any], fields: HeaderFields, *,
             producer: Producer | Mapping[str, str] | None = None,
             has_optimizer_state: bool | None = None, where: str = "<bytes>",
             for_writing: bool = True, error: type[VgsCkptError] = UsageError,
             vgs_error: type[VgsCkptError] | None = UsageError, vgs_fix: str = "",
             ) -> tuple[CheckpointHeader, dict[str, Array]]:
    """The validated header for ``parameters`` with the given :class:`HeaderFields`,
    and its arrays by tensor name.

    With ``for_writing`` (``save``), every tensor must be storable and digests are
    placeholders for the writer to fill in; without, digests are None. Invalid
    fields raise ``error``; an invalid VGS state raises ``vgs_error`` (None: warn,
    and keep it as given).
    """
    format = fields.get("format", CheckpointFormat.V2_FULL_PARAMETERS)
    hyperparams, lineage = fields.get("hyperparams"), fields.get("lineage")
    performance = fields.get("performance")
    if isinstance(performance, np.integer | np.floating):  # a number, not a bool
        performance = performance.item()
    try:
        format = CheckpointFormat(format)
    except ValueError:
        raise UsageError(f"{where}: cannot write format {format!r}; this library writes "
                         f"{', '.join(FORMAT_ORDER)}") from None
    tree, arrays = encode_tree(parameters, storable=for_writing)
    digest = PLACEHOLDER_DIGEST if for_writing else None
    header_fields: dict[str, Any] = {
        "format_version": format, "step": fields["step"],
        "performance": performance, "member_id": fields.get("member_id"),
        "producer": producer or PRODUCER, "provenance": fields.get("provenance"),
        "created_at": fields.get("created_at") or datetime.now(UTC), "tree": tree,
        "tensors": {name: {"dtype": a.dtype.code, "shape": list(a.shape), "digest": digest}
                    for name, a in arrays.items()},
    }
    vgs = None
    if format is CheckpointFormat.V2_FULL_PARAMETERS:
        header_fields["hyperparams"] = dict(hyperparams or {})
        header_fields["lineage"] = lineage if lineage is not None else Lineage()
        vgs = vgs_state.summary(parameters, tree, where, vgs_error, vgs_fix,
                                kind_error=error)
    else:
        if hyperparams or lineage is not None:
            raise UsageError(f"{where}: {format.value} files hold no hyperparams or lineage; "
                             "save as v2_full_parameters instead")
        header_fields["has_optimizer_state"] = (
            has_optimizer_state if has_optimizer_state is not None
            else "optimizer_state" in parameters)
    try:
        header = header_adapter.validate_python(header_fields)
    except pydantic.ValidationError as exc:
        raise error(f"{where}: invalid checkpoint header: {describe_validation(exc)}") from None
    # The summary was checked (or, when reading, kept as found) on its own.
    return (header.model_copy(update={"vgs": vgs}) if isinstance(header, CheckpointV2)
            else header), arrays


INLINE_HASH = 256 * 1024  # smaller arrays are hashed on the calling thread
HASH_THREADS = 2


def digest(data: memoryview) -> str:
    """The digest string of some bytes, e.g. ``xxh3-128:<32 hex digits>``."""
    return f"{DIGEST_ALGORITHM}:{xxhash.xxh3_128_hexdigest(data)}"


def digests(views: Iterable[tuple[str, memoryview]]) -> dict[str, str]:
    """The digest of each named view, big ones on :data:`HASH_THREADS` threads (xxhash
    releases the GIL); at most that many views are held at once, so views made on
    demand (a copy of a strided tensor) are freed as they are hashed."""
    found: dict[str, str] = {}
    running: deque[tuple[str, Future[str]]] = deque()
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="vgs_ckpt-hash") as pool:
        for name, view in views:
            if len(view) <= INLINE_HASH:
                found[name] = digest(view)
                continue
            running.append((name, pool.submit(digest, view)))
            if len(running) > HASH_THREADS:
                done, future = running.popleft()
                found[done] = future.result()
        for done, future in running:
            found[done] = future.result()
    return found


def with_digests(header: CheckpointHeader, digests: Mapping[str, str]) -> CheckpointHeader:
    """``header`` with the given tensor digests filled in."""
    tensors = {n: info.model_copy(update={"digest": digests[n]})
               for n, info in header.tensors.items()}
    return header.model_copy(update={"tensors": tensors})


def metadata(header: CheckpointV1 | CheckpointV2) -> dict[str, str]:
    """The ``__metadata__`` of a file with this header, in the writers' order."""
    return {META_FORMAT: "pt", META_FORMAT_VERSION: header.format_version.value,
            META_HEADER: header_json(header)}


def header_json(header: CheckpointV1 | CheckpointV2) -> str:
    """The header as the writers' JSON text (spec section 2.11): members in the models'
    order, no whitespace, raw UTF-8, numbers as Python's ``repr``, the timestamp in UTC
    with ``Z``, and the VGS summary's non-finite statistics as "NaN", "Infinity",
    "-Infinity" (the models' JSON form, :func:`header_data`)."""
    try:
        return dumps(header_data(header))
    except ValueError as exc:  # an int beyond CPython's digit limit, in hyperparams say
        raise UsageError(f"the header would not read back ({exc}); nothing was written - "
                         "store big integers as strings or tensors") from None


def header_data(header: CheckpointV1 | CheckpointV2,
                fallback: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """The header as JSON data, members in the models' order. The free-form parts (the
    tree, hyperparameters, provenance's legacy record) are taken as they are: pydantic's
    serializer stops at a nesting depth below the JSON limit of spec section 2.
    ``fallback`` shows what JSON cannot hold (a tensor where a salvaged VGS state has a
    setting)."""
    free = {"tree": header.tree}
    if isinstance(header, CheckpointV2):
        free["hyperparams"] = header.hyperparams
    data = header.model_dump(mode="json", exclude={*free, "provenance"}, fallback=fallback)
    out: dict[str, Any] = {}
    for name in type(header).model_fields:
        if name in free:
            out[name] = free[name]
        elif name == "provenance":
            provenance = header.provenance
            out[name] = None if provenance is None else {
                **provenance.model_dump(mode="json", exclude={"legacy"}),
                "legacy": provenance.legacy}
        else:
            out[name] = data[name]
    return out


def dumps(value: Any) -> str:
    """JSON text in the writers' form (spec section 2.11)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def parse(container: Container, where: str) -> tuple[CheckpointHeader, Any]:
    """The validated header of a container, checked against its tensor table, and the
    stored VGS summary as parsed JSON (None when absent); the summary is checked against
    the tree by :func:`vgs_ckpt.vgs_state.check_stored` once the tree is decoded."""
    meta = container.metadata
    if META_FORMAT_VERSION not in meta:
        raise FormatError(f"{where}: a safetensors file but not a vgs_ckpt checkpoint (no "
                          f"{META_FORMAT_VERSION!r} in __metadata__); load it with "
                          "safetensors.torch.load_file, or save it with vgs_ckpt.save")
    fmt = check_format_version(meta[META_FORMAT_VERSION], where)
    if meta.get(META_FORMAT) != "pt":
        raise FormatError(f"{where}: __metadata__ {META_FORMAT!r} must be \"pt\" (spec "
                          f"section 3), got {meta.get(META_FORMAT)!r:.40}; the file is corrupt")
    if META_HEADER not in meta:
        raise FormatError(f"{where}: __metadata__ has no {META_HEADER!r}; the file is corrupt")
    raw = loads_json(meta[META_HEADER], where, "vgs_ckpt header")
    if type(raw) is not dict:
        raise FormatError(f"{where}: the vgs_ckpt header is not a JSON object; the file is "
                          "corrupt")
    if raw.get("format_version") != fmt.value:
        check_format_version(raw.get("format_version"), where)
        raise FormatError(f"{where}: header says format {raw.get('format_version')!r} but "
                          f"__metadata__ says {fmt.value!r}; the file is corrupt")
    vgs = raw.get("vgs") if fmt is CheckpointFormat.V2_FULL_PARAMETERS else None
    try:
        header = header_adapter.validate_python({**raw, "vgs": None} if vgs is not None
                                                else raw)
    except pydantic.ValidationError as exc:
        raise FormatError(f"{where}: header does not match the {fmt.value} schema: "
                          f"{describe_validation(exc)}; the file is corrupt") from None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise FormatError(f"{where}: header cannot be read ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); the file is corrupt") from None
    missing = [name for name, info in header.tensors.items() if info.digest is None]
    if missing:
        raise FormatError(f"{where}: tensor {missing[0]!r} has no digest in the header; the "
                          "file is corrupt - restore it from a good copy")
    _check_index(header, container, where)
    return header, vgs


def _check_index(header: CheckpointHeader, container: Container, where: str) -> None:
    indexed, stored = set(header.tensors), set(container.entries)
    if indexed != stored:
        missing, extra = sorted(indexed - stored), sorted(stored - indexed)
        raise FormatError(f"{where}: tensor index and file disagree (in the index only: "
                          f"{missing[:5]}, in the file only: {extra[:5]}); the file is corrupt")
    for name, info in header.tensors.items():
        entry = container.entries[name]
        if info.dtype != entry.dtype.code or tuple(info.shape) != entry.shape:
            raise FormatError(f"{where}: tensor {name!r}: index says {info.dtype}{info.shape} "
                              f"but the file stores {entry.dtype.code}{list(entry.shape)}; "
                              "the file is corrupt")
