"""Pickle-free SB3 model files (sb3.save / sb3.load) and bit-exact continuation, against
the real stable-baselines3 and sb3-contrib."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vgs_ckpt
from vgs_ckpt import UsageError

pytest.importorskip("stable_baselines3")
pytest.importorskip("sb3_contrib")
from gymnasium import spaces
from stable_baselines3 import PPO, SAC
from stable_baselines3.common.utils import LinearSchedule

from tests.sb3_members import REPLAY, build, comparable, reseed
from vgs_ckpt.integrations import sb3
from vgs_ckpt.integrations.sb3.files import space_from_json, space_to_json
from vgs_ckpt.testing import assert_trees_equal

pytestmark = pytest.mark.sb3
ROOT = Path(__file__).parent.parent


# --- bit-exact continuation in a fresh process -------------------------------------------

@pytest.mark.parametrize("name", ["PPO", "A2C", "SAC", "TD3", "DQN", "TQC"])
def test_a_saved_member_continues_bit_for_bit_in_a_fresh_process(name, tmp_path) -> None:
    model = build(name, seed=3)
    model.learn(160)
    path = tmp_path / "member.safetensors"
    sb3.save(model, path, replay_buffer=name in REPLAY)
    # The uninterrupted run: reseed the envs, continue.
    reseed(model, 77)
    model.learn(96, reset_num_timesteps=False)
    expected = sb3.get_state(model, replay_buffer=name in REPLAY)
    # The resumed run, in a fresh process: sb3.load, reseed the envs the same way, continue.
    out = tmp_path / "continued.safetensors"
    subprocess.run([sys.executable, "-m", "tests.sb3_members", name, str(path), str(out),
                    "96", "77"], cwd=ROOT, check=True, timeout=300)
    actual = vgs_ckpt.load(out).parameters
    assert sb3.vgs_scaler(model).step_count > 5  # past warm-up: the VGS scaled
    assert_trees_equal(comparable(actual), comparable(expected))  # weights, Adam, VGS, RNG...


# --- what a file holds ---------------------------------------------------------------------

def test_the_file_is_an_ordinary_v2_checkpoint_with_a_model_description(tmp_path) -> None:
    model = build("PPO")
    model.learn(64)
    path = tmp_path / "ppo.safetensors"
    header = sb3.save(model, path, performance=-300.0, member_id="3")
    assert header.step == model.num_timesteps and header.member_id == "3"
    assert vgs_ckpt.detect_format(path).format == "v2_full_parameters"
    tree = vgs_ckpt.load(path).parameters
    description = tree["sb3_model"]
    assert description["algorithm"] == "stable_baselines3.PPO"
    assert description["policy_class"] == {
        "$class": "stable_baselines3.common.policies:ActorCriticPolicy"}
    assert description["observation_space"]["type"] == "Box"
    assert description["settings"]["clip_range"] == {
        "$schedule": {"type": "float", "of": {"type": "constant", "value": 0.2}}}
    assert set(tree) >= {"policy", "policy.optimizer", "vgs_state", "vec_normalize",
                         "counters", "rng"}
    raw = path.read_bytes()
    assert b"\x80\x04\x95" not in raw and b"cloudpickle" not in raw  # no pickle anywhere


def test_load_rebuilds_the_model_with_vgs_and_normalizer(tmp_path) -> None:
    model = build("PPO")
    model.learn(128)
    path = tmp_path / "ppo.safetensors"
    sb3.save(model, path)
    env = model.get_env()
    loaded = sb3.load(path, env=build("PPO", seed=5).get_env())
    assert type(loaded) is PPO and loaded.num_timesteps == model.num_timesteps
    assert loaded._n_updates == model._n_updates > 0
    assert_trees_equal(comparable(sb3.get_state(loaded)["vgs_state"]),
                       comparable(sb3.get_state(model)["vgs_state"]))
    stats, mine = loaded.get_vec_normalize_env().obs_rms, env.obs_rms
    assert np.array_equal(stats.mean, mine.mean) and stats.count == mine.count
    assert sb3.vgs_scaler(loaded).config() == sb3.vgs_scaler(model).config()
    obs = env.reset()
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0],
                          model.predict(obs, deterministic=True)[0])


def test_load_without_an_env_predicts_and_warns_about_the_statistics(tmp_path, caplog) -> None:
    model = build("PPO")
    model.learn(64)
    sb3.save(model, tmp_path / "ppo.safetensors")
    with caplog.at_level("WARNING", logger="vgs_ckpt"):
        loaded = sb3.load(tmp_path / "ppo.safetensors")
    assert "VecNormalize statistics but no env" in caplog.text
    obs = np.zeros((1, 3), dtype=np.float32)
    assert loaded.predict(obs)[0].shape == (1, 1)


def test_sac_keeps_its_replay_buffer_only_when_asked(tmp_path) -> None:
    model = build("SAC")
    model.learn(100)
    sb3.save(model, tmp_path / "without.safetensors")
    sb3.save(model, tmp_path / "with.safetensors", replay_buffer=True)
    assert "replay_buffer" not in vgs_ckpt.load(tmp_path / "without.safetensors").parameters
    loaded = sb3.load(tmp_path / "with.safetensors", env=build("SAC").get_env())
    assert type(loaded) is SAC
    assert loaded.replay_buffer.pos == model.replay_buffer.pos == 100
    assert np.array_equal(loaded.replay_buffer.observations[:100],
                          model.replay_buffer.observations[:100])
    assert torch.equal(loaded.log_ent_coef.detach(), model.log_ent_coef.detach())
    with pytest.raises(UsageError, match="no replay buffer"):
        sb3.save(build("PPO"), tmp_path / "ppo.safetensors", replay_buffer=True)


@pytest.mark.parametrize("name", ["TQC", "QRDQN", "TRPO", "CrossQ", "RecurrentPPO",
                                  "MaskablePPO", "ARS"])
def test_sb3_contrib_algorithms_save_and_load(name, tmp_path) -> None:
    model = build(name)
    model.learn(64 if name != "ARS" else 200)
    path = tmp_path / f"{name}.safetensors"
    sb3.save(model, path, replay_buffer=name in REPLAY)
    loaded = sb3.load(path, env=build(name, seed=9).get_env())
    assert type(loaded) is type(model)
    state, expected = sb3.get_state(loaded), sb3.get_state(model)
    for key in model._get_torch_save_params()[0]:
        assert_trees_equal(comparable(state[key]), comparable(expected[key]))
    if name == "TQC":
        assert torch.equal(loaded.log_ent_coef.detach(), model.log_ent_coef.detach())
    if name == "CrossQ":  # batch-norm running statistics travel with the policy
        assert any(key.endswith(("running_mean", "ra_mean")) for key in state["policy"])
    if name == "ARS":
        assert torch.equal(loaded.weights, model.weights)
    loaded.learn(32, reset_num_timesteps=False)


# --- settings that need care --------------------------------------------------------------

def _lr(progress: float) -> float:
    return 1e-3 * progress


def test_a_custom_schedule_is_a_clear_error_and_comes_back_through_custom_objects(
        tmp_path) -> None:
    model = PPO("MlpPolicy", "CartPole-v1", learning_rate=_lr, n_steps=32, batch_size=16,
                device="cpu", policy_kwargs={"net_arch": [8]})
    path = tmp_path / "ppo.safetensors"
    with pytest.raises(UsageError, match="'learning_rate'.*a callable.*exclude=") as info:
        sb3.save(model, path)
    assert not path.exists()
    assert "custom_objects" in str(info.value)
    sb3.save(model, path, exclude=["learning_rate", "lr_schedule"])
    with pytest.raises(UsageError, match="'learning_rate' was excluded.*custom_objects"):
        sb3.load(path)
    loaded = sb3.load(path, custom_objects={"learning_rate": _lr, "lr_schedule": _lr})
    assert loaded.lr_schedule(0.5) == pytest.approx(5e-4)


def test_linear_schedules_are_stored_by_their_parameters(tmp_path) -> None:
    model = PPO("MlpPolicy", "CartPole-v1", learning_rate=LinearSchedule(1e-3, 1e-4, 0.5),
                clip_range=LinearSchedule(0.3, 0.1, 1.0), n_steps=32, batch_size=16,
                device="cpu", policy_kwargs={"net_arch": [8], "activation_fn": torch.nn.ReLU,
                                             "optimizer_kwargs": {"eps": 1e-5}})
    sb3.save(model, tmp_path / "ppo.safetensors")
    loaded = sb3.load(tmp_path / "ppo.safetensors")
    for progress in (1.0, 0.75, 0.2):
        assert loaded.lr_schedule(progress) == model.lr_schedule(progress)
        assert loaded.clip_range(progress) == model.clip_range(progress)
    assert loaded.policy_kwargs["activation_fn"] is torch.nn.ReLU
    assert loaded.policy.optimizer.defaults["eps"] == 1e-5


class _MyPolicyClass:
    pass


def test_classes_outside_the_allowlist_are_refused_at_save_and_at_load(tmp_path) -> None:
    model = PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, device="cpu",
                policy_kwargs={"net_arch": [8]})
    model.rollout_buffer_kwargs = {"helper": _MyPolicyClass}
    with pytest.raises(UsageError, match=r"'rollout_buffer_kwargs.helper'.*class from outside"):
        sb3.save(model, tmp_path / "x.safetensors")
    model.rollout_buffer_kwargs = {}
    sb3.save(model, tmp_path / "ppo.safetensors")
    # A file naming another module (as a hostile file would) is refused before any import.
    tree = vgs_ckpt.load(tmp_path / "ppo.safetensors").parameters
    tree["sb3_model"]["settings"]["rollout_buffer_class"] = {"$class": "os:system"}
    vgs_ckpt.save(tmp_path / "hostile.safetensors", tree, step=1)
    with pytest.raises(UsageError, match="os:system is outside the packages"):
        sb3.load(tmp_path / "hostile.safetensors")
    tree["sb3_model"]["settings"].pop("rollout_buffer_class")
    tree["sb3_model"]["algorithm"] = "subprocess.Popen"
    vgs_ckpt.save(tmp_path / "hostile2.safetensors", tree, step=1)
    with pytest.raises(UsageError, match="not one sb3.load rebuilds"):
        sb3.load(tmp_path / "hostile2.safetensors")


def test_load_refuses_a_plain_state_file_and_an_env_with_other_spaces(tmp_path) -> None:
    model = build("PPO")
    vgs_ckpt.save(tmp_path / "state.safetensors", sb3.get_state(model), step=0)
    with pytest.raises(UsageError, match="not a file written by sb3.save.*set_state"):
        sb3.load(tmp_path / "state.safetensors")
    sb3.save(model, tmp_path / "ppo.safetensors")
    with pytest.raises(UsageError, match="spaces differ"):
        sb3.load(tmp_path / "ppo.safetensors", env=build("A2C").get_env())


@pytest.mark.parametrize("space", [
    spaces.Box(-1.0, 1.0, (3,), np.float32),
    spaces.Box(np.array([-1.0, -np.inf]), np.array([2.0, np.inf]), dtype=np.float64),
    spaces.Box(0, 255, (4, 4, 3), np.uint8),
    spaces.Discrete(5, start=2),
    spaces.MultiDiscrete([3, 4, 2]),
    spaces.MultiBinary(4),
    spaces.MultiBinary([2, 3]),
    spaces.Dict({"pos": spaces.Box(-1, 1, (2,)), "flag": spaces.Discrete(2)}),
])
def test_spaces_round_trip_as_json(space) -> None:
    data = space_to_json(space)
    json.dumps(data, allow_nan=True)  # plain JSON
    assert space_from_json(data) == space


def test_unsupported_spaces_are_refused_clearly() -> None:
    with pytest.raises(UsageError, match="Tuple space cannot be stored"):
        space_to_json(spaces.Tuple((spaces.Discrete(2),)))
    with pytest.raises(UsageError, match="unknown space type 'Graph'"):
        space_from_json({"type": "Graph"})
    with pytest.raises(UsageError, match="not a valid Box"):
        space_from_json({"type": "Box", "shape": [2]})


def test_inspect_shows_the_algorithm_spaces_and_vgs(tmp_path) -> None:
    model = build("SAC")
    model.learn(64)
    path = tmp_path / "sac.safetensors"
    sb3.save(model, path)
    out = subprocess.run([sys.executable, "-m", "vgs_ckpt", "inspect", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert "sb3 model: stable_baselines3.SAC" in out
    assert "observation space: Box(3,) float32" in out
    assert "action space: Box(1,) float32" in out
    assert f"step_count {sb3.vgs_scaler(model).step_count}" in out
    data = json.loads(subprocess.run([sys.executable, "-m", "vgs_ckpt", "inspect", str(path),
                                      "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    assert data["sb3_model"]["algorithm"] == "stable_baselines3.SAC"
