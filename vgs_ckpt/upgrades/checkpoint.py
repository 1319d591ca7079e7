"""Upgrading a loaded :class:`Checkpoint` in memory: the tree and the bookkeeping.

The steps change the parameter tree; this module carries the header along:
format, provenance and VGS summary, and the tree's description. No tensor byte
is read, copied or hashed: the new header's digests are None until it is saved.
"""

from __future__ import annotations

from collections.abc import Mapping

from vgs_ckpt import _header, vgs_state
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import FormatError
from vgs_ckpt.models import FORMAT_ORDER, CheckpointFormat, CheckpointV2
from vgs_ckpt.upgrades.steps import Upgrading, check_target, upgrade_tree

__all__ = ["upgrade"]

_FIX = ("load it with upgrade=False, fix parameters['vgs_state'] and save it, or use "
        "the scaler's load_state_dict on a fixed copy")


def upgrade(checkpoint: Checkpoint,
            target: CheckpointFormat | str = FORMAT_ORDER[-1]) -> tuple[Checkpoint, list[str]]:
    """Upgrade a checkpoint to ``target`` (default: the latest format) and VGS 3.2.

    Pure: the given checkpoint is not modified. The new header's ``provenance``
    records the original format, container and VGS version, and every applied step.
    This is where a VGS state read as stored (``load(..., upgrade=False)``) is
    validated.

    Returns:
        ``(checkpoint, applied)``; when ``applied`` is empty and the checkpoint came
        from a safetensors file, the same checkpoint object is returned.

    Raises:
        UsageError: ``target`` is not a format.
        UnsupportedVersionError: ``target`` is older than the checkpoint, or the VGS
            state version is unknown.
        FormatError: the (upgraded) VGS state fails validation.

    Example:
        >>> ckpt, applied = vgs_ckpt.upgrade(vgs_ckpt.load(path, upgrade=False))
    """
    header = checkpoint.header
    where = checkpoint.path or "<memory>"
    target = check_target(target)
    vgs = checkpoint.parameters.get(vgs_state.KEY)
    original_vgs = (vgs_state.version_of(vgs, where) if isinstance(vgs, Mapping)
                    and header.format_version is CheckpointFormat.V2_FULL_PARAMETERS else None)
    old = header.provenance
    state = Upgrading(header.format_version, checkpoint.parameters,
                      vgs_state_absent=old.vgs_state_absent if old else False,
                      legacy=dict(old.legacy) if old else {})
    state, applied = upgrade_tree(state, target)
    # A file read from a legacy torch container gets a provenance record even when
    # no step applies, so the container it came from is not forgotten.
    if not applied and (old is not None or checkpoint.container == "safetensors"):
        if isinstance(header, CheckpointV2):  # validation bites here, not on reading
            vgs_state.summary(checkpoint.parameters, header.tree, where, FormatError, _FIX)
        return checkpoint, []
    provenance = {
        "original_format": old.original_format if old else header.format_version.value,
        "original_container": old.original_container if old else checkpoint.container,
        "original_vgs_version": old.original_vgs_version if old else original_vgs,
        "applied_steps": [*(old.applied_steps if old else []), *applied],
        "vgs_state_absent": state.vgs_state_absent,
        "legacy": state.legacy,
    }
    v2 = header if isinstance(header, CheckpointV2) else None
    new_header, _ = _header.describe(
        state.parameters, {"step": header.step, "performance": header.performance,
                           "member_id": header.member_id, "created_at": header.created_at,
                           "hyperparams": v2.hyperparams if v2 else None,
                           "lineage": v2.lineage if v2 else None, "format": state.format,
                           "provenance": provenance},
        producer=header.producer, where=where, for_writing=False, error=FormatError,
        vgs_error=FormatError, vgs_fix=_FIX)
    return Checkpoint(dict(state.parameters), new_header, checkpoint.container,
                      checkpoint.path), applied
