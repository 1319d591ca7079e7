"""The Stable-Baselines3 integration, against the real stable-baselines3 and gymnasium."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import MissingDependencyError, UsageError
from vgs_ckpt.pbt import HyperparamSpec, PBTConfig, PBTScheduler
from vgs_ckpt.testing import assert_trees_equal

sb3_lib = pytest.importorskip("stable_baselines3")
from stable_baselines3 import A2C, DDPG, DQN, PPO, SAC, TD3  # noqa: E402
from stable_baselines3.common.save_util import recursive_getattr  # noqa: E402

from vgs_ckpt.integrations import sb3  # noqa: E402

pytestmark = pytest.mark.sb3

class _Small(dict):
    """Small networks on the CPU; a fresh policy_kwargs each time (SB3 mutates it)."""

    def keys(self):
        return ["policy_kwargs", "device"]

    def __getitem__(self, key):
        return {"net_arch": [16]} if key == "policy_kwargs" else "cpu"


SMALL = _Small()


def ppo(seed: int = 0, **kwargs: object) -> PPO:
    options = {"n_steps": 64, "batch_size": 32, "n_epochs": 2, **SMALL, **kwargs}
    return PPO("MlpPolicy", "CartPole-v1", seed=seed, **options)


def sac(seed: int = 0, **kwargs: object) -> SAC:
    options = {"learning_starts": 32, "batch_size": 32, "buffer_size": 1000, **SMALL, **kwargs}
    return SAC("MlpPolicy", "Pendulum-v1", seed=seed, **options)


def dqn(seed: int = 0) -> DQN:
    return DQN("MlpPolicy", "CartPole-v1", seed=seed, learning_starts=32, batch_size=32,
               buffer_size=1000, target_update_interval=50, **SMALL)


def trained(model, steps: int = 256):
    model.learn(steps)
    return model


def tensors_equal(actual, expected) -> None:
    """Bit-identical trees (vgs_ckpt.testing's check, with dict and OrderedDict alike)."""
    assert_trees_equal(_plain(actual), _plain(expected))


def _plain(tree):
    if isinstance(tree, dict):
        return {key: _plain(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [_plain(value) for value in tree]
    return tree.detach() if isinstance(tree, torch.Tensor) else tree


def snapshot(model) -> dict:
    return copy.deepcopy(sb3.get_state(model))


def learned(tree) -> dict:
    """A tree without its generators (which any other model's training moves)."""
    return {key: value for key, value in tree.items() if key != "rng"}


def scheduler_for(tmp_path, size: int = 2, **kwargs: object) -> PBTScheduler:
    config = PBTConfig(str(tmp_path / "population"), population_size=size,
                       perturbation_interval=1, truncation_ratio=0.5, seed=0, **kwargs)
    return PBTScheduler(config)


# --- attach_vgs -----------------------------------------------------------------------

def test_attach_twice_is_an_error() -> None:
    model = ppo()
    scaler = sb3.attach_vgs(model)
    with pytest.raises(UsageError, match="already has a VGS attached"):
        sb3.attach_vgs(model)
    assert sb3.vgs_scaler(model) is scaler


def test_attach_rejects_unknown_and_invalid_knobs() -> None:
    with pytest.raises(UsageError, match="unknown VGS knob"):
        sb3.attach_vgs(ppo(), gamma=0.5)
    with pytest.raises(UsageError, match="invalid VGS configuration"):
        sb3.attach_vgs(ppo(), beta=1.5)


def test_attach_rejects_a_non_sb3_object() -> None:
    with pytest.raises(UsageError, match="Stable-Baselines3 algorithm"):
        sb3.attach_vgs(torch.nn.Linear(2, 2))


def test_detach_removes_the_hooks() -> None:
    model = ppo()
    scaler = sb3.attach_vgs(model)
    assert sb3.detach_vgs(model) is scaler
    model.learn(64)
    assert scaler.step_count == 0 and sb3.vgs_scaler(model) is None


@pytest.mark.parametrize(("make", "steps"), [
    (ppo, 128),
    (lambda: A2C("MlpPolicy", "CartPole-v1", n_steps=8, seed=0, **SMALL), 80),
    (dqn, 96),
    (sac, 64),
    (lambda: TD3("MlpPolicy", "Pendulum-v1", learning_starts=32, batch_size=32,
                 buffer_size=1000, seed=0, **SMALL), 64),
    (lambda: DDPG("MlpPolicy", "Pendulum-v1", learning_starts=32, batch_size=32,
                  buffer_size=1000, seed=0, **SMALL), 64),
], ids=["PPO", "A2C", "DQN", "SAC", "TD3", "DDPG"])
def test_vgs_counts_one_step_per_gradient_step(make, steps: int) -> None:
    model = make()
    scaler = sb3.attach_vgs(model)
    model.learn(steps)
    model.learn(steps, reset_num_timesteps=False)  # keeps working across learn() calls
    assert scaler.step_count > 0
    if not isinstance(model, PPO):  # PPO counts epochs in _n_updates, not minibatches
        assert scaler.step_count == model._n_updates
    else:
        minibatches = model.n_steps // model.batch_size
        assert scaler.step_count == model._n_updates * minibatches
    assert scaler.param_grad_sq_ema is not None
    assert bool((scaler.param_grad_sq_ema > 0).all())  # every optimizer's parameters folded


def test_the_scaler_scales_what_the_optimizer_steps_after_clipping() -> None:
    model = ppo()
    scaler = sb3.attach_vgs(model, warmup_steps=1, alpha=10.0, variance_cap=None)
    model.learn(128)
    factor = scaler.scaling_factor()
    assert factor < 1.0
    params = [p for g in model.policy.optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    model.policy.optimizer.step()  # the pre-step hook scales, the post-step hook folds
    for p in params:
        assert torch.equal(p.grad, torch.full_like(p, factor))


def test_sac_one_scaler_covers_actor_critic_and_temperature() -> None:
    model = sac()
    scaler = sb3.attach_vgs(model)
    covered = {id(p) for p in scaler.params}
    for name in ("actor.optimizer", "critic.optimizer", "ent_coef_optimizer"):
        optimizer = recursive_getattr(model, name)
        assert all(id(p) in covered for g in optimizer.param_groups for p in g["params"])


# --- get_state / set_state --------------------------------------------------------------

def test_get_state_is_an_ordinary_v2_checkpoint(tmp_path) -> None:
    model = trained(sac())
    sb3.attach_vgs(model)
    model.learn(64, reset_num_timesteps=False)
    tree = sb3.get_state(model)
    assert set(tree) == {"policy", "actor.optimizer", "critic.optimizer",
                         "ent_coef_optimizer", "pytorch_variables", "vgs_state", "vgs_pending",
                         "counters", "rng"}
    # SAC steps its actor after the critic (the primary): its moments are pending.
    assert tree["vgs_pending"]["count"] > 0
    assert torch.equal(tree["pytorch_variables"]["log_ent_coef"], model.log_ent_coef.detach())
    path = tmp_path / "sac.safetensors"
    vgs_ckpt.save(path, tree, step=model.num_timesteps)
    loaded = vgs_ckpt.load(path)
    assert loaded.format == "v2_full_parameters"
    assert loaded.header.vgs is not None
    assert loaded.header.vgs.step_count == sb3.vgs_scaler(model).step_count
    out = subprocess.run([sys.executable, "-m", "vgs_ckpt", "inspect", str(path)],
                         capture_output=True, text=True, check=True).stdout
    assert f"step_count {sb3.vgs_scaler(model).step_count}" in out


def test_get_state_without_vgs_has_vgs_state_none() -> None:
    assert sb3.get_state(ppo())["vgs_state"] is None


def test_ppo_exploit_copies_vgs_and_adam_bit_for_bit(tmp_path) -> None:
    scheduler = scheduler_for(tmp_path)
    scheduler.initialize_population([{"lr": 3e-4}, {"lr": 1e-3}])
    donor, recipient = ppo(0), ppo(1)
    sb3.attach_vgs(donor), sb3.attach_vgs(recipient)
    donor.learn(256)
    recipient.learn(128)  # a different VGS step_count: the seed's situation
    donor_state = snapshot(donor)
    scheduler.update_performance("0", 100.0, 256, model_parameters=sb3.get_state(donor))
    scheduler.update_performance("1", 10.0, 128, model_parameters=sb3.get_state(recipient))
    parameters, hyperparams, fmt = scheduler.exploit_and_explore("1")
    assert parameters is not None and fmt == "v2_full_parameters"
    sb3.set_state(recipient, parameters, hyperparams=hyperparams)
    after = sb3.get_state(recipient)
    tensors_equal(after["vgs_state"], donor_state["vgs_state"])
    tensors_equal(after["policy"], donor_state["policy"])
    tensors_equal(after["policy.optimizer"]["state"], donor_state["policy.optimizer"]["state"])
    assert sb3.vgs_scaler(recipient).step_count == sb3.vgs_scaler(donor).step_count > 0


def test_explored_learning_rate_survives_the_next_learn() -> None:
    model = trained(ppo())
    donor_tree = snapshot(trained(ppo(1)))
    sb3.set_state(model, donor_tree, hyperparams={"lr": 0.0123})
    model.learn(64, reset_num_timesteps=False)
    assert model.policy.optimizer.param_groups[0]["lr"] == 0.0123
    assert model.lr_schedule(0.5) == 0.0123
    assert model.learning_rate == 0.0123


def test_sac_exploit_takes_the_donors_temperature(tmp_path) -> None:
    scheduler = scheduler_for(tmp_path)
    scheduler.initialize_population([{"lr": 3e-4}, {"lr": 1e-3}])
    donor, recipient = sac(0), sac(1, ent_coef="auto_0.5")
    sb3.attach_vgs(donor), sb3.attach_vgs(recipient)
    donor.learn(160)
    recipient.learn(64)
    assert not torch.equal(donor.log_ent_coef, recipient.log_ent_coef)
    donor_state = snapshot(donor)
    scheduler.update_performance("0", -200.0, 160, model_parameters=sb3.get_state(donor))
    scheduler.update_performance("1", -900.0, 64, model_parameters=sb3.get_state(recipient))
    parameters, hyperparams, _ = scheduler.exploit_and_explore("1")
    sb3.set_state(recipient, parameters, hyperparams=hyperparams)
    tensors_equal(recipient.log_ent_coef.detach(), donor_state["pytorch_variables"]["log_ent_coef"])
    tensors_equal(sb3.get_state(recipient)["ent_coef_optimizer"]["state"],
                  donor_state["ent_coef_optimizer"]["state"])
    # The temperature is still the parameter its optimizer steps.
    assert recipient.ent_coef_optimizer.param_groups[0]["params"][0] is recipient.log_ent_coef
    recipient.learn(32, reset_num_timesteps=False)
    assert recipient.ent_coef_optimizer.param_groups[0]["lr"] == hyperparams["lr"]
    assert recipient.actor.optimizer.param_groups[0]["lr"] == hyperparams["lr"]


def test_dqn_exploit_brings_the_target_network() -> None:
    donor, recipient = trained(dqn(0), 300), trained(dqn(1), 100)
    tree = snapshot(donor)
    assert any(k.startswith("q_net_target.") for k in tree["policy"])
    sb3.set_state(recipient, tree)
    tensors_equal(dict(recipient.policy.q_net_target.state_dict()),
                  dict(donor.policy.q_net_target.state_dict()))


def test_set_state_checks_everything_before_changing_anything() -> None:
    model = trained(ppo())
    before = snapshot(model)
    tree = snapshot(trained(ppo(1)))
    with pytest.raises(UsageError, match="'gae_lambda'.*DQN|DQN has no such setting"):
        sb3.set_state(trained(dqn()), snapshot(trained(dqn(1))), hyperparams={"gae_lambda": 0.9})
    with pytest.raises(UsageError, match="'tau': PPO has no such setting"):
        sb3.set_state(model, tree, hyperparams={"lr": 0.1, "tau": 0.5})
    with pytest.raises(UsageError, match="actor.optimizer: not part of this PPO"):
        sb3.set_state(model, {**tree, "actor.optimizer": {}})
    with pytest.raises(UsageError, match="no VGS; call attach_vgs"):
        sb3.set_state(model, {**tree, "vgs_state": sb3.VarianceGradientScaler(
            model.policy.parameters()).state_dict()})
    vgs_model = ppo()
    sb3.attach_vgs(vgs_model)
    vgs_model.learn(64)
    vgs_before = snapshot(vgs_model)
    other_vgs = sb3.get_state(trained(ppo(1)))
    other_vgs["vgs_state"] = {**sb3.vgs_scaler(vgs_model).state_dict(),
                              "param_grad_mean_ema": torch.zeros(3)}
    with pytest.raises(vgs_ckpt.UsageError, match="one entry per parameter"):
        sb3.set_state(vgs_model, other_vgs)
    tensors_equal(learned(sb3.get_state(vgs_model)), learned(vgs_before))
    with pytest.raises(UsageError, match="network architectures differ"):
        sb3.set_state(model, snapshot(ppo(policy_kwargs={"net_arch": [8]})))
    tensors_equal(learned(sb3.get_state(model)), learned(before))
    assert model.policy.optimizer.param_groups[0]["lr"] != 0.1


def test_set_hyperparams_where_sb3_reads_them() -> None:
    model = ppo()
    sb3.attach_vgs(model)
    sb3.set_hyperparams(model, {"clip_range": 0.1, "gamma": 0.95, "gae_lambda": 0.8,
                                "ent_coef": 0.01, "target_kl": 0.02, "max_grad_norm": 1.0,
                                "n_epochs": 3, "vgs_alpha": 0.3, "vgs_warmup_steps": 7})
    assert model.clip_range(1.0) == 0.1
    assert model.gamma == model.rollout_buffer.gamma == 0.95
    assert model.gae_lambda == model.rollout_buffer.gae_lambda == 0.8
    assert (model.ent_coef, model.target_kl, model.max_grad_norm, model.n_epochs) == (
        0.01, 0.02, 1.0, 3)
    scaler = sb3.vgs_scaler(model)
    assert (scaler.alpha, scaler.warmup_steps) == (0.3, 7)
    model.learn(64)
    assert model.clip_range(0.0) == 0.1


@pytest.mark.parametrize(("hyperparams", "message"), [
    ({"vgs_beta": 1.5}, "invalid VGS configuration"),
    ({"vgs_gamma": 0.5}, "VGS has no knob 'gamma'"),
    ({"lr": -1.0}, "must be > 0"),
    ({"lr": "fast"}, "must be a finite number"),
    ({"gamma": float("nan")}, "must be a finite number"),
    ({"n_epochs": 2.5}, "must be an integer"),
    ({"warp_factor": 9}, "'warp_factor': PPO has no such setting"),
])
def test_set_hyperparams_rejects_bad_keys_and_values(hyperparams, message) -> None:
    model = ppo()
    sb3.attach_vgs(model)
    with pytest.raises(UsageError, match=message):
        sb3.set_hyperparams(model, hyperparams)


def test_sac_fixed_and_learned_temperature() -> None:
    fixed = sac(ent_coef=0.1)
    sb3.set_hyperparams(fixed, {"ent_coef": 0.2})
    assert float(fixed.ent_coef_tensor) == pytest.approx(0.2)
    with pytest.raises(UsageError, match="learns its entropy coefficient"):
        sb3.set_hyperparams(sac(), {"ent_coef": 0.2})
    learned = sb3.get_state(sac())
    bad = {**learned, "pytorch_variables": {"log_ent_coef": torch.zeros(2)}}
    with pytest.raises(UsageError, match="expected a tensor of shape"):
        sb3.set_state(sac(), bad)
    with pytest.raises(UsageError, match="ent_coef_optimizer: not part of this SAC"):
        sb3.set_state(fixed, learned)
    del learned["ent_coef_optimizer"]
    with pytest.raises(UsageError, match="log_ent_coef not in this SAC"):
        sb3.set_state(fixed, learned)


def test_sb3_save_load_does_not_carry_vgs_and_the_documented_path_does(tmp_path) -> None:
    model = ppo()
    scaler = sb3.attach_vgs(model)
    model.learn(128)
    model.save(tmp_path / "model.zip")
    reloaded = PPO.load(tmp_path / "model.zip", device="cpu")
    assert sb3.vgs_scaler(reloaded) is None  # SB3's zip has no VGS state
    assert sb3.get_state(reloaded)["vgs_state"] is None
    # What to do instead (the module docstring and docs/integration.md say so):
    vgs_ckpt.save(tmp_path / "full.safetensors", sb3.get_state(model),
                  step=model.num_timesteps)
    sb3.attach_vgs(reloaded)
    sb3.set_state(reloaded, vgs_ckpt.load(tmp_path / "full.safetensors").parameters)
    tensors_equal(sb3.get_state(reloaded)["vgs_state"], scaler.state_dict())
    reloaded.set_env(model.get_env())
    reloaded.learn(64)
    assert sb3.vgs_scaler(reloaded).step_count > scaler.step_count


def test_policy_only_legacy_file_loads_into_an_sb3_model(tmp_path) -> None:
    donor, recipient = trained(ppo(0)), ppo(1)
    sb3.attach_vgs(recipient)
    recipient.learn(64)
    path = tmp_path / "legacy.pt"
    torch.save(donor.policy.state_dict(), path)  # what the original scheduler wrote
    ckpt = vgs_ckpt.load(path, upgrade=False)
    assert ckpt.format == "v1_policy_only"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sb3.set_state(recipient, {"policy": ckpt.parameters})
    tensors_equal(dict(recipient.policy.state_dict()), dict(donor.policy.state_dict()))
    assert sb3.vgs_scaler(recipient).step_count > 0  # v1: the recipient keeps its own VGS
    recipient.learn(64, reset_num_timesteps=False)


# --- PBTCallback and train_population ---------------------------------------------------

def test_population_round_robin_async_with_full_state_exploits(tmp_path) -> None:
    config = PBTConfig(str(tmp_path / "population"), population_size=4,
                       perturbation_interval=64, truncation_ratio=0.25, seed=0,
                       hyperparams=[HyperparamSpec("learning_rate", 1e-4, 3e-3,
                                                   log_scale=True),
                                    HyperparamSpec("vgs_alpha", 0.05, 0.5)])
    scheduler = PBTScheduler(config)
    members = scheduler.initialize_population()
    models = {}
    for i, member in enumerate(members):
        models[member.member_id] = model = ppo(i)
        sb3.attach_vgs(model, warmup_steps=4)
        sb3.set_hyperparams(model, member.hyperparams)
    lines: list[str] = []
    callbacks = sb3.train_population(scheduler, models, total_timesteps=384, interval=64,
                                     speeds={"0": 1.0, "1": 1.0, "2": 1.5, "3": 2.0},
                                     progress=lines.append)
    assert lines and lines[-1].startswith("round ")
    assert models["3"].num_timesteps >= 2 * 384 > models["0"].num_timesteps
    events = [e for cb in callbacks.values() for e in cb.events]
    assert events, "a population of 4 with truncation at every check must exploit"
    for event in events:
        assert event.format == "v2_full_parameters"
        assert event.vgs_step_after == event.donor_vgs_step
    assert any(e.donor_step != e.timestep for e in events)  # asynchronous meetings
    for member_id, model in models.items():  # the explored lr is what the optimizer uses
        lr = scheduler.members[member_id].hyperparams["learning_rate"]
        if callbacks[member_id].events:
            assert model.policy.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
        assert scheduler.store.latest(member_id) is not None


def test_callback_rejects_bad_arguments(tmp_path) -> None:
    scheduler = scheduler_for(tmp_path)
    scheduler.initialize_population([{}, {}])
    with pytest.raises(UsageError, match="interval"):
        sb3.PBTCallback(scheduler, "0", interval=0)
    with pytest.raises(UsageError, match="unknown member"):
        sb3.PBTCallback(scheduler, "9", interval=10)
    with pytest.raises(UsageError, match="speed of member"):
        sb3.train_population(scheduler, {"0": ppo()}, total_timesteps=64, interval=64,
                             speeds={"0": 0})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"models": {}}, "models must map at least one member"),
    ({"speeds": {"9": 1.0}}, r"speeds for unknown members \['9'\]; give speeds only for"),
    ({"total_timesteps": 0}, "total_timesteps must be >= 1"),
    ({"chunk": 0}, "chunk must be >= 1 timestep"),
    ({"models": {"7": None}}, "unknown member '7'|Stable-Baselines3 algorithm"),
])
def test_train_population_rejects_bad_arguments(tmp_path, kwargs, message) -> None:
    scheduler = scheduler_for(tmp_path)
    scheduler.initialize_population([{}, {}])
    arguments = {"models": {"0": ppo()}, "total_timesteps": 64, "interval": 64, **kwargs}
    with pytest.raises(UsageError, match=message):
        sb3.train_population(scheduler, **arguments)


