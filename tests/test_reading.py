"""The load path does each thing once; the lazy reader; the consistent edges (issue #12)."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

import vgs_ckpt
from vgs_ckpt import (
    CheckpointFormat,
    FormatError,
    IntegrityError,
    InvalidVGSStateWarning,
    LegacyFormatWarning,
    UsageError,
    VgsCkptError,
)
from vgs_ckpt.cli import main
from vgs_ckpt.pbt import CheckpointStore
from vgs_ckpt.testing import assert_trees_equal
from vgs_ckpt.upgrades import Upgrading, upgrade_tree
from vgs_ckpt.upgrades.files import upgrade_files

from .conftest import make_member, raises_exactly
from .legacy_files import payload, write_legacy


class HashCounter:
    """Counts every byte hashed, by wrapping the digest function of the xxhash package."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> HashCounter:
    counter = HashCounter()
    real = xxhash.xxh3_128_hexdigest

    def counting(data: Any) -> str:
        counter.calls += 1
        counter.bytes += memoryview(data).nbytes
        return real(data)

    monkeypatch.setattr(xxhash, "xxh3_128_hexdigest", counting)
    return counter


def _tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def _stored_bytes(path: Path) -> int:
    header = vgs_ckpt.read_header(path)
    return sum(vgs_ckpt.TensorSpec(n, t.dtype, tuple(t.shape)).nbytes
               for n, t in header.tensors.items())


# --- each byte hashed at most once ----------------------------------------------------

@pytest.mark.parametrize("layout", ["L0", "L1", "L2"])
def test_legacy_load_and_upgrade_hash_nothing(tmp_path: Path, layout: str,
                                              hashed: HashCounter) -> None:
    path = write_legacy(tmp_path / "m.pt", layout)
    with pytest.warns(LegacyFormatWarning):
        ckpt = vgs_ckpt.load(path)
    assert ckpt.format == "v2_full_parameters"
    raw = vgs_ckpt.load(path, upgrade=False)
    vgs_ckpt.upgrade(raw)
    assert (hashed.calls, hashed.bytes) == (0, 0)
    # The in-memory headers describe the tree; digests are left to save.
    assert all(info.digest is None for info in ckpt.header.tensors.values())
    assert set(ckpt.header.tensors) and all(n.startswith(("policy", "vgs_state", "kl"))
                                            for n in ckpt.header.tensors)


def test_verified_load_hashes_every_byte_exactly_once(tmp_path: Path,
                                                      hashed: HashCounter) -> None:
    path = tmp_path / "m.safetensors"
    member = make_member()
    vgs_ckpt.save(path, member, step=1)
    hashed.calls = hashed.bytes = 0
    ckpt = vgs_ckpt.load(path)
    assert hashed.bytes == _stored_bytes(path) == _tensor_bytes(member)
    vgs_ckpt.upgrade(ckpt)  # nothing to do, and nothing hashed
    vgs_ckpt.load(path, verify=False)
    assert hashed.bytes == _stored_bytes(path)


def test_upgrade_command_hashes_each_byte_once(tmp_path: Path, hashed: HashCounter) -> None:
    (tmp_path / "in").mkdir()
    source = write_legacy(tmp_path / "in" / "m.pt", "L2", vgs_version="3.1")
    [result] = upgrade_files([source], out=tmp_path / "out", in_place=False)
    assert result.result == "upgraded", result
    # Reading the legacy file hashes nothing; writing the new one hashes it once.
    assert hashed.bytes == _stored_bytes(tmp_path / "out" / "m.safetensors")
    hashed.calls = hashed.bytes = 0
    v2 = tmp_path / "out" / "m.safetensors"
    [again] = upgrade_files([v2], out=None, in_place=True)
    assert again.result == "up to date"
    assert hashed.bytes == _stored_bytes(v2)  # verified once, not rewritten


def test_legacy_load_to_meta_never_copies_a_tensor_to_the_host(tmp_path: Path) -> None:
    # "meta" tensors have no data: a load that needed the bytes (to hash or re-encode
    # them, the host round trip) would fail.
    path = write_legacy(tmp_path / "m.pt", "L1")
    with pytest.warns(LegacyFormatWarning):
        ckpt = vgs_ckpt.load(path, map_location="meta")
    weights = ckpt.parameters["policy"]
    assert weights and all(t.is_meta for t in weights.values())
    assert ckpt.header.tensors["policy/0.weight"].shape == [3, 4]
    with raises_exactly(vgs_ckpt.UnsupportedTypeError, match="meta tensor"):
        vgs_ckpt.save(tmp_path / "x.safetensors", ckpt.parameters, step=0)


