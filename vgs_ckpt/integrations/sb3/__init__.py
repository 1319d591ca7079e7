"""Stable-Baselines3: VGS inside stock algorithms, full-state PBT exploits, and
pickle-free model files.

Install with ``pip install 'vgs-ckpt[sb3]'`` (sb3-contrib's algorithms too with
``'vgs-ckpt[sb3-contrib]'``). Works with PPO, A2C, SAC, TD3, DDPG, DQN, and
sb3-contrib's TQC, QR-DQN, TRPO, CrossQ, RecurrentPPO, MaskablePPO and ARS (no
optimizer, so no VGS); no subclassing::

    from stable_baselines3 import PPO
    from vgs_ckpt.integrations import sb3

    model = PPO("MlpPolicy", VecNormalize(make_vec_env("Pendulum-v1", 4)))
    sb3.attach_vgs(model, warmup_steps=50)         # the reference VGS 3.2, in every step
    model.learn(10_000)
    sb3.save(model, "m.safetensors")               # one pickle-free v2 file
    model = sb3.load("m.safetensors", env=venv)    # rebuilt, VGS and statistics restored
    sb3.set_state(other, sb3.get_state(model),     # an exploit: the whole learned state
                  hyperparams={"learning_rate": 1e-3, "vgs_alpha": 0.2})

One module per concern:

- :mod:`.hooks`: the VGS in the gradient step (``attach_vgs``, ``vgs_scaler``,
  ``detach_vgs``);
- :mod:`.state`: the whole learner state as one tree (``get_state``, ``set_state``):
  networks, optimizers, torch variables, VGS, ``VecNormalize``, counters,
  generators, exploration state, optionally the replay buffer;
- :mod:`.hyperparams`: explored hyperparameters where SB3 reads them
  (``set_hyperparams``);
- :mod:`.population`: the population driver (``PBTCallback``, ``restore_member``,
  ``train_population``, saving on SIGTERM);
- :mod:`.files`: pickle-free model files (``save``, ``load``).

What travels on an exploit and what stays with the recipient is in
docs/integration.md; the layout of the tree is in docs/spec.md section 14.
"""

from vgs_ckpt.integrations.sb3._base import INSTALL, VARIABLES_KEY
from vgs_ckpt.integrations.sb3.files import describe, load, save
from vgs_ckpt.integrations.sb3.hooks import attach_vgs, detach_vgs, vgs_scaler
from vgs_ckpt.integrations.sb3.hyperparams import set_hyperparams
from vgs_ckpt.integrations.sb3.population import (
    ExploitEvent,
    PBTCallback,
    preempted,
    restore_member,
    train_population,
)
from vgs_ckpt.integrations.sb3.state import get_state, set_state
from vgs_ckpt.vgs import VarianceGradientScaler  # noqa: F401  (kept importable from here)

__all__ = ["INSTALL", "VARIABLES_KEY", "ExploitEvent", "PBTCallback", "attach_vgs",
           "describe", "detach_vgs", "get_state", "load", "preempted", "restore_member", "save",
           "set_hyperparams", "set_state", "train_population", "vgs_scaler"]
