"""Pydantic models of the checkpoint header, one frozen model per format version.

The header is the JSON document stored under ``__metadata__["vgs_ckpt.header"]``
of the safetensors container. ``docs/spec.md`` is normative; these models are
its executable form and ``schema/*.json`` is generated from them.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal, Required, TypeAlias, TypedDict

import pydantic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    WithJsonSchema,
)

from vgs_ckpt._dtypes import CODES, MAX_DIMS
from vgs_ckpt._tree import node_schema
from vgs_ckpt.errors import ArgumentError, FormatError, UnsupportedVersionError

__all__ = [
    "DIGEST_ALGORITHM",
    "FORMAT_ORDER",
    "VGS_VERSIONS",
    "CheckpointFormat",
    "CheckpointHeader",
    "CheckpointV1",
    "CheckpointV2",
    "ContainerKind",
    "ExploitSource",
    "HeaderFields",
    "Lineage",
    "Producer",
    "Provenance",
    "TensorInfo",
    "VGSRole",
    "VGSState",
    "check_format_version",
    "describe_validation",
    "header_adapter",
    "json_schemas",
]


class CheckpointFormat(enum.StrEnum):
    """The format versions this library reads and writes, oldest first."""

    V1_POLICY_ONLY = "v1_policy_only"
    V2_FULL_PARAMETERS = "v2_full_parameters"


FORMAT_ORDER: tuple[CheckpointFormat, ...] = tuple(CheckpointFormat)
VGS_VERSIONS: tuple[str, ...] = ("1.0", "2.0", "3.0", "3.1", "3.2")
DIGEST_ALGORITHM = "xxh3-128"
_DIGEST_PATTERN = rf"^{DIGEST_ALGORITHM}:[0-9a-f]{{32}}$"


# Numbers are strict (spec section 4): a JSON number (an integer reads as a float), never a
# boolean or a string, and finite (JSON has no infinity; readers refuse overflowing numbers).
FiniteFloat: TypeAlias = Annotated[float, Strict(), Field(allow_inf_nan=False)]
NonNegativeInt: TypeAlias = Annotated[StrictInt, Field(ge=0)]
NonEmptyStr: TypeAlias = Annotated[StrictStr, Field(min_length=1)]
DTypeCode: TypeAlias = Literal[CODES]  # type: ignore[valid-type]
# Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity".
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _any_float(value: object) -> float:
    if type(value) is str and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError('expected a number or one of the strings "NaN", "Infinity", '
                     '"-Infinity"')


def _any_float_json(value: Any) -> Any:
    """A non-finite float as its string; anything else (a finite number, or what a
    salvaged summary holds) as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    return value


AnyFloat: TypeAlias = Annotated[
    float, PlainValidator(_any_float), PlainSerializer(_any_float_json, when_used="json"),
    WithJsonSchema({"anyOf": [{"type": "number"}, {"enum": list(_NON_FINITE)}]})]
# The containers a checkpoint can come in (safetensors, and the legacy torch.save ones).
ContainerKind: TypeAlias = Literal["safetensors", "torch-zip", "torch-pickle"]
TREE_REF = "#/$defs/TreeNode"
# A marker that json_schemas() replaces by a reference to the tree grammar.
_TREE_MARK = "x-vgs-ckpt-tree"


def _tree_root(value: object) -> dict[str, Any]:
    # The tree's nodes are checked by the decoder (vgs_ckpt._tree), iteratively: pydantic's
    # recursive JsonValue would stop at a few hundred levels, below the JSON limit.
    if type(value) is not dict:
        raise ValueError("the tree must be a JSON object (a dict node)")
    return value


TreeRoot: TypeAlias = Annotated[dict[str, Any], PlainValidator(_tree_root),
                                WithJsonSchema({_TREE_MARK: True})]