def test_upgrade_changes_the_tree_and_bookkeeping_and_save_fills_the_digests(
        tmp_path: Path) -> None:
    path = tmp_path / "v1.safetensors"
    vgs_ckpt.save(path, {"w": torch.ones(3)}, step=5, format="v1_policy_only")
    stored = vgs_ckpt.load(path, upgrade=False)
    assert stored.header.tensors["w"].digest is not None  # as stored
    new, applied = vgs_ckpt.upgrade(stored)
    assert applied == ["v1_policy_only->v2_full_parameters"]
    assert [pair[0] for pair in new.header.tree["dict"]] == ["policy", "vgs_state"]
    assert set(new.header.tensors) == {"policy/w"}
    assert new.header.tensors["policy/w"].digest is None
    assert new.header.provenance is not None and new.header.step == 5
    written = vgs_ckpt.save(tmp_path / "v2.safetensors", new.parameters, **new.save_fields())
    assert written.tensors["policy/w"].digest is not None
    assert vgs_ckpt.load(tmp_path / "v2.safetensors").header == written


# --- invalid VGS settings: readable, refused by upgrade() and save() ----------------------

def _legacy_with_eps_zero(path: Path) -> Path:
    obj = payload("L2")
    obj["data"]["vgs_state"]["eps"] = 0.0
    torch.save(obj, path)
    return path


def test_invalid_vgs_settings_can_be_salvaged_with_upgrade_false(tmp_path: Path) -> None:
    path = _legacy_with_eps_zero(tmp_path / "m.pt")
    with pytest.warns(InvalidVGSStateWarning, match=r"vgs_state\.eps") as record:
        ckpt = vgs_ckpt.load(path, upgrade=False)
    assert record[0].filename == __file__
    assert ckpt.parameters["vgs_state"]["eps"] == 0.0
    assert ckpt.header.vgs is not None and ckpt.header.vgs.eps == 0.0  # as found
    with raises_exactly(FormatError, match=r"eps.*upgrade=False"):
        vgs_ckpt.upgrade(ckpt)
    with raises_exactly(FormatError, match=r"vgs_state\.eps.*upgrade=False"):
        vgs_ckpt.load(path)
    with raises_exactly(UsageError, match=r"vgs_state\.eps"):
        vgs_ckpt.save(tmp_path / "x.safetensors", ckpt.parameters, step=0)
    fixed = {**ckpt.parameters, "vgs_state": {**ckpt.parameters["vgs_state"], "eps": 1e-8}}
    vgs_ckpt.save(tmp_path / "x.safetensors", fixed, step=0)  # repaired, it saves


def test_a_stored_header_with_invalid_vgs_settings_is_readable_as_stored(
        tmp_path: Path) -> None:
    from .test_errors import _edit_inner

    data = vgs_ckpt.save_bytes({"vgs_state": make_member()["vgs_state"]}, step=0)

    def zero_eps(inner: dict[str, Any]) -> None:  # in the summary and in the tree alike
        inner["vgs"]["eps"] = 0.0
        [vgs] = [node for key, node in inner["tree"]["dict"] if key == "vgs_state"]
        [pair] = [pair for pair in vgs["dict"] if pair[0] == "eps"]
        pair[1] = {"float": 0.0}
    bad = _edit_inner(data, zero_eps)
    with pytest.warns(InvalidVGSStateWarning):
        ckpt = vgs_ckpt.load_bytes(bad, upgrade=False, verify=False)
    assert ckpt.header.vgs is not None and ckpt.header.vgs.eps == 0.0
    with raises_exactly(FormatError, match="eps"):
        vgs_ckpt.load_bytes(bad)


# --- the edges -------------------------------------------------------------------------

def test_swapped_save_arguments_are_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    with raises_exactly(UsageError, match="swap"):
        vgs_ckpt.save({"w": torch.ones(1)}, path, step=0)  # type: ignore[arg-type]
    with raises_exactly(UsageError, match="swap"):
        vgs_ckpt.save({"w": torch.ones(1)}, str(path), step=0)  # type: ignore[arg-type]
    with raises_exactly(UsageError, match="str or os.PathLike"):
        vgs_ckpt.save(3, {"w": torch.ones(1)}, step=0)  # type: ignore[arg-type]
    assert not path.exists()


@pytest.mark.parametrize(("zip_container", "kind"), [(True, "torch-zip"),
                                                      (False, "torch-pickle")])
def test_read_header_names_the_container_it_found(tmp_path: Path, zip_container: bool,
                                                   kind: str) -> None:
    path = write_legacy(tmp_path / "m.pt", "L2", zip_container=zip_container)
    with raises_exactly(FormatError, match=f"legacy {kind} file") as info:
        vgs_ckpt.read_header(path)
    del info
    with raises_exactly(FormatError, match="not a checkpoint"):
        vgs_ckpt.read_header(_bogus_length(tmp_path / "x.safetensors"))


