"""The safetensors container: layout, header parsing and validation, byte sources.

Parsing is done here rather than by the safetensors library so that the
header can be read without touching tensor bytes and every malformation gets a
precise error. Where the bytes come from is a :class:`Source` (files and other
backends: :mod:`vgs_ckpt.storage`; bytes in memory: :class:`BytesSource`).
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any, Protocol

from vgs_ckpt._dtypes import BY_CODE, MAX_DIMS, DType
from vgs_ckpt.errors import (
    FormatError,
)
from vgs_ckpt.models import ContainerKind

# The three containers a checkpoint can come in: ours, and torch.save's two.
SNIFF_BYTES = 64  # how many leading bytes sniff_container() needs
_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) container starts with the pickled magic number
# 0x1950a86a20f9469cfc6c: PROTO 2, LONG1 of 10 bytes.
_TORCH_PICKLE_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library enforces
# Deepest nesting of JSON arrays and objects a reader accepts (spec section 2): deep
# enough for any tree save() writes (at most MAX_TREE_DEPTH containers), shallow
# enough that no parser or walker runs out of stack.
MAX_JSON_DEPTH = 512
_LEN = struct.Struct("<Q")
MAX_DIM_SIZE = 2**63 - 1
ALIGNMENT = 8


@dataclass(frozen=True)
class Entry:
    """One tensor as the container describes it; offsets are absolute in the file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Container:
    metadata: dict[str, str]
    entries: dict[str, Entry]  # in file order
    header_bytes: int  # 8 + the JSON header length, padding included
    total_bytes: int


class Source(Protocol):
    """Somewhere bytes can be read from at an absolute offset."""

    where: str

    def size(self) -> int: ...

    def read(self, offset: int, count: int) -> bytes: ...

    def modified(self) -> float | None:
        """When the object was last changed (seconds since the epoch), if known."""
        ...

    def stream(self) -> IO[bytes]:
        """The whole object as a readable, seekable binary file, at offset 0 (for
        readers that need one, such as torch.load)."""
        ...

    def close(self) -> None:
        """Release the object (views already handed out stay valid)."""
        ...

    def __enter__(self) -> Source: ...

    def __exit__(self, *exc: object) -> None: ...

    def views(self, container: Container, readahead: bool = True,
              on_ready: Ready | None = None) -> tuple[dict[str, memoryview], bool]:
        """Views of every tensor's bytes, and whether they may be shared (writable,
        private to this process) rather than copied. ``on_ready(name, view)`` is
        called for each tensor as soon as its bytes are in memory (so hashing can
        overlap reading)."""
        ...


Ready = Callable[[str, memoryview], None]


def notify(views: dict[str, memoryview], on_ready: Ready | None) -> None:
    """Announce each view to ``on_ready`` (a source whose bytes are all in memory)."""
    if on_ready is not None:
        for name, view in views.items():
            on_ready(name, view)


def empty_views(container: Container, on_ready: Ready | None
                ) -> tuple[dict[str, memoryview], bool]:
    """``Source.views`` of a container whose tensors hold no bytes at all."""
    views = {name: memoryview(b"") for name in container.entries}
    notify(views, on_ready)
    return views, False


def runs(container: Container, limit: int) -> list[list[Entry]]:
    """The container's tensors in file order, grouped into runs that span at most
    ``limit`` bytes each (a larger tensor is a run of its own): what a reader reads
    into one piece of memory."""
    grouped: list[list[Entry]] = []
    for entry in container.entries.values():
        if not grouped or entry.end - grouped[-1][0].start > limit:
            grouped.append([])
        grouped[-1].append(entry)
    return grouped


class BytesSource:
    def __init__(self, data: bytes | bytearray | memoryview, where: str = "<bytes>") -> None:
        view = memoryview(data)
        if not view.c_contiguous:  # e.g. a strided slice: its bytes in order
            view = memoryview(view.tobytes())
        self._data = view.cast("B") if (view.format, view.ndim) != ("B", 1) else view
        self._original = data
        self.where = where

    def modified(self) -> float | None:
        return None

    def stream(self) -> IO[bytes]:
        raw = self._original if isinstance(self._original, bytes) else self._data.tobytes()
        return io.BytesIO(raw)

    def close(self) -> None:
        pass

    def __enter__(self) -> BytesSource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, count: int) -> bytes:
        if offset + count > len(self._data):
            raise FormatError(f"{self.where}: truncated data: expected {count} bytes at offset "
                              f"{offset}, only {max(0, len(self._data) - offset)} remain")
        return bytes(self._data[offset:offset + count])

    def views(self, container: Container, readahead: bool = True,
              on_ready: Ready | None = None) -> tuple[dict[str, memoryview], bool]:
        # The caller's bytes may be immutable or reused: arrays are copied out.
        views = {n: self._data[e.start:e.end] for n, e in container.entries.items()}
        notify(views, on_ready)
        return views, False


