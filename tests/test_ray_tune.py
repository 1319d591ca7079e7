"""The Ray Tune integration: unit tests, and a real PBT run on a local Ray (marked `ray`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import MissingDependencyError

from .pbt_helpers import make_learner, train, vgs_tensors

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_core_package_does_not_import_ray() -> None:
    code = "import sys, vgs_ckpt, vgs_ckpt.pbt, vgs_ckpt.integrations; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_missing_ray_gives_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from vgs_ckpt.integrations import ray_tune

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'vgs-ckpt\[ray\]'"):
        ray_tune.save_checkpoint(tmp_path, {"w": torch.ones(1)}, step=1)
    with pytest.raises(ImportError):  # also catchable as the builtin
        ray_tune.restore({})


def test_restore_of_a_cloned_checkpoint_applies_the_trials_own_config(tmp_path: Path) -> None:
    pytest.importorskip("ray.tune")
    from vgs_ckpt.integrations import ray_tune

    donor = make_learner(0, lr=0.05)
    train(donor, 6)
    checkpoint = ray_tune.save_checkpoint(tmp_path, donor.get_parameters(), step=6,
                                          performance=0.5, trial_id="donor_trial",
                                          config={"lr": 0.05, "vgs_alpha": 0.1, "nested": {}})
    restored = ray_tune.restore_checkpoint(checkpoint, {"lr": 0.001, "vgs_alpha": 0.4},
                                           trial_id="recipient_trial")
    assert restored.cloned
    source = restored.lineage.exploited_from
    assert source is not None and (source.member_id, source.step) == ("donor_trial", 6)
    assert restored.header.hyperparams == {"lr": 0.05, "vgs_alpha": 0.1}
    recipient = make_learner(1, lr=0.9)
    recipient.set_parameters(restored.parameters)
    assert recipient.optimizer.param_groups[0]["lr"] == 0.001
    assert recipient.vgs.alpha == 0.4
    assert recipient.vgs.step_count == 6
    for key, value in vgs_tensors(recipient).items():
        assert torch.equal(value, vgs_tensors(donor)[key])
    same = ray_tune.restore_checkpoint(checkpoint, {"lr": 0.05}, trial_id="donor_trial")
    assert not same.cloned and same.lineage == restored.header.lineage


def test_restore_refuses_a_foreign_checkpoint(tmp_path: Path) -> None:
    tune = pytest.importorskip("ray.tune")
    from vgs_ckpt.integrations import ray_tune

    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(vgs_ckpt.FormatError, match="vgs_ckpt.safetensors"):
        ray_tune.restore_checkpoint(tune.Checkpoint.from_directory(str(tmp_path)), {})


@pytest.mark.ray
def test_pbt_run_exploits_carry_the_donors_state_and_keep_the_explored_lr(
        tmp_path: Path) -> None:
    pytest.importorskip("ray.tune")
    import ray

    sys.path.insert(0, str(EXAMPLES))
    try:
        import ray_tune_pbt
    finally:
        sys.path.remove(str(EXAMPLES))
    try:
        results = ray_tune_pbt.run(str(tmp_path), num_samples=4, iterations=6)
    finally:
        ray.shutdown()
    frames = {r.metrics["trial_id"]: r.metrics_dataframe for r in results}
    exploits = [(trial, row) for trial, frame in frames.items()
                for row in frame.to_dict("records") if row.get("restored_cloned") is True]
    assert exploits, "PBT made no exploit; the test would prove nothing"
    for trial, row in exploits:
        assert row["restored_from"] != trial
        # The donor's checkpoint that Ray cloned, read back independently.
        donor = vgs_ckpt.load(Path(row["restored_file"]) / "vgs_ckpt.safetensors")
        assert donor.header.member_id == row["restored_from"]
        assert donor.header.step == row["restored_iteration"]
        reference = ray_tune_pbt.make_learner({"lr": 1e-3, "vgs_alpha": 0.1})
        reference.set_parameters(donor.parameters)
        assert row["restored_digest"] == ray_tune_pbt.state_digest(reference)  # weights + VGS
        assert row["restored_vgs_step_count"] == donor.parameters["vgs_state"]["step_count"]
        assert row["optimizer_lr"] == row["config/lr"]  # its own explored lr, not the donor's
        assert row["vgs_alpha_in_use"] == row["config/vgs_alpha"]
    # The checkpoints in storage record their lineage.
    files = sorted(tmp_path.rglob("vgs_ckpt.safetensors"))
    headers = [vgs_ckpt.read_header(f) for f in files]
    assert any(isinstance(h, vgs_ckpt.CheckpointV2) and h.lineage.exploited_from is not None
               for h in headers)


def test_a_restart_from_a_cloned_checkpoint_is_not_another_exploit(tmp_path: Path) -> None:
    """Ray restarts a trial whose node died from its latest checkpoint, which is the
    donor's when it was cloned and had not reported since: not a second exploit."""
    pytest.importorskip("ray.tune")
    from vgs_ckpt.integrations import ray_tune

    donor = make_learner(0, lr=0.05)
    train(donor, 4)
    checkpoint = ray_tune.save_checkpoint(tmp_path, donor.get_parameters(), step=4,
                                          trial_id="donor_trial", config={"lr": 0.05})
    first = ray_tune.restore_checkpoint(checkpoint, {"lr": 0.01}, trial_id="recipient")
    assert first.cloned and not first.restarted
    assert (tmp_path / ".vgs_ckpt-restored-by-recipient").exists()
    # A restart, on another node: the marker is on the checkpoint's storage.
    again = ray_tune.restore_checkpoint(checkpoint, {"lr": 0.01}, trial_id="recipient")
    assert not again.cloned and again.restarted
    assert again.lineage == first.lineage  # the exploit it continues, recorded once
    other = ray_tune.restore_checkpoint(checkpoint, {"lr": 0.02}, trial_id="third")
    assert other.cloned  # another recipient of the same donor checkpoint
    # A second exploit of the same donor checkpoint comes with a new explored config.
    second = ray_tune.restore_checkpoint(checkpoint, {"lr": 0.008}, trial_id="recipient")
    assert second.cloned and not second.restarted
    restart = ray_tune.restore_checkpoint(checkpoint, {"lr": 0.008}, trial_id="recipient")
    assert restart.restarted


