"""Small SB3 members for the integration tests (and the continuation driver), each
built the same way in any process: ``build(name, seed)``."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from vgs_ckpt.integrations import sb3

NET = {"net_arch": [16]}


def all_actions_valid(env: Any) -> np.ndarray:
    """MaskablePPO's action mask: every action allowed."""
    return np.ones(env.action_space.n, dtype=bool)


def _venv(env_id: str, n_envs: int, seed: int, normalize: bool = False,
          masked: bool = False) -> Any:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize
    wrapper: dict[str, Any] = {}
    if masked:
        from sb3_contrib.common.wrappers import ActionMasker
        wrapper = {"wrapper_class": ActionMasker,
                   "wrapper_kwargs": {"action_mask_fn": all_actions_valid}}
    venv = make_vec_env(env_id, n_envs=n_envs, seed=seed, **wrapper)
    return VecNormalize(venv, norm_obs=True, norm_reward=True) if normalize else venv


def env_for(name: str, seed: int) -> Any:
    """The env a member of this kind trains on (the same in every process)."""
    return {
        "PPO": lambda: _venv("Pendulum-v1", 2, seed, normalize=True),
        "A2C": lambda: _venv("CartPole-v1", 2, seed),
        "SAC": lambda: _venv("Pendulum-v1", 1, seed, normalize=True),
        "TD3": lambda: _venv("Pendulum-v1", 1, seed),
        "DQN": lambda: _venv("CartPole-v1", 1, seed),
        "TQC": lambda: _venv("Pendulum-v1", 1, seed),
        "QRDQN": lambda: _venv("CartPole-v1", 1, seed),
        "TRPO": lambda: _venv("Pendulum-v1", 1, seed),
        "CrossQ": lambda: _venv("Pendulum-v1", 1, seed),
        "RecurrentPPO": lambda: _venv("CartPole-v1", 1, seed),
        "MaskablePPO": lambda: _venv("CartPole-v1", 1, seed, masked=True),
        "ARS": lambda: _venv("Pendulum-v1", 1, seed),
    }[name]()


OFF_POLICY = {"learning_starts": 32, "batch_size": 32, "buffer_size": 1000}


def build(name: str, seed: int = 0, *, vgs: bool = True) -> Any:
    """A small member of the named algorithm on its env, VGS attached (not ARS)."""
    import stable_baselines3 as sb
    env = env_for(name, seed)
    common: dict[str, Any] = {"seed": seed, "device": "cpu", "policy_kwargs": dict(NET)}
    if name == "PPO":
        model = sb.PPO("MlpPolicy", env, n_steps=64, batch_size=32, n_epochs=2, **common)
    elif name == "A2C":
        model = sb.A2C("MlpPolicy", env, n_steps=8, **common)
    elif name == "SAC":
        model = sb.SAC("MlpPolicy", env, **OFF_POLICY, **common)
    elif name == "TD3":
        from stable_baselines3.common.noise import OrnsteinUhlenbeckActionNoise
        noise = OrnsteinUhlenbeckActionNoise(np.zeros(1), 0.3 * np.ones(1))
        model = sb.TD3("MlpPolicy", env, action_noise=noise, policy_delay=2, **OFF_POLICY,
                       **common)
    elif name == "DQN":
        model = sb.DQN("MlpPolicy", env, target_update_interval=50, train_freq=4,
                       **OFF_POLICY, **common)
    else:
        import sb3_contrib as contrib
        cls = getattr(contrib, name)
        if name in ("TQC", "CrossQ"):
            kwargs: dict[str, Any] = dict(OFF_POLICY)
            if name == "CrossQ":
                common["policy_kwargs"] = {"net_arch": [16, 16]}
        elif name == "QRDQN":
            kwargs = {**OFF_POLICY, "target_update_interval": 50, "train_freq": 4}
            common["policy_kwargs"] = {"net_arch": [16], "n_quantiles": 5}
        elif name in ("TRPO", "MaskablePPO"):
            kwargs = {"n_steps": 64, "batch_size": 32}
        elif name == "RecurrentPPO":
            kwargs = {"n_steps": 32, "batch_size": 16, "n_epochs": 2}
            common["policy_kwargs"] = {"net_arch": [16], "lstm_hidden_size": 8}
        else:  # ARS
            kwargs = {"n_delta": 2, "n_top": 1}
            common["policy_kwargs"] = {}
        policy = "MlpLstmPolicy" if name == "RecurrentPPO" else (
            "LinearPolicy" if name == "ARS" else "MlpPolicy")
        model = cls(policy, env, **kwargs, **common)
    if vgs and name != "ARS":
        sb3.attach_vgs(model, warmup_steps=5)
    return model


REPLAY = {"SAC", "TD3", "DQN", "TQC", "QRDQN", "CrossQ"}


def comparable(tree: Any) -> Any:
    """A tree as plain dicts and lists, without the wall-clock times (``t``) of episode
    infos, for assert_trees_equal."""
    import torch
    if isinstance(tree, dict):
        return {k: comparable(v) for k, v in tree.items() if k != "t"}
    if isinstance(tree, list | tuple):
        return [comparable(v) for v in tree]
    return tree.detach() if isinstance(tree, torch.Tensor) else tree


def reseed(model: Any, seed: int) -> None:
    """Seed the env's next reset and make the next learn() start with one."""
    env = model.get_env()
    env.seed(seed)
    model.set_env(env, force_reset=True)


def continue_from_file(name: str, path: str, out: str, steps: int, seed: int) -> None:
    """Load ``path`` with sb3.load in this (fresh) process, continue ``steps``
    timesteps after reseeding the env, and write the state to ``out``."""
    import vgs_ckpt
    env = env_for(name, 1000 + seed)  # seeded differently on purpose: reseed() decides
    model = sb3.load(path, env=env, device="cpu")
    reseed(model, seed)
    model.learn(steps, reset_num_timesteps=False)
    vgs_ckpt.save(out, sb3.get_state(model, replay_buffer=name in REPLAY), step=0)


if __name__ == "__main__":
    continue_from_file(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                       int(sys.argv[5]))
