"""Reading checkpoints: recognise a file by its bytes, then read it as stored.

- :func:`open` is the lazy reader: the header and the tree's structure first,
  then only the subtrees or tensors asked for, each verified when first read.
- :func:`load` reads everything (through the same reader) and upgrades it.
- :func:`read_header` and :func:`detect_format` read no tensor bytes.

Reading never builds or hashes a header for writing: the header of a file is
kept as stored, a legacy file's header is described from its tree without
touching tensor bytes, and each tensor byte is hashed at most once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any, NamedTuple

import numpy as np
import torch

from vgs_ckpt import _header, legacy, vgs_state
from vgs_ckpt._container import (
    BytesSource,
    Container,
    ContainerKind,
    Entry,
    FileSource,
    Source,
    open_file,
    read_container,
    sniff_source,
)
from vgs_ckpt._dtypes import BY_CODE, BY_TORCH
from vgs_ckpt._tree import Decoder
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import (
    FormatError,
    IntegrityError,
    LegacyFormatWarning,
    UsageError,
    VgsCkptError,
    warn,
)
from vgs_ckpt.models import CheckpointFormat, CheckpointHeader, CheckpointV2, Producer
from vgs_ckpt.upgrades import upgrade as upgrade_checkpoint

__all__ = ["CheckpointReader", "Detection", "TensorSpec", "container_of", "detect_format", "load",
           "load_bytes", "open", "read_header"]

_INLINE_HASH = 256 * 1024  # smaller tensors are hashed on the calling thread
_HASH_THREADS = 2
LEGACY_PRODUCER = Producer(name="torch.save (original PBT scheduler)", version="unknown")
TreePath = Sequence[str | int]


class Detection(NamedTuple):
    """What a checkpoint is: its format version and its container."""

    format: CheckpointFormat
    container: ContainerKind


@dataclass(frozen=True)
class TensorSpec:
    """A tensor of a file, as :meth:`CheckpointReader.structure` shows it (no bytes)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str = "torch"  # "torch", "numpy" (ndarray) or "npscalar"

    @property
    def nbytes(self) -> int:
        return BY_CODE[self.dtype].nbytes(self.shape)


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
            raise FormatError(f"tensor {entry.name!r} of dtype {dtype.code} is marked as a "
                              "numpy array but numpy has no such dtype")
        array = np.frombuffer(raw, dtype=dtype.numpy).reshape(entry.shape)
        return array if shared else array.copy()
    if shared and entry.nbytes and _address(raw) % dtype.itemsize == 0:
        flat = torch.frombuffer(raw, dtype=torch.uint8)
        return flat.view(dtype.torch).reshape(entry.shape)
    tensor = torch.empty(entry.shape, dtype=dtype.torch)
    if entry.nbytes:
        tensor.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(raw, dtype=np.uint8)
    return tensor


def _address(raw: memoryview) -> int:
    """Where ``raw``'s bytes start in memory (a view of them is aligned or not)."""
    return int(np.frombuffer(raw, dtype=np.uint8).ctypes.data) if len(raw) else 0