def _bogus_length(path: Path) -> Path:
    path.write_bytes((2**62).to_bytes(8, "little") + b"{" + b" " * 64)
    return path


def test_store_save_refuses_what_v1_cannot_hold(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with raises_exactly(UsageError, match="no hyperparams or lineage"):
        store.save("0", {"w": torch.ones(1)}, step=1, hyperparams={"lr": 0.1},
                   format="v1_policy_only")
    assert store.latest("0") is None
    store.save("0", {"w": torch.ones(1)}, step=1, format="v1_policy_only")
    assert store.latest("0") is not None


def test_upgrade_tree_and_upgrade_reject_an_unknown_target_alike() -> None:
    with raises_exactly(UsageError, match="unknown target format 'v9'"):
        upgrade_tree(Upgrading(CheckpointFormat.V1_POLICY_ONLY, {}), "v9")  # type: ignore
    ckpt = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"w": torch.ones(1)}, step=0))
    with raises_exactly(UsageError, match="unknown target format 'v9'"):
        vgs_ckpt.upgrade(ckpt, "v9")


def test_the_container_kind_is_one_type_everywhere() -> None:
    kinds = set(typing.get_args(vgs_ckpt.ContainerKind))
    assert kinds == {"safetensors", "torch-zip", "torch-pickle"}
    field = vgs_ckpt.Provenance.model_fields["original_container"]
    assert set(typing.get_args(field.annotation)) == kinds
    hints = typing.get_type_hints(vgs_ckpt.Checkpoint)
    assert hints["container"] == vgs_ckpt.ContainerKind
    assert typing.get_type_hints(vgs_ckpt.Detection)["container"] == vgs_ckpt.ContainerKind


def test_save_and_load_return_the_public_header_type(tmp_path: Path) -> None:
    header = vgs_ckpt.save(tmp_path / "m.safetensors", {"w": torch.ones(1)}, step=0)
    union = typing.get_args(vgs_ckpt.CheckpointHeader)[0]
    assert isinstance(header, union)
    for function in (vgs_ckpt.save, vgs_ckpt.read_header):
        hints = typing.get_type_hints(function, include_extras=True)
        assert hints["return"] == vgs_ckpt.CheckpointHeader
    assert typing.get_type_hints(vgs_ckpt.Checkpoint, include_extras=True)["header"] \
        == vgs_ckpt.CheckpointHeader


def test_the_merged_error_names_still_catch_what_they_caught() -> None:
    with pytest.warns(DeprecationWarning, match="merged"):
        old = vgs_ckpt.SchemaError  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tree_error = vgs_ckpt.TreeError  # type: ignore[attr-defined]
    with pytest.raises(old):
        vgs_ckpt.save_bytes({"w": torch.ones(1)}, step=-1)
    with pytest.raises(tree_error):
        vgs_ckpt.save_bytes({"a": {0: torch.ones(1), "0": torch.zeros(1)}}, step=0)
    with pytest.raises(AttributeError):
        vgs_ckpt.NoSuchError  # type: ignore[attr-defined]  # noqa: B018


@pytest.mark.parametrize(("cls", "kind"), [
    (vgs_ckpt.UsageError, ValueError), (vgs_ckpt.UnsupportedTypeError, TypeError),
    (vgs_ckpt.FormatError, ValueError), (vgs_ckpt.IntegrityError, vgs_ckpt.FormatError),
    (vgs_ckpt.UnsupportedVersionError, ValueError), (vgs_ckpt.UnsafeCheckpointError, ValueError),
    (vgs_ckpt.CheckpointIOError, OSError),
    (vgs_ckpt.CheckpointNotFoundError, vgs_ckpt.CheckpointIOError),
    (vgs_ckpt.MissingDependencyError, ImportError)])
def test_the_taxonomy(cls: type[Exception], kind: type[Exception]) -> None:
    assert issubclass(cls, VgsCkptError) and issubclass(cls, kind)


def test_testing_helpers_raise_under_python_dash_o() -> None:
    script = ("import torch\nfrom vgs_ckpt.testing import assert_trees_equal\n"
              "try:\n    assert_trees_equal({'a': torch.ones(1)}, {'a': torch.zeros(1)})\n"
              "except AssertionError as exc:\n    print('raised', exc)\n")
    out = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True,
                         check=True).stdout
    assert "raised $['a']: tensor bytes differ" in out


