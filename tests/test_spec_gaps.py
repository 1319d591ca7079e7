"""The gaps of issue #20, one test each where the rule is about the library's API, the
writer or the documents (the reading rules have conformance vectors too:
tests/test_conformance.py)."""

from __future__ import annotations

import json
import re
import struct
import warnings
from collections import OrderedDict
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

import vgs_ckpt
from vgs_ckpt import (
    FormatError,
    InvalidVGSStateWarning,
    UnsupportedVersionError,
    UsageError,
)
from vgs_ckpt.cli import main
from vgs_ckpt.upgrades.steps import FORMAT_STEPS, VGS_STEPS

from . import spec_writer
from .conftest import make_vgs_state

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "conformance" / "vectors"
SPEC = (ROOT / "docs" / "spec.md").read_text(encoding="utf-8")
FLAT = " ".join(SPEC.split())  # the spec's words, lines joined


def _vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def _inner(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack_from("<Q", data)
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["vgs_ckpt.header"])


def test_gap_01_duplicate_members_are_refused_at_every_level() -> None:
    for name in ("bad_duplicate_container_member", "bad_duplicate_metadata_member",
                 "bad_duplicate_header_member", "bad_duplicate_nested_member"):
        with pytest.raises(FormatError, match="duplicate member name"):
            vgs_ckpt.load_bytes(_vector(f"{name}.safetensors"))


def test_gap_02_format_pt_is_required() -> None:
    for name in ("bad_format_np", "bad_format_missing"):
        with pytest.raises(FormatError, match="must be \"pt\""):
            vgs_ckpt.load_bytes(_vector(f"{name}.safetensors"))


def test_gap_03_padding_and_alignment() -> None:
    with pytest.raises(FormatError, match="not a multiple of 8"):
        vgs_ckpt.load_bytes(_vector("bad_unaligned_data.safetensors"))
    with pytest.raises(FormatError, match="only spaces"):
        vgs_ckpt.load_bytes(_vector("bad_newline_padding.safetensors"))
    with pytest.raises(FormatError, match="not a multiple of its element size"):
        vgs_ckpt.load_bytes(_vector("bad_misaligned_tensor.safetensors"))


def test_gap_04_the_nesting_limits_are_the_stated_ones() -> None:
    nested: Any = 0
    for _ in range(510):  # 512 JSON levels with the header and hyperparams objects
        nested = [nested]
    data = vgs_ckpt.save_bytes({"x": 1}, step=0, hyperparams={"d": nested})
    assert vgs_ckpt.load_bytes(data).header.hyperparams["d"] == nested
    with pytest.raises(UsageError, match="would not read back"):
        vgs_ckpt.save_bytes({"x": 1}, step=0, hyperparams={"d": [nested]})
    tree: Any = torch.ones(1)
    for _ in range(63):
        tree = [tree]
    assert vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"t": tree}, step=0)).parameters["t"]
    with pytest.raises(UsageError, match="more than 64 containers"):
        vgs_ckpt.save_bytes({"t": [tree]}, step=0)
    with pytest.raises(FormatError, match="more than 64 containers"):
        vgs_ckpt.load_bytes(_vector("bad_tree_65_deep.safetensors"))


def test_gap_05_writers_refuse_integers_readers_cannot_parse(tmp_path: Path) -> None:
    largest = 10**4300 - 1  # 4300 digits: readers must accept it
    assert vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"x": largest}, step=0)
                               ).parameters["x"] == largest
    for tree, fields in (({"x": 10**4300}, {}), ({"x": -(10**5000)}, {}),
                         ({"x": 1}, {"hyperparams": {"n": 10**5000}})):
        path = tmp_path / "m.safetensors"
        with pytest.raises(UsageError, match="4300|read back"):
            vgs_ckpt.save(path, tree, step=0, **fields)
        assert not path.exists()


def test_gap_06_overflowing_numbers_are_refused_everywhere() -> None:
    for name in ("bad_float_overflow_tree", "bad_float_overflow_hyperparams",
                 "bad_float_overflow_vgs"):
        with pytest.raises(FormatError, match="overflows binary64"):
            vgs_ckpt.load_bytes(_vector(f"{name}.safetensors"))


