"""Pydantic models of the checkpoint header, one frozen model per format version.

The header is the JSON document stored under ``__metadata__["vgs_ckpt.header"]``
of the safetensors container. ``docs/spec.md`` is normative; these models are
its executable form and ``schema/*.json`` is generated from them.
"""

from __future__ import annotations

import enum
import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    field_validator,
)

from vgs_ckpt._dtypes import CODES

__all__ = [
    "DIGEST_ALGORITHM",
    "FORMAT_ORDER",
    "VGS_VERSIONS",
    "CheckpointFormat",
    "CheckpointHeader",
    "CheckpointV1",
    "CheckpointV2",
    "ExploitSource",
    "Lineage",
    "Producer",
    "Provenance",
    "TensorInfo",
    "VGSState",
    "header_adapter",
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
NonNegativeInt: TypeAlias = Annotated[int, Field(ge=0)]
DTypeCode: TypeAlias = Literal[CODES]  # type: ignore[valid-type]


class _Model(BaseModel):
    # Unknown fields are ignored (forward compatibility within a format
    # version, spec section 8); writers never emit them.
    model_config = ConfigDict(frozen=True, extra="ignore", ser_json_inf_nan="strings")


class TensorInfo(_Model):
    """One tensor of the file: dtype, shape and digest of its bytes."""

    dtype: DTypeCode
    shape: list[NonNegativeInt]
    digest: Annotated[str, Field(pattern=_DIGEST_PATTERN)]


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
    original_container: Literal["safetensors", "torch-zip", "torch-pickle"]
    original_vgs_version: str | None = None
    applied_steps: list[str] = []
    vgs_state_absent: bool = False
    legacy: dict[str, JsonValue] = {}


class VGSState(_Model):
    """The scalar part of a Variance Gradient Scaler state.

    The per-parameter EMAs are tensors of the file; this model names them.
    """

    vgs_version: Literal["1.0", "2.0", "3.0", "3.1", "3.2"]
    enabled: bool = True
    beta: Annotated[float, Field(gt=0.0, lt=1.0)]
    alpha: Annotated[FiniteFloat, Field(ge=0.0)]
    eps: Annotated[FiniteFloat, Field(gt=0.0)]
    warmup_steps: NonNegativeInt
    step_count: NonNegativeInt
    min_scaling_factor: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    variance_cap: Annotated[FiniteFloat, Field(gt=0.0)] | None = None
    # Legacy global statistics (logging only); any float, NaN and inf included.
    grad_mean_ema: float | None = None
    grad_var_ema: float | None = None
    grad_norm_ema: float | None = None
    grad_max_ema: float | None = None
    # Names of the per-parameter EMA tensors in this file, or null.
    param_grad_mean_ema: str | None = None
    param_grad_sq_ema: str | None = None
    param_numel: str | None = None


class _Header(_Model):
    format_version: CheckpointFormat
    step: NonNegativeInt
    performance: FiniteFloat | None = None
    member_id: Annotated[str, Field(min_length=1)] | None = None
    producer: Producer
    created_at: AwareDatetime
    tree: dict[str, JsonValue]
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
    hyperparams: dict[str, JsonValue] = {}
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


def header_json_schema() -> dict[str, Any]:
    """The JSON Schema of the header union."""
    return header_adapter.json_schema(mode="validation")
