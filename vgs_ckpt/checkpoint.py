"""The in-memory checkpoint returned by :func:`vgs_ckpt.load`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vgs_ckpt.models import CheckpointFormat, CheckpointV1, CheckpointV2

__all__ = ["Checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the parameter tree and the validated header.

    Attributes:
        parameters: the tree, e.g. ``{"policy": ..., "policy.optimizer": ..., "vgs_state": ...}``.
        header: the validated header (``CheckpointV1`` or ``CheckpointV2``).
        container: ``"safetensors"``, ``"torch-zip"`` or ``"torch-pickle"``.
        path: the file it was read from, or None for bytes.
    """

    parameters: dict[Any, Any]
    header: CheckpointV1 | CheckpointV2
    container: str = "safetensors"
    path: str | None = None

    @property
    def format(self) -> CheckpointFormat:
        """The format version of the header, e.g. ``"v2_full_parameters"``."""
        return self.header.format_version