def test_vgs_hyperparameters_need_an_attached_vgs() -> None:
    with pytest.raises(UsageError, match="'vgs_alpha': this PPO has no VGS; call attach_vgs"):
        sb3.set_hyperparams(ppo(), {"vgs_alpha": 0.2})
    with pytest.raises(UsageError, match="'clip_range': SAC has no such setting"):
        sb3.set_hyperparams(sac(), {"clip_range": 0.2})


class _ClashingPPO(PPO):
    """A real PPO subclass whose own state-dict names include "vgs_state"."""

    def _setup_model(self) -> None:
        super()._setup_model()
        self.vgs_state = torch.nn.Linear(1, 1)

    def _get_torch_save_params(self):
        names, variables = super()._get_torch_save_params()
        return [*names, "vgs_state"], variables


def test_get_state_refuses_an_algorithm_that_uses_a_reserved_name() -> None:
    model = _ClashingPPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, **SMALL)
    with pytest.raises(UsageError, match=r"already has \['vgs_state'\].*rename"):
        sb3.get_state(model)


class _NoOptimizerPPO(PPO):
    """A real PPO subclass that lists no optimizer among its state dicts."""

    def _get_torch_save_params(self):
        return ["policy"], []


def test_attach_needs_an_optimizer() -> None:
    model = _NoOptimizerPPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=32, **SMALL)
    with pytest.raises(UsageError, match="no torch optimizer.*gradient-based"):
        sb3.attach_vgs(model)


