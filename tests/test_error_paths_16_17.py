"""Error paths added by issues 16 and 17 that other tests do not reach: each is the
documented VgsCkptError, and its message says what, where and how to fix."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import vgs_ckpt
from vgs_ckpt import CheckpointIOError, UsageError
from vgs_ckpt.pbt import CheckpointStore
from vgs_ckpt.vgs import VarianceGradientScaler

# --- the VGS's pending moments -------------------------------------------------------------

@pytest.mark.parametrize(("pending", "match"), [
    ({"count": 1}, "exactly the keys count, sum, sum_sq, max.*pass what pending"),
    ([1, 2, 3, 4], "exactly the keys"),
    ({"count": -1, "sum": 0.0, "sum_sq": 0.0, "max": 0.0}, "count must be an int >= 0"),
    ({"count": 1, "sum": float("nan"), "sum_sq": 0.0, "max": 0.0}, "finite numbers"),
    ({"count": True, "sum": 0.0, "sum_sq": 0.0, "max": 0.0}, "count must be an int"),
])
def test_bad_pending_moments_are_refused_and_change_nothing(pending, match) -> None:
    scaler = VarianceGradientScaler([torch.nn.Parameter(torch.ones(2))])
    scaler.load_pending({"count": 3, "sum": 1.0, "sum_sq": 2.0, "max": 0.5})
    with pytest.raises(UsageError, match=match):
        scaler.load_pending(pending)
    assert scaler.pending() == {"count": 3, "sum": 1.0, "sum_sq": 2.0, "max": 0.5}
    scaler.load_pending(None)
    assert scaler.pending()["count"] == 0


# --- writer and store ------------------------------------------------------------------------

def test_a_header_field_that_would_not_read_back_is_refused_before_writing(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(UsageError, match="would not read back.*nothing was written"):
        vgs_ckpt.save(path, {"w": torch.ones(1)}, step=1, hyperparams={"n": 10**5000})
    assert not path.exists()


def test_a_store_whose_root_cannot_be_created_says_so(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointIOError, match="cannot create the store directory"):
        CheckpointStore(blocker / "store")


class _Claims65Dims:
    """numpy and torch cannot make such an array; the encoder's limit still holds."""

    shape = (1,) * 65


def test_a_tensor_of_more_than_64_dimensions_is_refused_at_save() -> None:
    vgs_ckpt.save_bytes({"t": torch.ones([1] * 64)}, step=0)  # the limit is allowed
    from vgs_ckpt._dtypes import BY_CODE
    from vgs_ckpt._tree import Encoder
    with pytest.raises(UsageError, match=r"\['t'\]: a tensor of 65 dimensions cannot be "
                                         "stored"):
        Encoder()._add(None, ("t",), BY_CODE["F32"], _Claims65Dims())


# --- sb3: files and state --------------------------------------------------------------------

sb3_lib = pytest.importorskip("stable_baselines3")
from tests.sb3_members import build  # noqa: E402
from vgs_ckpt.integrations import sb3  # noqa: E402
from vgs_ckpt.integrations.sb3.files import _decode, _resolve_class  # noqa: E402


def _saved(tmp_path: Path, name: str = "PPO") -> tuple[object, dict]:
    model = build(name)
    model.learn(64)
    path = tmp_path / "m.safetensors"
    sb3.save(model, path)
    return model, vgs_ckpt.load(path).parameters


def _resave(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "edited.safetensors"
    vgs_ckpt.save(path, tree, step=1)
    return path


@pytest.mark.parametrize(("edit", "match"), [
    (lambda d: d.__setitem__("format", 2), "format 2 is not one this vgs_ckpt reads.*upgrade"),
    (lambda d: d.__setitem__("settings", [1]), "settings must be a mapping"),
    (lambda d: d.__setitem__("policy_class", {"$custom": "MyPolicy"}),
     "policy class was excluded.*custom_objects=\\{'policy_class'"),
    (lambda d: d.__setitem__("policy_class", {"$class": "torch.nn:ReLU"}),
     "outside the packages a file may name"),
    (lambda d: d.__setitem__("policy_class", {"$class": "stable_baselines3.ppo:Nope"}),
     "cannot find stable_baselines3.ppo:Nope.*another version"),
    (lambda d: d.__setitem__("policy_class", {"$class": "stable_baselines3.ppo:PPO.learn"}),
     "is not a class"),
    (lambda d: d["settings"].__setitem__("clip_range", {"$schedule": {"type": "cosine"}}),
     "'clip_range': unknown schedule type 'cosine'"),
    (lambda d: d["settings"].__setitem__("clip_range", {"$schedule": {"type": "linear"}}),
     "'clip_range': not a valid \\$schedule value"),
    (lambda d: d["observation_space"].__setitem__("type", 5), "expected a space description"),
])
def test_a_damaged_model_description_is_a_clear_usage_error(tmp_path, edit, match) -> None:
    _, tree = _saved(tmp_path)
    edit(tree["sb3_model"])
    with pytest.raises(UsageError, match=match):
        sb3.load(_resave(tmp_path, tree))


def test_class_paths_must_name_a_module_and_a_class() -> None:
    with pytest.raises(UsageError, match="expected 'module:QualName'"):
        _resolve_class("torch.nn.ReLU", "where")
    with pytest.raises(UsageError, match="'x': not a valid \\$train_freq"):
        _decode({"$train_freq": {"frequency": 1, "unit": "fortnight"}}, "x")


def test_an_unsupported_algorithm_is_refused_at_save(tmp_path) -> None:
    from stable_baselines3 import PPO

    class MyPPO(PPO):
        pass
    model = MyPPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, device="cpu")
    with pytest.raises(UsageError, match="MyPPO.*is not an algorithm sb3.save can rebuild.*"
                                         "set_state"):
        sb3.save(model, tmp_path / "m.safetensors")