def json_value(value: Any, path: str) -> Any:
    """``value`` as plain JSON data (None, bool, int, finite float, str, list, dict with
    str keys; int and float subclasses such as numpy's become int and float), checked
    without recursion, so nesting is bounded by the JSON limit alone.

    Raises:
        ValueError: naming the first path that is not JSON data.
    """
    out: list[Any] = [None]
    stack: list[tuple[Any, str, Any, Any]] = [(value, path, out, 0)]
    while stack:
        item, where, parent, key = stack.pop()
        if item is None or type(item) in (bool, str, int):
            parent[key] = item
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError(f"{where} holds {item!r}; JSON numbers must be finite")
            parent[key] = float(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            parent[key] = int(item)
        elif type(item) is list:
            parent[key] = made = [None] * len(item)
            stack.extend((v, f"{where}[{i}]", made, i) for i, v in enumerate(item))
        elif isinstance(item, dict):
            made_dict: dict[str, Any] = {}
            parent[key] = made_dict
            for k in item:
                if type(k) is not str:
                    raise ValueError(f"{where} has the key {k!r}; JSON object keys are strings")
                made_dict[k] = None  # keeps the order of the keys
            stack.extend((v, f"{where}.{k}", made_dict, k) for k, v in item.items())
        else:
            raise ValueError(f"{where} holds a {type(item).__qualname__}, which is not JSON "
                             "data (null, boolean, number, string, list or object)")
    return out[0]


def _json_object(path: str) -> Any:
    def check(value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError("expected a JSON object")
        result: dict[str, Any] = json_value(value, path)
        return result
    return PlainValidator(check)


# A marker that json_schemas() replaces by an object of JSON values.
_JSON_MARK = "x-vgs-ckpt-json-object"
_JSON_OBJECT_SCHEMA = WithJsonSchema({_JSON_MARK: True})
JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": "Any JSON value; numbers finite (docs/spec.md section 4).",
    "type": ["null", "boolean", "number", "string", "array", "object"],
    "items": {"$ref": "#/$defs/JsonValue"},
    "additionalProperties": {"$ref": "#/$defs/JsonValue"},
}

_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))")
RFC3339_PATTERN = (r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]"
                   r"([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?"
                   r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")


def parse_timestamp(text: str) -> datetime:
    """An RFC 3339 ``date-time`` (spec section 4.1) as an aware datetime in UTC.

    Raises:
        ValueError: not of that form, a date or time out of range (a leap second
            ``:60`` included), or an instant outside the years 0001-9999 in UTC.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError("expected an RFC 3339 date-time such as 2026-01-01T00:00:00Z "
                         "('T' between date and time, a 'Z' or +hh:mm offset)")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zulu, sign, off_h, off_m = match.groups()[6:]
    if second == 60:
        raise ValueError("a leap second (:60) is not accepted; write :59")
    offset = timedelta(0)
    if not zulu:
        if int(off_h) > 23 or int(off_m) > 59:
            raise ValueError(f"time zone offset {sign}{off_h}:{off_m} is out of range")
        offset = (1 if sign == "+" else -1) * timedelta(hours=int(off_h), minutes=int(off_m))
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        local = datetime(year, month, day, hour, minute, second, micro, timezone(offset))
        return local.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"date-time out of range ({exc})") from None


def format_timestamp(value: datetime) -> str:
    """The writers' form of a timestamp: UTC, ``Z``, microseconds only when not zero."""
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.year < 1000:  # strftime does not pad every platform's years
        text = f"{value.year:04d}{text[text.index('-'):]}"
    return f"{text}.{value.microsecond:06d}Z" if value.microsecond else f"{text}Z"


def _created_at(value: object) -> datetime:
    if type(value) is str:
        return parse_timestamp(value)
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("a datetime without a time zone; pass an aware one, e.g. "
                             "datetime.now(UTC)")
        return value.astimezone(UTC)
    raise ValueError("expected an RFC 3339 date-time string")


