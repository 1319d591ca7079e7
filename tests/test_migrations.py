"""Migration steps, one at a time, as tables of (old, new) pairs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import CheckpointFormat, UnsupportedVersionError
from vgs_ckpt.testing import assert_trees_equal
from vgs_ckpt.upgrades.steps import (
    FORMAT_STEPS,
    VGS_STEPS,
    Upgrading,
    upgrade_tree,
    v1_policy_only_to_v2_full_parameters,
    vgs_1_0_to_3_1,
    vgs_2_0_to_3_1,
    vgs_3_0_to_3_1,
    vgs_3_1_to_3_2,
)

from .legacy_files import vgs_state_of_version

V2 = CheckpointFormat.V2_FULL_PARAMETERS


def _v2(vgs: dict[str, Any] | None) -> Upgrading:
    return Upgrading(V2, {"policy": {"w": torch.ones(2)}, "vgs_state": vgs})


def test_v1_to_v2_moves_the_policy_and_marks_vgs_absent() -> None:
    policy = {"w": torch.ones(2)}
    new = v1_policy_only_to_v2_full_parameters(Upgrading(CheckpointFormat.V1_POLICY_ONLY,
                                                         policy))
    assert new.format is V2
    assert new.parameters["policy"] is policy
    assert new.parameters["vgs_state"] is None
    assert new.vgs_state_absent is True


STALE = [("1.0", vgs_1_0_to_3_1), ("2.0", vgs_2_0_to_3_1), ("3.0", vgs_3_0_to_3_1)]


@pytest.mark.parametrize(("version", "step"), STALE)
def test_pre_3_1_states_drop_their_emas_and_restart_the_step_count(version: str, step: Any
                                                                   ) -> None:
    old = vgs_state_of_version(version, step_count=250)
    new = step(_v2(old))
    vgs = new.parameters["vgs_state"]
    expected = {**old, "vgs_version": "3.1", "step_count": 0, "param_grad_mean_ema": None,
                "param_grad_sq_ema": None, "param_numel": None}
    assert_trees_equal(vgs, expected)
    record = new.legacy["vgs"]
    assert record["vgs_version"] == version and record["step_count"] == 250
    if version != "1.0":
        assert record["param_grad_mean_ema"] == pytest.approx([0.1, 0.2])
        assert record["param_numel"] == [12.0, 3.0]


def test_3_1_to_3_2_adds_the_new_config_keys_and_keeps_statistics() -> None:
    old = vgs_state_of_version("3.1", step_count=42)
    new = vgs_3_1_to_3_2(_v2(old)).parameters["vgs_state"]
    assert_trees_equal(new, {**old, "vgs_version": "3.2", "min_scaling_factor": 0.1,
                             "variance_cap": 50.0})
    assert new["step_count"] == 42


@pytest.mark.parametrize("step", [*FORMAT_STEPS, *VGS_STEPS], ids=lambda s: s.name)
def test_steps_are_pure(step: Any) -> None:
    if step in FORMAT_STEPS:
        state = Upgrading(CheckpointFormat.V1_POLICY_ONLY, {"w": torch.ones(1)})
    else:
        state = _v2(vgs_state_of_version(step.source))
    snapshot = copy.deepcopy(dict(state.parameters))
    new = step.apply(state)
    assert new is not state
    assert_trees_equal(dict(state.parameters), snapshot)


@pytest.mark.parametrize(("version", "applied"), [
    ("1.0", ["vgs_1.0->3.1", "vgs_3.1->3.2"]),
    ("2.0", ["vgs_2.0->3.1", "vgs_3.1->3.2"]),
    ("3.0", ["vgs_3.0->3.1", "vgs_3.1->3.2"]),
    ("3.1", ["vgs_3.1->3.2"]),
    ("3.2", []),
])
def test_driver_chains_vgs_steps(version: str, applied: list[str]) -> None:
    state, steps = upgrade_tree(_v2(vgs_state_of_version(version)))
    assert steps == applied
    assert state.parameters["vgs_state"]["vgs_version"] == "3.2"


def test_driver_v1_to_latest() -> None:
    _, steps = upgrade_tree(Upgrading(CheckpointFormat.V1_POLICY_ONLY, {"w": torch.ones(1)}))
    assert steps == ["v1_policy_only->v2_full_parameters"]


def test_driver_refuses_to_downgrade() -> None:
    with pytest.raises(UnsupportedVersionError, match="downgrade"):
        upgrade_tree(_v2(None), CheckpointFormat.V1_POLICY_ONLY)


def test_driver_refuses_unknown_vgs_versions() -> None:
    with pytest.raises(UnsupportedVersionError, match="'4.0'"):
        upgrade_tree(_v2({**vgs_state_of_version("3.2"), "vgs_version": "4.0"}))


def test_public_upgrade_records_history_and_is_idempotent() -> None:
    data = vgs_ckpt.save_bytes({"policy": {"w": torch.ones(2)},
                                "vgs_state": vgs_state_of_version("3.1", step_count=7)},
                               step=5, member_id="a", hyperparams={"lr": 0.1})
    raw = vgs_ckpt.load_bytes(data, upgrade=False)
    assert raw.parameters["vgs_state"]["vgs_version"] == "3.1"
    new, applied = vgs_ckpt.upgrade(raw)
    assert applied == ["vgs_3.1->3.2"]
    assert raw.parameters["vgs_state"]["vgs_version"] == "3.1"  # the input is untouched
    assert new.header.provenance is not None
    assert new.header.provenance.original_vgs_version == "3.1"
    assert new.header.provenance.applied_steps == ["vgs_3.1->3.2"]
    assert isinstance(new.header, vgs_ckpt.CheckpointV2)
    assert new.header.hyperparams == {"lr": 0.1} and new.header.member_id == "a"
    assert new.header.vgs is not None and new.header.vgs.vgs_version == "3.2"
    again, applied_again = vgs_ckpt.upgrade(new)
    assert applied_again == [] and again is new


def test_load_of_an_old_vgs_state_upgrades_with_a_warning() -> None:
    data = vgs_ckpt.save_bytes({"vgs_state": vgs_state_of_version("3.0", step_count=99)}, step=0)
    with pytest.warns(vgs_ckpt.LegacyFormatWarning, match="vgs_3.0->3.1"):
        ckpt = vgs_ckpt.load_bytes(data)
    assert ckpt.parameters["vgs_state"]["step_count"] == 0
    assert ckpt.header.provenance is not None
    assert ckpt.header.provenance.legacy["vgs"]["step_count"] == 99


def test_upgrade_to_v1_target_leaves_v1_alone() -> None:
    data = vgs_ckpt.save_bytes({"w": torch.ones(1)}, step=0,
                               format=CheckpointFormat.V1_POLICY_ONLY)
    raw = vgs_ckpt.load_bytes(data, upgrade=False)
    assert vgs_ckpt.upgrade(raw, target="v1_policy_only") == (raw, [])


def test_upgrade_to_an_unknown_target_is_a_usage_error() -> None:
    raw = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"w": torch.ones(1)}, step=0), upgrade=False)
    with pytest.raises(vgs_ckpt.UsageError, match="v7_x"):
        vgs_ckpt.upgrade(raw, target="v7_x")