@pytest.mark.parametrize(("part", "edit", "match"), [
    ("vec_normalize", lambda t: t["vec_normalize"]["obs_rms"].__setitem__("count", 0),
     "obs_rms.count must be a number > 0"),
    ("vec_normalize", lambda t: t["vec_normalize"].pop("settings"),
     "expected obs_rms, ret_rms and settings"),
    ("vec_normalize", lambda t: t["vec_normalize"]["settings"].__setitem__("clip_obs", "x"),
     "settings.clip_obs must be a finite number"),
    ("counters", lambda t: t.__setitem__("counters", [1]), "counters must be a mapping"),
    ("counters", lambda t: t["counters"].__setitem__("ep_info_buffer", 3),
     "counters.ep_info_buffer must be a list or None"),
    ("rng", lambda t: t.__setitem__("rng", 7), "rng must be a mapping"),
    ("rng", lambda t: t["rng"].__setitem__("python", (3, (1,), None)),
     "rng.python: not a random.getstate"),
    ("rng", lambda t: t["rng"].__setitem__("numpy", ("MT19937", np.zeros(3, np.uint32), 0)),
     "rng.numpy: not a numpy.random.get_state"),
    ("rng", lambda t: t["rng"]["action_space"].__setitem__(
        "generator", {"bit_generator": "PCG64", "state": {"state": -1}}),
     "rng.action_space: not a valid PCG64 state"),
    ("rng", lambda t: t["rng"].__setitem__("action_space", 5), "rng.action_space must be a"),
])
def test_damaged_state_parts_are_refused_before_anything_changes(part, edit, match) -> None:
    model = build("PPO")
    model.learn(64)
    tree = copy.deepcopy(sb3.get_state(model))
    before = copy.deepcopy(sb3.get_state(model))
    edit(tree)
    with pytest.raises(UsageError, match=match):
        sb3.set_state(model, tree, restore_counters=True, restore_rng=True)
    assert model.num_timesteps == before["counters"]["num_timesteps"]
    assert torch.equal(model.policy.state_dict()["log_std"], before["policy"]["log_std"])
    assert part


def test_damaged_replay_buffer_and_noise_states_are_refused() -> None:
    donor, recipient = build("TD3", 0), build("TD3", 1)
    donor.learn(64)
    tree = copy.deepcopy(sb3.get_state(donor, replay_buffer=True))
    bad = copy.deepcopy(tree)
    bad["replay_buffer"]["pos"] = 10**6
    with pytest.raises(UsageError, match="pos must be an int in \\[0, buffer_size\\)"):
        sb3.set_state(recipient, bad)
    bad = copy.deepcopy(tree)
    bad["replay_buffer"]["arrays"]["actions"] = np.zeros((3, 1), np.float32)
    with pytest.raises(UsageError, match="replay_buffer.arrays.actions: expected a float32 "
                                         "array of shape \\(64, 1, 1\\)"):
        sb3.set_state(recipient, bad)
    bad = copy.deepcopy(tree)
    bad["exploration"]["action_noise"]["noise_prev"] = np.zeros(5)
    with pytest.raises(UsageError, match="exploration.action_noise.noise_prev: expected an "
                                         "array of shape \\(1,\\)"):
        sb3.set_state(recipient, bad, restore_rng=True)


def test_generators_of_another_number_of_envs_are_kept_with_a_warning() -> None:
    model = build("PPO")  # 2 envs
    tree = copy.deepcopy(sb3.get_state(model))
    tree["rng"]["envs"] = tree["rng"]["envs"][:1]
    with pytest.warns(vgs_ckpt.PartialStateWarning,
                      match=r"generators of 1 env\(s\), this PPO has 2; the envs keep their own"):
        sb3.set_state(model, tree, restore_rng=True)
