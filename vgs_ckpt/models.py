"""Pydantic models of the checkpoint header, one frozen model per format version.

The header is the JSON document stored under ``__metadata__["vgs_ckpt.header"]``
of the safetensors container. ``docs/spec.md`` is normative; these models are
its executable form and ``schema/*.json`` is generated from them.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Required, TypeAlias, TypedDict

import pydantic
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
)

from vgs_ckpt._dtypes import CODES
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


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"expected a finite number or null, got {value!r}")
    return value


FiniteFloat: TypeAlias = Annotated[float, AfterValidator(_finite)]
NonNegativeInt: TypeAlias = Annotated[StrictInt, Field(ge=0)]
DTypeCode: TypeAlias = Literal[CODES]  # type: ignore[valid-type]
# Non-finite floats are written as the strings "NaN", "Infinity", "-Infinity".
AnyFloat: TypeAlias = Annotated[float, WithJsonSchema({"anyOf": [
    {"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]})]
# The containers a checkpoint can come in (safetensors, and the legacy torch.save ones).
ContainerKind: TypeAlias = Literal["safetensors", "torch-zip", "torch-pickle"]
TREE_REF = "#/$defs/TreeNode"
# A marker that json_schemas() replaces by a reference to the tree grammar.
_TREE_MARK = "x-vgs-ckpt-tree"
TreeRoot: TypeAlias = Annotated[dict[str, JsonValue], WithJsonSchema({_TREE_MARK: True})]


def _finite_json(value: JsonValue, path: str = "hyperparams") -> JsonValue:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} holds {value!r}; JSON hyperparameters must be finite")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite_json(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite_json(item, f"{path}[{i}]")
    return value


class _Model(BaseModel):
    # Unknown fields are ignored (forward compatibility within a format
    # version, spec section 8); writers never emit them.
    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="strings")


class TensorInfo(_Model):
    """One tensor of the file: dtype, shape and digest of its bytes."""

    dtype: DTypeCode
    shape: list[NonNegativeInt]
    # Always set in a file (the schema requires it). None only in memory, for a tensor
    # not stored in this layout yet: one read from a legacy torch file, or moved by an
    # in-memory upgrade; save() computes it.
    digest: Annotated[Annotated[str, Field(pattern=_DIGEST_PATTERN)] | None,
                      WithJsonSchema({"type": "string", "pattern": _DIGEST_PATTERN})]


class Producer(_Model):
    """The program that wrote the file."""

    name: Annotated[str, Field(min_length=1)]
    version: Annotated[str, Field(min_length=1)]


class ExploitSource(_Model):
    """Where a member's state came from when it exploited another member."""

    member_id: Annotated[str, Field(min_length=1)]
    step: NonNegativeInt
    performance: FiniteFloat | None = None
    file: str | None = None


class Lineage(_Model):
    """The history of a member's state across PBT exploits."""

    exploited_from: ExploitSource | None = None


class Provenance(_Model):
    """What an upgrade did to a checkpoint that was written in an older format."""

    original_format: Annotated[str, Field(min_length=1)]
    original_container: ContainerKind
    original_vgs_version: str | None = None
    applied_steps: list[str] = []
    vgs_state_absent: bool = False
    legacy: dict[str, JsonValue] = {}


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
    beta: Annotated[StrictFloat, Field(gt=0.0, lt=1.0), _KNOB]
    alpha: Annotated[StrictFloat, AfterValidator(_finite), Field(ge=0.0), _KNOB]
    eps: Annotated[StrictFloat, AfterValidator(_finite), Field(gt=0.0), _KNOB]
    warmup_steps: Annotated[StrictInt, Field(ge=0), _KNOB]
    step_count: Annotated[StrictInt, Field(ge=0), _STAT]
    min_scaling_factor: Annotated[
        Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None, _KNOB] = None
    variance_cap: Annotated[
        Annotated[StrictFloat, AfterValidator(_finite), Field(gt=0.0)] | None, _KNOB] = None
    # Names of the per-parameter EMA tensors in this file, or null.
    param_grad_mean_ema: Annotated[str | None, _TENSOR] = None
    param_grad_sq_ema: Annotated[str | None, _TENSOR] = None
    param_numel: Annotated[str | None, _TENSOR] = None
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
    member_id: Annotated[str, Field(min_length=1)] | None = None
    producer: Producer
    created_at: AwareDatetime
    tree: TreeRoot
    tensors: dict[str, TensorInfo]
    provenance: Provenance | None = None

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)


class CheckpointV1(_Header):
    """``v1_policy_only``: the policy's weights only, as the original scheduler wrote."""

    format_version: Literal[CheckpointFormat.V1_POLICY_ONLY]
    has_optimizer_state: bool = False


class CheckpointV2(_Header):
    """``v2_full_parameters``: the whole parameter tree of a PBT member."""

    format_version: Literal[CheckpointFormat.V2_FULL_PARAMETERS]
    hyperparams: dict[str, Annotated[JsonValue, AfterValidator(_finite_json)]] = {}
    lineage: Lineage = Lineage()
    vgs: VGSState | None = None


CheckpointHeader: TypeAlias = Annotated[
    CheckpointV1 | CheckpointV2, Field(discriminator="format_version")
]
header_adapter: TypeAdapter[CheckpointV1 | CheckpointV2] = TypeAdapter(CheckpointHeader)

_VERSION_RE = re.compile(r"^v(\d+)_[a-z0-9_]+$")


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


def describe_validation(exc: pydantic.ValidationError, prefix: str = "") -> str:
    """A pydantic error as "field.path: message (got ...); ..." for error messages."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        parts.append(f"{loc or '<header>'}: {err['msg']} (got {err.get('input')!r:.60})")
    return "; ".join(parts)


TREE_NODE_SCHEMA: dict[str, Any] = node_schema(TREE_REF)


def _replace_tree_marks(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, dict) and value.get(_TREE_MARK) is True:
                node[key] = {"$ref": "#/$defs/TreeRoot", "title": value.get("title", "Tree")}
            else:
                _replace_tree_marks(value)
    elif isinstance(node, list):
        for item in node:
            _replace_tree_marks(item)


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema documents generated from the models, keyed by file stem."""
    documents = {
        "header": header_adapter.json_schema(mode="validation"),
        "checkpoint_v1": CheckpointV1.model_json_schema(mode="validation"),
        "checkpoint_v2": CheckpointV2.model_json_schema(mode="validation"),
        "vgs_state": VGSState.model_json_schema(mode="validation"),
    }
    for stem, document in documents.items():
        _replace_tree_marks(document)
        document.setdefault("$defs", {})
        if stem != "vgs_state":
            document["$defs"]["TreeNode"] = TREE_NODE_SCHEMA
            # Only a dict node may be the root of the tree.
            document["$defs"]["TreeRoot"] = {"allOf": [{"$ref": TREE_REF},
                                                       {"type": "object", "required": ["dict"]}]}
        if not document["$defs"]:
            del document["$defs"]
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