def test_gap_07_one_object_per_reference_and_flags() -> None:
    parameter = torch.nn.Parameter(torch.ones(2))
    graded = torch.zeros(1).requires_grad_(True)
    tree = {"a": parameter, "b": parameter, "view": parameter.detach(), "g": [graded, graded]}
    out = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(tree, step=0)).parameters
    assert out["a"] is out["b"] and isinstance(out["a"], torch.nn.Parameter)
    assert out["g"][0] is out["g"][1] and out["g"][0].requires_grad
    # Other flags: another object, the same memory (as parameter.detach() is).
    assert out["view"] is not out["a"] and not isinstance(out["view"], torch.nn.Parameter)
    assert out["view"].data_ptr() == out["a"].data_ptr()
    with vgs_ckpt.open(_write(tree)) as reader:
        both = reader.load()
        assert both["a"] is both["b"]


def _write(tree: dict[str, Any]) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "t.safetensors"
    vgs_ckpt.save(path, tree, step=0)
    return path


def test_gap_08_npscalar_needs_a_0d_tensor() -> None:
    with pytest.raises(FormatError, match="npscalar node refers to tensor 'a' of shape"):
        vgs_ckpt.load_bytes(_vector("bad_tree_npscalar_1d.safetensors"))
    out = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"s": np.float32(1.5)}, step=0))
    assert type(out.parameters["s"]) is np.float32


def test_gap_09_every_tensor_is_referenced_and_named_by_its_path() -> None:
    with pytest.raises(FormatError, match="no tree node refers to it"):
        vgs_ckpt.load_bytes(_vector("bad_tree_unreferenced_tensor.safetensors"))
    with pytest.raises(FormatError, match="so it must be named 'n'"):
        vgs_ckpt.load_bytes(_vector("bad_tree_name_not_path.safetensors"))


def test_gap_10_numpy_nodes_need_a_numpy_dtype() -> None:
    assert "`ndarray` and `npscalar` nodes MUST reference a tensor whose dtype numpy" in FLAT
    for name in ("bad_tree_ndarray_bf16", "bad_tree_ndarray_f8"):
        with pytest.raises(FormatError, match="numpy has no such dtype"):
            vgs_ckpt.load_bytes(_vector(f"{name}.safetensors"))


def test_gap_11_a_numpy_array_and_a_torch_view_of_it_are_two_tensors() -> None:
    array = np.arange(3, dtype=np.float32)
    data = vgs_ckpt.save_bytes({"a": array, "t": torch.from_numpy(array)}, step=0)
    assert set(_inner(data)["tensors"]) == {"a", "t"}
    out = vgs_ckpt.load_bytes(data).parameters
    assert type(out["a"]) is np.ndarray and type(out["t"]) is torch.Tensor


def test_gap_12_lone_surrogates_are_refused_by_writers_and_readers() -> None:
    with pytest.raises(vgs_ckpt.UnsupportedTypeError, match="not valid Unicode"):
        vgs_ckpt.save_bytes({"s": "\ud800"}, step=0)
    for name in ("bad_lone_surrogate", "bad_lone_surrogate_key"):
        with pytest.raises(FormatError, match="lone surrogate"):
            vgs_ckpt.load_bytes(_vector(f"{name}.safetensors"))


def test_gap_13_writers_refuse_non_numbers() -> None:
    for value in (True, "1", float("nan")):
        with pytest.raises(UsageError, match="performance"):
            vgs_ckpt.save_bytes({"x": 1}, step=0, performance=value)
    assert vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(
        {"x": 1}, step=0, performance=np.float32(0.5))).header.performance == 0.5
    with pytest.raises(UsageError, match="time zone"):
        vgs_ckpt.save_bytes({"x": 1}, step=0, created_at=datetime(2026, 1, 1))
    with pytest.raises(UsageError, match="exploited_from.performance"):
        vgs_ckpt.save_bytes({"x": 1}, step=0, lineage={"exploited_from": {
            "member_id": "a", "step": 1, "performance": True}})
    for name in ("bad_performance_true", "bad_performance_string", "bad_created_at_int",
                 "bad_created_at_float", "bad_created_at_digits", "bad_step_float",
                 "bad_has_optimizer_state_string", "bad_provenance_flag_int"):
        with pytest.raises(FormatError):
            vgs_ckpt.load_bytes(_vector(f"{name}.safetensors"))


def test_gap_14_rfc_3339_as_the_spec_profiles_it() -> None:
    for name in ("created_at_space", "created_at_leap_second", "created_at_no_zone",
                 "created_at_february_30", "created_at_year_0"):
        with pytest.raises(FormatError, match="created_at"):
            vgs_ckpt.load_bytes(_vector(f"bad_{name}.safetensors"))
    read = vgs_ckpt.load_bytes(_vector("ok_created_at_offset.safetensors"))
    assert read.header.created_at == datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)


