"""Safe reading of the original scheduler's files, in both torch containers."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vgs_ckpt
from vgs_ckpt import LegacyFormatWarning, UnsafeCheckpointError
from vgs_ckpt.testing import assert_trees_equal, tensors
from vgs_ckpt.upgrades.files import upgrade_files

from .legacy_files import EXPECTED_FORMAT, LAYOUTS, payload, write_legacy

CONTAINERS = [(True, "torch-zip"), (False, "torch-pickle")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("zip_container", "container"), CONTAINERS)
def test_every_layout_is_detected_as_the_original_classified_it(
        tmp_path: Path, layout: str, zip_container: bool, container: str) -> None:
    path = write_legacy(tmp_path / "member_1_step_150.pt", layout, zip_container=zip_container)
    assert vgs_ckpt.detect_format(path) == (EXPECTED_FORMAT[layout], container)
    raw = vgs_ckpt.load(path, upgrade=False)
    assert raw.format == EXPECTED_FORMAT[layout]
    assert raw.container == container
    expected = payload(layout)
    assert_trees_equal(raw.parameters, expected if layout == "L0" else expected["data"])
    if layout != "L0":
        assert (raw.header.step, raw.header.performance) == (150, 0.9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_upgrades_legacy_files_with_a_warning_naming_the_format(
        tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture) -> None:
    path = write_legacy(tmp_path / "m.pt", layout)
    with caplog.at_level("DEBUG", logger="vgs_ckpt"), \
            pytest.warns(LegacyFormatWarning, match=EXPECTED_FORMAT[layout]) as record:
        ckpt = vgs_ckpt.load(path)
    # One channel, at the caller's line: warnings filters by module work.
    assert len(record) == 1 and record[0].filename == __file__
    assert caplog.text == ""
    assert ckpt.format == "v2_full_parameters"
    provenance = ckpt.header.provenance
    assert provenance is not None
    assert provenance.original_format == EXPECTED_FORMAT[layout]
    assert provenance.original_container == "torch-zip"
    if EXPECTED_FORMAT[layout] == "v1_policy_only":
        assert ckpt.parameters["vgs_state"] is None
        assert provenance.vgs_state_absent is True
        assert provenance.applied_steps == ["v1_policy_only->v2_full_parameters"]
        assert_trees_equal(ckpt.parameters["policy"], payload("L0"))
    else:
        assert provenance.vgs_state_absent is False


def test_v2_legacy_file_with_current_vgs_needs_no_step_but_keeps_its_origin(
        tmp_path: Path) -> None:
    path = write_legacy(tmp_path / "m.pt", "L2", vgs_version="3.2", zip_container=False)
    with pytest.warns(LegacyFormatWarning, match="torch-pickle"):
        ckpt = vgs_ckpt.load(path)
    assert ckpt.header.vgs is not None and ckpt.header.vgs.step_count == 10
    assert ckpt.header.provenance is not None
    assert ckpt.header.provenance.applied_steps == []
    assert ckpt.header.provenance.original_container == "torch-pickle"


def test_current_files_load_without_a_warning(tmp_path: Path) -> None:
    vgs_ckpt.save(tmp_path / "m.safetensors", payload("L2")["data"], step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = vgs_ckpt.load(tmp_path / "m.safetensors")
    assert ckpt.header.provenance is None


def test_has_optimizer_state_flag_is_kept(tmp_path: Path) -> None:
    obj = payload("L1+flag")
    obj["has_optimizer_state"] = True
    torch.save(obj, tmp_path / "m.pt")
    header = vgs_ckpt.load(tmp_path / "m.pt", upgrade=False).header
    assert isinstance(header, vgs_ckpt.CheckpointV1) and header.has_optimizer_state is True


class _Sentinel:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize(("zip_container", "container"), CONTAINERS)
def test_malicious_pickle_runs_nothing_and_names_the_global(
        tmp_path: Path, zip_container: bool, container: str) -> None:
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": "v2_full_parameters", "data": {"x": _Sentinel(str(sentinel))},
                "step": 1}, path, _use_new_zipfile_serialization=zip_container)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        vgs_ckpt.load(path)
    with pytest.raises(UnsafeCheckpointError):
        vgs_ckpt.detect_format(path)
    with pytest.raises(ValueError, match="nothing in it was run"):
        vgs_ckpt.load_bytes(path.read_bytes())
    assert not sentinel.exists()


def test_cuda_saved_tensors_load_on_map_location(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Write a file whose storages are tagged "cuda:0", as on a GPU machine.
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"format_version": "v2_full_parameters", "step": 3, "performance": 1.0,
                "data": {"policy": {"w": torch.ones(3)},
                         "vgs_state": {**payload("L2")["data"]["vgs_state"]}}}, tmp_path / "g.pt")
    monkeypatch.undo()
    with pytest.warns(LegacyFormatWarning):
        ckpt = vgs_ckpt.load(tmp_path / "g.pt", map_location="cpu")
    assert ckpt.parameters["policy"]["w"].device.type == "cpu"
    assert torch.equal(ckpt.parameters["policy"]["w"], torch.ones(3))


@pytest.mark.parametrize("corrupt", [b"PK\x03\x04garbage", b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46"
                                     b"\xf9\x20\x6a\xa8\x50\x19truncated"])
def test_corrupt_torch_files_are_format_errors(tmp_path: Path, corrupt: bytes) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(corrupt)
    with pytest.raises(vgs_ckpt.FormatError, match="bad.pt"):
        vgs_ckpt.load(path)


def test_legacy_newer_format_is_refused(tmp_path: Path) -> None:
    torch.save({"format_version": "v7_quantum", "data": {}, "step": 0}, tmp_path / "n.pt")
    with pytest.raises(vgs_ckpt.UnsupportedVersionError, match="v7_quantum"):
        vgs_ckpt.load(tmp_path / "n.pt")


def test_legacy_file_holding_a_non_dict_is_refused(tmp_path: Path) -> None:
    torch.save([torch.ones(1)], tmp_path / "l.pt")
    with pytest.raises(vgs_ckpt.FormatError, match="not a checkpoint dict"):
        vgs_ckpt.load(tmp_path / "l.pt")


# torch cannot read back uint16/32/64 from its old non-zip container, and the
# original scheduler never wrote them; they are left out here.
_LEGACY_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
_leaf_trees = st.dictionaries(
    st.text("abcdefgh._", min_size=1, max_size=6),
    st.one_of(tensors(dtypes=_LEGACY_DTYPES), st.integers(-5, 5), st.floats(allow_nan=False),
              st.booleans(), st.none(), st.text(max_size=4)), max_size=5)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_leaf_trees, zip_container=st.booleans())
def test_legacy_save_upgrade_load_keeps_every_value(tmp_path: Path, tree: dict[str, Any],
                                                    zip_container: bool) -> None:
    """For arbitrary trees: torch.save (layout L2) -> vgs-ckpt upgrade -> load is lossless."""
    source = tmp_path / "m.pt"
    torch.save({"format_version": "v2_full_parameters", "data": {"extra": tree}, "step": 2,
                "performance": 0.1}, source, _use_new_zipfile_serialization=zip_container)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    results = upgrade_files([source], out=out, in_place=False)
    assert [r.result for r in results] == ["upgraded"]
    ckpt = vgs_ckpt.load(out / "m.safetensors")
    assert_trees_equal(ckpt.parameters["extra"], tree)
    assert ckpt.header.provenance is not None
    assert ckpt.header.provenance.original_container == ("torch-zip" if zip_container
                                                         else "torch-pickle")
