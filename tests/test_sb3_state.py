"""The whole learner state travels: VecNormalize, counters, generators, exploration
state, pending VGS moments, sb3-contrib algorithms (against the real SB3)."""

from __future__ import annotations

import copy
import random

import gymnasium as gym
import numpy as np
import pytest
import torch

import vgs_ckpt
from vgs_ckpt import UsageError

pytest.importorskip("stable_baselines3")
pytest.importorskip("sb3_contrib")
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from tests.sb3_members import build, comparable
from vgs_ckpt.integrations import sb3
from vgs_ckpt.pbt import PBTConfig, PBTScheduler
from vgs_ckpt.testing import assert_trees_equal

pytestmark = pytest.mark.sb3


def normalized_ppo(seed: int, n_envs: int = 4) -> PPO:
    venv = VecNormalize(make_vec_env("Pendulum-v1", n_envs=n_envs, seed=seed))
    model = PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=2, seed=seed,
                device="cpu", policy_kwargs={"net_arch": [32]})
    sb3.attach_vgs(model)
    return model


def evaluate(model: PPO, episodes: int = 2) -> list[np.ndarray]:
    """Deterministic actions over a fixed set of raw observations, normalised by the
    model's own VecNormalize (what it would do in its env)."""
    raw = np.random.default_rng(0).uniform([-1, -1, -8], [1, 1, 8], (64, 3)).astype(np.float32)
    normalizer = model.get_vec_normalize_env()
    return model.predict(normalizer.normalize_obs(raw), deterministic=True)[0]


# --- VecNormalize ------------------------------------------------------------------------

def test_an_exploit_takes_the_donors_vecnormalize_statistics() -> None:
    """The issue's measurement on a small budget: a recipient given the donor's state
    acts exactly as the donor, because the normalizer's statistics travel too."""
    donor, recipient = normalized_ppo(0), normalized_ppo(1)
    donor.learn(2048)
    recipient.learn(256)
    theirs, mine = donor.get_vec_normalize_env(), recipient.get_vec_normalize_env()
    assert not np.array_equal(theirs.obs_rms.mean, mine.obs_rms.mean)
    tree = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(sb3.get_state(donor), step=2048)).parameters
    assert set(tree["vec_normalize"]) == {"obs_rms", "ret_rms", "settings"}
    sb3.set_state(recipient, tree)
    for name in ("obs_rms", "ret_rms"):
        for stat in ("mean", "var"):
            assert np.array_equal(getattr(getattr(mine, name), stat),
                                  getattr(getattr(theirs, name), stat))
        assert getattr(mine, name).count == getattr(theirs, name).count
    assert np.array_equal(evaluate(recipient), evaluate(donor))
    # The recipient's envs keep their own running returns (episode accumulators).
    assert mine.returns is not theirs.returns


def test_vecnormalize_mismatches_are_errors_or_warnings_never_silence(caplog) -> None:
    donor = normalized_ppo(0, n_envs=2)
    donor.learn(128)
    tree = sb3.get_state(donor)
    plain_model = PPO("MlpPolicy", "Pendulum-v1", n_steps=64, batch_size=64, device="cpu",
                      policy_kwargs={"net_arch": [32]})
    sb3.attach_vgs(plain_model)
    with pytest.raises(UsageError, match="not wrapped in VecNormalize"):
        sb3.set_state(plain_model, tree)
    recipient = normalized_ppo(1, n_envs=2)
    with pytest.warns(vgs_ckpt.PartialStateWarning, match="no vec_normalize statistics") as got:
        sb3.set_state(recipient, sb3.get_state(plain_model))
    assert got[0].filename == __file__  # attributed to the caller's line
    other = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=3), norm_reward=False)
    with pytest.raises(UsageError, match="settings.norm_reward"):
        sb3.set_state(recipient, tree, env=other)
    broken = copy.deepcopy(tree)
    broken["vec_normalize"]["obs_rms"]["mean"] = np.zeros(5)
    with pytest.raises(UsageError, match=r"obs_rms.mean: shape \(5,\)"):
        sb3.set_state(recipient, broken)


