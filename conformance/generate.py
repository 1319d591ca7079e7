"""Write the conformance vectors and their manifest: ``python conformance/generate.py [DIR]``.

Every vector is made here, by code: valid files by the library's writer from a tree
given below, invalid ones by editing a valid file's bytes with the standard library
only (JSON text, padding, offsets, digests). The expected outcome of each is stated
here from docs/spec.md, not read back from the library: the tree a valid file must
decode to is the tree it was written from (in the decoded-tree form of spec appendix
B, ``vgs_ckpt.conformance.tree_form``), the header members are those of the file's own
JSON, and every upgrade result is spelled out from spec appendix A.
``tests/test_conformance.py`` regenerates the manifest and checks the library against
it; ``python -m vgs_ckpt.conformance`` runs the check on its own.
"""

from __future__ import annotations

import contextlib
import decimal
import io
import json
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from vgs_ckpt import _header, writer
from vgs_ckpt.conformance import canonical, tree_form
from vgs_ckpt.models import Producer

HERE = Path(__file__).parent
TIME = datetime(2026, 1, 1, tzinfo=UTC)
TIME_TEXT = "2026-01-01T00:00:00Z"
PRODUCER = Producer(name="vgs_ckpt", version="0.1.0")  # pinned: a release changes no vector
LEGACY = "LegacyFormatWarning"
INVALID_VGS = "InvalidVGSStateWarning"
V1, V2 = "v1_policy_only", "v2_full_parameters"


# -- trees ------------------------------------------------------------------------------

def vgs_state(version: str = "3.2", step_count: int = 10) -> dict[str, Any]:
    """A VGS state_dict of each version, as the original scaler wrote it."""
    state: dict[str, Any] = {"enabled": True, "beta": 0.99, "alpha": 0.1, "eps": 1e-8,
                             "warmup_steps": 100, "step_count": step_count}
    if version == "3.2":
        state.update(min_scaling_factor=0.1, variance_cap=50.0)
    if version != "1.0":
        state.update(param_grad_mean_ema=torch.tensor([0.5, -0.25]),
                     param_grad_sq_ema=torch.tensor([0.25, 0.125]),
                     param_numel=torch.tensor([12.0, 3.0]))
    state.update(grad_mean_ema=None, grad_var_ema=2.5e-06, grad_norm_ema=None,
                 grad_max_ema=None)
    if version != "1.0":
        state["vgs_version"] = version
    return state


def member(version: str = "3.2") -> dict[str, Any]:
    """A small SB3-style get_parameters() tree: policy, Adam state, VGS state."""
    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    return {
        "policy": OrderedDict([("w", weight), ("b", torch.tensor([0.0, -0.0]))]),
        "policy.optimizer": {
            "state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.full((2, 2), 0.5),
                          "exp_avg_sq": torch.full((2, 2), 0.25)}},
            "param_groups": [{"lr": 0.0003, "betas": (0.9, 0.999), "eps": 1e-08,
                              "weight_decay": 0, "amsgrad": False, "params": [0, 1]}]},
        "vgs_state": vgs_state(version),
    }


def every_dtype() -> dict[str, Any]:
    tensors = {
        "bool": torch.tensor([True, False]), "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u16": torch.tensor([0, 65535], dtype=torch.uint16),
        "i16": torch.tensor([-32768, 1], dtype=torch.int16),
        "u32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32),
        "i32": torch.tensor([-(2**31), 7], dtype=torch.int32),
        "u64": torch.tensor([0, 2**63 - 1], dtype=torch.uint64),
        "i64": torch.tensor([-(2**63), 9], dtype=torch.int64),
        "f16": torch.tensor([1.5, -0.0], dtype=torch.float16),
        "bf16": torch.tensor([1.5, float("inf")], dtype=torch.bfloat16),
        "f32": torch.tensor([1.0, float("nan")]), "f64": torch.tensor([0.1, -1e308],
                                                                      dtype=torch.float64),
        "c64": torch.tensor([1 + 2j], dtype=torch.complex64),
        "f8_e4m3": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn),
        "f8_e4m3fnuz": torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fnuz),
        "f8_e5m2": torch.tensor([0.5, -1.0]).to(torch.float8_e5m2),
        "f8_e5m2fnuz": torch.tensor([0.5, -1.0]).to(torch.float8_e5m2fnuz),
        # a NaN with a payload: bytes are exact
        "nan_payload": torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32),
    }
    arrays = {name: np.array(values, dtype=dtype) for name, values, dtype in [
        ("bool", [True], np.bool_), ("u8", [1], np.uint8), ("i8", [-1], np.int8),
        ("u16", [2], np.uint16), ("i16", [-2], np.int16), ("u32", [3], np.uint32),
        ("i32", [-3], np.int32), ("u64", [4], np.uint64), ("i64", [-4], np.int64),
        ("f16", [0.5], np.float16), ("f32", [0.25], np.float32),
        ("f64", [0.125], np.float64), ("c64", [1 - 1j], np.complex64)]}
    return {"tensors": tensors, "arrays": arrays,
            "scalars": [np.float32(1.5), np.int64(-3), np.bool_(True)],
            "shapes": {"zero_d": torch.tensor(3.0), "empty": torch.zeros(0, 3),
                       "empty_f64": torch.zeros(0, dtype=torch.float64),
                       "three_d": torch.arange(8, dtype=torch.int16).reshape(2, 2, 2)}}


def plain_values() -> dict[str, Any]:
    return {
        "none": None, "true": True, "false": False, "text": "héllo \u2028 \"q\" \\ \n\t\x01",
        "ints": [0, -1, 2**63, -(2**64)], "big": int("9" * 4300), "negbig": -int("9" * 4300),
        "floats": [0.5, -0.0, 1e-08, 1e16, 1e+22, 5e-324, 1.7976931348623157e+308,
                   float("nan"), float("inf"), float("-inf"), 1.0, 123456789.0],
        "tuple": (1, (2.0, None)), "empty": {"d": {}, "l": [], "t": ()},
        "keys": {0: "int key", -7: "negative", "a/b": torch.ones(1), "c~d": torch.zeros(1),
                 "": torch.tensor([2.0]), "ünï": torch.tensor([3.0])},
        "nested_empty_key": {"": torch.tensor([4.0])},
        "ordered": OrderedDict([("z", 1), ("a", 2)]),
    }


