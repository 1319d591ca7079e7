"""The vocabulary of a Variance Gradient Scaler state, in one place.

A VGS state is the dict ``VarianceGradientScaler.state_dict()`` returns, stored
under :data:`KEY` of a parameter tree. Its keys are the fields of
:class:`vgs_ckpt.models.VGSState` (the header's summary of it), and every key set
here is derived from that model's field marks, never written out again:

- :data:`KNOBS`: the configuration (the scaler's keyword arguments; PBT explores
  them as ``vgs_<knob>`` hyperparameters, :data:`HYPERPARAM_PREFIX`);
- :data:`STATISTICS`: the step count and the legacy global EMAs;
- :data:`TENSOR_KEYS`: the per-parameter EMA tensors.

:data:`DEFAULTS` are the scaler's defaults (the 3.2 ones), :func:`version_of` is
the one version check, :func:`summary` turns a stored state into the header's
``vgs`` field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pydantic
import torch

from vgs_ckpt._tree import dict_items
from vgs_ckpt.errors import (
    InvalidVGSStateWarning,
    UnsupportedVersionError,
    UsageError,
    VgsCkptError,
    warn,
)
from vgs_ckpt.models import VGS_VERSIONS, VGSRole, VGSState, describe_validation

__all__ = ["ADDED_IN_3_2", "DEFAULTS", "HYPERPARAM_PREFIX", "KEY", "KNOBS", "LATEST",
           "SCALAR_KEYS", "STATE_KEYS", "STATISTICS", "TENSOR_KEYS", "VERSIONS", "check",
           "same_summary", "summary", "version_of"]

KEY = "vgs_state"
HYPERPARAM_PREFIX = "vgs_"
VERSIONS = VGS_VERSIONS
LATEST = VERSIONS[-1]
# A state without "vgs_version" predates the key: version 1.0.
_UNVERSIONED = VERSIONS[0]


def _with_role(role: VGSRole) -> tuple[str, ...]:
    return tuple(name for name, field in VGSState.model_fields.items() if role in field.metadata)


KNOBS = _with_role(VGSRole.KNOB)
STATISTICS = _with_role(VGSRole.STATISTIC)
TENSOR_KEYS = _with_role(VGSRole.TENSOR)
SCALAR_KEYS = tuple(name for name in VGSState.model_fields if name in KNOBS + STATISTICS)
# The keys of a state_dict(), in the original scaler's order.
STATE_KEYS = tuple(VGSState.model_fields)

# The scaler's defaults: the recommended VGS 3.2 configuration.
DEFAULTS: dict[str, Any] = {"enabled": True, "beta": 0.99, "alpha": 0.1, "eps": 1e-8,
                            "warmup_steps": 100, "min_scaling_factor": 0.1,
                            "variance_cap": 50.0}
# The knobs VGS 3.2 added; a 3.1 state is upgraded with their DEFAULTS.
ADDED_IN_3_2 = ("min_scaling_factor", "variance_cap")


def version_of(state: Mapping[str, Any], where: str = "") -> str:
    """The version of a VGS state_dict; a state without ``vgs_version`` is "1.0".

    Raises:
        UnsupportedVersionError: a version this library does not know.
    """
    version = state.get("vgs_version", _UNVERSIONED)
    if version not in VERSIONS:
        raise UnsupportedVersionError(
            f"{where + ': ' if where else ''}{KEY}.vgs_version {version!r} is not a VGS version "
            f"this library knows ({', '.join(VERSIONS)}); upgrade vgs_ckpt")
    return str(version)


def check(fields: Mapping[str, Any], where: str, error: type[VgsCkptError] | None,
          fix: str = "", what: str = f"invalid VGS state: {KEY}", quiet: bool = False
          ) -> VGSState:
    """``fields`` as a :class:`VGSState`, validated; ``what`` ("label: field prefix")
    heads the error message.

    Invalid fields raise ``error`` (with ``fix`` appended), or, with ``error=None``,
    give an :class:`InvalidVGSStateWarning` naming them (unless ``quiet``) and come
    back unvalidated, exactly as given.
    """
    try:
        return VGSState.model_validate(fields)
    except pydantic.ValidationError as exc:
        label, _, prefix = what.partition(": ")
        problem = f"{where}: {label}: {describe_validation(exc, prefix)}"
        if error is not None:
            raise error(f"{problem}{'; ' + fix if fix else ''}") from None
        if not quiet:
            warn(f"{problem}; returned as stored - fix parameters[{KEY!r}] before saving or "
                 "upgrading it", InvalidVGSStateWarning)
        return VGSState.model_construct(**{name: fields.get(name)
                                           for name in VGSState.model_fields})


def summary(parameters: Mapping[Any, Any], tree: Mapping[str, Any], where: str,
            error: type[VgsCkptError] | None = UsageError, fix: str = "",
            quiet: bool = False) -> VGSState | None:
    """The header's ``vgs`` field for ``parameters[KEY]``, or None when there is none.

    ``tree`` is the encoded tree (it names the per-parameter tensors). ``error``,
    ``fix`` and ``quiet`` are as for :func:`check`.
    """
    state = parameters.get(KEY)
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise (error or UsageError)(
            f"{where}: {KEY!r} must be a dict (a VGS state_dict()) or None, got "
            f"{type(state).__qualname__}")
    fields: dict[str, Any] = {"vgs_version": version_of(state, where)}
    for key in SCALAR_KEYS:
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
            value = value.item()
        fields[key] = value
    if fields["enabled"] is None:
        fields["enabled"] = DEFAULTS["enabled"]
    nodes = dict(_vgs_items(tree))
    for key in TENSOR_KEYS:
        node = nodes.get(key)
        fields[key] = node["tensor"] if type(node) is dict and "tensor" in node else None
    return check(fields, where, error, fix, quiet=quiet)


def _vgs_items(tree: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """The (key, node) pairs of the encoded tree's VGS state (none if it has none)."""
    for key, node in dict_items(tree):
        if key == KEY:
            return dict_items(node)
    return []


def same_summary(a: VGSState | None, b: VGSState | None) -> bool:
    """Whether two summaries are equal (NaN equals NaN)."""
    if a is None or b is None:
        return a is b
    return all(_same(getattr(a, n, None), getattr(b, n, None)) for n in VGSState.model_fields)


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return bool(x == y) and type(x) is type(y)
