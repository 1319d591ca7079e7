"""The population driver: nothing ends unsaved, progress by default, and a member
preempted with SIGTERM saves durably before it exits (against the real SB3)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vgs_ckpt

pytest.importorskip("stable_baselines3")
from stable_baselines3 import PPO

from vgs_ckpt.integrations import sb3
from vgs_ckpt.pbt import HyperparamSpec, PBTConfig, PBTScheduler

pytestmark = pytest.mark.sb3
ROOT = Path(__file__).parent.parent


def population(tmp_path, size: int = 4, **config):
    scheduler = PBTScheduler(PBTConfig(
        str(tmp_path / "population"), population_size=size, perturbation_interval=64,
        truncation_ratio=0.25, seed=0,
        hyperparams=[HyperparamSpec("learning_rate", 1e-4, 3e-3, log_scale=True)], **config))
    models = {}
    for i, member in enumerate(scheduler.initialize_population()):
        models[member.member_id] = model = PPO(
            "MlpPolicy", "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1, seed=i,
            device="cpu", policy_kwargs={"net_arch": [8]})
        sb3.attach_vgs(model, warmup_steps=2)
        sb3.set_hyperparams(model, member.hyperparams)
    return scheduler, models


def test_train_population_ends_with_every_members_state_on_disk(tmp_path) -> None:
    scheduler, models = population(tmp_path)
    callbacks = sb3.train_population(scheduler, models, total_timesteps=320, interval=64,
                                     chunk=64, progress=False)
    assert sum(len(cb.events) for cb in callbacks.values()) > 0
    for member_id, model in models.items():
        latest = scheduler.store.latest(member_id)
        assert latest is not None and latest.step == model.num_timesteps
        saved = vgs_ckpt.load(latest.path).parameters
        for key, value in model.policy.state_dict().items():
            assert torch.equal(saved["policy"][key], value), (member_id, key)
        assert saved["vgs_state"]["step_count"] == sb3.vgs_scaler(model).step_count
        # No exploit after the final save: the last check only saved.
        events = callbacks[member_id].events
        assert not events or events[-1].timestep < model.num_timesteps


def test_a_population_trained_in_rounds_keeps_exploiting(tmp_path) -> None:
    """train_population called once a round with the same callbacks (as a loop that
    records a curve does): each call's budget, not the first call's, bounds the
    exploits, so members exploit after the first round too."""
    scheduler, models = population(tmp_path)
    speeds = dict(zip(models, (0.5, 0.75, 1.25, 1.5), strict=True))
    callbacks = None
    for round_no in range(1, 6):
        callbacks = sb3.train_population(scheduler, models, total_timesteps=64 * round_no,
                                         interval=64, progress=False, callbacks=callbacks,
                                         speeds=speeds)
    assert callbacks is not None
    assert any(e.timestep > 96 for cb in callbacks.values() for e in cb.events)
    for member_id in models:
        assert callbacks[member_id].total_timesteps == round(320 * speeds[member_id])
    # A budget the caller set is the caller's: checks up to it may exploit.
    scheduler, models = population(tmp_path / "b")
    own = {m: sb3.PBTCallback(scheduler, m, interval=64) for m in models}
    for cb in own.values():
        cb.total_timesteps = 320
    for round_no in range(1, 6):
        sb3.train_population(scheduler, models, total_timesteps=64 * round_no, interval=64,
                             progress=False, callbacks=own)
    assert all(cb.total_timesteps == 320 for cb in own.values())
    assert any(e.timestep > 64 for cb in own.values() for e in cb.events)


def test_a_run_that_stops_between_checks_saves_at_the_end(tmp_path) -> None:
    scheduler, models = population(tmp_path, size=2)
    callbacks = sb3.train_population(scheduler, models, total_timesteps=100, interval=96,
                                     chunk=50, progress=False)
    for member_id, model in models.items():
        assert callbacks[member_id].reports[-2][0] == 96  # the last periodic check
        assert scheduler.store.latest(member_id).step == model.num_timesteps == 128


def test_progress_is_shown_on_long_runs_and_can_be_silenced(tmp_path, capsys) -> None:
    scheduler, models = population(tmp_path, size=2)
    sb3.train_population(scheduler, models, total_timesteps=64, interval=64)
    assert capsys.readouterr().err == ""  # the default: quiet unless a run takes 10 s
    scheduler, models = population(tmp_path / "b", size=2)
    sb3.train_population(scheduler, models, total_timesteps=128, interval=64, progress=True)
    err = capsys.readouterr().err
    assert err.count("round ") == 2 and "best performance" in err
    with pytest.raises(vgs_ckpt.UsageError, match="progress must be a callable"):
        sb3.train_population(scheduler, models, total_timesteps=64, interval=64, progress=3)


def _preempt(tmp_path, mode: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    root = tmp_path / "population"
    process = subprocess.Popen([sys.executable, "-m", "tests.sb3_preempt", str(root), mode,
                                *extra], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(root.glob("*/step_*.safetensors")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # mid-training, past the first checkpoint
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    elapsed = time.monotonic() - sent
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), elapsed


@pytest.mark.parametrize("extra", [(), ("async",)])
def test_a_preempted_member_saves_durably_and_exits_143(tmp_path, extra) -> None:
    result, elapsed = _preempt(tmp_path, "member", *extra)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "not preempted" not in result.stdout and "preempted (signal 15)" in result.stderr
    files = sorted((tmp_path / "population" / "0").glob("step_*.safetensors"),
                   key=lambda p: int(p.stem.split("_")[1]))
    last = vgs_ckpt.load(files[-1], verify=True)
    assert f"member 0 at {last.header.step}" in result.stdout  # its state when it stopped
    assert last.parameters["counters"]["num_timesteps"] == last.header.step
    assert not list((tmp_path / "population").rglob("*.tmp"))
    assert elapsed < 30


def test_a_preempted_population_saves_every_member(tmp_path) -> None:
    result, _ = _preempt(tmp_path, "population")
    assert result.returncode == 143, result.stderr
    steps = {}
    for member in ("0", "1"):
        files = list((tmp_path / "population" / member).glob("step_*.safetensors"))
        steps[member] = max(vgs_ckpt.read_header(f).step for f in files)
    # Each member's last file holds the state it had when the process stopped.
    for member, step in steps.items():
        assert f"member {member} at {step}" in result.stdout


def test_an_off_policy_member_can_keep_its_replay_buffer_for_a_resume(tmp_path) -> None:
    from tests.sb3_members import build
    scheduler = PBTScheduler(PBTConfig(str(tmp_path / "population"), population_size=2,
                                       perturbation_interval=64, truncation_ratio=0.5, seed=0))
    scheduler.initialize_population([{}, {}])
    models = {"0": build("SAC", 0), "1": build("SAC", 1)}
    callbacks = {m: sb3.PBTCallback(scheduler, m, interval=64, replay_buffer=True)
                 for m in models}
    sb3.train_population(scheduler, models, total_timesteps=192, interval=64,
                         callbacks=callbacks, progress=False)
    for member_id, model in models.items():
        saved = vgs_ckpt.load(scheduler.store.latest(member_id).path).parameters
        assert saved["replay_buffer"]["pos"] == model.replay_buffer.pos == 192
    # Exploits kept each recipient's own experience.
    for member_id, callback in callbacks.items():
        if callback.events:
            own = models[member_id].replay_buffer.observations[:64]
            other = models["1" if member_id == "0" else "0"].replay_buffer.observations[:64]
            assert not (own == other).all()
    fresh = build("SAC", 5)
    resumed = PBTScheduler(PBTConfig(str(tmp_path / "population"), population_size=2,
                                     perturbation_interval=64, seed=0, resume="auto"))
    assert sb3.restore_member(resumed, "0", fresh)
    assert fresh.replay_buffer.pos == 192
    assert (fresh.replay_buffer.actions[:192] == models["0"].replay_buffer.actions[:192]).all()
