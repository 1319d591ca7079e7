"""``vgs-ckpt migrate``: a directory of the original scheduler's files becomes a
population that ``PBTScheduler(resume="must")`` continues (issue #21, item 1)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import UsageError
from vgs_ckpt.cli import main
from vgs_ckpt.pbt import PBTConfig, PBTScheduler
from vgs_ckpt.pbt.migrate import migrate_population, plan_population

from .legacy_files import write_legacy


@pytest.fixture
def original(tmp_path: Path) -> Path:
    """A checkpoint_dir as the original scheduler left it: every layout, both torch
    containers, several steps per member, and files that are not its checkpoints."""
    src = tmp_path / "checkpoint_dir"
    src.mkdir()
    write_legacy(src / "member_0_step_100.pt", "L0")  # a bare state_dict: no step inside
    write_legacy(src / "member_0_step_200.pt", "L0", zip_container=False)
    write_legacy(src / "member_1_step_150.pt", "L1")  # the file says step 150
    write_legacy(src / "member_1_step_300.pt", "L1+flag", zip_container=False)
    write_legacy(src / "member_2_step_150.pt", "L2", vgs_version="3.0")
    write_legacy(src / "member_4_step_50.pt", "L2+flag", vgs_version="3.2")
    write_legacy(src / "member_a.b-c_step_150.pt", "L2")
    (src / "notes.txt").write_text("not a checkpoint")
    write_legacy(src / "best_member.pt", "L2")  # a checkpoint, but not named by the original
    (src / "member_3_step_10.pt").write_bytes(b"PK\x03\x04 truncated")
    return src


def test_a_directory_of_the_original_scheduler_resumes_as_a_population(
        original: Path, tmp_path: Path) -> None:
    dest = tmp_path / "population"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vgs_ckpt.LegacyFormatWarning)
        items = migrate_population(original, dest)
    by_name = {i.source.name: i for i in items}
    assert by_name["notes.txt"].skipped and by_name["best_member.pt"].skipped
    assert by_name["member_3_step_10.pt"].failed
    migrated = [i for i in items if i.result == "migrated"]
    assert len(migrated) == 7
    # Steps: from the name for L0 (the file has none), from the file otherwise (L1 and L2
    # files hold 150, whatever their names say: the disagreement is noted).
    assert by_name["member_0_step_100.pt"].step == 100
    assert by_name["member_1_step_300.pt"].step == 150
    assert "step 150" in by_name["member_1_step_300.pt"].note

    scheduler = PBTScheduler(PBTConfig(str(dest), population_size=5, resume="must"))
    assert scheduler.resumed
    assert sorted(scheduler.members) == ["0", "1", "2", "4", "a.b-c"]
    assert scheduler.members["4"].step == 150  # the file's step, not the name's 50
    assert scheduler.members["0"].step == 200  # the latest is the highest step
    assert scheduler.members["2"].step == 150 and scheduler.members["2"].performance == 0.9
    loaded = scheduler.load_member("2")
    assert loaded is not None and loaded.format == "v2_full_parameters"
    # VGS 3.0 statistics were dropped (a bug of 3.0), the step count restarted.
    assert loaded.parameters["vgs_state"]["vgs_version"] == "3.2"
    assert loaded.parameters["vgs_state"]["step_count"] == 0
    provenance = loaded.header.provenance
    assert provenance is not None
    assert provenance.original_container == "torch-zip"
    assert provenance.applied_steps == ["vgs_3.0->3.1", "vgs_3.1->3.2"]
    assert provenance.legacy["source_file"] == "member_2_step_150.pt"
    policy_only = scheduler.load_member("0")
    assert policy_only is not None
    assert policy_only.parameters["vgs_state"] is None
    assert policy_only.header.provenance is not None
    assert policy_only.header.provenance.applied_steps == ["v1_policy_only->v2_full_parameters"]
    assert policy_only.header.provenance.legacy["step_from"] == "name"
    # Every file of the store is a verified vgs_ckpt file.
    for path in dest.rglob("*.safetensors"):
        vgs_ckpt.load(path)


def test_the_dry_run_prints_the_plan_and_writes_nothing(
        original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "population"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["migrate", str(original), str(dest), "--dry-run"]) == 1  # one failed
    out = capsys.readouterr().out
    assert not dest.exists()
    assert "step_000000000200_w000000000002.safetensors" in out
    assert "skipped: the name is not member_<id>_step_<step>.pt" in out
    assert "failed (below)" in out and "member_3_step_10.pt:" in out
    assert "10 files: 7 would migrate (5 members), 2 skipped, 1 failed (dry run" in out
    table = out.split("\n\n")[0]
    assert "Error" not in table  # messages below: one long message does not widen every row
    assert [i.destination for i in plan_population(original, dest) if i.destination]


def test_the_command_migrates_and_says_how_to_continue(
        original: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (original / "member_3_step_10.pt").unlink()
    dest = tmp_path / "population"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["migrate", str(original), str(dest)]) == 0
    out = capsys.readouterr().out
    assert "resume='must'" in out
    assert len(list(dest.rglob("*.safetensors"))) == 7
    # Into an existing population: refused, nothing mixed.
    with pytest.raises(UsageError, match="not an empty directory"):
        migrate_population(original, dest)
    assert main(["migrate", str(original), str(dest)]) == 1
    assert "not an empty directory" in capsys.readouterr().err


def test_a_source_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a directory"):
        migrate_population(tmp_path / "nowhere", tmp_path / "out")
    torch.save({}, tmp_path / "file.pt")
    with pytest.raises(UsageError, match="is not a directory"):
        migrate_population(tmp_path / "file.pt", tmp_path / "out")