@pytest.mark.parametrize("summary", ["matching", "null", "partial"])
@pytest.mark.parametrize("setting", ["beta_1_5", "alpha_negative", "eps_zero",
                                     "min_scaling_factor_zero"])
def test_gap_15_invalid_v2_settings_can_be_salvaged(tmp_path: Path, setting: str,
                                                    summary: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(_vector(f"salvage_{setting}_{summary}_summary.safetensors"))
    with pytest.warns(InvalidVGSStateWarning, match="invalid VGS state"):
        stored = vgs_ckpt.load(path, upgrade=False)
    assert stored.parameters["vgs_state"]["step_count"] == 10  # the data is all there
    with pytest.warns(InvalidVGSStateWarning), vgs_ckpt.open(path) as reader:
        assert reader["vgs_state"]["vgs_version"] == "3.2"
    with pytest.raises(FormatError, match="upgrade=False to salvage"):
        vgs_ckpt.load(path)
    with pytest.raises(FormatError, match="invalid VGS state"):
        vgs_ckpt.upgrade(stored)
    with pytest.raises(UsageError, match="invalid VGS state"):
        vgs_ckpt.save(tmp_path / "again.safetensors", stored.parameters, step=1)


def test_gap_16_an_unknown_vgs_version_is_unsupported_from_every_reader(tmp_path: Path
                                                                        ) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(_vector("bad_vgs_version_unknown.safetensors"))
    for read in (lambda: vgs_ckpt.load(path), lambda: vgs_ckpt.load(path, upgrade=False),
                 lambda: vgs_ckpt.open(path), lambda: vgs_ckpt.read_header(path)):
        with pytest.raises(UnsupportedVersionError, match="9.9"):
            read()
    with pytest.raises(UnsupportedVersionError):
        vgs_ckpt.save_bytes({"vgs_state": {**make_vgs_state(), "vgs_version": "9.9"}}, step=0)


def test_gap_17_summary_statistics_are_strict() -> None:
    for name in ("nan_lower", "string", "bool"):
        with pytest.raises(FormatError, match="summary is invalid"):
            vgs_ckpt.load_bytes(_vector(f"bad_vgs_summary_stat_{name}.safetensors"),
                                upgrade=False)


@pytest.mark.parametrize("value", [np.array([12.0, 3.0], dtype=np.float32), [12.0, 3.0]])
def test_gap_18_per_parameter_members_are_tensors_or_none(value: Any) -> None:
    with pytest.raises(UsageError, match="param_numel: must be a torch tensor"):
        vgs_ckpt.save_bytes({"vgs_state": {**make_vgs_state(), "param_numel": value}}, step=0)
    data = vgs_ckpt.save_bytes({"vgs_state": make_vgs_state()}, step=0)
    assert _inner(data)["vgs"]["param_numel"] == "vgs_state/param_numel"


@pytest.mark.parametrize(("key", "value"), [
    ("alpha", torch.tensor(0.1)), ("step_count", np.int64(3)), ("beta", np.float64(0.9)),
    ("grad_mean_ema", True), ("enabled", 1), ("warmup_steps", 1.0)])
def test_gap_19_writers_refuse_vgs_scalars_that_are_not_plain(key: str, value: Any) -> None:
    with pytest.raises(UsageError, match=f"vgs_state.{key}"):
        vgs_ckpt.save_bytes({"vgs_state": {**make_vgs_state(), key: value}}, step=0)
    from vgs_ckpt.vgs import VarianceGradientScaler

    scaler = VarianceGradientScaler([torch.nn.Parameter(torch.ones(2))])
    vgs_ckpt.save_bytes({"vgs_state": scaler.state_dict()}, step=0)  # the scaler's are plain


def test_gap_20_the_vgs_state_key_set() -> None:
    state = {**make_vgs_state(), "my_note": "kept"}
    out = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"vgs_state": state}, step=0))
    assert out.parameters["vgs_state"]["my_note"] == "kept"
    assert "my_note" not in _inner(vgs_ckpt.save_bytes({"vgs_state": state}, step=0))["vgs"]
    for required in ("beta", "alpha", "eps", "warmup_steps", "step_count"):
        broken = {k: v for k, v in make_vgs_state().items() if k != required}
        with pytest.raises(UsageError, match=f"vgs_state.{required}: Field required"):
            vgs_ckpt.save_bytes({"vgs_state": broken}, step=0)
    minimal = {"beta": 0.9, "alpha": 0, "eps": 1e-8, "warmup_steps": 0, "step_count": 0,
               "vgs_version": "3.2"}
    assert vgs_ckpt.load_bytes(vgs_ckpt.save_bytes({"vgs_state": minimal}, step=0)).header.vgs