def layout(arrays: Iterable[tuple[str, DType, tuple[int, ...], int]],
           metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix included) and the data order of the tensors.

    Tensors are ordered by itemsize (largest first), then name, so that every
    tensor starts at a multiple of its itemsize (the safetensors writer's rule).
    """
    items = sorted(arrays, key=lambda a: (-a[1].itemsize, a[0]))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in items:
        header[name] = {"dtype": dtype.code, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    raw = text.encode("utf-8")
    raw += b" " * (-(len(raw) + _LEN.size) % ALIGNMENT)
    return _LEN.pack(len(raw)) + raw, [a[0] for a in items]


def looks_like_safetensors(prefix: bytes) -> bool:
    """Whether the first bytes read like a safetensors header (length, then ``{``)."""
    if len(prefix) < 9:
        return False
    (length,) = _LEN.unpack_from(prefix)
    # The length is not checked against the file size here, so that a truncated
    # file is reported as truncated rather than as "not a checkpoint".
    return 2 <= length <= MAX_HEADER_BYTES and prefix[8:9] == b"{"


def sniff_container(prefix: bytes, where: str) -> ContainerKind:
    """The container kind from the first :data:`SNIFF_BYTES` bytes of a file.

    The rules are tried in the order of spec section 10, safetensors first: a file
    whose first bytes are both a safetensors header and a zip local header (a
    polyglot; no torch.save file is one, as its byte 8 is a zip compression method,
    never ``{``) is read as safetensors, digests and all, as any safetensors reader
    would read it."""
    if looks_like_safetensors(prefix):
        return "safetensors"
    if prefix.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if prefix.startswith(_TORCH_PICKLE_MAGIC):
        return "torch-pickle"
    raise FormatError(f"{where}: not a checkpoint: the first bytes {prefix[:16]!r} are neither "
                      "a safetensors header nor a torch.save container")


def sniff_source(source: Source) -> ContainerKind:
    return sniff_container(source.read(0, min(SNIFF_BYTES, source.size())), source.where)


def read_container(source: Source) -> Container:
    """Parse and validate the safetensors header of ``source``; read no tensor bytes."""
    where = source.where
    size = source.size()
    if size < 8:
        raise FormatError(f"{where}: file of {size} bytes is too short for a safetensors "
                          "header (8-byte length prefix missing); it is empty or truncated")
    (length,) = _LEN.unpack(source.read(0, 8))
    if length > MAX_HEADER_BYTES:
        raise FormatError(f"{where}: header length {length} exceeds the limit of "
                          f"{MAX_HEADER_BYTES} bytes; this is not a safetensors file or it "
                          "is corrupt")
    if 8 + length > size:
        raise FormatError(f"{where}: header length {length} runs past the end of the file "
                          f"({size} bytes); the file is truncated or not a safetensors file")
    if (8 + length) % ALIGNMENT:
        raise FormatError(f"{where}: the data region starts at byte {8 + length}, not a "
                          f"multiple of {ALIGNMENT}: the header must be padded with spaces "
                          "(spec section 2); the file is corrupt or was not written by a "
                          "conforming writer")
    header = loads_json(source.read(8, length), where, "safetensors header", padded=True)
    if type(header) is not dict:
        raise FormatError(f"{where}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})  # its absence: not a vgs_ckpt file (_header)
    if type(metadata) is not dict or any(type(v) is not str for v in metadata.values()):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + length
    entries = [_entry(where, name, spec, data_start) for name, spec in header.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    expected = data_start
    for entry in entries:
        if (entry.start - data_start) % entry.dtype.itemsize:
            raise FormatError(f"{where}: tensor {entry.name!r} of {entry.dtype.code} starts at "
                              f"data offset {entry.start - data_start}, not a multiple of its "
                              f"element size {entry.dtype.itemsize} (spec section 2); the "
                              "header's data_offsets are corrupt")
        if entry.start != expected:
            problem = "overlaps the previous tensor" if entry.start < expected else "leaves a gap"
            raise FormatError(f"{where}: tensor {entry.name!r} {problem} (data starts at "
                              f"{entry.start - data_start}, expected {expected - data_start}); "
                              "the header's data_offsets are corrupt")
        expected = entry.end
    if expected != size:
        what = "trailing bytes after" if size > expected else "the file ends before"
        raise FormatError(f"{where}: {what} the last tensor (tensor data ends at {expected}, file "
                          f"has {size} bytes); the file is truncated or was appended to")
    return Container(metadata, {e.name: e for e in entries}, data_start, size)


def json_depth(value: Any) -> int:
    """The deepest nesting of lists and dicts in a parsed JSON value (no recursion)."""
    depth, level = 0, [value]
    while level:
        containers = [node for node in level if type(node) is dict or type(node) is list]
        if not containers:
            break
        depth += 1
        level = []
        for node in containers:
            level.extend(node.values() if type(node) is dict else node)
    return depth


def loads_json(text: str | bytes, where: str, what: str, padded: bool = False) -> Any:
    """``json.loads`` for untrusted UTF-8 text, with the rules of spec section 2: standard
    constants only, no duplicate member names, numbers that fit binary64, integers of
    at most 4300 digits, nesting bounded, no lone surrogates. With ``padded``, the JSON
    text may be followed by spaces (0x20) only (the container header's padding).

    Raises:
        FormatError: any of these broken (``what`` names the JSON text).
    """
    try:
        raw = text.decode("utf-8") if isinstance(text, bytes) else text
        if padded:
            value, end = _DECODER.raw_decode(raw)
            if raw[end:].strip(" "):
                raise FormatError(f"{where}: the {what} is followed by "
                                  f"{raw[end:end + 8]!r} where only spaces (0x20) may pad "
                                  "it (spec section 2); the file is corrupt")
        else:
            value = _DECODER.decode(raw)
    except RecursionError:  # the C parser's own stack guard
        value, depth = None, None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a bad constant
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"{where}: malformed {what} JSON ({exc}); the file is corrupt"
                          ) from None
    else:
        depth = json_depth(value)
    if depth is None or depth > MAX_JSON_DEPTH:
        raise FormatError(f"{where}: the {what} JSON is nested "
                          f"{'too' if depth is None else f'{depth} levels'} deep, more than "
                          f"the limit of {MAX_JSON_DEPTH}; the file is corrupt or hostile")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        raise FormatError(f"{where}: the {what} JSON holds a lone surrogate escape (a \\ud800-"
                          "\\udfff that is not half of a pair), which is not valid Unicode; "
                          "the file is corrupt or hostile")
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:  # one pass: a hostile object may have millions of members
            if name in seen:
                raise ValueError(f"duplicate member name {name[:80]!r} in one object (spec "
                                 "section 2)")
            seen.add(name)
    return found


def _finite_number(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"the number {text[:24]}... overflows binary64 (spec section 2)")
    return number


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in a parsed JSON value is not valid Unicode."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _no_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_float=_finite_number,
                            parse_constant=_no_constant)


def _entry(where: str, name: str, spec: Any, data_start: int) -> Entry:
    if type(spec) is not dict or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{where}: tensor {name!r}: header entry must have exactly dtype, "
                          f"shape and data_offsets, got {spec!r:.120}")
    dtype = BY_CODE.get(spec["dtype"]) if type(spec["dtype"]) is str else None
    if dtype is None:
        raise FormatError(f"{where}: tensor {name!r}: unknown dtype {spec['dtype']!r}; "
                          f"expected one of {', '.join(BY_CODE)}")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise FormatError(f"{where}: tensor {name!r}: shape must be a list of non-negative "
                          f"integers, got {shape!r:.80}")
    if (type(offsets) is not list or len(offsets) != 2
            or any(type(o) is not int or o < 0 for o in offsets) or offsets[0] > offsets[1]):
        raise FormatError(f"{where}: tensor {name!r}: data_offsets must be [begin, end] with "
                          f"0 <= begin <= end, got {offsets!r:.80}")
    if len(shape) > MAX_DIMS or any(d > MAX_DIM_SIZE for d in shape):
        raise FormatError(f"{where}: tensor {name!r}: shape {shape!r:.80} has more than "
                          f"{MAX_DIMS} dimensions or a dimension of 2**63 or more; the "
                          "header is corrupt")
    numel = 1
    for dim in shape:
        numel *= dim
    if numel * dtype.itemsize != offsets[1] - offsets[0]:
        raise FormatError(f"{where}: tensor {name!r}: shape {shape} of {dtype.code} needs "
                          f"{numel * dtype.itemsize} bytes but data_offsets span "
                          f"{offsets[1] - offsets[0]}; the header is corrupt")
    return Entry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