def test_inspect_reads_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    legacy_file = write_legacy(tmp_path / "m.pt", "L2")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    assert main(["inspect", str(legacy_file)]) == 0
    assert len(loads) == 1  # unpickled once
    ours = tmp_path / "m.safetensors"
    vgs_ckpt.save(ours, make_member(), step=3)
    opened = []
    import os
    real_open = os.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(ours):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    assert main(["inspect", str(ours)]) == 0
    assert len(opened) == 1
    assert "v2_full_parameters" in capsys.readouterr().out


# --- the lazy reader -------------------------------------------------------------------

def _member_file(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    member = make_member()
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, member, step=7, performance=0.5)
    return path, member


def test_open_gives_header_and_structure_without_reading_tensor_bytes(
        tmp_path: Path, hashed: HashCounter) -> None:
    path, member = _member_file(tmp_path)
    hashed.calls = hashed.bytes = 0
    with vgs_ckpt.open(path) as reader:
        assert reader.header.step == 7 and reader.format == "v2_full_parameters"
        assert reader.container == "safetensors"
        assert reader.keys() == list(member)
        structure = reader.structure()
        spec = structure["policy"]["0.weight"]
        assert (spec.name, spec.dtype, spec.shape) == ("policy/0.weight", "F32", (3, 4))
        assert structure["kl_penalty_state"] == member["kl_penalty_state"]  # plain values
        assert reader.bytes_read == 0
    assert hashed.bytes == 0


def test_open_loads_a_subtree_reading_and_verifying_only_its_tensors(
        tmp_path: Path, hashed: HashCounter) -> None:
    path, member = _member_file(tmp_path)
    hashed.calls = hashed.bytes = 0
    with vgs_ckpt.open(path) as reader:
        policy = reader["policy"]
        assert_trees_equal(policy, member["policy"])
        assert reader.bytes_read == _tensor_bytes(member["policy"]) == hashed.bytes
        assert reader.load(["policy", "0.weight"]) is policy["0.weight"]  # made once
        assert reader.load("policy")["0.weight"] is policy["0.weight"]  # a key on its own
        assert hashed.bytes == _tensor_bytes(member["policy"])  # verified once
        step = reader.load(["policy.optimizer", "state", 0, "step"])
        assert torch.equal(step, member["policy.optimizer"]["state"][0]["step"])
        assert torch.equal(reader.tensor("policy/2.bias"), member["policy"]["2.bias"])
        assert reader.get_tensor("policy/2.bias") is reader.tensor("policy/2.bias")
        assert_trees_equal(reader.load(), member)
    assert_trees_equal(policy, member["policy"])  # still valid after close


def test_open_names_the_tensor_that_fails_and_reads_the_others(tmp_path: Path) -> None:
    path, member = _member_file(tmp_path)
    # Corrupt one byte of an optimizer tensor (found by the safetensors header): the
    # policy still reads fine.
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    table = json.loads(data[8:8 + length])
    begin, _ = table["policy.optimizer/state/0/exp_avg"]["data_offsets"]
    data[8 + length + begin] ^= 0xFF
    path.write_bytes(bytes(data))
    with vgs_ckpt.open(path) as reader:
        assert_trees_equal(reader["policy"], member["policy"])
        with raises_exactly(IntegrityError, match="'policy.optimizer/state/0/exp_avg'"):
            reader["policy.optimizer"]
    with vgs_ckpt.open(path, verify=False) as reader:
        reader["policy.optimizer"]  # salvage


def test_open_errors(tmp_path: Path) -> None:
    path, _ = _member_file(tmp_path)
    with vgs_ckpt.open(path) as reader:
        with raises_exactly(UsageError, match=r"no \['nope'\]"):
            reader.load(["nope"])
        with raises_exactly(UsageError, match=r"no \['policy'\]\['nope'\]"):
            reader.load(["policy", "nope"])
        with raises_exactly(UsageError, match="no tensor 'nope'"):
            reader.tensor("nope")
    with raises_exactly(UsageError, match="closed"):
        reader.load(["policy"])
    with raises_exactly(vgs_ckpt.CheckpointNotFoundError):
        vgs_ckpt.open(tmp_path / "missing.safetensors")
    with raises_exactly(UsageError, match="load_bytes"):
        vgs_ckpt.open(b"bytes")  # type: ignore[arg-type]


def test_open_serves_a_legacy_file_from_memory(tmp_path: Path) -> None:
    path = write_legacy(tmp_path / "m.pt", "L2")
    with vgs_ckpt.open(path) as reader:
        assert reader.container == "torch-zip" and reader.format == "v2_full_parameters"
        assert_trees_equal(reader["policy"], payload("L2")["data"]["policy"])
        assert reader.structure()["policy"]["0.weight"].shape == (3, 4)
        assert reader.bytes_read == _tensor_bytes(payload("L2")["data"])
        with raises_exactly(UsageError, match="no tensor names"):
            reader.tensor("policy/0.weight")