def test_gap_21_the_spec_states_every_layout_and_upgrade_step() -> None:
    appendix = SPEC[SPEC.index("## Appendix A"):]
    for layout in ("L0", "L1", "L2"):
        assert f"**{layout}**" in appendix
    for step in (*FORMAT_STEPS, *VGS_STEPS):
        assert f"`{step.name}`" in appendix


def test_gap_22_has_optimizer_state_is_checked() -> None:
    data = vgs_ckpt.save_bytes({"w": torch.ones(1), "optimizer_state": {"lr": 1.0}}, step=0,
                               format="v1_policy_only")
    assert _inner(data)["has_optimizer_state"] is True
    with pytest.raises(FormatError, match="has_optimizer_state is false"):
        vgs_ckpt.load_bytes(_vector("bad_has_optimizer_state_false.safetensors"))
    legacy = vgs_ckpt.load_bytes(_vector("legacy_L1_flag_disagrees.pt"), upgrade=False)
    assert legacy.header.has_optimizer_state is True  # a legacy file is read as it is


# Every keyword of JSON Schema 2020-12, by what its value holds.
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "dependentSchemas"}
_SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
_SCHEMA_ONE = {"additionalProperties", "items", "contains", "not", "if", "then", "else",
               "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema"}
_OTHER = {"$schema", "$id", "$ref", "$anchor", "$dynamicRef", "$dynamicAnchor",
          "$vocabulary", "$comment", "type", "enum", "const", "multipleOf", "maximum",
          "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength", "minLength",
          "pattern", "maxItems", "minItems", "uniqueItems", "maxContains", "minContains",
          "maxProperties", "minProperties", "required", "dependentRequired", "title",
          "description", "default", "deprecated", "readOnly", "writeOnly", "examples",
          "format", "contentEncoding", "contentMediaType"}


def _keywords(schema: Any, where: str) -> list[str]:
    """Every key of ``schema`` in a schema position that is not a 2020-12 keyword."""
    if isinstance(schema, bool):
        return []
    bad = [f"{where}.{k}" for k in schema
           if k not in _SCHEMA_MAPS | _SCHEMA_LISTS | _SCHEMA_ONE | _OTHER]
    for key, value in schema.items():
        if key in _SCHEMA_MAPS:
            for name, sub in value.items():
                bad += _keywords(sub, f"{where}.{key}.{name}")
        elif key in _SCHEMA_LISTS:
            for i, sub in enumerate(value):
                bad += _keywords(sub, f"{where}.{key}[{i}]")
        elif key in _SCHEMA_ONE:
            bad += _keywords(value, f"{where}.{key}")
    return bad


def test_gap_23_schema_uses_json_schema_keywords_only() -> None:
    documents = {p.stem.split(".")[0]: json.loads(p.read_text())
                 for p in (ROOT / "schema").glob("*.schema.json")}
    assert set(documents) == {"container", "header", "checkpoint_v1", "checkpoint_v2",
                              "vgs_state"}
    for name, document in documents.items():
        jsonschema.Draft202012Validator.check_schema(document)
        assert _keywords(document, name) == []
    vgs = jsonschema.Draft202012Validator(documents["vgs_state"])
    good = {"vgs_version": "3.2", "beta": 0.9, "alpha": 0.1, "eps": 1e-8,
            "warmup_steps": 0, "step_count": 0}
    assert vgs.is_valid(good)
    for change in ({"alpha": -1}, {"eps": 0}, {"variance_cap": -1}, {"beta": 1.0},
                   {"min_scaling_factor": 0}, {"beta": True}, {"step_count": Decimal("1.0")},
                   {"grad_mean_ema": "nan"}, {"grad_mean_ema": "0.5"}):
        assert not vgs.is_valid({**good, **change}), change


