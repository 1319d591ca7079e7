"""The main job: `vgs-ckpt demo`."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest

import vgs_ckpt
from vgs_ckpt.cli import main
from vgs_ckpt.demo import run_demo


def test_demo_exploits_carry_the_donors_vgs_state(tmp_path: Path) -> None:
    out = io.StringIO()
    result = run_demo(tmp_path, members=4, rounds=3, interval=6, seed=1, out=out)
    assert result.exploits, "a population of 4 must exploit (truncation never rounds to 0)"
    for e in result.exploits:
        assert e.fmt == "v2_full_parameters"
        assert e.matches_donor
        assert e.after["step_count"] == e.donor_state["step_count"]
    text = out.getvalue()
    assert "round  3/3" in text and "matches donor" in text and "yes" in text
    files = sorted(tmp_path.rglob("step_*.safetensors"))
    assert files and all(vgs_ckpt.detect_format(f).format == "v2_full_parameters"
                         for f in files)


def test_policy_only_run_reports_v1_and_stale_vgs(tmp_path: Path) -> None:
    result = run_demo(tmp_path, members=4, rounds=3, interval=6, seed=1, policy_only=True,
                      out=io.StringIO())
    assert result.exploits
    for e in result.exploits:
        assert e.fmt == "v1_policy_only" and not e.matches_donor
        assert e.after["step_count"] == e.before["step_count"]


def test_demo_command_with_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--members", "4", "--rounds", "2", "--interval", "5", "--dir",
                 str(tmp_path), "--compare"])
    out = capsys.readouterr().out
    assert code == 0
    assert "full:" in out and "policy-only:" in out and "final val loss" in out
    assert (tmp_path / "full").is_dir() and (tmp_path / "policy-only").is_dir()
    # The comparison is a median and a range over seeds, not one number.
    assert "over 3 seed(s) (0..2)" in out and "median ratio policy-only / full" in out
    assert (tmp_path / "seed-2" / "policy-only").is_dir()
    assert "members at different speeds (optimizer steps per round: 5, 4, 3, 2)" in out


def test_members_at_different_speeds_exploit_higher_step_counts(tmp_path: Path) -> None:
    result = run_demo(tmp_path, members=6, rounds=4, interval=10, seed=0, out=io.StringIO())
    raised = [e for e in result.exploits if e.after["step_count"] > e.before["step_count"]]
    assert raised, "the seed's situation: a recipient at a low step count takes a higher one"
    for e in raised:
        assert e.after["step_count"] == e.donor_state["step_count"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None,
                    reason="matplotlib is installed")
def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--members", "2", "--rounds", "1", "--interval", "2", "--dir",
                 str(tmp_path), "--plot", str(tmp_path / "p.png")])
    assert code == 1
    captured = capsys.readouterr()
    assert "pip install 'vgs-ckpt[plot]'" in captured.err and "nothing was run" in captured.err
    assert "round" not in captured.out  # refused before the demo ran, not after


def test_bad_demo_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--members", "1", "--dir", str(tmp_path)]) == 1
    assert "members >= 2" in capsys.readouterr().err


def test_demo_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("x")
    with pytest.raises(vgs_ckpt.UsageError, match="not empty"):
        run_demo(tmp_path, members=2, rounds=1, interval=1, out=io.StringIO())
