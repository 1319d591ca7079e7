"""``LegacyReader``: the original scheduler's ``torch.save`` files through the
reader protocol.

The file is decoded once, when opened, by :mod:`vgs_ckpt.legacy` (safely:
``weights_only=True``, bounded by the file's size) and served from memory; it has
no lazy access and no tensor names. Its header is described from the tree (no
tensor bytes hashed; ``created_at`` is the file's modification time).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import torch

from vgs_ckpt import _header
from vgs_ckpt._container import Source
from vgs_ckpt._dtypes import BY_TORCH
from vgs_ckpt.errors import FormatError, UsageError, VgsCkptError
from vgs_ckpt.legacy import read_legacy
from vgs_ckpt.models import ContainerKind, Producer
from vgs_ckpt.readers.base import CheckpointReader, TensorSpec, TreePath, as_path, no_such

__all__ = ["LEGACY_PRODUCER", "LegacyReader"]

LEGACY_PRODUCER = Producer(name="torch.save (original PBT scheduler)", version="unknown")


class LegacyReader(CheckpointReader):
    """A legacy ``torch.save`` file, read when opened and served from memory (it has
    no lazy access and no tensor names); made by :func:`vgs_ckpt.open`."""

    def __init__(self, source: Source, container: ContainerKind, *, path: str | None,
                 device: torch.device, vgs_error: type[VgsCkptError] | None = None) -> None:
        super().__init__(source.where, path)
        if container == "safetensors":
            raise AssertionError("LegacyReader opened on a safetensors file")
        self.container = container
        modified = source.modified()
        try:
            found = read_legacy(source, container=self.container, map_location=device)
        finally:
            source.close()  # everything is in memory now
        parameters = found.payload if isinstance(found.payload, dict) else dict(found.payload)
        self.header, _ = _header.describe(
            parameters, {"step": found.step, "performance": found.performance,
                         "format": found.format,
                         "created_at": (datetime.fromtimestamp(modified, UTC)
                                        if modified is not None else None)},
            producer=LEGACY_PRODUCER, has_optimizer_state=found.has_optimizer_state,
            where=self.where, for_writing=False, error=FormatError, vgs_error=vgs_error,
            vgs_fix="load it with upgrade=False to salvage the data")
        self.legacy_layout = found.layout
        self._tree = parameters

    def keys(self) -> list[Any]:
        return list(self._tree)

    def structure(self) -> Any:
        return _specs(self._tree)

    @property
    def bytes_read(self) -> int:
        """All of the tensors' bytes: a legacy file is read when opened."""
        return sum(spec.nbytes for spec in _leaves(self.structure())
                   if isinstance(spec, TensorSpec))

    def load(self, path: TreePath | str | int = ()) -> Any:
        self._check_open()
        wanted = as_path(path)
        node: Any = self._tree
        for depth, key in enumerate(wanted):
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                raise no_such(self.where, wanted[:depth + 1]) from None
        return node

    def tensor(self, name: str) -> Any:
        self._check_open()
        raise UsageError(f"{self.where}: a legacy {self.container} file has no tensor "
                         "names; use reader.load(path) instead")


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
