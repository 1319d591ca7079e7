"""Building, serialising and checking the vgs_ckpt header inside ``__metadata__``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias

import pydantic
import torch
import xxhash

from vgs_ckpt._container import Container, loads_json
from vgs_ckpt._tree import Array, encode_tree
from vgs_ckpt._version import __version__
from vgs_ckpt.errors import FormatError, SchemaError, UnsupportedVersionError, UsageError
from vgs_ckpt.models import (
    DIGEST_ALGORITHM,
    FORMAT_ORDER,
    VGS_VERSIONS,
    CheckpointFormat,
    CheckpointV1,
    CheckpointV2,
    Lineage,
    Producer,
    Provenance,
    VGSState,
    format_number,
    header_adapter,
)

Header: TypeAlias = CheckpointV1 | CheckpointV2
PRODUCER = "vgs_ckpt"
PLACEHOLDER_DIGEST = f"{DIGEST_ALGORITHM}:{'0' * 32}"

META_FORMAT = "format"
META_FORMAT_VERSION = "vgs_ckpt.format_version"
META_HEADER = "vgs_ckpt.header"
VGS_KEY = "vgs_state"
_VGS_SCALARS = ("enabled", "beta", "alpha", "eps", "warmup_steps", "step_count",
                "min_scaling_factor", "variance_cap", "grad_mean_ema", "grad_var_ema",
                "grad_norm_ema", "grad_max_ema")
# The per-parameter tensors of a VGS state (one entry per parameter tensor).
VGS_TENSOR_KEYS = ("param_grad_mean_ema", "param_grad_sq_ema", "param_numel")
_LATEST_NUMBER = format_number(FORMAT_ORDER[-1]) or 0


def describe_validation(exc: pydantic.ValidationError, prefix: str = "") -> str:
    """A pydantic error as "field.path: message; ..." lines."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{loc or '<header>'}: {err['msg']} (got {err.get('input')!r:.60})")
    return "; ".join(parts)


def check_format_version(value: object, where: str) -> CheckpointFormat:
    """The known format named by ``value``, or the right error for an unknown one."""
    if type(value) is str and value in FORMAT_ORDER:
        return CheckpointFormat(value)
    number = format_number(value) if type(value) is str else None
    if number is not None and number > _LATEST_NUMBER:
        raise UnsupportedVersionError(
            f"{where}: format {value!r} is newer than this library knows (latest "
            f"{FORMAT_ORDER[-1]!r}); upgrade vgs_ckpt to read it")
    raise FormatError(f"{where}: unknown checkpoint format {value!r}; expected one of "
                      f"{', '.join(FORMAT_ORDER)}")


def vgs_summary(parameters: Mapping[Any, Any], tree: dict[str, Any],
                where: str) -> VGSState | None:
    """Validate ``parameters["vgs_state"]`` and describe it, or None when there is none."""
    state = parameters.get(VGS_KEY)
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise SchemaError(f"{where}: {VGS_KEY!r} must be a dict (a VGS state_dict()) or None, "
                          f"got {type(state).__qualname__}")
    version = state.get("vgs_version", "1.0")
    if version not in VGS_VERSIONS:
        raise UnsupportedVersionError(
            f"{where}: {VGS_KEY}.vgs_version {version!r} is not a VGS version this library "
            f"knows ({', '.join(VGS_VERSIONS)}); upgrade vgs_ckpt")
    fields: dict[str, Any] = {"vgs_version": version}
    for key in _VGS_SCALARS:
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        fields[key] = value
    if fields["enabled"] is None:
        fields["enabled"] = True
    nodes = {pair[0]: pair[1] for pair in _vgs_node(tree)}
    for key in VGS_TENSOR_KEYS:
        node = nodes.get(key)
        fields[key] = node["tensor"] if type(node) is dict and "tensor" in node else None
    try:
        return VGSState.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise SchemaError(f"{where}: invalid VGS state: {describe_validation(exc, VGS_KEY)}; "
                          "fix the scaler's configuration") from None


def _vgs_node(tree: dict[str, Any]) -> list[list[Any]]:
    for key, node in tree.get("dict", []):
        if key == VGS_KEY and type(node) is dict and type(node.get("dict")) is list:
            return [p for p in node["dict"] if type(p) is list and len(p) == 2]
    return []


