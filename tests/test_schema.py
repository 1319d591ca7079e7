"""The committed JSON Schema files match the models and validate real headers."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

import vgs_ckpt
from vgs_ckpt.schema import render_schemas, schema_drift

from .conftest import make_member

SCHEMA_DIR = Path(__file__).parent.parent / "schema"


def _header_of(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(json.loads(data[8:8 + n])["__metadata__"]["vgs_ckpt.header"])


def _validator(stem: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / f"{stem}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_files_match_the_models() -> None:
    assert schema_drift(SCHEMA_DIR) == [], "run `vgs-ckpt schema --out schema`"
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(render_schemas())


def test_drift_is_detected(tmp_path: Path) -> None:
    (tmp_path / "header.schema.json").write_text("{}")
    assert "header.schema.json" in schema_drift(tmp_path)


@pytest.fixture(scope="module")
def real_headers() -> list[dict[str, Any]]:
    nan_vgs = {**make_member()["vgs_state"], "grad_mean_ema": float("nan")}
    return [
        _header_of(vgs_ckpt.save_bytes(make_member(), step=150, performance=0.9,
                                       member_id="3", hyperparams={"lr": 5e-4},
                                       lineage={"exploited_from": {"member_id": "1",
                                                                   "step": 100}})),
        _header_of(vgs_ckpt.save_bytes({"vgs_state": nan_vgs}, step=0)),
        _header_of(vgs_ckpt.save_bytes({"w": torch.ones(1)}, step=3,
                                       format=vgs_ckpt.CheckpointFormat.V1_POLICY_ONLY)),
    ]


def test_real_headers_are_accepted(real_headers: list[dict[str, Any]]) -> None:
    for header in real_headers:
        _validator("header").validate(header)
        stem = "checkpoint_v2" if header["format_version"] == "v2_full_parameters" else \
            "checkpoint_v1"
        _validator(stem).validate(header)
        if header.get("vgs"):
            _validator("vgs_state").validate(header["vgs"])


BROKEN = [
    ("step", -1), ("step", "7"), ("performance", "high"), ("format_version", "v9_x"),
    ("tensors", {"a": {"dtype": "F99", "shape": [1], "digest": "xxh3-128:" + "0" * 32}}),
    ("tensors", {"a": {"dtype": "F32", "shape": [-1], "digest": "xxh3-128:" + "0" * 32}}),
    ("tensors", {"a": {"dtype": "F32", "shape": [1], "digest": "md5:abc"}}),
    ("tree", {"list": []}), ("tree", {"dict": [["k", {"bogus": 1}]]}),
    ("tree", {"dict": [["k", {"float": "NaN"}]]}), ("member_id", 3),
    ("producer", {"name": ""}), ("vgs", {"vgs_version": "3.2", "beta": 1.5}),
]


@pytest.mark.parametrize(("field", "value"), BROKEN)
def test_broken_headers_are_rejected_by_schema_and_models(
        real_headers: list[dict[str, Any]], field: str, value: Any) -> None:
    broken = {**real_headers[0], field: value}
    with pytest.raises(jsonschema.ValidationError):
        _validator("header").validate(broken)
    # The library refuses a file carrying the same header.
    data = vgs_ckpt.save_bytes(make_member(), step=150)
    (n,) = struct.unpack("<Q", data[:8])
    outer = json.loads(data[8:8 + n])
    outer["__metadata__"]["vgs_ckpt.header"] = json.dumps(broken)
    raw = json.dumps(outer).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    with pytest.raises(vgs_ckpt.VgsCkptError):
        vgs_ckpt.load_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_missing_required_field_is_rejected(real_headers: list[dict[str, Any]]) -> None:
    for field in ("step", "tree", "tensors", "producer", "created_at", "format_version"):
        broken = {k: v for k, v in real_headers[0].items() if k != field}
        with pytest.raises(jsonschema.ValidationError):
            _validator("header").validate(broken)
