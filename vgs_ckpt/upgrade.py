"""Upgrading a loaded checkpoint to the latest format (and VGS state version)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from vgs_ckpt import _header
from vgs_ckpt._header import VGS_KEY
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import UsageError
from vgs_ckpt.legacy import LegacyCheckpoint
from vgs_ckpt.migrations import Upgrading, upgrade_tree, vgs_version_of
from vgs_ckpt.models import FORMAT_ORDER, CheckpointFormat, Producer

__all__ = ["from_legacy", "upgrade"]

LEGACY_PRODUCER = Producer(name="torch.save (original PBT scheduler)", version="unknown")


def _finish(header: _header.Header, arrays: Mapping[str, Any]) -> _header.Header:
    return _header.with_digests(header, {n: _header.digest(a.data) for n, a in arrays.items()})


def from_legacy(legacy: LegacyCheckpoint, container: str, path: str | None,
                created_at: datetime | None = None) -> Checkpoint:
    """A :class:`Checkpoint` for a legacy file, in its original format (not upgraded)."""
    where = path or "<bytes>"
    header, arrays = _header.build(
        legacy.payload, step=legacy.step, performance=legacy.performance, member_id=None,
        hyperparams=None, lineage=None, format=legacy.format,
        created_at=created_at or datetime.now(UTC), where=where, producer=LEGACY_PRODUCER)
    if legacy.has_optimizer_state is not None and header.format_version == "v1_policy_only":
        header = header.model_copy(update={"has_optimizer_state": legacy.has_optimizer_state})
    parameters = legacy.payload if isinstance(legacy.payload, dict) else dict(legacy.payload)
    return Checkpoint(parameters, _finish(header, arrays), container, path)


def upgrade(checkpoint: Checkpoint,
            target: CheckpointFormat | str = FORMAT_ORDER[-1]) -> tuple[Checkpoint, list[str]]:
    """Upgrade a checkpoint to ``target`` (default: the latest format) and VGS 3.2.

    Pure: the given checkpoint is not modified. The new header's ``provenance``
    records the original format, container and VGS version, and every applied step.

    Returns:
        ``(checkpoint, applied)``; when ``applied`` is empty and the checkpoint came
        from a safetensors file, the same checkpoint object is returned.

    Raises:
        UnsupportedVersionError: ``target`` is older than the checkpoint, or the VGS
            state version is unknown.

    Example:
        >>> ckpt, applied = vgs_ckpt.upgrade(vgs_ckpt.load(path, upgrade=False))
    """
    header = checkpoint.header
    vgs = checkpoint.parameters.get(VGS_KEY)
    original_vgs = (vgs_version_of(vgs) if isinstance(vgs, Mapping)
                    and header.format_version is CheckpointFormat.V2_FULL_PARAMETERS else None)
    old = header.provenance
    state = Upgrading(header.format_version, checkpoint.parameters,
                      vgs_state_absent=old.vgs_state_absent if old else False,
                      legacy=dict(old.legacy) if old else {})
    try:
        target = CheckpointFormat(target)
    except ValueError:
        raise UsageError(f"unknown target format {target!r}; expected one of "
                         f"{', '.join(FORMAT_ORDER)}") from None
    state, applied = upgrade_tree(state, target)
    # A file read from a legacy torch container gets a provenance record even when
    # no step applies, so the container it came from is not forgotten.
    if not applied and (old is not None or checkpoint.container == "safetensors"):
        return checkpoint, []
    provenance = {
        "original_format": old.original_format if old else header.format_version.value,
        "original_container": old.original_container if old else checkpoint.container,
        "original_vgs_version": old.original_vgs_version if old else original_vgs,
        "applied_steps": [*(old.applied_steps if old else []), *applied],
        "vgs_state_absent": state.vgs_state_absent,
        "legacy": state.legacy,
    }
    new_header, arrays = _header.build(
        state.parameters, **_header.bookkeeping(header), format=state.format,
        where=checkpoint.path or "<bytes>", producer=header.producer, provenance=provenance)
    parameters = dict(state.parameters)
    return Checkpoint(parameters, _finish(new_header, arrays), checkpoint.container,
                      checkpoint.path), applied