def test_gap_24_writers_refuse_bool_bytes_other_than_0_and_1() -> None:
    raw = torch.tensor([0, 2], dtype=torch.uint8)
    with pytest.raises(UsageError, match="bytes other than 0 and 1"):
        vgs_ckpt.save_bytes({"m": raw.view(torch.bool)}, step=0)
    with pytest.raises(UsageError, match="bytes other than 0 and 1"):
        vgs_ckpt.save_bytes({"m": np.array([3], dtype=np.uint8).view(np.bool_)}, step=0)
    with pytest.raises(FormatError, match="BOOL holds bytes other than 0 and 1"):
        vgs_ckpt.load_bytes(_vector("bad_bool_byte_2.safetensors"))


def test_gap_25_verify_says_the_header_is_not_covered(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    path = tmp_path / "edited.safetensors"
    path.write_bytes(_vector("ok_header_edit_not_covered.safetensors"))
    assert main(["verify", str(path)]) == 0
    assert "no digest covers it" in capsys.readouterr().out
    assert "Digests cover the tensor bytes only" in FLAT


def test_gap_26_unknown_members_are_ignored_in_nested_objects_too() -> None:
    out = vgs_ckpt.load_bytes(_vector("ok_unknown_members.safetensors"))
    assert out.header.producer.name == "vgs_ckpt"
    with pytest.raises(FormatError, match="unknown members"):
        vgs_ckpt.load_bytes(_vector("bad_tree_unknown_member.safetensors"))


def test_gap_27_empty_keys_give_empty_segments() -> None:
    data = vgs_ckpt.save_bytes({"": torch.ones(1), "n": {"": torch.zeros(1)}}, step=0)
    assert list(_inner(data)["tensors"]) == ["", "n/"]
    out = vgs_ckpt.load_bytes(data).parameters
    assert out[""].tolist() == [1.0] and out["n"][""].tolist() == [0.0]


def test_gap_28_an_independent_writer_makes_the_same_bytes() -> None:
    created = datetime(2026, 1, 1, 0, 0, 0, 250000, tzinfo=UTC)
    parameter = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    trees = [
        {"policy": {"w": torch.tensor([1.0, -2.0])}, "extra": {"k": [1, 0.5, (True, None)]}},
        {"floats": [1e-08, 1e16, 1.5e-7, 0.0001, 123456789012345680.0, -0.0, 5e-324,
                    1.7976931348623157e+308, 1e15, 0.1, float("nan"), float("-inf")],
         "text": "héllo \u2028 \"q\" \\ \n\t\x01\x7f", "keys": {0: None, "a/b": [], "c~d": ()},
         "ordered": OrderedDict([("z", torch.arange(3, dtype=torch.int16))]),
         "tied": [parameter, parameter], "bits": torch.tensor([True, False]),
         "d": torch.ones(2, 2, dtype=torch.float64), "h": torch.ones(1, dtype=torch.bfloat16),
         "": torch.zeros(0), "big": 10**40},
    ]
    for tree in trees:
        ours = vgs_ckpt.save_bytes(tree, step=3, performance=0.25, member_id="m\u00e9",
                                   hyperparams={"lr": 1e-05, "n": [1, 2.0]},
                                   created_at=created)
        theirs = spec_writer.write(tree, step=3, performance=0.25, member_id="m\u00e9",
                                   hyperparams={"lr": 1e-05, "n": [1, 2.0]},
                                   created_at="2026-01-01T00:00:00.250000Z",
                                   producer=("vgs_ckpt", vgs_ckpt.__version__))
        assert ours == theirs


@pytest.mark.parametrize("x", [1e-08, 1e16, 1e15, 1.5e-7, 0.0001, 1e-05, 5e-324, 0.1, 2.0,
                               123456789012345680.0, 1.7976931348623157e+308, -2.5e-10])
def test_gap_28_the_number_rule_is_pythons_repr(x: float) -> None:
    assert spec_writer.number(x) == repr(x)


def test_gap_29_a_bad_vgs_state_in_a_file_is_a_format_error_either_way() -> None:
    data = _vector("bad_vgs_state_list.safetensors")
    for upgrade in (True, False):
        with pytest.raises(FormatError, match="must be a dict node or null"):
            vgs_ckpt.load_bytes(data, upgrade=upgrade)


def test_the_spec_has_a_changelog_line_for_this_revision() -> None:
    changelog = SPEC[SPEC.index("## Changelog"):]
    assert re.search(r"issue #20", changelog)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vgs_ckpt.load_bytes(_vector("ok_golden.safetensors")).header.step == 7
