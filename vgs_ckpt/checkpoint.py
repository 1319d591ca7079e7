"""The in-memory checkpoint returned by :func:`vgs_ckpt.load`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vgs_ckpt.models import CheckpointFormat, CheckpointHeader, CheckpointV2, ContainerKind

__all__ = ["Checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the parameter tree and the validated header.

    Attributes:
        parameters: the tree, e.g. ``{"policy": ..., "policy.optimizer": ..., "vgs_state": ...}``.
        header: the header (``CheckpointV1`` or ``CheckpointV2``): as stored for a
            vgs_ckpt file; described from the tree (digests None) for a legacy file or
            after an in-memory upgrade.
        container: ``"safetensors"``, ``"torch-zip"`` or ``"torch-pickle"``.
        path: the file it was read from, or None for bytes.
    """

    parameters: dict[Any, Any]
    header: CheckpointHeader
    container: ContainerKind = "safetensors"
    path: str | None = None

    @property
    def format(self) -> CheckpointFormat:
        """The format version of the header, e.g. ``"v2_full_parameters"``."""
        return self.header.format_version

    def save_fields(self) -> dict[str, Any]:
        """The keyword arguments of ``vgs_ckpt.save`` that write this checkpoint's
        bookkeeping again: ``save(path, ckpt.parameters, **ckpt.save_fields())``."""
        header = self.header
        v2 = header if isinstance(header, CheckpointV2) else None
        return {"step": header.step, "performance": header.performance,
                "member_id": header.member_id, "created_at": header.created_at,
                "hyperparams": v2.hyperparams if v2 else None,
                "lineage": v2.lineage if v2 else None, "format": header.format_version,
                "provenance": header.provenance}
