"""Round trips: save -> load is the identity on parameter trees.

"Lossless" means: same container types (dict, OrderedDict, list, tuple) and key
order, same key types (str vs int), same leaf types (numpy stays numpy, bool stays
bool), floats equal bit for bit except NaN payloads, tensors bit-identical with
the same dtype, shape, requires_grad and nn.Parameter-ness.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import vgs_ckpt
from vgs_ckpt.testing import assert_trees_equal, parameter_trees, vgs_states

from .conftest import make_member

_FIXED = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@settings(max_examples=200, deadline=None)
@given(parameter_trees())
def test_bytes_round_trip_is_identity(tree: dict[Any, Any]) -> None:
    data = vgs_ckpt.save_bytes(tree, step=3)
    assert_trees_equal(vgs_ckpt.load_bytes(data).parameters, tree)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=parameter_trees())
def test_file_round_trip_is_identity_and_matches_bytes(tmp_path: Any, tree: dict[Any, Any]
                                                       ) -> None:
    path = tmp_path / "m.safetensors"
    header = vgs_ckpt.save(path, tree, step=1, created_at=_FIXED)
    assert path.read_bytes() == vgs_ckpt.save_bytes(tree, step=1, created_at=_FIXED)
    loaded = vgs_ckpt.load(path)
    assert_trees_equal(loaded.parameters, tree)
    assert loaded.header == header == vgs_ckpt.read_header(path)


@settings(max_examples=50, deadline=None)
@given(vgs_states("3.2"))
def test_vgs_state_round_trips_and_is_summarised(state: dict[str, Any]) -> None:
    ckpt = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"vgs_state": state}, step=0))
    assert_trees_equal(ckpt.parameters["vgs_state"], state)
    assert ckpt.header.vgs is not None
    assert ckpt.header.vgs.step_count == state["step_count"]
    assert ckpt.header.vgs.param_grad_mean_ema == "vgs_state/param_grad_mean_ema"


def test_realistic_member_round_trips(tmp_path: Any, member: dict[str, Any]) -> None:
    path = tmp_path / "member_3.safetensors"
    vgs_ckpt.save(path, member, step=150, performance=0.9, member_id="3",
                  hyperparams={"lr": 5e-4})
    ckpt = vgs_ckpt.load(path, map_location="cpu")
    assert_trees_equal(ckpt.parameters, member)
    assert ckpt.format == vgs_ckpt.CheckpointFormat.V2_FULL_PARAMETERS == "v2_full_parameters"
    assert (ckpt.header.step, ckpt.header.performance, ckpt.header.member_id) == (150, 0.9, "3")
    opt = ckpt.parameters["policy.optimizer"]
    assert set(opt["state"]) == {0, 1, 2, 3}
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999)
    # The loaded optimizer state is usable by torch.
    policy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    policy.load_state_dict(ckpt.parameters["policy"])
    torch.optim.Adam(policy.parameters()).load_state_dict(opt)


def test_tied_tensors_are_stored_once_and_come_back_shared() -> None:
    weight = torch.randn(8, 4)
    tree = {"encoder": {"emb": weight}, "decoder": {"out": weight}, "view": weight[:2]}
    ckpt = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(tree, step=0))
    assert set(ckpt.header.tensors) == {"encoder/emb", "view"}
    assert ckpt.parameters["decoder"]["out"] is ckpt.parameters["encoder"]["emb"]
    # A view of part of the storage is stored by value (spec section 6).
    assert torch.equal(ckpt.parameters["view"], weight[:2])


def test_non_contiguous_tensors_are_stored_by_value() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    tree = {"t": base.t(), "strided": base[:, ::2]}
    out = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(tree, step=0)).parameters
    assert torch.equal(out["t"], base.t()) and out["t"].is_contiguous()
    assert torch.equal(out["strided"], base[:, ::2])


@pytest.mark.parametrize("dtype", [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16,
    torch.uint32, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 3)])
def test_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = torch.ones(shape, dtype=torch.float32).to(dtype)
    out = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"t": tensor}, step=0)).parameters["t"]
    assert_trees_equal(out, tensor)


def test_special_floats_and_scalar_types() -> None:
    tree = {"f": [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-308, 5e-324], "b": True,
            "i": [0, -1, 2**70], "s": "ünï/~cødé", "n": None, "t": (0.9, 0.999),
            "np": [np.float32(1.5), np.int64(-3), np.bool_(True), np.arange(3, dtype=np.uint16)]}
    out = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(tree, step=0)).parameters
    assert_trees_equal(out, tree)
    assert type(out["np"][0]) is np.float32 and type(out["np"][3]) is np.ndarray


def test_map_location_moves_every_tensor_and_keeps_numpy() -> None:
    weight = torch.randn(2)
    tree = {"a": weight, "b": weight, "n": np.ones(2)}
    out = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(tree, step=0), map_location="meta").parameters
    assert out["a"].device.type == "meta" and out["b"] is out["a"]
    assert type(out["n"]) is np.ndarray


def test_ordered_dict_and_int_keys_survive() -> None:
    tree = {"sd": OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))]),
            "state": {0: {"step": torch.tensor(3.0)}, 10: {}}}
    out = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(tree, step=0)).parameters
    assert type(out["sd"]) is OrderedDict and list(out["sd"]) == ["b", "a"]
    assert list(out["state"]) == [0, 10]


def test_tensor_names_are_readable_paths_with_escapes() -> None:
    tree = {"policy": {"mlp.0.weight": torch.ones(1)},
            "policy.optimizer": {"state": {0: {"exp_avg": torch.ones(1)}}},
            "a/b": {"c~d": torch.ones(1)}}
    header = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(tree, step=0)).header
    assert list(header.tensors) == ["policy/mlp.0.weight", "policy.optimizer/state/0/exp_avg",
                                    "a~1b/c~0d"]


def test_save_does_not_mutate_the_callers_tree(member: dict[str, Any]) -> None:
    before = {k: dict(v) if isinstance(v, dict) else v for k, v in member.items()}
    vgs_ckpt.save_bytes(member, step=0)
    assert_trees_equal(member, make_member())
    assert list(member) == list(before)


def test_v1_policy_only_round_trip() -> None:
    policy = OrderedDict(w=torch.ones(2))
    data = vgs_ckpt.save_bytes(policy, step=4, performance=0.5,
                               format=vgs_ckpt.CheckpointFormat.V1_POLICY_ONLY)
    ckpt = vgs_ckpt.load_bytes(data, upgrade=False)
    assert ckpt.format == "v1_policy_only"
    assert isinstance(ckpt.header, vgs_ckpt.CheckpointV1)
    assert ckpt.header.has_optimizer_state is False
    assert_trees_equal(ckpt.parameters, policy)