def tied() -> dict[str, Any]:
    parameter = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    graded = torch.tensor([3.0]).requires_grad_(True)
    shared = torch.tensor([5.0, 6.0])
    array = np.array([1, 2], dtype=np.int32)
    return {"encoder": {"weight": parameter}, "decoder": {"weight": parameter},
            "plain_view": parameter.detach(), "graded": [graded, graded],
            "shared": [shared, shared], "array": [array, array],
            "torch_of_numpy": torch.from_numpy(array)}


def deep_tree(containers: int) -> dict[str, Any]:
    tree: Any = torch.ones(1)
    for _ in range(containers - 1):
        tree = [tree]
    return {"deep": tree}


# -- files ------------------------------------------------------------------------------

def write(tree: dict[str, Any], **fields: Any) -> bytes:
    """A valid file, as ``save`` writes it (pinned time and producer)."""
    fields.setdefault("step", 7)
    fields.setdefault("created_at", TIME)
    header, arrays = _header.describe(tree, fields, producer=PRODUCER)
    buffer = io.BytesIO()
    writer.write(buffer, header, arrays)
    return buffer.getvalue()


def split(data: bytes) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """The container header, the vgs_ckpt header and the data region of a valid file."""
    (n,) = struct.unpack_from("<Q", data)
    container = json.loads(data[8:8 + n])
    return container, json.loads(container["__metadata__"]["vgs_ckpt.header"]), data[8 + n:]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def join(container: dict[str, Any], header: dict[str, Any] | None, blob: bytes, *,
         header_text: Callable[[str], str] = lambda t: t,
         container_text: Callable[[str], str] = lambda t: t, pad: bytes = b" ",
         fix_digests: bool = True, length: Callable[[int], int] = lambda n: n) -> bytes:
    """A file from its parts: the vgs_ckpt header (its digests recomputed from the data
    unless told not to) as text, edited by ``header_text``; the container as text, edited
    by ``container_text``, padded with ``pad`` to a multiple of 8."""
    container = _copy(container)
    if header is not None:
        header = _copy(header)
        if fix_digests:
            for name, info in header.get("tensors", {}).items():
                if name in container:
                    begin, end = container[name]["data_offsets"]
                    info["digest"] = f"xxh3-128:{xxhash.xxh3_128_hexdigest(blob[begin:end])}"
        container["__metadata__"]["vgs_ckpt.header"] = header_text(dumps(header))
    raw = container_text(dumps(container)).encode("utf-8", "surrogatepass")
    raw += pad * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", length(len(raw))) + raw + blob


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def edit(data: bytes, change: Callable[[dict[str, Any]], Any] | None = None,
         **options: Any) -> bytes:
    """``data`` with its vgs_ckpt header changed in place by ``change``."""
    container, header, blob = split(data)
    if change is not None:
        change(header)
    return join(container, header, blob, **options)


def edit_container(data: bytes, change: Callable[[dict[str, Any]], Any],
                   **options: Any) -> bytes:
    container, header, blob = split(data)
    container["__metadata__"]["vgs_ckpt.header"] = dumps(header)
    change(container)
    return join(container, None, blob, **options)


def torch_file(obj: Any, *, zip_container: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zip_container)
    return buffer.getvalue()


def deflated(data: bytes) -> bytes:
    """A torch zip re-packed with deflate, as a zip tool writes it."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            record = zipfile.ZipInfo(info.filename, date_time=(2026, 1, 1, 0, 0, 0))
            record.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(record, src.read(info.filename))
    return out.getvalue()


# -- expected outcomes ------------------------------------------------------------------

def header_of(data: bytes, **changes: Any) -> dict[str, Any]:
    """The header members a reader returns for a valid file: those of its own JSON."""
    from vgs_ckpt.conformance import HEADER_MEMBERS
    header = split(data)[1]
    found = {m: header[m] for m in HEADER_MEMBERS if m in header}
    found.update(changes)
    return found


def ok(tree: Any, header: dict[str, Any], warnings: tuple[str, ...] = ()) -> dict[str, Any]:
    record: dict[str, Any] = {"result": "ok"}
    if warnings:
        record["warnings"] = list(warnings)
    record["header"] = header
    record["tree"] = tree_form(tree)
    return record


def error(name: str) -> dict[str, Any]:
    return {"result": name}


_NUMBER_KEYS = ("beta", "alpha", "eps", "min_scaling_factor", "variance_cap",
                "grad_mean_ema", "grad_var_ema", "grad_norm_ema", "grad_max_ema")
_SUMMARY_ORDER = ("enabled", "beta", "alpha", "eps", "warmup_steps", "step_count",
                  "min_scaling_factor", "variance_cap", "param_grad_mean_ema",
                  "param_grad_sq_ema", "param_numel", "grad_mean_ema", "grad_var_ema",
                  "grad_norm_ema", "grad_max_ema", "vgs_version")


def summary(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The header's VGS summary of a state (spec section 8), as JSON."""
    if state is None:
        return None
    found: dict[str, Any] = {}
    for key in _SUMMARY_ORDER:
        value = state.get(key)
        if key.startswith("param_"):
            value = f"vgs_state/{key}" if isinstance(value, torch.Tensor) else None
        elif key in _NUMBER_KEYS and value is not None:
            value = float(value)
        found[key] = value
    found["enabled"] = True if found["enabled"] is None else found["enabled"]
    found["vgs_version"] = state.get("vgs_version", "1.0")
    return found


