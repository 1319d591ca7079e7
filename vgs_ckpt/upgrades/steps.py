"""The migration steps, and :func:`upgrade_tree`, the driver that applies them.

Each step is pure and named: it takes an :class:`Upgrading` value (a parameter
tree with its format) and returns a new one; nothing is mutated in place.
:func:`upgrade_tree` applies the format steps, then the VGS state steps, in
registry order, and reports which ones ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vgs_ckpt import vgs_state
from vgs_ckpt.errors import UnsupportedVersionError, UsageError
from vgs_ckpt.models import FORMAT_ORDER, CheckpointFormat
from vgs_ckpt.vgs_state import KEY as VGS_KEY

__all__ = ["FORMAT_STEPS", "VGS_STEPS", "MigrationStep", "Upgrading", "check_target",
           "upgrade_tree", "upgrade_vgs_state"]


@dataclass(frozen=True)
class Upgrading:
    """A checkpoint on its way to the latest format."""

    format: CheckpointFormat
    parameters: Mapping[Any, Any]
    vgs_state_absent: bool = False
    legacy: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MigrationStep:
    """One named step from ``source`` to ``target`` (format or VGS versions)."""

    name: str
    source: str
    target: str
    apply: Callable[[Upgrading], Upgrading]


def _vgs(state: Upgrading) -> dict[str, Any]:
    vgs = state.parameters.get(VGS_KEY)
    assert isinstance(vgs, Mapping)
    return dict(vgs)


def _with_vgs(state: Upgrading, vgs: dict[str, Any], legacy: dict[str, Any] | None = None
              ) -> Upgrading:
    parameters = {**state.parameters, VGS_KEY: vgs}
    merged = {**state.legacy, **(legacy or {})}
    return dataclasses.replace(state, parameters=parameters, legacy=merged)


def _json_floats(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [float(x) for x in value.detach().cpu().reshape(-1).tolist()]
    return value


def v1_policy_only_to_v2_full_parameters(state: Upgrading) -> Upgrading:
    """v1_policy_only -> v2_full_parameters (since format v2).

    A v1 file holds only the policy's state_dict; it becomes
    ``parameters["policy"]``. There is no VGS state: ``vgs_state`` is None and
    the provenance records that the state was absent (not zero), so a scaler
    restoring from it knows to start fresh.
    """
    return dataclasses.replace(state, format=CheckpointFormat.V2_FULL_PARAMETERS,
                               parameters={"policy": state.parameters, VGS_KEY: None},
                               vgs_state_absent=True)


def _drop_stale_emas(state: Upgrading, version: str) -> Upgrading:
    old = _vgs(state)
    record = {"vgs_version": version, "step_count": old.get("step_count")}
    record.update({key: _json_floats(old[key]) for key in vgs_state.TENSOR_KEYS if key in old})
    new = {**old, "vgs_version": "3.1", "step_count": 0}
    for key in vgs_state.TENSOR_KEYS:
        new[key] = None
    return _with_vgs(state, new, {"vgs": record})


def vgs_1_0_to_3_1(state: Upgrading) -> Upgrading:
    """VGS 1.0 -> 3.1: global "spatial" variance only; restart the statistics.

    1.0 kept no per-parameter EMAs. 3.1 needs them, so they start empty, and
    ``step_count`` is reset to 0 so bias correction and warm-up restart with
    them (the original kept the old count, which inflates the normalized
    variance for about 1/(1-beta) steps). The old values go to the legacy record.
    """
    return _drop_stale_emas(state, "1.0")


def vgs_2_0_to_3_1(state: Upgrading) -> Upgrading:
    """VGS 2.0 -> 3.1: per-parameter EMAs measured E[|g|] and a spatial variance.

    3.1 measures mean(g) and mean(g**2), so the 2.0 tensors are dropped (kept in
    the legacy record) and ``step_count`` is reset to 0, for the reason in
    :func:`vgs_1_0_to_3_1`.
    """
    return _drop_stale_emas(state, "2.0")


def vgs_3_0_to_3_1(state: Upgrading) -> Upgrading:
    """VGS 3.0 -> 3.1: the squared-gradient EMA held mean(g)**2 (a bug), not mean(g**2).

    Its tensors cannot be corrected after the fact, so they are dropped (kept in
    the legacy record) and ``step_count`` is reset to 0.
    """
    return _drop_stale_emas(state, "3.0")


def vgs_3_1_to_3_2(state: Upgrading) -> Upgrading:
    """VGS 3.1 -> 3.2: adds ``min_scaling_factor`` (0.1) and ``variance_cap`` (50.0).

    The statistics mean the same in both versions and are kept unchanged.
    """
    old = _vgs(state)
    new = {**old, "vgs_version": "3.2"}
    for key in vgs_state.ADDED_IN_3_2:
        new.setdefault(key, vgs_state.DEFAULTS[key])
    return _with_vgs(state, new)


FORMAT_STEPS: tuple[MigrationStep, ...] = (
    MigrationStep("v1_policy_only->v2_full_parameters", "v1_policy_only",
                  "v2_full_parameters", v1_policy_only_to_v2_full_parameters),
)
VGS_STEPS: tuple[MigrationStep, ...] = (
    MigrationStep("vgs_1.0->3.1", "1.0", "3.1", vgs_1_0_to_3_1),
    MigrationStep("vgs_2.0->3.1", "2.0", "3.1", vgs_2_0_to_3_1),
    MigrationStep("vgs_3.0->3.1", "3.0", "3.1", vgs_3_0_to_3_1),
    MigrationStep("vgs_3.1->3.2", "3.1", "3.2", vgs_3_1_to_3_2),
)


def check_target(target: CheckpointFormat | str) -> CheckpointFormat:
    """``target`` as a format, or a :class:`UsageError` naming the known ones."""
    try:
        return CheckpointFormat(target)
    except ValueError:
        raise UsageError(f"unknown target format {target!r}; expected one of "
                         f"{', '.join(FORMAT_ORDER)}") from None


def upgrade_tree(state: Upgrading, target: CheckpointFormat | str = FORMAT_ORDER[-1]
                 ) -> tuple[Upgrading, list[str]]:
    """Apply every format step up to ``target``, then (for v2) every VGS step up to the
    latest VGS version.

    Returns:
        The upgraded value and the names of the steps applied, in order.

    Raises:
        UsageError: ``target`` is not a format.
        UnsupportedVersionError: ``target`` is older than the checkpoint, or the VGS
            state has a version this library does not know.
    """
    target = check_target(target)
    if FORMAT_ORDER.index(state.format) > FORMAT_ORDER.index(target):
        raise UnsupportedVersionError(f"cannot downgrade {state.format.value} to "
                                      f"{target.value}; only upgrades are supported")
    applied: list[str] = []
    for step in FORMAT_STEPS:
        if state.format == step.source and FORMAT_ORDER.index(target) >= FORMAT_ORDER.index(
                CheckpointFormat(step.target)):
            state = step.apply(state)
            applied.append(step.name)
    if state.format is CheckpointFormat.V2_FULL_PARAMETERS:
        for step in VGS_STEPS:
            vgs = state.parameters.get(VGS_KEY)
            if isinstance(vgs, Mapping) and vgs_state.version_of(vgs) == step.source:
                state = step.apply(state)
                applied.append(step.name)
    return state, applied


def upgrade_vgs_state(state: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A VGS state_dict of any known version, upgraded to the latest, and the steps
    applied."""
    upgraded, applied = upgrade_tree(Upgrading(CheckpointFormat.V2_FULL_PARAMETERS,
                                               {VGS_KEY: dict(state)}))
    return dict(upgraded.parameters[VGS_KEY]), applied