Timestamp: TypeAlias = Annotated[
    datetime, PlainValidator(_created_at), PlainSerializer(format_timestamp, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": RFC3339_PATTERN})]


class _Model(BaseModel):
    # Unknown fields are ignored (forward compatibility within a format
    # version, spec section 8); writers never emit them.
    model_config = ConfigDict(frozen=True, extra="ignore")


class TensorInfo(_Model):
    """One tensor of the file: dtype, shape and digest of its bytes."""

    dtype: DTypeCode
    shape: list[NonNegativeInt]
    # Always set in a file (the schema requires it). None only in memory, for a tensor
    # not stored in this layout yet: one read from a legacy torch file, or moved by an
    # in-memory upgrade; save() computes it.
    digest: Annotated[Annotated[StrictStr, Field(pattern=_DIGEST_PATTERN)] | None,
                      WithJsonSchema({"type": "string", "pattern": _DIGEST_PATTERN})]


class Producer(_Model):
    """The program that wrote the file."""

    name: NonEmptyStr
    version: NonEmptyStr


class ExploitSource(_Model):
    """Where a member's state came from when it exploited another member."""

    member_id: NonEmptyStr
    step: NonNegativeInt
    performance: FiniteFloat | None = None
    file: StrictStr | None = None


class Lineage(_Model):
    """The history of a member's state across PBT exploits."""

    exploited_from: ExploitSource | None = None


class Provenance(_Model):
    """What an upgrade did to a checkpoint that was written in an older format."""

    original_format: NonEmptyStr
    original_container: ContainerKind
    original_vgs_version: StrictStr | None = None
    applied_steps: list[StrictStr] = []
    vgs_state_absent: StrictBool = False
    legacy: Annotated[dict[str, Any], _json_object("provenance.legacy"),
                      _JSON_OBJECT_SCHEMA] = {}


class VGSRole(enum.Enum):
    """What a field of :class:`VGSState` is; ``vgs_ckpt.vgs_state`` derives its key sets
    from these marks (they do not appear in the JSON Schema)."""

    KNOB = "knob"  # a configuration setting (a keyword argument of the scaler)
    STATISTIC = "statistic"  # a scalar statistic (the step count, the global EMAs)
    TENSOR = "tensor"  # the name of a per-parameter tensor of the file


_KNOB, _STAT, _TENSOR = VGSRole.KNOB, VGSRole.STATISTIC, VGSRole.TENSOR


class VGSState(_Model):
    """The scalar part of a Variance Gradient Scaler state.

    The per-parameter EMAs are tensors of the file; this model names them.
    """

    # In the order of the original scaler's state_dict() keys.
    enabled: Annotated[StrictBool, _KNOB] = True
    beta: Annotated[FiniteFloat, Field(gt=0.0, lt=1.0), _KNOB]
    alpha: Annotated[FiniteFloat, Field(ge=0.0), _KNOB]
    eps: Annotated[FiniteFloat, Field(gt=0.0), _KNOB]
    warmup_steps: Annotated[NonNegativeInt, _KNOB]
    step_count: Annotated[NonNegativeInt, _STAT]
    min_scaling_factor: Annotated[
        Annotated[FiniteFloat, Field(gt=0.0, le=1.0)] | None, _KNOB] = None
    variance_cap: Annotated[Annotated[FiniteFloat, Field(gt=0.0)] | None, _KNOB] = None
    # Names of the per-parameter EMA tensors in this file, or null.
    param_grad_mean_ema: Annotated[StrictStr | None, _TENSOR] = None
    param_grad_sq_ema: Annotated[StrictStr | None, _TENSOR] = None
    param_numel: Annotated[StrictStr | None, _TENSOR] = None
    # Legacy global statistics (logging only); any float, NaN and inf included.
    grad_mean_ema: Annotated[AnyFloat | None, _STAT] = None
    grad_var_ema: Annotated[AnyFloat | None, _STAT] = None
    grad_norm_ema: Annotated[AnyFloat | None, _STAT] = None
    grad_max_ema: Annotated[AnyFloat | None, _STAT] = None
    vgs_version: Literal[VGS_VERSIONS]  # type: ignore[valid-type]


class _Header(_Model):
    format_version: CheckpointFormat
    step: NonNegativeInt
    performance: FiniteFloat | None = None
    member_id: NonEmptyStr | None = None
    producer: Producer
    created_at: Timestamp
    tree: TreeRoot
    tensors: dict[str, TensorInfo]
    provenance: Provenance | None = None


class CheckpointV1(_Header):
    """``v1_policy_only``: the policy's weights only, as the original scheduler wrote."""

    format_version: Literal[CheckpointFormat.V1_POLICY_ONLY]
    has_optimizer_state: StrictBool = False


class CheckpointV2(_Header):
    """``v2_full_parameters``: the whole parameter tree of a PBT member."""

    format_version: Literal[CheckpointFormat.V2_FULL_PARAMETERS]
    hyperparams: Annotated[dict[str, Any], _json_object("hyperparams"),
                           _JSON_OBJECT_SCHEMA] = {}
    lineage: Lineage = Lineage()
    vgs: VGSState | None = None


CheckpointHeader: TypeAlias = Annotated[
    CheckpointV1 | CheckpointV2, Field(discriminator="format_version")
]
header_adapter: TypeAdapter[CheckpointV1 | CheckpointV2] = TypeAdapter(CheckpointHeader)

_VERSION_RE = re.compile(r"^v([0-9]+)_[a-z0-9_]+$")


def format_number(format_version: str) -> int | None:
    """The number N of a format string ``vN_name``, or None when it is not of that form."""
    match = _VERSION_RE.match(format_version)
    return int(match.group(1)) if match else None


_LATEST_NUMBER = format_number(FORMAT_ORDER[-1]) or 0


def check_format_version(value: object, where: str) -> CheckpointFormat:
    """The known format named by ``value``, or the right error for an unknown one.

    Raises:
        UnsupportedVersionError: a well-formed ``vN_name`` newer than this library.
        FormatError: anything else.
    """
    if type(value) is str and value in FORMAT_ORDER:
        return CheckpointFormat(value)
    number = format_number(value) if type(value) is str else None
    if number is not None and number > _LATEST_NUMBER:
        raise UnsupportedVersionError(
            f"{where}: format {value!r} is newer than this library knows (latest "
            f"{FORMAT_ORDER[-1]!r}); upgrade vgs_ckpt to read it")
    raise FormatError(f"{where}: unknown checkpoint format {value!r}; expected one of "
                      f"{', '.join(FORMAT_ORDER)}")


def describe_validation(exc: pydantic.ValidationError, prefix: str = "",
                        skip: Collection[str] = ()) -> str:
    """A pydantic error as "field.path: message (got ...); ..." for error messages,
    leaving out the errors of the top-level fields in ``skip`` (reported otherwise)."""
    parts = []
    for err in exc.errors():
        if err["loc"] and err["loc"][0] in skip:
            continue
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{loc or '<header>'}: {err['msg']} (got {err.get('input')!r:.60})")
    return "; ".join(parts)


TREE_NODE_SCHEMA: dict[str, Any] = node_schema(TREE_REF)


def _replace_tree_marks(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict) and value.get(_TREE_MARK) is True:
                node[key] = {"$ref": "#/$defs/TreeRoot", "title": value.get("title", "Tree")}
            elif isinstance(value, dict) and value.get(_JSON_MARK) is True:
                node[key] = {**{k: v for k, v in value.items() if k != _JSON_MARK},
                             "type": "object",
                             "additionalProperties": {"$ref": "#/$defs/JsonValue"}}
            else:
                _replace_tree_marks(value)
    elif isinstance(node, list):
        for item in node:
            _replace_tree_marks(item)


def _drop_openapi(node: Any) -> None:
    """Remove pydantic's ``discriminator`` (an OpenAPI keyword, not JSON Schema's)."""
    if isinstance(node, dict):
        node.pop("discriminator", None)
        for value in node.values():
            _drop_openapi(value)
    elif isinstance(node, list):
        for item in node:
            _drop_openapi(item)


def container_schema() -> dict[str, Any]:
    """The JSON Schema of the safetensors container header (spec sections 2 and 3): what
    JSON Schema can say of it; tiling, alignment and padding are rules of section 2."""
    offset = {"type": "integer", "minimum": 0}
    return {
        "title": "Container header",
        "description": "The JSON object at bytes 8..8+N of a vgs_ckpt file "
                       "(docs/spec.md sections 2 and 3): __metadata__ and one entry per "
                       "tensor.",
        "type": "object",
        "required": ["__metadata__"],
        "properties": {"__metadata__": {
            "type": "object",
            "required": ["format", "vgs_ckpt.format_version", "vgs_ckpt.header"],
            "properties": {
                "format": {"const": "pt"},
                "vgs_ckpt.format_version": {"type": "string",
                                            "pattern": _VERSION_RE.pattern},
                "vgs_ckpt.header": {"type": "string", "contentMediaType": "application/json",
                                    "contentSchema": {"$ref": "header.schema.json"}},
            },
            "additionalProperties": {"type": "string"},
        }},
        "additionalProperties": {"$ref": "#/$defs/TensorEntry"},
        "$defs": {"TensorEntry": {
            "type": "object",
            "required": ["dtype", "shape", "data_offsets"],
            "additionalProperties": False,
            "properties": {
                "dtype": {"enum": list(CODES)},
                "shape": {"type": "array", "maxItems": MAX_DIMS,
                          "items": {"type": "integer", "minimum": 0,
                                    "maximum": 2**63 - 1}},
                "data_offsets": {"type": "array", "minItems": 2, "maxItems": 2,
                                 "prefixItems": [offset, offset], "items": False},
            },
        }},
    }


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema documents generated from the models, keyed by file stem."""
    documents = {
        "container": container_schema(),
        "header": header_adapter.json_schema(mode="validation"),
        "checkpoint_v1": CheckpointV1.model_json_schema(mode="validation"),
        "checkpoint_v2": CheckpointV2.model_json_schema(mode="validation"),
        "vgs_state": VGSState.model_json_schema(mode="validation"),
    }
    for stem, document in documents.items():
        _replace_tree_marks(document)
        _drop_openapi(document)
        document.setdefault("$defs", {})
        if stem not in ("vgs_state", "container"):
            document["$defs"]["TreeNode"] = TREE_NODE_SCHEMA
            document["$defs"]["JsonValue"] = JSON_VALUE_SCHEMA
            # Only a dict node may be the root of the tree.
            document["$defs"]["TreeRoot"] = {"allOf": [{"$ref": TREE_REF},
                                                       {"type": "object", "required": ["dict"]}]}
        if not document["$defs"]:
            del document["$defs"]
        document["$comment"] = (
            "docs/spec.md is normative; this schema states what JSON Schema can of it. "
            "Validate JSON parsed with numbers that have a fraction or exponent kept apart "
            "from integers (Python: json.loads(text, parse_float=decimal.Decimal)), so that "
            "1.0 is not an integer, as the spec requires (appendix B).")
        document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        document["$id"] = f"https://vgs-ckpt.dev/schema/{stem}.schema.json"
    return documents


class HeaderFields(TypedDict, total=False):
    """The header's fields a writer takes, defined once: the keyword arguments of
    ``save``, ``save_bytes``, ``save_async``, ``CheckpointStore.save`` and the Ray
    integration (``**fields: Unpack[HeaderFields]``).

    - ``step``: the training step (>= 0), required.
    - ``performance``: the member's metric, finite or None.
    - ``member_id``, ``hyperparams``, ``lineage``: PBT bookkeeping (v2 only, but for
      ``member_id``).
    - ``format``: ``v2_full_parameters`` (default) or the legacy ``v1_policy_only``.
    - ``created_at``: the timestamp to record (default: now, UTC).
    - ``provenance``: the upgrade history to record (set by ``vgs-ckpt upgrade``).
    """

    step: Required[int]
    performance: float | None
    member_id: str | None
    hyperparams: Mapping[str, Any] | None
    lineage: Lineage | Mapping[str, Any] | None
    format: CheckpointFormat | str
    created_at: datetime | None
    provenance: Provenance | Mapping[str, Any] | None


FIELDS = HeaderFields.__required_keys__ | HeaderFields.__optional_keys__


def check_fields(fields: Mapping[str, Any], function: str) -> HeaderFields:
    """``fields`` if they are header fields with a ``step``, else an ArgumentError
    naming the unknown ones (the runtime check behind ``Unpack[HeaderFields]``)."""
    unknown = sorted(set(fields) - FIELDS)
    if unknown:
        raise ArgumentError(f"{function}() got unknown header argument(s) "
                            f"{', '.join(unknown)}; the header's fields are "
                            f"{', '.join(sorted(FIELDS))}")
    if "step" not in fields:
        raise ArgumentError(f"{function}() needs step=<the training step>")
    return fields  # type: ignore[return-value]  # checked above
