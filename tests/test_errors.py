"""Every error path of the codec: bad input trees, malformed and corrupt files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vgs_ckpt
from vgs_ckpt import (
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    UnsupportedTypeError,
    UnsupportedVersionError,
    UsageError,
    VgsCkptError,
)

from .conftest import make_vgs_state, raises_exactly


def _good() -> bytes:
    return vgs_ckpt.save_bytes({"policy": {"w": torch.arange(6.0).reshape(2, 3)}}, step=1)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _edit_inner(data: bytes, edit: Any) -> bytes:
    header, body = _split(data)
    inner = json.loads(header["__metadata__"]["vgs_ckpt.header"])
    edit(inner)
    header["__metadata__"]["vgs_ckpt.header"] = json.dumps(inner)
    return _join(header, body)


@pytest.mark.parametrize(("cls", "builtin"), [
    (vgs_ckpt.FormatError, ValueError), (vgs_ckpt.IntegrityError, ValueError),
    (vgs_ckpt.UnsupportedVersionError, ValueError), (vgs_ckpt.UnsupportedTypeError, TypeError),
    (vgs_ckpt.UnsafeCheckpointError, ValueError),
    (vgs_ckpt.CheckpointNotFoundError, FileNotFoundError),
    (vgs_ckpt.CheckpointIOError, OSError), (vgs_ckpt.UsageError, ValueError),
    (vgs_ckpt.ArgumentError, TypeError), (vgs_ckpt.ArgumentError, vgs_ckpt.UsageError)])
def test_every_error_refines_a_builtin(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, VgsCkptError)
    assert issubclass(cls, builtin)


# --- refused input trees -------------------------------------------------------------

class Opaque:
    pass


@pytest.mark.parametrize(("tree", "where"), [
    ({"policy": {"act": Opaque()}}, "['policy']['act']"),
    ({"a": [1, {2.5: 1}]}, "['a'][1]"),
    ({"a": {(1, 2): 1}}, "['a']"),
    ({"a": {True: 1}}, "['a']"),
    ({"s": {1, 2}}, "['s']"),
    ({"c": 1 + 2j}, "['c']"),
    ({"b": b"bytes"}, "['b']"),
    ({"t": torch.ones(2, dtype=torch.complex128)}, "['t']"),
    ({"n": np.array(["x"])}, "['n']"),
    ({"n": np.ones(2, dtype=np.complex128)}, "['n']"),
    ({"sp": torch.ones(2, 2).to_sparse()}, "['sp']"),
    ({"m": torch.empty(2, device="meta")}, "['m']"),
    ({"u": "\ud800"}, "['u']"),
])
def test_unsupported_leaves_are_refused_with_their_path(tree: dict[str, Any], where: str
                                                        ) -> None:
    with raises_exactly(UnsupportedTypeError, match=__import__("re").escape(where)):
        vgs_ckpt.save_bytes(tree, step=0)


def test_root_must_be_a_dict() -> None:
    with raises_exactly(UnsupportedTypeError, match="must be a dict"):
        vgs_ckpt.save_bytes([torch.ones(1)], step=0)  # type: ignore[arg-type]


def test_colliding_tensor_names_are_refused() -> None:
    with raises_exactly(UsageError, match="'a/0'"):
        vgs_ckpt.save_bytes({"a": {0: torch.ones(1), "0": torch.zeros(1)}}, step=0)


def test_reserved_tensor_name_is_refused() -> None:
    with raises_exactly(UsageError, match="__metadata__"):
        vgs_ckpt.save_bytes({"__metadata__": torch.ones(1)}, step=0)


def test_nothing_is_pickled_even_for_picklable_objects(tmp_path: Path) -> None:
    with raises_exactly(UnsupportedTypeError, match="never pickles"):
        vgs_ckpt.save(tmp_path / "x.safetensors", {"f": Path("x")}, step=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"step": -1}, "step"),
    ({"step": 0, "performance": math.nan}, "performance"),
    ({"step": 0, "performance": math.inf}, "performance"),
    ({"step": 0, "member_id": ""}, "member_id"),
    ({"step": 0, "hyperparams": {"lr": math.nan}}, "hyperparams"),
    ({"step": 0, "hyperparams": {"f": Opaque()}}, "hyperparams"),
])
def test_invalid_header_fields_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with raises_exactly(UsageError, match=field):
        vgs_ckpt.save_bytes({"w": torch.ones(1)}, **kwargs)


@pytest.mark.parametrize(("key", "value"), [
    ("beta", 1.0), ("beta", 0.0), ("beta", 1.5), ("eps", 0.0), ("alpha", -1.0),
    ("warmup_steps", -1), ("step_count", -3), ("min_scaling_factor", 0.0),
    ("variance_cap", -1.0), ("beta", "0.9"),
])
def test_invalid_vgs_state_is_refused(key: str, value: Any) -> None:
    state = {**make_vgs_state(), key: value}
    with raises_exactly(UsageError, match=f"vgs_state.{key}"):
        vgs_ckpt.save_bytes({"vgs_state": state}, step=0)


def test_unknown_vgs_version_is_refused() -> None:
    with raises_exactly(UnsupportedVersionError, match="'9.0'"):
        vgs_ckpt.save_bytes({"vgs_state": {**make_vgs_state(), "vgs_version": "9.0"}}, step=0)


def test_vgs_state_of_wrong_type_is_refused() -> None:
    with raises_exactly(UsageError, match="vgs_state"):
        vgs_ckpt.save_bytes({"vgs_state": [1, 2]}, step=0)


def test_v1_with_hyperparams_is_a_usage_error() -> None:
    with raises_exactly(UsageError, match="v2_full_parameters"):
        vgs_ckpt.save_bytes({"w": torch.ones(1)}, step=0, hyperparams={"lr": 1.0},
                            format=vgs_ckpt.CheckpointFormat.V1_POLICY_ONLY)


def test_bad_map_location_is_a_usage_error() -> None:
    with raises_exactly(UsageError, match="map_location"):
        vgs_ckpt.load_bytes(_good(), map_location="nonsense:0")


# --- malformed and corrupt files -------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    with raises_exactly(CheckpointNotFoundError, match="nope"):
        vgs_ckpt.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        vgs_ckpt.read_header(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -1, -7])
def test_truncated_files_are_refused(cut: int) -> None:
    data = _good()
    with raises_exactly(FormatError):
        vgs_ckpt.load_bytes(data[:cut] if cut else b"")


def test_truncated_file_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    path.write_bytes(_good()[:-3])
    with raises_exactly(FormatError, match="t.safetensors"):
        vgs_ckpt.load(path)


def test_trailing_bytes_are_refused() -> None:
    with raises_exactly(FormatError, match="trailing bytes"):
        vgs_ckpt.load_bytes(_good() + b"\0")


def test_header_length_beyond_the_file() -> None:
    data = _good()
    with raises_exactly(FormatError, match="past the end"):
        vgs_ckpt.load_bytes(struct.pack("<Q", len(data)) + data[8:])


def test_huge_header_length() -> None:
    with raises_exactly(FormatError):
        vgs_ckpt.load_bytes(struct.pack("<Q", 2**62) + b"{" + b" " * 100)


def test_malformed_outer_json() -> None:
    data = _good()
    broken = data[:8] + b"{" + b"x" + data[10:]
    with raises_exactly(FormatError, match="malformed"):
        vgs_ckpt.load_bytes(broken)


def test_malformed_inner_json() -> None:
    header, body = _split(_good())
    header["__metadata__"]["vgs_ckpt.header"] = "{not json"
    with raises_exactly(FormatError, match="malformed vgs_ckpt header"):
        vgs_ckpt.load_bytes(_join(header, body))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dtype", "F99", "unknown dtype"),
    ("dtype", "F64", "needs 48 bytes"),
    ("shape", [2, 2], "needs 16 bytes"),
    ("shape", [-1, 3], "non-negative"),
    ("data_offsets", [0, 20], "needs 24 bytes"),
    ("data_offsets", [4, 28], "gap"),
    ("data_offsets", [24, 0], "begin"),
])
def test_wrong_dtype_shape_or_offsets(field: str, value: Any, message: str) -> None:
    header, body = _split(_good())
    header["policy/w"][field] = value
    with raises_exactly(FormatError, match=message):
        vgs_ckpt.load_bytes(_join(header, body))


def test_overlapping_offsets() -> None:
    data = vgs_ckpt.save_bytes({"a": torch.ones(2), "b": torch.ones(2)}, step=0)
    header, body = _split(data)
    header["b"]["data_offsets"] = [4, 12]
    with raises_exactly(FormatError, match="overlaps|gap"):
        vgs_ckpt.load_bytes(_join(header, body))


def test_index_disagreeing_with_container() -> None:
    def edit(inner: dict[str, Any]) -> None:
        inner["tensors"]["policy/w"]["shape"] = [3, 2]
    with raises_exactly(FormatError, match="index says"):
        vgs_ckpt.load_bytes(_edit_inner(_good(), edit))


def test_flipped_tensor_byte_names_the_tensor(tmp_path: Path) -> None:
    data = bytearray(vgs_ckpt.save_bytes({"policy": {"w": torch.zeros(4), "b": torch.ones(2)}},
                                         step=0))
    data[-1] ^= 0x01
    path = tmp_path / "bad.safetensors"
    path.write_bytes(bytes(data))
    # Tensors are laid out by name, so the last byte belongs to "policy/w".
    with raises_exactly(IntegrityError, match=r"bad\.safetensors: tensor 'policy/w'"):
        vgs_ckpt.load(path)
    # verify=False salvages the data as stored
    assert vgs_ckpt.load(path, verify=False).parameters["policy"]["w"][3].item() != 0.0


def test_large_tensor_corruption_is_caught_by_the_chunked_hash() -> None:
    big = torch.zeros(3_000_000)  # 12 MB: hashed on the worker thread
    data = bytearray(vgs_ckpt.save_bytes({"big": big}, step=0))
    data[-5] ^= 0x10
    with raises_exactly(IntegrityError, match="'big'"):
        vgs_ckpt.load_bytes(bytes(data))


def test_newer_format_is_refused_by_name() -> None:
    header, body = _split(_good())
    header["__metadata__"]["vgs_ckpt.format_version"] = "v3_future"
    with raises_exactly(UnsupportedVersionError, match="v3_future"):
        vgs_ckpt.load_bytes(_join(header, body))
    with raises_exactly(UnsupportedVersionError, match="v3_future"):
        vgs_ckpt.detect_format(_join(header, body))


def test_unknown_format_string_is_a_format_error() -> None:
    header, body = _split(_good())
    header["__metadata__"]["vgs_ckpt.format_version"] = "banana"
    with raises_exactly(FormatError, match="banana"):
        vgs_ckpt.load_bytes(_join(header, body))


def test_metadata_and_header_format_must_agree() -> None:
    header, body = _split(_good())
    header["__metadata__"]["vgs_ckpt.format_version"] = "v1_policy_only"
    with raises_exactly(FormatError, match="header says"):
        vgs_ckpt.load_bytes(_join(header, body))


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    import safetensors.torch

    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    with raises_exactly(FormatError, match="not a vgs_ckpt checkpoint"):
        vgs_ckpt.load(path)


def test_random_bytes_are_not_a_checkpoint() -> None:
    with raises_exactly(FormatError, match="not a checkpoint"):
        vgs_ckpt.load_bytes(b"GIF89a" + b"\0" * 64)


def test_schema_violation_in_stored_header_is_reported_with_field() -> None:
    def edit(inner: dict[str, Any]) -> None:
        inner["step"] = -5
    with raises_exactly(FormatError, match="step"):
        vgs_ckpt.load_bytes(_edit_inner(_good(), edit))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda inner: inner["tensors"]["policy/w"].update(digest=None), "has no digest"),
    (lambda inner: inner.update(vgs=[1]), "has a VGS summary but the tree has no"),
])
def test_stored_header_fields_that_memory_allows_but_files_do_not(edit: Any,
                                                                  message: str) -> None:
    with raises_exactly(FormatError, match=message):
        vgs_ckpt.load_bytes(_edit_inner(_good(), edit))


def test_stored_header_that_is_not_an_object() -> None:
    header, body = _split(_good())
    header["__metadata__"]["vgs_ckpt.header"] = "[1, 2]"
    with raises_exactly(FormatError, match="not a JSON object"):
        vgs_ckpt.load_bytes(_join(header, body))


def test_paths_that_are_not_paths_are_usage_errors() -> None:
    with raises_exactly(UsageError, match="use load_bytes"):
        vgs_ckpt.load(3)  # type: ignore[arg-type]  # would otherwise open file descriptor 3
    with raises_exactly(UsageError, match="use load_bytes"):
        vgs_ckpt.read_header(b"m.safetensors")  # type: ignore[arg-type]
    with raises_exactly(UsageError, match="use load for a path"):
        vgs_ckpt.load_bytes("m.safetensors")  # type: ignore[arg-type]


def test_unknown_header_fields_are_ignored() -> None:
    def edit(inner: dict[str, Any]) -> None:
        inner["added_in_a_later_minor_version"] = {"x": 1}
    ckpt = vgs_ckpt.load_bytes(_edit_inner(_good(), edit))
    assert ckpt.header.step == 1


@pytest.mark.parametrize("node", [{"bogus": 1}, {"tensor": 3}, {"dict": [[1]]}, {"float": "x"},
                                  {"list": 5}, {"tensor": "missing"}, {}])
def test_malformed_tree_nodes(node: Any) -> None:
    def edit(inner: dict[str, Any]) -> None:
        inner["tree"]["dict"].append(["extra", node])
    with raises_exactly(FormatError):
        vgs_ckpt.load_bytes(_edit_inner(_good(), edit))


def test_tampered_vgs_summary_is_detected() -> None:
    data = vgs_ckpt.save_bytes({"vgs_state": make_vgs_state(step_count=10)}, step=0)

    def edit(inner: dict[str, Any]) -> None:
        inner["vgs"]["step_count"] = 4
    with raises_exactly(FormatError, match="VGS summary"):
        vgs_ckpt.load_bytes(_edit_inner(data, edit))


@pytest.mark.parametrize("node", [{"tensor": "policy/w", "extra": 1},
                                  {"dict": [], "list": []},
                                  {"dict": [], "ordered": False},
                                  {"tensor": "policy/w", "requires_grad": "yes"}])
def test_tree_nodes_with_extra_members_or_bad_flags_are_refused(node: Any) -> None:
    def edit(inner: dict[str, Any]) -> None:
        inner["tree"]["dict"].append(["extra", node])
    with raises_exactly(FormatError):
        vgs_ckpt.load_bytes(_edit_inner(_good(), edit))


def test_format_may_be_given_as_a_string_and_unknown_ones_are_refused() -> None:
    data = vgs_ckpt.save_bytes({"w": torch.ones(1)}, step=0,
                               format="v1_policy_only")
    assert vgs_ckpt.detect_format(data).format == "v1_policy_only"
    with raises_exactly(UsageError, match="v9_new"):
        vgs_ckpt.save_bytes({"w": torch.ones(1)}, step=0, format="v9_new")


def test_one_tensor_referenced_as_torch_and_numpy_is_refused() -> None:
    def edit(inner: dict[str, Any]) -> None:
        inner["tree"]["dict"].append(["alias", {"ndarray": "policy/w"}])
    with raises_exactly(FormatError, match="both as a torch tensor and as a numpy array"):
        vgs_ckpt.load_bytes(_edit_inner(_good(), edit))


def test_invalid_path_is_a_usage_error() -> None:
    with raises_exactly(UsageError, match="invalid checkpoint path"):
        vgs_ckpt.load("bad\0name.safetensors")
    with raises_exactly(UsageError, match="invalid checkpoint path"):
        vgs_ckpt.detect_format("bad\0name.safetensors")