def build(parameters: Mapping[Any, Any], *, step: int, performance: float | None,
          member_id: str | None, hyperparams: Mapping[str, Any] | None,
          lineage: Lineage | Mapping[str, Any] | None, format: CheckpointFormat | str,
          created_at: datetime | None, where: str,
          producer: Producer | Mapping[str, str] | None = None,
          provenance: Provenance | Mapping[str, Any] | None = None,
          ) -> tuple[Header, dict[str, Array]]:
    """Validate a header for ``parameters``; digests are placeholders until written."""
    try:
        format = CheckpointFormat(format)
    except ValueError:
        raise UsageError(f"{where}: cannot write format {format!r}; this library writes "
                         f"{', '.join(FORMAT_ORDER)}") from None
    tree, arrays = encode_tree(parameters)
    fields: dict[str, Any] = {
        "format_version": format, "step": step, "performance": performance,
        "member_id": member_id,
        "producer": producer or {"name": PRODUCER, "version": __version__},
        "provenance": provenance,
        "created_at": created_at or datetime.now(UTC), "tree": tree,
        "tensors": {name: {"dtype": a.dtype.code, "shape": list(a.shape),
                           "digest": PLACEHOLDER_DIGEST} for name, a in arrays.items()},
    }
    if format is CheckpointFormat.V2_FULL_PARAMETERS:
        fields["hyperparams"] = dict(hyperparams or {})
        fields["lineage"] = lineage if lineage is not None else Lineage()
        fields["vgs"] = vgs_summary(parameters, tree, where)
    else:
        if hyperparams or lineage is not None:
            raise UsageError(f"{where}: {format.value} files hold no hyperparams or lineage; "
                             "save as v2_full_parameters instead")
        fields["has_optimizer_state"] = "optimizer_state" in parameters
    try:
        header = header_adapter.validate_python(fields)
    except pydantic.ValidationError as exc:
        raise SchemaError(f"{where}: invalid checkpoint header: "
                          f"{describe_validation(exc)}") from None
    return header, arrays


def bookkeeping(header: Header) -> dict[str, Any]:
    """The fields of ``header`` that a re-save or an upgrade carries over, as keyword
    arguments of :func:`build` and ``vgs_ckpt.save``."""
    v2 = header if isinstance(header, CheckpointV2) else None
    return {"step": header.step, "performance": header.performance,
            "member_id": header.member_id, "created_at": header.created_at,
            "hyperparams": v2.hyperparams if v2 else None,
            "lineage": v2.lineage if v2 else None}


def digest(data: memoryview) -> str:
    """The digest string of some bytes, e.g. ``xxh3-128:<32 hex digits>``."""
    return f"{DIGEST_ALGORITHM}:{xxhash.xxh3_128_hexdigest(data)}"


def with_digests(header: Header, digests: Mapping[str, str]) -> Header:
    """``header`` with the given tensor digests filled in."""
    tensors = {n: info.model_copy(update={"digest": digests[n]})
               for n, info in header.tensors.items()}
    return header.model_copy(update={"tensors": tensors})


def dump(header: CheckpointV1 | CheckpointV2) -> str:
    """The header as compact JSON (no NaN: non-finite floats are strings)."""
    return header.model_dump_json()


def metadata(header: CheckpointV1 | CheckpointV2) -> dict[str, str]:
    return {META_FORMAT: "pt", META_FORMAT_VERSION: header.format_version.value,
            META_HEADER: dump(header)}


def parse(container: Container, where: str) -> CheckpointV1 | CheckpointV2:
    """The validated header of a container, checked against its tensor table."""
    meta = container.metadata
    if META_FORMAT_VERSION not in meta:
        raise FormatError(f"{where}: a safetensors file but not a vgs_ckpt checkpoint (no "
                          f"{META_FORMAT_VERSION!r} in __metadata__); load it with "
                          "safetensors.torch.load_file, or save it with vgs_ckpt.save")
    fmt = check_format_version(meta[META_FORMAT_VERSION], where)
    if META_HEADER not in meta:
        raise FormatError(f"{where}: __metadata__ has no {META_HEADER!r}; the file is corrupt")
    raw = loads_json(meta[META_HEADER], where, "vgs_ckpt header")
    if type(raw) is dict and raw.get("format_version") != fmt.value:
        check_format_version(raw.get("format_version"), where)
        raise FormatError(f"{where}: header says format {raw.get('format_version')!r} but "
                          f"__metadata__ says {fmt.value!r}; the file is corrupt")
    try:
        header = header_adapter.validate_python(raw)
    except pydantic.ValidationError as exc:
        raise SchemaError(f"{where}: header does not match the {fmt.value} schema: "
                          f"{describe_validation(exc)}") from None
    _check_index(header, container, where)
    return header


def _check_index(header: CheckpointV1 | CheckpointV2, container: Container, where: str) -> None:
    indexed, stored = set(header.tensors), set(container.entries)
    if indexed != stored:
        missing, extra = sorted(indexed - stored), sorted(stored - indexed)
        raise FormatError(f"{where}: tensor index and file disagree (in the index only: "
                          f"{missing[:5]}, in the file only: {extra[:5]}); the file is corrupt")
    for name, info in header.tensors.items():
        entry = container.entries[name]
        if info.dtype != entry.dtype.code or tuple(info.shape) != entry.shape:
            raise FormatError(f"{where}: tensor {name!r}: index says {info.dtype}{info.shape} "
                              f"but the file stores {entry.dtype.code}{list(entry.shape)}; "
                              "the file is corrupt")