@pytest.mark.ray
@pytest.mark.sb3
def test_sb3_population_on_ray_carries_the_normalizer(tmp_path: Path) -> None:
    """examples/sb3_ray_pbt.py: PPO+VGS with VecNormalize as a Ray Tune trainable."""
    pytest.importorskip("stable_baselines3")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "sb3_ray_pbt.py"), "--samples", "2", "--iterations",
         "3", "--interval", "1", "--storage-path", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    exploits = [line for line in done.stdout.splitlines() if line.startswith("exploit:")]
    assert exploits, done.stdout[-2000:]
    for line in exploits:  # the recipient's normalizer is the donor's after the restore
        before, after = line.split("obs mean[0] ")[1].split(",")[0].split(" -> ")
        assert float(after) != float(before)
    assert any(p.name == "vgs_ckpt.safetensors" for p in tmp_path.rglob("*"))


def test_a_checkpoint_that_cannot_be_marked_still_restores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Where the marker cannot be written (a read-only storage), the restore works and
    says that a restart from it would count as another exploit."""
    pytest.importorskip("ray.tune")
    from pyarrow import fs

    from vgs_ckpt.integrations import ray_tune

    donor = make_learner(0)
    checkpoint = ray_tune.save_checkpoint(tmp_path, donor.get_parameters(), step=2,
                                          trial_id="donor_trial")
    nowhere = str(tmp_path / "no" / "such" / "dir" / "marker")
    monkeypatch.setattr(ray_tune, "_marker_path",
                        lambda checkpoint, trial: (fs.LocalFileSystem(), nowhere))
    with caplog.at_level("WARNING", logger="vgs_ckpt"):
        restored = ray_tune.restore_checkpoint(checkpoint, {"lr": 0.01}, trial_id="recipient")
    assert restored.cloned and not restored.restarted
    assert "could not mark the cloned checkpoint" in caplog.text
    assert "would count as another exploit" in caplog.text
