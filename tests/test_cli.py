"""The vgs-ckpt command line."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vgs_ckpt
from vgs_ckpt.cli import main

from .conftest import make_member


@pytest.fixture
def ckpt_file(tmp_path: Path) -> Path:
    path = tmp_path / "member_3.safetensors"
    vgs_ckpt.save(path, make_member(), step=150, performance=0.9, member_id="3",
                  hyperparams={"lr": 5e-4})
    return path


def test_inspect_shows_format_step_vgs_and_tensors(ckpt_file: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ckpt_file)]) == 0
    out = capsys.readouterr().out
    for text in ("v2_full_parameters", "step         150", "performance  0.9", "member       3",
                 "step_count 10", "policy/0.weight", "F32", "3x4", "48 B"):
        assert text in out


def test_inspect_json(ckpt_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(ckpt_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "v2_full_parameters"
    assert info["header"]["vgs"]["step_count"] == 10
    weight = next(t for t in info["tensors"] if t["name"] == "policy/0.weight")
    assert weight == {"name": "policy/0.weight", "dtype": "F32", "shape": [3, 4], "bytes": 48}


def test_verify_ok_and_corrupt(ckpt_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(ckpt_file)]) == 0
    data = bytearray(ckpt_file.read_bytes())
    data[-1] ^= 0xFF
    ckpt_file.write_bytes(bytes(data))
    assert main(["verify", str(ckpt_file)]) == 1
    assert "does not match its digest" in capsys.readouterr().err


def test_errors_exit_non_zero_with_a_message(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    assert main(["verify", str(junk)]) == 1


def test_schema_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "s"
    assert main(["schema", "--out", str(out)]) == 0
    assert main(["schema", "--out", str(out), "--check"]) == 0
    (out / "header.schema.json").write_text("{}")
    assert main(["schema", "--out", str(out), "--check"]) == 1


def test_schema_check_of_missing_files_says_they_are_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Outside a checkout (or from the wheel) there is no schema/ to check: say so,
    not "out of date"."""
    assert main(["schema", "--out", str(tmp_path / "nowhere"), "--check"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "out of date" not in err
    (tmp_path / "some").mkdir()
    assert main(["schema", "--out", str(tmp_path / "some"), "--check"]) == 1
    assert "lacks" in capsys.readouterr().err


def test_python_dash_m_entry_point(ckpt_file: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vgs_ckpt", "verify", str(ckpt_file)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


def test_inspect_a_v1_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "v1.safetensors"
    vgs_ckpt.save(path, {"w": torch.ones(2)}, step=4,
                  format=vgs_ckpt.CheckpointFormat.V1_POLICY_ONLY)
    assert main(["inspect", str(path)]) == 0
    assert "v1_policy_only" in capsys.readouterr().out


def test_inspect_a_legacy_torch_file_shows_it_as_stored(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "member_0_step_1.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown as stored: no upgrade, so no warning
        assert main(["inspect", str(tmp_path / "member_0_step_1.pt")]) == 0
    out = capsys.readouterr().out
    assert "torch-zip" in out and "v1_policy_only" in out and "w " in out


def test_inspect_piped_into_head_exits_quietly(tmp_path: Path) -> None:
    path = tmp_path / "many.safetensors"  # a table far larger than a pipe's buffer
    vgs_ckpt.save(path, {f"tensor_{i:05d}": torch.ones(1) for i in range(4000)}, step=0)
    proc = subprocess.run(f"{sys.executable} -m vgs_ckpt inspect {path} | head -2",
                          shell=True, capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("file")
    assert "Traceback" not in proc.stderr and "Broken pipe" not in proc.stderr


def test_cli_errors_share_one_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command's failure: exit 1 and one line `error: ...` saying how to fix it."""
    assert main(["sweep", str(tmp_path / "nosuchdir")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a directory" in err
    assert main(["verify", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a directory" in err and "Errno" not in err


def test_upgrade_summary_counts_one_file(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "one.safetensors"
    vgs_ckpt.save(path, {"policy": {"w": torch.ones(2)}}, step=1)
    assert main(["upgrade", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 file: 1 ok" in out and "1 files" not in out