def upgraded_vgs(state: dict[str, Any]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Spec appendix A.3: the VGS steps, the state after them, and the legacy record."""
    version = state.get("vgs_version", "1.0")
    new, steps, legacy = dict(state), [], {}
    if version in ("1.0", "2.0", "3.0"):
        record: dict[str, Any] = {"vgs_version": version, "step_count": state["step_count"]}
        for key in ("param_grad_mean_ema", "param_grad_sq_ema", "param_numel"):
            if key in state:
                value = state[key]
                record[key] = None if value is None else [float(x) for x in value.tolist()]
        legacy = {"vgs": record}
        new.update(vgs_version="3.1", step_count=0, param_grad_mean_ema=None,
                   param_grad_sq_ema=None, param_numel=None)
        steps.append(f"vgs_{version}->3.1")
        version = "3.1"
    if version == "3.1":
        new["vgs_version"] = "3.2"
        new.setdefault("min_scaling_factor", 0.1)
        new.setdefault("variance_cap", 50.0)
        steps.append("vgs_3.1->3.2")
    return new, steps, legacy


def v2_header(step: int, performance: float | None, state: dict[str, Any] | None,
              provenance: dict[str, Any] | None, **more: Any) -> dict[str, Any]:
    """The members of an in-memory v2 header (an upgraded legacy file)."""
    return {"format_version": V2, "step": step, "performance": performance,
            "member_id": None, **more, "provenance": provenance, "hyperparams": {},
            "lineage": {"exploited_from": None}, "vgs": summary(state)}


def provenance(fmt: str, container: str, vgs_version: str | None, steps: list[str],
               absent: bool = False, legacy: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"original_format": fmt, "original_container": container,
            "original_vgs_version": vgs_version, "applied_steps": steps,
            "vgs_state_absent": absent, "legacy": legacy or {}}


# -- the vectors ------------------------------------------------------------------------

class Vectors:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.entries: list[dict[str, Any]] = []

    def add(self, name: str, data: bytes, rules: str, description: str, stored: dict[str, Any],
            upgraded: dict[str, Any] | None = None, gaps: tuple[int, ...] = ()) -> None:
        path = self.out / "vectors" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (path.exists() and _same_pickle(path.read_bytes(), data)):
            path.write_bytes(data)
        entry: dict[str, Any] = {"file": f"vectors/{name}", "rules": rules.split(),
                                 "description": description}
        if gaps:
            entry["issue_20_gaps"] = list(gaps)
        entry["schema"] = schema_verdicts(data)
        entry["stored"] = stored
        entry["upgraded"] = stored if upgraded is None else upgraded
        self.entries.append(entry)

    def refused(self, name: str, data: bytes, rules: str, description: str,
                cls: str = "FormatError", gaps: tuple[int, ...] = ()) -> None:
        self.add(name, data, rules, description, error(cls), gaps=gaps)


def _same_pickle(old: bytes, new: bytes) -> bool:
    """Whether two torch-pickle files hold the same object: their bytes name storages by
    memory address, so each run writes other bytes for the same object."""
    if old == new or not new.startswith(b"\x80\x02\x8a\x0a"):
        return old == new
    try:
        found = [torch.load(io.BytesIO(d), weights_only=True) for d in (old, new)]
    except Exception:  # an old file torch cannot read is replaced
        return False
    return bool(canonical(tree_form(found[0])) == canonical(tree_form(found[1])))


def schema_verdicts(data: bytes) -> dict[str, str | None]:
    """Whether the container header and the vgs_ckpt header validate against schema/,
    parsed with fractions kept as decimals so that 1.0 is not an integer (spec B.2);
    None when there is no such JSON to validate."""
    import jsonschema

    schema_dir = HERE.parent / "schema"
    verdicts: dict[str, str | None] = {"container": None, "header": None}
    if len(data) < 8 or data[8:9] != b"{":
        return verdicts
    (n,) = struct.unpack_from("<Q", data)
    try:
        container = json.loads(data[8:8 + n].decode("utf-8"), parse_float=decimal.Decimal)
    except (ValueError, RecursionError):
        return verdicts
    stores = {}
    for stem in ("container", "header"):
        stores[stem] = json.loads((schema_dir / f"{stem}.schema.json").read_text())
    registry = {s["$id"]: s for s in stores.values()}

    def verdict(stem: str, value: Any) -> str:
        validator = jsonschema.Draft202012Validator(stores[stem],
                                                    registry=_registry(registry))
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20_000))  # jsonschema recurses per JSON level
        try:
            return "valid" if validator.is_valid(value) else "invalid"
        finally:
            sys.setrecursionlimit(limit)

    verdicts["container"] = verdict("container", container)
    meta = container.get("__metadata__") if isinstance(container, dict) else None
    text = meta.get("vgs_ckpt.header") if isinstance(meta, dict) else None
    if isinstance(text, str):
        with contextlib.suppress(ValueError, RecursionError):  # not JSON: no verdict
            verdicts["header"] = verdict("header", json.loads(text,
                                                              parse_float=decimal.Decimal))
    return verdicts


def _registry(schemas: dict[str, Any]) -> Any:
    from referencing import Registry, Resource

    return Registry().with_resources(
        (uri, Resource.from_contents(schema)) for uri, schema in schemas.items())


def generate(out: Path) -> list[dict[str, Any]]:
    v = Vectors(out)
    base_tree = member()
    base = write(base_tree, performance=0.5, member_id="m0", hyperparams={"lr": 0.001})
    base_header = header_of(base)

    # --- valid files (sections 2-8, 12) ---
    golden_tree = {"policy": {"w": torch.tensor([1.0, -2.0])},
                   "extra": {"k": [1, 0.5, (True, None)]}}
    golden = write(golden_tree, performance=0.5, member_id="m0", hyperparams={"lr": 0.001})
    v.add("ok_golden.safetensors", golden, "12", "the worked example of section 12",
          ok(golden_tree, header_of(golden)))
    v.add("ok_member.safetensors", base, "4.3 8", "a PBT member: policy, Adam state, VGS 3.2",
          ok(base_tree, base_header))
    dtypes = every_dtype()
    data = write(dtypes)
    v.add("ok_every_dtype.safetensors", data, "2.3 2.4 5",
          "every dtype as a tensor, every numpy dtype as an array and scalar, 0-d and "
          "empty tensors, a NaN payload", ok(dtypes, header_of(data)))
    values = plain_values()
    data = write(values)
    v.add("ok_values.safetensors", data, "5 6", "every leaf kind: strings with escapes, "
          "ints beyond 64 bits (4300 digits), floats (-0.0, subnormal, extremes, nan, inf), "
          "tuples, empty containers, int keys, keys with / and ~, empty-string keys, an "
          "ordered dict", ok(values, header_of(data)), gaps=(5, 27))
    shared = tied()
    data = write(shared)
    v.add("ok_shared.safetensors", data, "5 6", "tied parameters come back as one object; "
          "a plain view of a parameter is another object sharing its memory; a numpy array "
          "and torch.from_numpy of it are two tensors", ok(shared, header_of(data)),
          gaps=(7, 11))
    deepest = deep_tree(64)
    data = write(deepest)
    v.add("ok_tree_64_deep.safetensors", data, "5", "a tree of 64 nested containers",
          ok(deepest, header_of(data)), gaps=(4,))
    nested: Any = 0
    for _ in range(510):  # header object, hyperparams object, then 510 arrays: 512 levels
        nested = [nested]
    data = write({"x": 1}, hyperparams={"deep": nested})
    v.add("ok_json_512_deep.safetensors", data, "2.1", "header JSON nested exactly 512 "
          "levels deep (in hyperparams)", ok({"x": 1}, header_of(data)), gaps=(4,))
    v1_tree = {"w": torch.tensor([1.0]), "optimizer_state": {"lr": 0.1}}
    data = write(v1_tree, format=V1, performance=1.0)
    v1_up = {"policy": v1_tree, "vgs_state": None}
    v.add("ok_v1_optimizer_state.safetensors", data, "4.2 A.2",
          "a v1 file whose tree has optimizer_state (has_optimizer_state true)",
          ok(v1_tree, header_of(data)),
          ok(v1_up, {**v2_header(7, 1.0, None, provenance(V1, "safetensors", None,
                                                        ["v1_policy_only->v2_full_parameters"],
                                                        absent=True)),
                     "producer": {"name": "vgs_ckpt", "version": "0.1.0"},
                     "created_at": TIME_TEXT, "member_id": None}, (LEGACY,)),
          gaps=(22,))
    for version in ("1.0", "2.0", "3.0", "3.1"):
        tree = member(version)
        data = write(tree, step=3)
        state, steps, legacy = upgraded_vgs(tree["vgs_state"])
        up_tree = {**tree, "vgs_state": state}
        v.add(f"ok_vgs_{version}.safetensors", data, "8 9.6 A.3",
              f"a v2 file with a VGS {version} state, upgraded to 3.2",
              ok(tree, header_of(data)),
              ok(up_tree, {**v2_header(3, None, state, provenance(V2, "safetensors", version,
                                                                  steps, legacy=legacy)),
                           "producer": {"name": "vgs_ckpt", "version": "0.1.0"},
                           "created_at": TIME_TEXT}, (LEGACY,)), gaps=(20, 21))
    extra_keys = member()
    extra_keys["vgs_state"]["my_note"] = "kept, not summarised"
    data = write(extra_keys)
    v.add("ok_vgs_extra_key.safetensors", data, "8", "a VGS state with a key of its own: "
          "kept in the tree, not in the summary", ok(extra_keys, header_of(data)), gaps=(20,))
    non_finite = member()
    non_finite["vgs_state"].update(grad_mean_ema=float("nan"), grad_norm_ema=float("inf"),
                                   grad_max_ema=float("-inf"))
    data = write(non_finite)
    v.add("ok_vgs_non_finite_stats.safetensors", data, "8", "legacy statistics NaN, "
          "Infinity, -Infinity in the summary", ok(non_finite, header_of(data)))
    min_state = {"beta": 0.9, "alpha": 0, "eps": 1e-8, "warmup_steps": 0, "step_count": 0,
                 "vgs_version": "3.2"}
    data = write({"vgs_state": min_state})
    v.add("ok_vgs_required_keys_only.safetensors", data, "8", "a VGS state with only the "
          "required keys (an integer alpha is a number)",
          ok({"vgs_state": min_state}, header_of(data)), gaps=(20,))

    def unknown_members(h: dict[str, Any]) -> None:
        h["future_member"] = {"anything": [1, 2]}
        h["producer"]["build"] = "x"
        h["lineage"]["note"] = 1
        h["tensors"]["policy/w"]["future"] = True
        h["vgs"]["future_stat"] = 0.5
    v.add("ok_unknown_members.safetensors", edit(base, unknown_members), "9.3",
          "unknown members of the header and of its nested objects are ignored",
          ok(base_tree, base_header), gaps=(26,))
    v.add("ok_extra_metadata_key.safetensors",
          edit_container(base, lambda c: c["__metadata__"].update({"my.tool": "v"})), "3",
          "another __metadata__ key is ignored", ok(base_tree, base_header))
    v.add("ok_created_at_offset.safetensors",
          edit(base, lambda h: h.update(created_at="2026-01-01t05:30:00.123456789+05:30")),
          "4.1", "created_at with an offset, lower-case t and 9 fraction digits reads as UTC, "
          "truncated to microseconds",
          ok(base_tree, {**base_header, "created_at": "2026-01-01T00:00:00.123456Z"}),
          gaps=(14,))
    v.add("ok_header_edit_not_covered.safetensors",
          edit(base, lambda h: h.update(step=999)), "7",
          "the header is not covered by a digest: an edited step that stays valid reads",
          ok(base_tree, {**base_header, "step": 999}), gaps=(25,))
    v.add("ok_performance_integer.safetensors",
          edit(base, lambda h: h.update(performance=2)), "4.1",
          "an integer performance is a number", ok(base_tree, {**base_header,
                                                               "performance": 2.0}), gaps=(13,))

    # --- section 2: the container ---
    container, header, blob = split(base)
    v.refused("bad_short.safetensors", base[:7], "2", "shorter than the length prefix")
    v.refused("bad_truncated.safetensors", base[:-1], "2.6", "the data region is truncated")
    v.refused("bad_trailing.safetensors", base + b"\0", "2.6", "a byte after the last tensor")
    v.refused("bad_length_past_end.safetensors", struct.pack("<Q", 4096) + base[8:80],
              "2", "N runs past the end of the file")
    v.refused("bad_not_a_checkpoint.safetensors", b"hello world, not a checkpoint!!!",
              "10", "no container matches the first bytes")
    v.refused("bad_unaligned_data.safetensors", join(container, header, blob, pad=b""),
              "2.1", "8 + N is not a multiple of 8", gaps=(3,))
    v.refused("bad_newline_padding.safetensors", join(container, header, blob, pad=b"\n"),
              "2.1", "padding with newlines instead of spaces", gaps=(3,))
    f32 = {"x": torch.ones(1), "y": torch.ones(1, dtype=torch.float64)}
    fc, fh, fb = split(write(f32))
    fc["x"]["data_offsets"], fc["y"]["data_offsets"] = [0, 4], [4, 12]
    v.refused("bad_misaligned_tensor.safetensors", join(fc, fh, fb[8:12] + fb[:8]), "2.7",
              "an F64 tensor at data offset 4", gaps=(3,))

    def entry(change: Callable[[dict[str, Any]], Any]) -> bytes:
        return edit_container(base, lambda c: change(c["policy/w"]))
    v.refused("bad_entry_extra_member.safetensors", entry(lambda e: e.update(x=1)), "2.2",
              "a tensor entry with a member besides dtype, shape, data_offsets")
    v.refused("bad_entry_unknown_dtype.safetensors", entry(lambda e: e.update(dtype="F128")),
              "2.3", "an unknown dtype code")
    v.refused("bad_entry_negative_dim.safetensors", entry(lambda e: e.update(shape=[-2, -2])),
              "2.4", "a negative dimension")
    v.refused("bad_entry_65_dims.safetensors", entry(lambda e: e.update(shape=[1] * 65)),
              "2.9", "a shape of 65 dimensions")
    v.refused("bad_entry_size_mismatch.safetensors", entry(lambda e: e.update(shape=[3])),
              "2.5", "shape and data_offsets disagree")

    def swap_offsets(c: dict[str, Any]) -> None:
        c["policy/w"]["data_offsets"] = c["policy/w"]["data_offsets"][::-1]
    v.refused("bad_entry_offsets_reversed.safetensors", edit_container(base, swap_offsets),
              "2.5", "begin > end")

    def overlap(c: dict[str, Any]) -> None:
        c["policy/b"]["data_offsets"] = list(c["policy/w"]["data_offsets"][:1]) * 1 + [
            c["policy/w"]["data_offsets"][0] + 8]
    v.refused("bad_overlap.safetensors", edit_container(base, overlap), "2.6",
              "two tensors overlap (and one byte range is left uncovered)")
    v.refused("bad_duplicate_container_member.safetensors",
              join(container, header, blob, container_text=lambda t: t.replace(
                  '"policy/b":{', '"policy/b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                  '"policy/b":{', 1)), "2.1", "a tensor named twice in the container header",
              gaps=(1,))
    v.refused("bad_duplicate_metadata_member.safetensors",
              join(container, header, blob, container_text=lambda t: t.replace(
                  '"format":"pt"', '"format":"pt","format":"pt"', 1)), "2.1",
              "a __metadata__ key given twice", gaps=(1,))
    v.refused("bad_duplicate_header_member.safetensors",
              edit(base, header_text=lambda t: t.replace('"step":7', '"step":7,"step":8', 1)),
              "2.1", "a header member given twice", gaps=(1,))
    v.refused("bad_duplicate_nested_member.safetensors",
              edit(base, header_text=lambda t: t.replace('{"lr":0.001}', '{"lr":0.001,'
                                                                         '"lr":0.002}', 1)),
              "2.1", "a hyperparameter given twice", gaps=(1,))
    v.refused("bad_nan_constant.safetensors",
              edit(base, header_text=lambda t: t.replace('"performance":0.5',
                                                         '"performance":NaN', 1)),
              "2.8", "the non-standard constant NaN")
    too_deep: Any = 0
    for _ in range(511):
        too_deep = [too_deep]
    v.refused("bad_json_513_deep.safetensors",
              edit(base, lambda h: h.update(hyperparams={"deep": too_deep})), "2.1",
              "header JSON nested 513 levels deep", gaps=(4,))
    v.refused("bad_float_overflow_tree.safetensors",
              edit(write({"x": 0.5}), header_text=lambda t: t.replace('{"float":0.5}',
                                                                      '{"float":1e400}', 1)),
              "2.8 5", "a float node of 1e400 (JSON has no infinity)", gaps=(6,))
    v.refused("bad_float_overflow_hyperparams.safetensors",
              edit(base, header_text=lambda t: t.replace('"lr":0.001', '"lr":-1e400', 1)),
              "2.8", "a hyperparameter of -1e400", gaps=(6,))
    v.refused("bad_float_overflow_vgs.safetensors",
              edit(base, header_text=lambda t: t.replace('"grad_var_ema":2.5e-06',
                                                         '"grad_var_ema":1e999', 1)),
              "2.8 8", "a VGS statistic of 1e999 (infinity is written \"Infinity\")",
              gaps=(6, 17))
    v.refused("bad_int_4301_digits.safetensors",
              edit(write({"x": 1}), header_text=lambda t: t.replace(
                  '["x",1]', '["x",' + "9" * 4301 + "]", 1)), "2.9 5",
              "an integer of 4301 digits", gaps=(5,))
    v.refused("bad_lone_surrogate.safetensors",
              edit(base, header_text=lambda t: t.replace('"member_id":"m0"',
                                                         '"member_id":"m\\ud800"', 1)),
              "2.9", "a lone surrogate escape in a header string", gaps=(12,))
    v.refused("bad_lone_surrogate_key.safetensors",
              join(container, header, blob, container_text=lambda t: t.replace(
                  '"format":"pt"',
                                               '"format":"pt","\\udfff":"x"', 1)),
              "2.9", "a lone surrogate escape in a __metadata__ key", gaps=(12,))
    v.refused("bad_invalid_utf8.safetensors",
              join(container, header, blob, container_text=lambda t: t.replace(
                  '"format":"pt"', '"format":"pt","x":"\udcff"', 1)), "2",
              "a byte sequence that is not UTF-8")
    v.refused("bad_metadata_not_strings.safetensors",
              edit_container(base, lambda c: c["__metadata__"].update({"n": 1})), "2.2",
              "a __metadata__ value that is not a string")

    # --- section 3: __metadata__ ---
    v.refused("bad_no_metadata.safetensors",
              edit_container(base, lambda c: c.pop("__metadata__")), "3",
              "a plain safetensors file, no __metadata__")
    v.refused("bad_format_np.safetensors",
              edit_container(base, lambda c: c["__metadata__"].update(format="np")), "3",
              "__metadata__ format \"np\"", gaps=(2,))
    v.refused("bad_format_missing.safetensors",
              edit_container(base, lambda c: c["__metadata__"].pop("format")), "3",
              "no __metadata__ format", gaps=(2,))
    v.refused("bad_format_version_mismatch.safetensors",
              edit_container(base, lambda c: c["__metadata__"].update(
                  {"vgs_ckpt.format_version": V1})), "3",
              "__metadata__ and header disagree on the format")
    v.refused("bad_format_newer.safetensors",
              edit(base, lambda h: h.update(format_version="v3_future"),
                   container_text=lambda t: t.replace(f'"vgs_ckpt.format_version":"{V2}"',
                                                      '"vgs_ckpt.format_version":"v3_future"')),
              "9.2", "a newer format version", "UnsupportedVersionError")
    v.refused("bad_format_unknown.safetensors",
              edit(base, lambda h: h.update(format_version="bogus"),
                   container_text=lambda t: t.replace(f'"vgs_ckpt.format_version":"{V2}"',
                                                      '"vgs_ckpt.format_version":"bogus"')),
              "9.2", "a format string not of the form v<N>_<name>")
    v.refused("bad_header_not_object.safetensors",
              edit(base, header_text=lambda t: "[1]"), "3", "the header is not an object")

    # --- section 4: header members and strict types ---
    for name, change, gaps in [
        ("step_negative", {"step": -1}, ()), ("step_float", {"step": 1.0}, (13,)),
        ("step_string", {"step": "7"}, (13,)), ("step_bool", {"step": True}, (13,)),
        ("performance_true", {"performance": True}, (13,)),
        ("performance_string", {"performance": "1"}, (13,)),
        ("created_at_int", {"created_at": 5}, (13,)),
        ("created_at_float", {"created_at": 1.5e9}, (13,)),
        ("created_at_digits", {"created_at": "1700000000"}, (13,)),
        ("created_at_space", {"created_at": "2026-01-01 00:00:00Z"}, (14,)),
        ("created_at_leap_second", {"created_at": "2016-12-31T23:59:60Z"}, (14,)),
        ("created_at_no_zone", {"created_at": "2026-01-01T00:00:00"}, (14,)),
        ("created_at_february_30", {"created_at": "2026-02-30T00:00:00Z"}, (14,)),
        ("created_at_year_0", {"created_at": "0000-01-01T00:00:00Z"}, (14,)),
        ("member_id_empty", {"member_id": ""}, ()), ("member_id_int", {"member_id": 3}, ()),
        ("producer_missing", {"producer": None}, ()),
        ("hyperparams_list", {"hyperparams": [1]}, ()),
        ("lineage_bad_step", {"lineage": {"exploited_from": {"member_id": "a",
                                                              "step": -1}}}, ()),
        ("provenance_flag_int", {"provenance": provenance(V2, "safetensors", None, [],
                                                          absent=1)}, (13,)),  # type: ignore
        ("digest_malformed", None, ()), ("digest_null", None, ()),
    ]:
        def change_header(h: dict[str, Any], name: str = name,
                          change: dict[str, Any] | None = change) -> None:
            if change is not None:
                h.update(change)
            if name == "digest_malformed":
                h["tensors"]["policy/w"]["digest"] = "md5:00"
            if name == "digest_null":
                h["tensors"]["policy/w"]["digest"] = None
        v.refused(f"bad_{name}.safetensors", edit(base, change_header, fix_digests=False),
                  "4.1 4.4", f"header: {name.replace('_', ' ')}", gaps=gaps)
    v.refused("bad_index_missing_tensor.safetensors",
              edit(base, lambda h: h["tensors"].pop("policy/b")), "4.4",
              "a tensor of the container missing from the header's index")
    v.refused("bad_index_dtype_mismatch.safetensors",
              edit(base, lambda h: h["tensors"]["policy/w"].update(dtype="F64")), "4.4",
              "the index says F64, the container F32")
    v1_file = write(v1_tree, format=V1)
    v.refused("bad_has_optimizer_state_false.safetensors",
              edit(v1_file, lambda h: h.update(has_optimizer_state=False)), "4.2",
              "has_optimizer_state false for a tree with optimizer_state", gaps=(22,))
    v.refused("bad_has_optimizer_state_string.safetensors",
              edit(v1_file, lambda h: h.update(has_optimizer_state="true")), "4.2",
              "has_optimizer_state \"true\"", gaps=(13,))

    # --- section 5: the tree ---
    def tree_edit(change: Callable[[dict[str, Any]], Any], data: bytes = base) -> bytes:
        return edit(data, lambda h: change(h["tree"]))

    small = write({"a": torch.tensor([1.0]), "n": 1})
    for name, new_tree, gaps in [
        ("root_list", {"list": []}, ()),
        ("two_tags", {"dict": [["a", {"tensor": "a"}], ["n", {"list": [], "tuple": []}]]}, ()),
        ("unknown_member", {"dict": [["a", {"tensor": "a", "dtype": "F32"}], ["n", 1]]}, (26,)),
        ("flag_false", {"dict": [["a", {"tensor": "a", "parameter": False}], ["n", 1]]}, ()),
        ("empty_node", {"dict": [["a", {"tensor": "a"}], ["n", {}]]}, ()),
        ("float_upper_nan", {"dict": [["a", {"tensor": "a"}], ["n", {"float": "NaN"}]]}, ()),
        ("duplicate_key", {"dict": [["a", {"tensor": "a"}], ["a", 1]]}, ()),
        ("float_key", {"dict": [["a", {"tensor": "a"}], [1.5, 1]]}, ()),
        ("missing_tensor", {"dict": [["a", {"tensor": "a"}], ["n", {"tensor": "zz"}]]}, ()),
        ("torch_and_numpy", {"dict": [["a", {"tensor": "a"}], ["n", {"ndarray": "a"}]]}, ()),
        ("npscalar_1d", {"dict": [["a", {"npscalar": "a"}], ["n", 1]]}, (8,)),
        ("unreferenced_tensor", {"dict": [["a", 1], ["n", 1]]}, (9,)),
        ("name_not_path", {"dict": [["n", {"tensor": "a"}], ["a", 1]]}, (9,)),
    ]:
        v.refused(f"bad_tree_{name}.safetensors",
                  edit(small, lambda h, t=new_tree: h.update(tree=t)), "5 6",
                  f"tree: {name.replace('_', ' ')}", gaps=gaps)
    int_file = write({"i": torch.tensor([1], dtype=torch.int32)})
    v.refused("bad_tree_requires_grad_int.safetensors",
              tree_edit(lambda t: t["dict"][0][1].update(requires_grad=True), int_file), "5",
              "requires_grad on an I32 tensor")
    bf16 = write({"b": torch.tensor([1.0], dtype=torch.bfloat16)})
    v.refused("bad_tree_ndarray_bf16.safetensors",
              tree_edit(lambda t: t["dict"][0].__setitem__(1, {"ndarray": "b"}), bf16), "5",
              "an ndarray node on a BF16 tensor (numpy has no bfloat16)", gaps=(10,))
    f8 = write({"b": torch.tensor([1.0]).to(torch.float8_e5m2)})
    v.refused("bad_tree_ndarray_f8.safetensors",
              tree_edit(lambda t: t["dict"][0].__setitem__(1, {"ndarray": "b"}), f8), "5",
              "an ndarray node on an F8_E5M2 tensor", gaps=(10,))
    v.refused("bad_tree_65_deep.safetensors",
              tree_edit(lambda t: t["dict"][0].__setitem__(1, _wrap_lists({"tensor": "deep"},
                                                                          64)),
                        write(deep_tree(1))), "5", "a tree of 65 nested containers",
              gaps=(4,))

    # --- sections 2 and 7: bytes ---
    v.refused("bad_digest_mismatch.safetensors", base[:-1] + bytes([base[-1] ^ 1]), "7",
              "a tensor byte flipped", "IntegrityError")
    bools = write({"m": torch.tensor([True, False])})
    bc, bh, bb = split(bools)
    v.refused("bad_bool_byte_2.safetensors", join(bc, bh, bb[:-1] + b"\x02"), "2.3",
              "a BOOL tensor holding the byte 2 (digest recomputed)", gaps=(24,))

    # --- section 8: the VGS summary ---
    v.refused("bad_vgs_summary_mismatch.safetensors",
              edit(base, lambda h: h["vgs"].update(step_count=11)), "8",
              "the summary's step_count is not the state's")
    v.refused("bad_vgs_summary_without_state.safetensors",
              edit(golden, lambda h: h.update(vgs=summary(vgs_state()))), "8",
              "a summary for a tree without vgs_state")
    for name, value in [("nan_lower", "nan"), ("string", "0.5"), ("bool", True)]:
        v.refused(f"bad_vgs_summary_stat_{name}.safetensors",
                  edit(base, lambda h, value=value: h["vgs"].update(grad_mean_ema=value)),
                  "8", f"a summary statistic of {value!r}", gaps=(17,))
    v.refused("bad_vgs_state_list.safetensors",
              edit(write({"vgs_state": None}),
                   lambda h: h["tree"]["dict"][0].__setitem__(1, {"list": [1]})), "8",
              "vgs_state is a list (neither a dict nor null)", gaps=(29,))
    future_file = edit(base, lambda h: (
        h["tree"]["dict"][2][1]["dict"].__setitem__(-1, ["vgs_version", "9.9"]),
        h["vgs"].update(vgs_version="9.9")))
    v.refused("bad_vgs_version_unknown.safetensors", future_file, "9.5",
              "vgs_version 9.9", "UnsupportedVersionError", gaps=(16,))
    # Invalid settings: readable as stored (with a warning), refused on upgrade.
    for name, change in [("beta_1_5", {"beta": 1.5}), ("alpha_negative", {"alpha": -1.0}),
                         ("eps_zero", {"eps": 0.0}),
                         ("min_scaling_factor_zero", {"min_scaling_factor": 0.0})]:
        state = {**vgs_state(), **change}
        tree = {**member(), "vgs_state": state}
        valid = write(member())
        for summary_kind in ("matching", "null", "partial"):
            def set_state(h: dict[str, Any], change: dict[str, Any] = change,
                          summary_kind: str = summary_kind) -> None:
                pairs = h["tree"]["dict"][2][1]["dict"]
                for pair in pairs:
                    if pair[0] in change:
                        pair[1] = {"float": change[pair[0]]}
                h["vgs"] = ({**h["vgs"], **change} if summary_kind == "matching" else
                            None if summary_kind == "null" else {"beta": 0.99})
            data = edit(valid, set_state)
            kept = ({**summary(vgs_state()), **change} if summary_kind == "matching" else
                    {} if summary_kind == "null" else {"beta": 0.99})
            stored_vgs = {k: kept.get(k) for k in _SUMMARY_ORDER}
            v.add(f"salvage_{name}_{summary_kind}_summary.safetensors", data, "8",
                  f"VGS {name.replace('_', ' ')} with a {summary_kind} summary: read as stored "
                  "with a warning, refused on upgrade",
                  ok(tree, {**header_of(valid), "vgs": stored_vgs}, (INVALID_VGS,)),
                  error("FormatError"), gaps=(15,))
    for name, state_change, what, gaps in [
        ("param_ndarray", {"param_numel": np.array([12.0, 3.0], dtype=np.float32)},
         "param_numel is a numpy array", (18,)),
        ("param_list", {"param_numel": [12.0, 3.0]}, "param_numel is a list", (18,)),
        ("scalar_tensor", {"alpha": torch.tensor(0.1)}, "alpha is a 0-d tensor", (19,)),
        ("scalar_npscalar", {"step_count": np.int64(10)}, "step_count is a numpy scalar",
         (19,)),
        ("stat_bool", {"grad_mean_ema": True}, "grad_mean_ema is true", (19,)),
        ("missing_beta", {}, "beta is missing", (20,)),
    ]:
        state = {**vgs_state(), **state_change}
        if name == "missing_beta":
            del state["beta"]
        tree = {**member(), "vgs_state": state}
        data = _with_raw_state(tree)
        v.add(f"salvage_vgs_{name}.safetensors", data, "8",
              f"a VGS state whose {what}: invalid, read as stored with a warning, refused on "
              "upgrade",
              ok(tree, {**header_of(data), "vgs": {k: None for k in _SUMMARY_ORDER}},
                 (INVALID_VGS,)), error("FormatError"), gaps=gaps)

    # --- section 10 and appendix A: legacy torch files ---
    legacy_policy = OrderedDict([("w", torch.tensor([1.0, 2.0])), ("b", torch.tensor([0.5]))])
    for container_kind, zip_container in (("torch-zip", True), ("torch-pickle", False)):
        suffix = "zip" if zip_container else "pickle"
        data = torch_file(legacy_policy, zip_container=zip_container)
        v.add(f"legacy_L0_{suffix}.pt", data, "10 A.1 A.2",
              "layout L0: a bare policy state_dict",
              ok(legacy_policy, {"format_version": V1, "step": 0, "performance": None,
                                 "member_id": None, "provenance": None,
                                 "has_optimizer_state": False}),
              ok({"policy": legacy_policy, "vgs_state": None},
                 v2_header(0, None, None, provenance(
                     V1, container_kind, None, ["v1_policy_only->v2_full_parameters"],
                     absent=True)), (LEGACY,)), gaps=(21,))
        for flag in (False, True):
            wrapped: dict[str, Any] = {"format_version": V1, "data": legacy_policy,
                                       "step": 150, "performance": 0.9}
            if flag:
                wrapped["has_optimizer_state"] = False
            data = torch_file(wrapped, zip_container=zip_container)
            name = f"legacy_L1{'_flag' if flag else ''}_{suffix}.pt"
            v.add(name, data, "10 A.1 A.2", "layout L1: a wrapped v1 policy"
                  + (" with has_optimizer_state" if flag else ""),
                  ok(legacy_policy, {"format_version": V1, "step": 150, "performance": 0.9,
                                     "member_id": None, "provenance": None,
                                     "has_optimizer_state": False}),
                  ok({"policy": legacy_policy, "vgs_state": None},
                     v2_header(150, 0.9, None, provenance(
                         V1, container_kind, None, ["v1_policy_only->v2_full_parameters"],
                         absent=True)), (LEGACY,)), gaps=(21,))
        for version in ("1.0", "2.0", "3.0", "3.1", "3.2"):
            payload = member(version)
            wrapped = {"format_version": V2, "data": payload, "step": 150, "performance": 0.9,
                       "has_optimizer_state": False}
            data = torch_file(wrapped, zip_container=zip_container)
            state, steps, legacy = upgraded_vgs(payload["vgs_state"])
            v.add(f"legacy_L2_vgs_{version}_{suffix}.pt", data, "10 A.1 A.3",
                  f"layout L2: a wrapped v2 member with a VGS {version} state",
                  ok(payload, v2_header(150, 0.9, payload["vgs_state"], None)),
                  ok({**payload, "vgs_state": state},
                     v2_header(150, 0.9, state, provenance(V2, container_kind, version, steps,
                                                           legacy=legacy)), (LEGACY,)),
                  gaps=(21,))
    zipped = torch_file({"format_version": V1, "data": legacy_policy, "step": 3})
    v.add("legacy_L1_deflated.pt", deflated(zipped), "10",
          "a torch zip re-packed with deflate reads as the stored one",
          ok(legacy_policy, {"format_version": V1, "step": 3, "performance": None,
                             "member_id": None, "provenance": None,
                             "has_optimizer_state": False}),
          ok({"policy": legacy_policy, "vgs_state": None},
             v2_header(3, None, None, provenance(V1, "torch-zip", None,
                                                 ["v1_policy_only->v2_full_parameters"],
                                                 absent=True)), (LEGACY,)))
    v.add("legacy_L1_flag_disagrees.pt",
          torch_file({"format_version": V1, "data": legacy_policy, "step": 1,
                      "has_optimizer_state": True}), "A.1",
          "a legacy flag that disagrees with data is kept as stored (only vgs_ckpt files "
          "are held to section 4.2), and dropped by the upgrade",
          ok(legacy_policy, {"format_version": V1, "step": 1, "performance": None,
                             "member_id": None, "provenance": None,
                             "has_optimizer_state": True}),
          ok({"policy": legacy_policy, "vgs_state": None},
             v2_header(1, None, None, provenance(V1, "torch-zip", None,
                                                 ["v1_policy_only->v2_full_parameters"],
                                                 absent=True)), (LEGACY,)), gaps=(22,))
    v.refused("legacy_bad_step.pt", torch_file({"format_version": V1, "data": legacy_policy,
                                                "step": -1}), "A.1", "a negative step")
    v.refused("legacy_bad_data.pt", torch_file({"format_version": V1, "data": [1]}), "A.1",
              "data is not a dict")
    v.refused("legacy_bad_newer_format.pt",
              torch_file({"format_version": "v3_future", "data": {}}), "9.2 A.1",
              "a legacy file naming a newer format", "UnsupportedVersionError")
    v.refused("legacy_bad_unsafe_global.pt", torch_file({"x": _Unsafe()}), "10",
              "a pickle that asks for a global beyond the safe set (nothing runs)",
              "UnsafeCheckpointError")
    v.refused("legacy_bad_duplicate_record.pt", _duplicate_record(zipped), "10",
              "a torch zip with two records of one name")
    return v.entries


class _Unsafe:
    """Pickled as a call of ``print``: a reader that ran it would print (refused)."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return print, ("a checkpoint ran code",)


def _wrap_lists(node: Any, count: int) -> Any:
    for _ in range(count):
        node = {"list": [node]}
    return node


def _with_raw_state(tree: dict[str, Any]) -> bytes:
    """A file holding ``tree``, whose VGS state the writer would refuse, with a null VGS
    summary: the tree encoded and laid out as a writer would, by hand."""
    from vgs_ckpt._tree import encode_tree

    container, header, _ = split(write({**tree, "vgs_state": None}))
    header["tree"], arrays = encode_tree(tree)
    header["tensors"] = {name: {"dtype": a.dtype.code, "shape": list(a.shape), "digest": None}
                         for name, a in arrays.items()}
    header["vgs"] = None
    layout: dict[str, Any] = {"__metadata__": container["__metadata__"]}
    blob = b""
    for name, array in sorted(arrays.items(), key=lambda a: (-a[1].dtype.itemsize, a[0])):
        raw = bytes(array.data())
        layout[name] = {"dtype": array.dtype.code, "shape": list(array.shape),
                        "data_offsets": [len(blob), len(blob) + len(raw)]}
        blob += raw
    return join(layout, header, blob)


def _duplicate_record(data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        infos = src.infolist()
        for info in infos:
            dst.writestr(info, src.read(info.filename))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
            dst.writestr(infos[0], src.read(infos[0].filename))
    return out.getvalue()


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else HERE
    entries = generate(out)
    manifest = {
        "description": "Conformance vectors of docs/spec.md: each file, the outcome of "
                       "reading it as stored and upgraded ('ok' or an error class of spec "
                       "section 13), and for 'ok' the header members and the decoded tree "
                       "in the form of spec appendix B. 'schema' says whether the container "
                       "header and the vgs_ckpt header validate against schema/ (null: no "
                       "such JSON); a file can be schema-valid and still break a rule of the "
                       "spec that JSON Schema cannot state.",
        "spec": "docs/spec.md", "generator": "conformance/generate.py",
        "generated_with": {"torch": torch.__version__.split("+")[0]},
        "vectors": entries,
    }
    # One vector a line: readable diffs, no indentation of the deep vectors.
    head = json.dumps({k: v for k, v in manifest.items() if k != "vectors"}, indent=1,
                      ensure_ascii=False)
    lines = ",\n".join(json.dumps(e, ensure_ascii=False, allow_nan=False) for e in entries)
    text = f'{head[:-2]},\n "vectors": [\n{lines}\n ]\n}}\n'
    (out / "manifest.json").write_text(text, encoding="utf-8")
    print(f"wrote {len(entries)} vectors and {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
