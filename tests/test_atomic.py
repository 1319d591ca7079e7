"""Atomic writes: the target holds the old bytes or all of the new ones, never a mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch

import vgs_ckpt
from vgs_ckpt import CheckpointIOError

from .disk_faults import full_disk, killed_mid_write_script


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.zeros(4)}, step=1)
    before = path.read_bytes()
    disk = full_disk(monkeypatch, after=4096)  # part of the data is on disk, then it is full
    with pytest.raises(CheckpointIOError, match="intact"):
        vgs_ckpt.save(path, {"w": torch.ones(100_000)}, step=2)
    monkeypatch.undo()
    assert disk.written > 4096
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_killed_writer_never_leaves_a_partial_target(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.zeros(4)}, step=1)
    before = path.read_bytes()
    # The writer is killed once most of its data is in the temp file (by size, watched
    # from outside), before the rename.
    script = killed_mid_write_script(tmp_path, f"""
        for _ in range(50):  # each save is 40 MB; one of them is killed part-way
            vgs_ckpt.save({str(path)!r}, {{"w": torch.ones(10_000_000)}}, step=2,
                          durable=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert vgs_ckpt.load(path).header.step == 1


def test_saving_over_a_memory_mapped_file_corrupts_neither(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.zeros(1000)}, step=1)
    with safetensors.safe_open(str(path), framework="pt") as old:
        vgs_ckpt.save(path, {"w": torch.ones(1000)}, step=2)
        assert torch.equal(old.get_tensor("w"), torch.zeros(1000))
    assert torch.equal(vgs_ckpt.load(path).parameters["w"], torch.ones(1000))


def test_saving_over_a_file_open_for_reading(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.zeros(10)}, step=1)
    with open(path, "rb") as handle:
        vgs_ckpt.save(path, {"w": torch.ones(10)}, step=2)
        assert vgs_ckpt.load_bytes(handle.read()).header.step == 1
    assert vgs_ckpt.read_header(path).step == 2


def test_new_files_get_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.zeros(1)}, step=1, durable=False)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "deeper" / "member_3.safetensors"
    vgs_ckpt.save(path, {"w": torch.ones(1)}, step=0)
    assert vgs_ckpt.read_header(path).step == 0


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(CheckpointIOError, match="writable directory"):
        vgs_ckpt.save(tmp_path / "file" / "m.safetensors", {"w": torch.ones(1)}, step=0)