def test_without_sb3_the_module_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['stable_baselines3'] = None\n"
            "import vgs_ckpt\n"
            "from vgs_ckpt.integrations import sb3\n"
            "try:\n    sb3.attach_vgs(object())\n"
            "except vgs_ckpt.MissingDependencyError as exc:\n    print('OK', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("OK") and "pip install 'vgs-ckpt[sb3]'" in out
    assert issubclass(MissingDependencyError, ImportError)


def test_the_example_runs_asynchronously(tmp_path) -> None:
    example = Path(__file__).parent.parent / "examples" / "sb3_pbt.py"
    out = subprocess.run([sys.executable, str(example), "--timesteps", "2048", "--interval",
                          "512", "--async", "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    assert "exploit: member" in out
    summary = next(line for line in out.splitlines() if " exploits in " in line)
    exploits, matched = summary.split(" exploits in ")[0], summary.split("after ")[1].split()[0]
    assert int(exploits) > 0 and matched == exploits


def test_a_resumed_population_continues_where_it_stopped(tmp_path) -> None:
    def population(resume: str):
        scheduler = PBTScheduler(PBTConfig(str(tmp_path / "population"), population_size=2,
                                           perturbation_interval=64, seed=0, resume=resume,
                                           hyperparams=[HyperparamSpec("learning_rate", 1e-4,
                                                                       1e-3)]))
        models = {}
        for member in scheduler.initialize_population():
            models[member.member_id] = model = ppo(int(member.member_id))
            sb3.attach_vgs(model)
            sb3.set_hyperparams(model, member.hyperparams)
        return scheduler, models

    scheduler, models = population("auto")
    sb3.train_population(scheduler, models, total_timesteps=128, interval=64)
    before = {m: snapshot(model) for m, model in models.items()}
    steps = {m: model.num_timesteps for m, model in models.items()}
    with pytest.raises(UsageError, match="already holds checkpoints"):
        population("refuse")
    scheduler, fresh = population("auto")  # the process was restarted
    assert scheduler.resumed
    for member_id, model in fresh.items():
        assert sb3.restore_member(scheduler, member_id, model)
        assert model.num_timesteps == steps[member_id]
        tensors_equal(sb3.get_state(model)["vgs_state"], before[member_id]["vgs_state"])
        tensors_equal(sb3.get_state(model)["policy"], before[member_id]["policy"])
    sb3.train_population(scheduler, fresh, total_timesteps=192, interval=64)
    assert all(model.num_timesteps >= 192 for model in fresh.values())
