"""`vgs-ckpt upgrade` on directories of mixed legacy, current, corrupt and unsafe files."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch

import vgs_ckpt
from vgs_ckpt.cli import main

from .legacy_files import write_legacy
from .test_legacy import _Sentinel


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    root = tmp_path / "ckpts"
    (root / "sub").mkdir(parents=True)
    write_legacy(root / "member_0_step_10.pt", "L0")
    write_legacy(root / "sub" / "member_1_step_10.pt", "L2", zip_container=False,
                 vgs_version="2.0")
    write_legacy(root / "member_2_step_10.pt", "L1+flag")
    vgs_ckpt.save(root / "member_3.safetensors", {"policy": {"w": torch.ones(2)}}, step=3)
    (root / "corrupt.pt").write_bytes((root / "member_0_step_10.pt").read_bytes()[:200])
    torch.save({"x": _Sentinel(str(tmp_path / "pwned"))}, root / "unsafe.pt")
    (root / "notes.txt").write_text("not a checkpoint")
    return root


def _results(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        for name in ("member_0", "member_1", "member_2", "member_3", "corrupt", "unsafe"):
            if name in line.split("  ")[0]:
                rows[name] = line
    return rows


def test_out_dir_converts_good_files_and_reports_bad_ones(
        mixed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["upgrade", str(mixed), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    rows = _results(text)
    assert "upgraded" in rows["member_0"] and "v1_policy_only->v2_full_parameters" in rows[
        "member_0"]
    assert "vgs_2.0->3.1, vgs_3.1->3.2" in rows["member_1"]
    assert "up to date" in rows["member_3"]
    table = text.split("\n\n")[0]  # each failure's message follows the table
    assert "failed (below)" in _results(table)["corrupt"]
    assert "failed (below)" in _results(table)["unsafe"]
    assert re.search(r"corrupt\.pt:\n  FormatError: ", text)
    assert re.search(r"unsafe\.pt:\n  UnsafeCheckpointError: ", text)
    assert "Error" not in table  # messages below: one long message does not widen every row
    assert "notes.txt" not in text
    assert "6 files: 4 ok, 2 failed" in text
    assert not (tmp_path / "pwned").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converted files are current: no warning
        ckpt = vgs_ckpt.load(out / "sub" / "member_1_step_10.safetensors")
    assert ckpt.parameters["vgs_state"]["step_count"] == 0
    assert ckpt.header.provenance is not None
    assert ckpt.header.provenance.original_container == "torch-pickle"
    assert ckpt.header.provenance.original_vgs_version == "2.0"
    assert (out / "member_3.safetensors").read_bytes() == (mixed / "member_3.safetensors"
                                                           ).read_bytes()


def test_in_place_keeps_backups_and_never_overwrites_one(
        mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = (mixed / "member_0_step_10.pt").read_bytes()
    (mixed / "member_0_step_10.pt.bak").write_bytes(b"an older backup")
    assert main(["upgrade", str(mixed / "member_0_step_10.pt"), "--in-place"]) == 0
    assert (mixed / "member_0_step_10.pt.bak").read_bytes() == b"an older backup"
    assert (mixed / "member_0_step_10.pt.bak.1").read_bytes() == original
    assert vgs_ckpt.detect_format(mixed / "member_0_step_10.pt") == ("v2_full_parameters",
                                                                     "safetensors")
    capsys.readouterr()
    # A second run changes nothing: no new backup, same bytes.
    before = (mixed / "member_0_step_10.pt").read_bytes()
    assert main(["upgrade", str(mixed / "member_0_step_10.pt"), "--in-place"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (mixed / "member_0_step_10.pt").read_bytes() == before
    assert not (mixed / "member_0_step_10.pt.bak.2").exists()


def test_dry_run_writes_nothing(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p: p.stat().st_mtime_ns for p in mixed.rglob("*")}
    assert main(["upgrade", str(mixed), "--dry-run"]) == 1  # the bad files still fail
    assert {p: p.stat().st_mtime_ns for p in mixed.rglob("*")} == before
    out = capsys.readouterr().out
    assert "would upgrade" in out and "dry run" in out


def test_out_and_in_place_are_exclusive_and_one_is_required(
        mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["upgrade", str(mixed), "--in-place", "--out", "x"])
    assert main(["upgrade", str(mixed)]) == 1
    assert "--out DIR or --in-place" in capsys.readouterr().err


def test_progress_bar_for_many_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(6):
        write_legacy(tmp_path / f"member_{i}.pt", "L0")
    assert main(["upgrade", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "6/6" in err and "#" in err


def test_missing_path_fails_but_others_convert(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    good = write_legacy(tmp_path / "good.pt", "L0")
    assert main(["upgrade", str(tmp_path / "missing.pt"), str(good), "--out",
                 str(tmp_path / "o")]) == 1
    assert (tmp_path / "o" / "good.safetensors").exists()
    assert "no such file" in capsys.readouterr().out
    assert os.path.exists(good)