def _references(node: Any) -> list[str]:
    """The tensor names a tree node refers to, in tree order (malformed nodes are left
    to the decoder to report)."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            for tag in ("tensor", "ndarray", "npscalar"):
                if type(item.get(tag)) is str:
                    found.append(item[tag])
            stack.extend(reversed([v for k, v in item.items() if k in ("dict", "list",
                                                                        "tuple")]))
        elif type(item) is list:
            stack.extend(reversed(item))
    return list(dict.fromkeys(found))


def _subnode(tree: Any, path: TreePath, where: str) -> Any:
    """The node at ``path`` (dict keys, list/tuple indices) of an encoded tree."""
    node = tree
    for depth, key in enumerate(path):
        if type(node) is dict and type(node.get("dict")) is list:
            match = [p[1] for p in node["dict"] if type(p) is list and len(p) == 2
                     and p[0] == key and type(p[0]) is type(key)]
            if match:
                node = match[0]
                continue
        elif type(node) is dict and type(key) is int and ("list" in node or "tuple" in node):
            items = node.get("list", node.get("tuple"))
            if type(items) is list and -len(items) <= key < len(items):
                node = items[key]
                continue
        raise _no_such(where, path[:depth + 1])
    return node


def _no_such(where: str, path: TreePath) -> UsageError:
    shown = "".join(f"[{k!r}]" for k in path)
    return UsageError(f"{where}: the tree has no {shown}; see reader.structure() for what it "
                      "holds")


class _SpecDecoder(Decoder):
    """Decodes a tree's structure: tensors become :class:`TensorSpec`, no bytes read."""

    def __init__(self, container: Container) -> None:
        entries = self._entries = container.entries
        kinds: dict[str, str] = {}

        def spec(name: str, kind: str) -> TensorSpec:
            if name not in entries:
                raise FormatError(f"the tree refers to tensor {name!r}, which is not in the "
                                  "file")
            if kinds.setdefault(name, kind) != kind:
                raise FormatError(f"tensor {name!r} is referenced both as a torch tensor and "
                                  "as a numpy array")
            entry = entries[name]
            if kind == "numpy" and entry.dtype.numpy is None:
                raise FormatError(f"tensor {name!r} of dtype {entry.dtype.code} is marked as "
                                  "a numpy array but numpy has no such dtype")
            return TensorSpec(name, entry.dtype.code, entry.shape, kind)

        super().__init__(spec)

    def tensor(self, name: str, parameter: bool, requires_grad: bool) -> Any:
        found = self._array(name, "torch")
        dtype = self._entries[name].dtype.torch
        if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
            raise FormatError(f"tensor {name!r} of dtype {dtype} is marked requires_grad, "
                              "which only floating-point and complex tensors can be")
        return found

    def npscalar(self, name: str) -> Any:
        return TensorSpec(**{**self._array(name, "numpy").__dict__, "kind": "npscalar"})


