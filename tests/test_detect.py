"""Detection reads bytes, never names, and at most the header."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import CheckpointFormat, Detection, FormatError, detect_format
from vgs_ckpt.storage.local import FileSource


def test_v2_and_v1_files(tmp_path: Path) -> None:
    v2 = tmp_path / "a.pt"  # the name says torch; the bytes say safetensors
    vgs_ckpt.save(v2, {"w": torch.ones(1)}, step=0)
    v1 = tmp_path / "b.safetensors"
    vgs_ckpt.save(v1, {"w": torch.ones(1)}, step=0, format=CheckpointFormat.V1_POLICY_ONLY)
    assert detect_format(v2) == Detection(CheckpointFormat.V2_FULL_PARAMETERS, "safetensors")
    fmt, container = detect_format(v1)
    assert (fmt, container) == ("v1_policy_only", "safetensors")
    assert detect_format(v1.read_bytes()).format == "v1_policy_only"


def test_detection_reads_no_tensor_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.ones(1000)}, step=0)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor bytes were read")

    monkeypatch.setattr(FileSource, "views", forbidden)
    assert detect_format(path).format == "v2_full_parameters"
    assert vgs_ckpt.read_header(path).step == 0


@pytest.mark.parametrize(("zip_container", "container"), [(True, "torch-zip"),
                                                          (False, "torch-pickle")])
def test_torch_containers_are_recognised(tmp_path: Path, zip_container: bool,
                                         container: str) -> None:
    path = tmp_path / "member_0_step_5.safetensors"  # a misleading name on purpose
    torch.save({"format_version": "v2_full_parameters", "data": {"policy": {}}, "step": 5,
                "performance": 1.0}, path, _use_new_zipfile_serialization=zip_container)
    assert detect_format(path) == ("v2_full_parameters", container)


@pytest.mark.parametrize("data", [b"", b"hello world, not a checkpoint", b"PK", b"\x80\x02"])
def test_other_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(FormatError):
        detect_format(data)


def test_missing_path() -> None:
    with pytest.raises(vgs_ckpt.CheckpointNotFoundError):
        detect_format("/nonexistent/ckpt.safetensors")
