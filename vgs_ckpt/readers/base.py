"""What every checkpoint reader offers (:class:`CheckpointReader`), and the pieces
the two readers share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from vgs_ckpt._dtypes import BY_CODE
from vgs_ckpt.errors import UsageError
from vgs_ckpt.models import CheckpointFormat, CheckpointHeader, ContainerKind

__all__ = ["CheckpointReader", "TensorSpec", "TreePath"]

TreePath = Sequence[str | int]


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


class CheckpointReader(ABC):
    """A checkpoint opened for reading, as stored (not upgraded); see
    :func:`vgs_ckpt.open`, which picks the reader from the bytes:
    :class:`~vgs_ckpt.readers.safetensors.SafetensorsReader` (lazy) or
    :class:`~vgs_ckpt.readers.legacy.LegacyReader` (a torch.save file, read once).
    Readers are made by ``open``; their constructors are private.
    """

    path: str | None  # the file's path or key (None for bytes)
    where: str  # how errors name it
    header: CheckpointHeader
    container: ContainerKind
    legacy_layout: str | None  # "L0"/"L1"/"L2" for a legacy file, else None

    def __init__(self, where: str, path: str | None) -> None:
        self.where, self.path = where, path
        self._closed = False

    @property
    def format(self) -> CheckpointFormat:
        """The format version of the file, e.g. ``"v2_full_parameters"``."""
        return self.header.format_version

    @abstractmethod
    def keys(self) -> list[Any]:
        """The top-level keys of the tree (``["policy", "policy.optimizer", ...]``)."""

    @abstractmethod
    def structure(self) -> Any:
        """The tree with every tensor or array replaced by a :class:`TensorSpec` (name,
        dtype, shape); no tensor byte is read."""

    @property
    @abstractmethod
    def bytes_read(self) -> int:
        """Tensor bytes decoded or verified so far (each tensor counts once)."""

    @abstractmethod
    def load(self, path: TreePath | str | int = ()) -> Any:
        """The subtree at ``path`` (e.g. ``["policy"]``, or just ``"policy"`` for a
        top-level key; ``()`` is the whole tree), with only the tensors it refers to
        read and verified.

        Raises:
            UsageError: no such path in the tree.
            IntegrityError: a tensor it refers to does not match its digest (named).
        """

    @abstractmethod
    def tensor(self, name: str) -> Any:
        """One stored tensor by its name in the file (``"policy/w"``), verified."""

    def get_tensor(self, name: str) -> Any:
        """:meth:`tensor` (the name safetensors' ``safe_open`` uses)."""
        return self.tensor(name)

    def __getitem__(self, key: str | int) -> Any:
        """``reader["policy"]`` is ``reader.load(["policy"])``."""
        return self.load([key])

    def close(self) -> None:
        """Release the file (tensors already read stay valid)."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"{self.where}: the reader is closed; read inside the `with` "
                             "block")

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def as_path(path: TreePath | str | int) -> list[str | int]:
    """A tree path from what :meth:`CheckpointReader.load` accepts."""
    return [path] if isinstance(path, str | int) else list(path)


def no_such(where: str, path: TreePath) -> UsageError:
    shown = "".join(f"[{k!r}]" for k in path)
    return UsageError(f"{where}: the tree has no {shown}; see reader.structure() for what it "
                      "holds")