class DictPendulum(gym.ObservationWrapper):
    """Pendulum with a Dict observation (angle features and velocity apart)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = gym.spaces.Dict({
            "angle": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            "velocity": gym.spaces.Box(-8.0, 8.0, (1,), np.float32)})

    def observation(self, obs):
        return {"angle": obs[:2], "velocity": obs[2:]}


def dict_ppo(seed: int) -> PPO:
    venv = make_vec_env("Pendulum-v1", n_envs=2, seed=seed, wrapper_class=DictPendulum)
    venv = VecNormalize(venv, norm_obs_keys=["velocity"])
    model = PPO("MultiInputPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=seed,
                device="cpu", policy_kwargs={"net_arch": [16]})
    sb3.attach_vgs(model)
    return model


def test_dict_observations_with_norm_obs_keys_travel(tmp_path) -> None:
    donor, recipient = dict_ppo(0), dict_ppo(1)
    donor.learn(256)
    recipient.learn(64)
    tree = sb3.get_state(donor)
    assert set(tree["vec_normalize"]["obs_rms"]) == {"velocity"}
    assert tree["vec_normalize"]["settings"]["norm_obs_keys"] == ["velocity"]
    sb3.set_state(recipient, tree)
    theirs = donor.get_vec_normalize_env().obs_rms["velocity"]
    mine = recipient.get_vec_normalize_env().obs_rms["velocity"]
    assert np.array_equal(mine.mean, theirs.mean) and mine.count == theirs.count
    sb3.save(donor, tmp_path / "dict.safetensors")
    loaded = sb3.load(tmp_path / "dict.safetensors", env=dict_ppo(2).get_env())
    assert loaded.observation_space == donor.observation_space
    assert np.array_equal(loaded.get_vec_normalize_env().obs_rms["velocity"].var, theirs.var)


# --- who owns what after an exploit and after a resume -------------------------------------

def test_an_exploit_keeps_the_recipients_counters_and_randomness() -> None:
    donor, recipient = build("DQN", 0), build("DQN", 1)
    donor.learn(300)
    recipient.learn(100)
    tree = copy.deepcopy(sb3.get_state(donor))
    counters = {k: getattr(recipient, k) for k in ("num_timesteps", "_n_updates", "_n_calls",
                                                   "_episode_num", "exploration_rate")}
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    space = recipient.action_space.np_random.bit_generator.state
    sb3.set_state(recipient, tree)
    assert {k: getattr(recipient, k) for k in counters} == counters
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    assert recipient.action_space.np_random.bit_generator.state == space
    # A resume of the member's own checkpoint restores them all.
    sb3.set_state(recipient, tree, restore_counters=True, restore_rng=True)
    assert recipient.num_timesteps == 300 and recipient._n_calls == donor._n_calls
    assert recipient._n_updates == donor._n_updates
    assert random.getstate() == tree["rng"]["python"]
    assert torch.equal(torch.get_rng_state(), tree["rng"]["torch"])
    assert recipient.action_space.np_random.bit_generator.state == \
        tree["rng"]["action_space"]["generator"]
    assert [e["r"] for e in recipient.ep_info_buffer] == [e["r"] for e in donor.ep_info_buffer]


def _walk(model) -> dict:
    """Every tensor and statistic found on the learner, by attribute: modules and
    optimizers through their state dicts, tensors, the VGS and VecNormalize."""
    found: dict = {}
    for name, value in vars(model).items():
        if isinstance(value, torch.nn.Module):
            found[name] = dict(value.state_dict())
        elif isinstance(value, torch.optim.Optimizer):
            found[name] = value.state_dict()
        elif isinstance(value, torch.Tensor):
            found[name] = value.detach()
    for module_name, module in vars(model.policy).get("_modules", {}).items():
        for attr in ("optimizer",):
            optimizer = getattr(module, attr, None)
            if isinstance(optimizer, torch.optim.Optimizer):
                found[f"policy.{module_name}.{attr}"] = optimizer.state_dict()
    if isinstance(getattr(model.policy, "optimizer", None), torch.optim.Optimizer):
        found["policy.optimizer"] = model.policy.optimizer.state_dict()
    scaler = sb3.vgs_scaler(model)
    if scaler is not None:
        found["vgs"] = scaler.state_dict()
        found["vgs_pending"] = scaler.pending()
    normalizer = model.get_vec_normalize_env()
    if normalizer is not None:
        found["vec_normalize"] = {
            name: {"mean": rms.mean, "var": rms.var, "count": rms.count}
            for name, rms in (("obs", normalizer.obs_rms), ("ret", normalizer.ret_rms))}
    return found


@pytest.mark.parametrize("name", ["PPO", "SAC", "TD3", "TQC", "CrossQ"])
def test_after_an_exploit_every_learned_tensor_and_statistic_is_the_donors(name) -> None:
    donor, recipient = build(name, 0), build(name, 1)
    donor.learn(160)
    recipient.learn(96)
    hyperparams = {"learning_rate": 7e-4, "vgs_alpha": 0.3}
    sb3.set_state(recipient, copy.deepcopy(sb3.get_state(donor)), hyperparams=hyperparams)
    mine, theirs = _walk(recipient), _walk(donor)
    assert set(mine) == set(theirs) and len(mine) >= 3
    # The explored hyperparameters are the only difference.
    for tree in (mine, theirs):
        for value in tree.values():
            if isinstance(value, dict) and "param_groups" in value:
                for group in value["param_groups"]:
                    group.pop("lr", None)
        tree["vgs"] = {k: v for k, v in tree["vgs"].items() if k != "alpha"}
    assert_trees_equal(comparable(mine), comparable(theirs))
    assert sb3.vgs_scaler(recipient).alpha == 0.3


def test_a_sac_save_between_its_optimizer_steps_keeps_the_pending_vgs_moments() -> None:
    donor, recipient = build("SAC", 0), build("SAC", 1)
    donor.learn(80)
    recipient.learn(40)
    pending = sb3.vgs_scaler(donor).pending()
    assert pending["count"] > 0  # the actor stepped after the critic
    tree = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(sb3.get_state(donor), step=1)).parameters
    sb3.set_state(recipient, tree)
    assert sb3.vgs_scaler(recipient).pending() == pending
    donor.learn(1, reset_num_timesteps=False)
    recipient_state = sb3.vgs_scaler(recipient)
    assert recipient_state.pending() == pending  # unchanged until it trains


def test_gsde_matrices_are_resampled_from_the_donors_policy_on_an_exploit() -> None:
    def model(seed: int) -> PPO:
        return PPO("MlpPolicy", "Pendulum-v1", use_sde=True, n_steps=64, batch_size=64,
                   seed=seed, device="cpu", policy_kwargs={"net_arch": [16]})
    donor, recipient = model(0), model(1)
    donor.learn(256)
    recipient.learn(64)
    tree = copy.deepcopy(sb3.get_state(donor))
    assert "gsde" in tree["exploration"]
    stale = recipient.policy.action_dist.exploration_mat.clone()
    sb3.set_state(recipient, tree)
    fresh = recipient.policy.action_dist.exploration_mat
    assert not torch.equal(fresh, stale)
    sb3.set_state(recipient, tree, restore_rng=True)  # a resume takes the saved matrices
    assert torch.equal(recipient.policy.action_dist.exploration_mat,
                       tree["exploration"]["gsde"]["policy"]["exploration_mat"])


def test_td3_ornstein_uhlenbeck_noise_is_restored_on_a_resume() -> None:
    donor, recipient = build("TD3", 0), build("TD3", 1)
    donor.learn(64)
    tree = copy.deepcopy(sb3.get_state(donor))
    prev = tree["exploration"]["action_noise"]["noise_prev"]
    assert np.array_equal(prev, donor.action_noise.noise_prev) and np.any(prev != 0)
    sb3.set_state(recipient, tree)
    assert not np.array_equal(recipient.action_noise.noise_prev, prev)  # its own on exploit
    sb3.set_state(recipient, tree, restore_rng=True)
    assert np.array_equal(recipient.action_noise.noise_prev, prev)


@pytest.mark.parametrize("name", ["TQC", "QRDQN", "TRPO", "CrossQ", "RecurrentPPO",
                                  "MaskablePPO", "ARS"])
def test_sb3_contrib_exploits_carry_the_whole_state(name, tmp_path) -> None:
    donor, recipient = build(name, 0), build(name, 1)
    donor.learn(200 if name == "ARS" else 96)
    recipient.learn(200 if name == "ARS" else 64)
    path = tmp_path / "donor.safetensors"
    vgs_ckpt.save(path, sb3.get_state(donor), step=donor.num_timesteps)
    sb3.set_state(recipient, vgs_ckpt.load(path).parameters)
    for key in donor._get_torch_save_params()[0]:
        assert_trees_equal(comparable(sb3.get_state(recipient)[key]),
                           comparable(sb3.get_state(donor)[key]))
    if name == "TQC":
        assert torch.equal(recipient.log_ent_coef.detach(), donor.log_ent_coef.detach())
    if name == "ARS":  # its flat weight copy follows the restored policy
        assert torch.equal(recipient.weights, donor.weights)
    else:
        assert sb3.vgs_scaler(recipient).state_dict()["step_count"] == \
            sb3.vgs_scaler(donor).step_count
    recipient.learn(32, reset_num_timesteps=False)


def test_ars_has_no_optimizer_and_says_so() -> None:
    with pytest.raises(UsageError, match="no torch optimizer.*ARS.*gradient-free"):
        sb3.attach_vgs(build("ARS", vgs=False))


def test_replay_buffer_state_is_checked_before_anything_changes() -> None:
    donor, recipient = build("SAC", 0), build("SAC", 1)
    donor.learn(64)
    tree = sb3.get_state(donor, replay_buffer=True)
    assert tree["replay_buffer"]["pos"] == 64
    bad = copy.deepcopy(tree)
    bad["replay_buffer"]["buffer_size"] = 5
    before = recipient.replay_buffer.pos
    with pytest.raises(UsageError, match="replay_buffer.buffer_size"):
        sb3.set_state(recipient, bad)
    assert recipient.replay_buffer.pos == before
    sb3.set_state(recipient, tree)
    assert recipient.replay_buffer.pos == 64
    assert np.array_equal(recipient.replay_buffer.actions[:64], donor.replay_buffer.actions[:64])
    with pytest.raises(UsageError, match="no replay buffer"):
        sb3.get_state(build("PPO"), replay_buffer=True)


def test_bad_generator_and_counter_states_are_usage_errors() -> None:
    model = build("PPO")
    tree = copy.deepcopy(sb3.get_state(model))
    bad = {**tree, "rng": {**tree["rng"], "torch": torch.zeros(3)}}
    with pytest.raises(UsageError, match="rng.torch must be a uint8 tensor"):
        sb3.set_state(model, bad, restore_rng=True)
    bad = {**tree, "rng": {**tree["rng"], "envs": [{"bit_generator": "Evil", "state": {}}] * 2}}
    with pytest.raises(UsageError, match="rng.envs.0: expected a numpy bit-generator"):
        sb3.set_state(model, bad, restore_rng=True)
    bad = {**tree, "counters": {**tree["counters"], "num_timesteps": "many"}}
    with pytest.raises(UsageError, match="counters.num_timesteps must be a finite number"):
        sb3.set_state(model, bad, restore_counters=True)
    sb3.set_state(model, bad)  # an exploit does not read the counters


# --- a resumed population member -------------------------------------------------------------

def test_restore_member_restores_counters_generators_and_normalizer(tmp_path) -> None:
    config = PBTConfig(str(tmp_path / "population"), population_size=2,
                       perturbation_interval=64, seed=0)
    scheduler = PBTScheduler(config)
    scheduler.initialize_population([{}, {}])
    model = normalized_ppo(0, n_envs=2)
    callback = sb3.PBTCallback(scheduler, "0", interval=128, preemption=False)
    model.learn(256, callback=callback)
    saved = vgs_ckpt.load(scheduler.store.latest("0").path).parameters
    fresh = normalized_ppo(7, n_envs=2)
    resumed = PBTScheduler(PBTConfig(str(tmp_path / "population"), population_size=2,
                                     perturbation_interval=64, seed=0, resume="auto"))
    assert sb3.restore_member(resumed, "0", fresh)
    assert fresh.num_timesteps == saved["counters"]["num_timesteps"] == 256
    assert fresh._n_updates == saved["counters"]["_n_updates"] > 0
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert np.array_equal(fresh.get_vec_normalize_env().obs_rms.mean,
                          saved["vec_normalize"]["obs_rms"]["mean"])