class CheckpointReader:
    """A checkpoint file opened for reading, as stored (not upgraded); see :func:`open`.

    A vgs_ckpt file is read lazily: only the subtrees and tensors asked for are
    decoded, and each tensor's digest is checked the first time it is read. A legacy
    torch file has no lazy access: it is read once, when opened, and served from memory.
    """

    def __init__(self, source: Source, *, path: str | None, device: torch.device,
                 verify: bool, readahead: bool, vgs_error: type[VgsCkptError] | None = None,
                 legacy_data: bytes | bytearray | memoryview | None = None,
                 handle: IO[bytes] | None = None) -> None:
        self.path = path
        self._handle = handle  # closed with the reader
        self.where = source.where
        self._device, self._verify = device, verify
        self._verified: set[str] = set()
        self._made: dict[str, tuple[str, Any]] = {}
        self._closed = False
        self._loaded: dict[Any, Any] | None = None
        self.container: ContainerKind = sniff_source(source)
        if self.container != "safetensors":
            # The same reader whether the bytes come from a file or from memory.
            raw = legacy_data if legacy_data is not None else handle
            if raw is None:
                raise AssertionError("a legacy file is read from its handle or its bytes")
            found = legacy.read_legacy(raw, container=self.container, map_location=device,
                                       where=self.where)
            mtime = datetime.fromtimestamp(os.stat(path).st_mtime, UTC) if path else None
            parameters = (found.payload if isinstance(found.payload, dict)
                          else dict(found.payload))
            self.header, _ = _header.describe(
                parameters, step=found.step, performance=found.performance,
                format=found.format, created_at=mtime, producer=LEGACY_PRODUCER,
                has_optimizer_state=found.has_optimizer_state, where=self.where,
                for_writing=False, error=FormatError, vgs_error=vgs_error,
                vgs_fix="load it with upgrade=False to salvage the data")
            self.legacy_layout: str | None = found.layout
            self._loaded = parameters
            return
        self.legacy_layout = None
        self._source, self._readahead = source, readahead
        self._container = read_container(source)
        self.header = _header.parse(self._container, self.where, vgs_error)
        self._decode(self.header.tree, _SpecDecoder(self._container))  # the tree is sound
        self._mapped: tuple[dict[str, memoryview], bool] | None = None

    def _views(self) -> tuple[dict[str, memoryview], bool]:
        """The tensors' bytes, read (or mapped) on the first access (opening reads the
        header only)."""
        if self._mapped is None:
            self._mapped = self._source.views(self._container, readahead=self._readahead)
        return self._mapped

    @property
    def format(self) -> CheckpointFormat:
        """The format version of the file, e.g. ``"v2_full_parameters"``."""
        return self.header.format_version

    def keys(self) -> list[Any]:
        """The top-level keys of the tree (``["policy", "policy.optimizer", ...]``)."""
        if self._loaded is not None:
            return list(self._loaded)
        items = self.header.tree.get("dict")
        return [p[0] for p in items if type(p) is list and p] if type(items) is list else []

    def structure(self) -> Any:
        """The tree with every tensor or array replaced by a :class:`TensorSpec` (name,
        dtype, shape); no tensor byte is read."""
        if self._loaded is not None:
            return _specs(self._loaded)
        return self._decode(self.header.tree, _SpecDecoder(self._container))

    @property
    def bytes_read(self) -> int:
        """Tensor bytes decoded or verified so far (each tensor counts once; all of them
        for a legacy file, which is read when opened)."""
        if self._loaded is not None:
            return sum(spec.nbytes for spec in _leaves(self.structure())
                       if isinstance(spec, TensorSpec))
        touched = self._verified | set(self._made)
        return sum(self._container.entries[n].nbytes for n in touched)

    def load(self, path: TreePath | str | int = ()) -> Any:
        """The subtree at ``path`` (e.g. ``["policy"]``, or just ``"policy"`` for a
        top-level key; ``()`` is the whole tree), with only the tensors it refers to
        read and verified.

        Raises:
            UsageError: no such path in the tree.
            IntegrityError: a tensor it refers to does not match its digest (named).
        """
        self._check_open()
        if isinstance(path, str | int):
            path = [path]
        if self._loaded is not None:
            node: Any = self._loaded
            for depth, key in enumerate(path):
                try:
                    node = node[key]
                except (KeyError, IndexError, TypeError):
                    raise _no_such(self.where, path[:depth + 1]) from None
            return node
        node = _subnode(self.header.tree, path, self.where)
        self._check(_references(node))
        return self._decode(node, Decoder(self._get))

    def __getitem__(self, key: str | int) -> Any:
        """``reader["policy"]`` is ``reader.load(["policy"])``."""
        return self.load([key])

    def tensor(self, name: str) -> Any:
        """One stored tensor by its name in the file (``"policy/w"``), verified."""
        self._check_open()
        if self._loaded is not None:
            raise UsageError(f"{self.where}: a legacy {self.container} file has no tensor "
                             "names; use reader.load(path) instead")
        if name not in self._container.entries:
            raise UsageError(f"{self.where}: no tensor {name!r} in the file; it holds "
                             f"{', '.join(list(self._container.entries)[:8]) or 'none'}")
        self._check([name])
        kind = self._made[name][0] if name in self._made else "torch"
        return self._get(name, kind)

    get_tensor = tensor  # the name safetensors' safe_open uses

    def _decode(self, node: Any, decoder: Decoder) -> Any:
        return _decode(node, decoder, self.where)

    def _check(self, names: list[str]) -> None:
        """Verify the digests of the named tensors not verified yet (big ones on two
        threads); an unknown name is left to the decoder to report."""
        entries = self._container.entries
        todo = [n for n in names if n not in self._verified and n in entries]
        if not self._verify or not todo:
            return
        wanted = set(todo)
        pending: dict[str, str | Future[str]] = {}
        with ThreadPoolExecutor(_HASH_THREADS, thread_name_prefix="vgs_ckpt-hash") as pool:

            def ready(name: str, view: memoryview) -> None:
                # Hash each tensor as soon as its bytes are in memory: reading the next
                # ones overlaps hashing these.
                if name in wanted and name not in pending:
                    pending[name] = (pool.submit(_header.digest, view)
                                     if entries[name].nbytes > _INLINE_HASH
                                     else _header.digest(view))

            if self._mapped is None:
                self._mapped = self._source.views(self._container, readahead=self._readahead,
                                                  on_ready=ready)
            views = self._mapped[0]
            for name in todo:
                ready(name, views[name])  # the lazy reader reads each here
            digests = {n: d if isinstance(d, str) else d.result() for n, d in pending.items()}
        bad = [n for n in todo if digests[n] != self.header.tensors[n].digest]
        self._verified.update(n for n in todo if n not in bad)
        if bad:
            others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise IntegrityError(
                f"{self.where}: tensor {bad[0]!r}{others} does not match its digest "
                f"{self.header.tensors[bad[0]].digest}; the file is corrupt - restore it "
                "from a good copy (read with verify=False only to salvage data)")

    def _get(self, name: str, kind: str) -> Any:
        """Each array on its first reference, in the kind the tree asks for, on the
        device; later references get the same object."""
        if name not in self._made:
            if name not in self._container.entries:
                raise FormatError(f"the tree refers to tensor {name!r}, which is not in the "
                                  "file")
            views, shared = self._views()
            value = _array(kind, self._container.entries[name], views[name], shared)
            if kind == "torch" and self._device.type != "cpu":
                value = value.to(self._device)
            self._made[name] = (kind, value)
        made_kind, value = self._made[name]
        if made_kind != kind:
            raise FormatError(f"tensor {name!r} is referenced both as a torch tensor and as "
                              "a numpy array")
        return value

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"{self.where}: the reader is closed; read inside the `with` "
                             "block")

    def close(self) -> None:
        """Release the file (tensors already read stay valid)."""
        self._closed = True
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _decode(node: Any, decoder: Decoder, where: str) -> Any:
    """``decoder.decode(node)``, every failure a FormatError naming the file."""
    try:
        return decoder.decode(node)
    except IntegrityError:
        raise
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}; the file is corrupt") from None
    except VgsCkptError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError, RecursionError,
            MemoryError) as exc:
        # numpy and torch refuse what the checks let through (a shape of 65 dimensions,
        # a product that overflows): still a corrupt file, never a raw exception.
        raise FormatError(f"{where}: the tree cannot be decoded ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); the file is corrupt") from None


