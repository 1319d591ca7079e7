"""``SafetensorsReader``: the lazy reader of vgs_ckpt files.

Opening reads the header and checks the tree's structure against the tensor
table; each subtree or tensor asked for is then read once, and its digest checked
the first time (big tensors hashed on two threads while the next are read).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from vgs_ckpt import _header, vgs_state
from vgs_ckpt._container import Container, Entry, Source, read_container
from vgs_ckpt._tree import Decoder, check_names, dict_items, references, subnode
from vgs_ckpt.errors import FormatError, IntegrityError, UsageError, VgsCkptError
from vgs_ckpt.models import CheckpointHeader, CheckpointV1
from vgs_ckpt.readers.base import CheckpointReader, TensorSpec, TreePath, as_path, no_such

__all__ = ["SafetensorsReader", "read_header"]


def read_header(source: Source, vgs_error: type[VgsCkptError] | None = None
                ) -> tuple[Container, CheckpointHeader]:
    """The container and the validated header of a vgs_ckpt source, with the tree's
    structure checked as the reader will decode it (no tensor bytes are read)."""
    where = source.where
    container = read_container(source)
    header, stored_vgs = _header.parse(container, where)
    structure = decode(header.tree, _SpecDecoder(container), where)
    if not isinstance(structure, dict):  # a dict node (an OrderedDict when ordered)
        raise FormatError(f"{where}: the root of the tree is not a dict node (spec section "
                          "5); the file is corrupt")
    try:
        check_names(header.tree, container.entries)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}; the file is corrupt") from None
    if isinstance(header, CheckpointV1):
        holds = "optimizer_state" in structure
        if header.has_optimizer_state != holds:
            raise FormatError(f"{where}: has_optimizer_state is "
                              f"{str(header.has_optimizer_state).lower()} but the tree "
                              f"{'has' if holds else 'has no'} top-level 'optimizer_state' "
                              "(spec section 4.2); the file is corrupt")
    else:
        summary = vgs_state.check_stored(structure, header.tree, stored_vgs, where,
                                         as_stored=vgs_error is None)
        header = header.model_copy(update={"vgs": summary})
    return container, header


class SafetensorsReader(CheckpointReader):
    """A vgs_ckpt file opened for lazy reading; made by :func:`vgs_ckpt.open`."""

    def __init__(self, source: Source, *, path: str | None, device: torch.device,
                 verify: bool, readahead: bool, vgs_error: type[VgsCkptError] | None = None,
                 ) -> None:
        super().__init__(source.where, path)
        self.container = "safetensors"  # open() sniffed it
        self.legacy_layout = None
        self._source, self._readahead = source, readahead
        self._device, self._verify = device, verify
        self._verified: set[str] = set()
        self._made: dict[str, tuple[str, Any]] = {}
        self._container, self.header = read_header(source, vgs_error)
        self._mapped: tuple[dict[str, memoryview], bool] | None = None

    def _views(self) -> tuple[dict[str, memoryview], bool]:
        """The tensors' bytes, read (or mapped) on the first access (opening reads the
        header only)."""
        if self._mapped is None:
            self._mapped = self._source.views(self._container, readahead=self._readahead)
        return self._mapped

    def keys(self) -> list[Any]:
        return [key for key, _ in dict_items(self.header.tree)]

    def structure(self) -> Any:
        return decode(self.header.tree, _SpecDecoder(self._container), self.where)

    @property
    def bytes_read(self) -> int:
        touched = self._verified | set(self._made)
        return sum(self._container.entries[n].nbytes for n in touched)

    def load(self, path: TreePath | str | int = ()) -> Any:
        self._check_open()
        wanted = as_path(path)
        try:
            node = subnode(self.header.tree, wanted)
        except KeyError as exc:
            raise no_such(self.where, exc.args[0]) from None
        names = references(node)
        self._prefetch(names)
        self._check(names)
        return decode(node, Decoder(self._get), self.where)

    def _prefetch(self, names: list[str]) -> None:
        """Read the named tensors together where the source can (an object store: one
        ranged request per run of adjacent tensors, instead of one per tensor)."""
        if self._mapped is None and not self._readahead:
            self._mapped = self._source.views(self._container, readahead=False)
        if self._mapped is not None:
            prefetch = getattr(self._mapped[0], "prefetch", None)
            if prefetch is not None:
                prefetch([n for n in names if n not in self._made])

    def tensor(self, name: str) -> Any:
        self._check_open()
        if name not in self._container.entries:
            raise UsageError(f"{self.where}: no tensor {name!r} in the file; it holds "
                             f"{', '.join(list(self._container.entries)[:8]) or 'none'}")
        self._prefetch([name])
        self._check([name])
        kind = self._made[name][0] if name in self._made else "torch"
        return self._get(name, kind)

    def _check(self, names: list[str]) -> None:
        """Verify the digests of the named tensors not verified yet (big ones on two
        threads); an unknown name is left to the decoder to report."""
        entries = self._container.entries
        todo = [n for n in names if n not in self._verified and n in entries]
        if not self._verify or not todo:
            return
        wanted = set(todo)
        pending: dict[str, str | Future[str]] = {}
        with ThreadPoolExecutor(_header.HASH_THREADS,
                                thread_name_prefix="vgs_ckpt-hash") as pool:

            def ready(name: str, view: memoryview) -> None:
                # Hash each tensor as soon as its bytes are in memory: reading the next
                # ones overlaps hashing these.
                if name in wanted and name not in pending:
                    pending[name] = (pool.submit(_header.digest, view)
                                     if entries[name].nbytes > _header.INLINE_HASH
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

    def close(self) -> None:
        super().close()
        self._source.close()


def _array(kind: str, entry: Entry, raw: memoryview, shared: bool) -> Any:
    """The array stored in ``raw``: a view of it when ``shared`` (memory private to
    this process, aligned), else a copy."""
    dtype = entry.dtype
    if dtype.code == "BOOL" and entry.nbytes and int(np.frombuffer(raw, np.uint8).max()) > 1:
        raise FormatError(f"tensor {entry.name!r} of BOOL holds bytes other than 0 and 1 "
                          "(spec section 2); the file is corrupt")
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
        found = self._array(name, "numpy")
        self.check_scalar(name, found.shape)
        return TensorSpec(**{**found.__dict__, "kind": "npscalar"})


def decode(node: Any, decoder: Decoder, where: str) -> Any:
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