def _leaves(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [leaf for value in node.values() for leaf in _leaves(value)]
    if isinstance(node, list | tuple):
        return [leaf for value in node for leaf in _leaves(value)]
    return [node]


def _specs(node: Any) -> Any:
    """A loaded tree's structure (a legacy file's: its tensors have no stored names)."""
    if isinstance(node, torch.Tensor):  # its dtype is in the table: describe() checked it
        return TensorSpec("", BY_TORCH[node.dtype].code, tuple(node.shape))
    if isinstance(node, dict):
        return type(node)((k, _specs(v)) for k, v in node.items())
    if isinstance(node, list | tuple):
        return type(node)(_specs(v) for v in node)
    return node


def open(path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu",
         verify: bool = True, mmap: bool = False) -> CheckpointReader:
    """Open a checkpoint for lazy reading, like ``safetensors.safe_open``.

    Opening reads the header only. ``reader.structure()`` shows the tree with tensor
    shapes; ``reader.load(["policy"])`` (or ``reader["policy"]``) reads one subtree and
    ``reader.tensor("policy/w")`` one tensor, each verified against its digest the
    first time it is read. The file is read as stored (not upgraded). A legacy torch
    file has no lazy access: it is read when opened.

    Each tensor is read into memory the process owns (with ``mmap=True``: mapped
    from the file instead; see :func:`load`).

    Example:
        >>> with vgs_ckpt.open("member_3.safetensors") as reader:
        ...     policy = reader["policy"]

    Raises:
        CheckpointNotFoundError, FormatError, UnsupportedVersionError,
        UnsafeCheckpointError: as for :func:`load`.
    """
    device = _device(map_location)
    handle = open_file(path)
    where = os.fspath(path)
    try:
        return CheckpointReader(FileSource(handle, where, use_mmap=mmap), path=where,
                                device=device, verify=verify, readahead=False, handle=handle)
    except BaseException:
        handle.close()
        raise


def container_of(path: str | os.PathLike[str]) -> ContainerKind:
    """The container of a checkpoint file, from its first bytes only.

    Raises:
        FormatError: the file is not a checkpoint of any container.
    """
    with open_file(path) as handle:
        return sniff_source(FileSource(handle, os.fspath(path)))


def read_header(path: str | os.PathLike[str]) -> CheckpointHeader:
    """The validated header of a vgs_ckpt file, reading no tensor bytes.

    Raises:
        FormatError: the file is not a vgs_ckpt file (a legacy torch file is named as
            such: use :func:`load` or :func:`open` for those) or is corrupt.
        UnsupportedVersionError: the file has a newer format than this library knows.
    """
    with open_file(path) as handle:
        where = os.fspath(path)
        source = FileSource(handle, where)
        kind = sniff_source(source)
        if kind != "safetensors":
            raise FormatError(f"{where}: a legacy {kind} file (torch.save), not a vgs_ckpt "
                              "safetensors file, so it has no vgs_ckpt header; read it with "
                              "vgs_ckpt.load or vgs_ckpt.open, or convert it with "
                              "`vgs-ckpt upgrade`")
        container = read_container(source)
        header = _header.parse(container, where)
        # The tree's structure, as the readers will decode it (no tensor bytes).
        _decode(header.tree, _SpecDecoder(container), where)
        return header


def detect_format(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
                  ) -> Detection:
    """The format and container of a checkpoint, read from its bytes.

    For safetensors files only the header is read. For legacy torch files the
    pickle is read with ``torch.load(weights_only=True)``.

    Returns:
        ``Detection(format, container)``, which unpacks as a tuple.

    Raises:
        FormatError: the bytes are not a checkpoint.
        UnsupportedVersionError: the file names a format newer than this library.
        UnsafeCheckpointError: a legacy pickle asks for a forbidden global.

    Example:
        >>> fmt, container = vgs_ckpt.detect_format("member_3.safetensors")
    """
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        found = CheckpointReader(BytesSource(path_or_bytes), path=None,
                                 device=torch.device("cpu"), verify=False, readahead=False,
                                 legacy_data=path_or_bytes)
        return Detection(found.format, found.container)
    with open(path_or_bytes, verify=False) as reader:
        return Detection(reader.format, reader.container)


def _finish(reader: CheckpointReader, upgrade: bool) -> Checkpoint:
    """The whole tree of an open reader as a Checkpoint, upgraded when asked."""
    parameters = reader.load()
    if not isinstance(parameters, dict):
        raise FormatError(f"{reader.where}: the root of the tree is not a dict node; the "
                          "file is corrupt")
    header = reader.header
    if reader.container == "safetensors" and isinstance(header, CheckpointV2):
        # The header's summary must describe the stored state (no bytes involved);
        # parsing the header already reported invalid settings.
        found = vgs_state.summary(parameters, header.tree, reader.where,
                                  FormatError if upgrade else None, quiet=True)
        if not vgs_state.same_summary(found, header.vgs):
            raise FormatError(f"{reader.where}: the header's VGS summary does not match the "
                              f"stored {vgs_state.KEY!r}; the file is corrupt")
    checkpoint = Checkpoint(parameters, header, reader.container, reader.path)
    if not upgrade:
        return checkpoint
    upgraded, applied = upgrade_checkpoint(checkpoint)
    if reader.container != "safetensors":
        _warn_upgraded(reader.where, f"{checkpoint.format.value} ({reader.container}, layout "
                       f"{reader.legacy_layout})", applied or ["read from a torch.save container"])
    elif applied:
        _warn_upgraded(reader.where, checkpoint.format.value, applied)
    return upgraded


def _warn_upgraded(where: str, original: str, applied: list[str]) -> None:
    warn(f"{where}: legacy checkpoint format {original!r} upgraded in memory "
         f"({', '.join(applied)}); run `vgs-ckpt upgrade` to convert the file",
         LegacyFormatWarning)


def load(path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu",
         verify: bool = True, upgrade: bool = True, mmap: bool = False) -> Checkpoint:
    """Load a checkpoint file: a vgs_ckpt file or a legacy ``torch.save`` one.

    The format is recognised from the bytes. Legacy torch files are read with
    ``torch.load(weights_only=True)`` only, so loading never runs code. Every tensor
    byte is read once and hashed at most once (legacy files have no digests).

    Args:
        path: the file to read.
        map_location: device for every torch tensor (numpy arrays stay numpy).
        verify: recompute every tensor's digest and compare it with the header.
        upgrade: upgrade an older format (or VGS state) to the latest in memory, with a
            :class:`LegacyFormatWarning`. With False the checkpoint is returned as
            stored, even with invalid VGS settings (an ``InvalidVGSStateWarning`` names
            them), so its data can be salvaged.
        mmap: map the tensor data from the file (private, copy-on-write) instead of
            reading it into memory the process owns (the default). Faster when the
            file is in the page cache, but a writer that rewrites the file in place
            (``cp``, a shell redirect, ``torch.save`` to the same name) changes the
            tensors already verified, and truncating it kills the process with
            SIGBUS. vgs_ckpt's own writers replace files atomically, which is safe.
            Legacy torch files are always read into memory.

    Returns:
        A :class:`Checkpoint` with ``parameters``, ``header`` and ``format``.

    Raises:
        CheckpointNotFoundError: no such file.
        FormatError: the bytes are not a valid checkpoint (or, with ``upgrade``, its VGS
            state fails validation).
        IntegrityError: a tensor's bytes do not match its digest (the tensor is named).
        UnsupportedVersionError: the file has a newer format than this library knows.
        UnsafeCheckpointError: a legacy pickle asks for a forbidden global (nothing runs).

    Example:
        >>> ckpt = vgs_ckpt.load("member_3.safetensors")
        >>> ckpt.header.step, ckpt.format
    """
    device = _device(map_location)
    with open_file(path) as handle:
        where = os.fspath(path)
        reader = CheckpointReader(FileSource(handle, where, use_mmap=mmap), path=where,
                                  device=device, verify=verify, readahead=True, handle=handle,
                                  vgs_error=FormatError if upgrade else None)
        return _finish(reader, upgrade)


def load_bytes(data: bytes | bytearray | memoryview, *,
               map_location: str | torch.device | None = "cpu",
               verify: bool = True, upgrade: bool = True) -> Checkpoint:
    """Load a checkpoint from bytes (as :func:`load` does for a file)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UsageError(f"load_bytes() takes bytes, got {type(data).__qualname__}; use "
                         "load for a path")
    reader = CheckpointReader(BytesSource(data), path=None, device=_device(map_location),
                              verify=verify, readahead=False,
                              vgs_error=FormatError if upgrade else None, legacy_data=data)
    return _finish(reader, upgrade)

