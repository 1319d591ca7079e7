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

from vgs_ckpt._tree import dict_items
from vgs_ckpt.errors import (
    FormatError,
    InvalidVGSStateWarning,
    UnsupportedVersionError,
    UsageError,
    VgsCkptError,
    warn,
)
from vgs_ckpt.models import VGS_VERSIONS, VGSRole, VGSState, describe_validation

__all__ = ["ADDED_IN_3_2", "DEFAULTS", "HYPERPARAM_PREFIX", "KEY", "KNOBS", "LATEST",
           "SCALAR_KEYS", "STATE_KEYS", "STATISTICS", "TENSOR_KEYS", "VERSIONS", "check",
           "check_stored", "summary", "version_of"]

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
        UnsupportedVersionError: any other value than a version this library knows (spec
            section 9.5), whoever reads it: ``load``, ``load(upgrade=False)``, ``open``.
    """
    version = state.get("vgs_version", _UNVERSIONED)
    if type(version) is not str or version not in VERSIONS:
        raise UnsupportedVersionError(
            f"{where + ': ' if where else ''}{KEY}.vgs_version {version!r:.40} is not a VGS "
            f"version this library knows ({', '.join(VERSIONS)}); upgrade vgs_ckpt")
    return version


def check(fields: Mapping[str, Any], where: str, error: type[VgsCkptError] | None,
          fix: str = "", what: str = f"invalid VGS state: {KEY}") -> VGSState:
    """``fields`` as a :class:`VGSState`, validated; ``what`` ("label: field prefix")
    heads the error message.

    Invalid fields raise ``error`` (with ``fix`` appended), or, with ``error=None``,
    give an :class:`InvalidVGSStateWarning` naming them and come back unvalidated,
    exactly as given.
    """
    label, _, prefix = what.partition(": ")
    model, problem = _validate(fields, {}, prefix)
    if model is not None:
        return model
    return _invalid(fields, f"{where}: {label}: {problem}", error, fix)


def _validate(fields: Mapping[str, Any], problems: Mapping[str, str], prefix: str
              ) -> tuple[VGSState | None, str]:
    """The validated model, or None and every problem: ``problems`` (key -> message)
    first, then the model's own, but for the keys ``problems`` already names."""
    try:
        model = VGSState.model_validate(fields)
    except pydantic.ValidationError as exc:
        found = describe_validation(exc, prefix, skip=problems)
        return None, "; ".join([*problems.values(), *([found] if found else [])])
    return (None, "; ".join(problems.values())) if problems else (model, "")


def _kind(value: Any) -> str:
    """What a value of a tree is, for messages (a spec of a lazily read tree included)."""
    kind = getattr(value, "kind", None)
    if kind is not None and hasattr(value, "dtype") and hasattr(value, "shape"):
        return {"torch": "a tensor", "numpy": "a numpy array"}.get(kind, "a numpy scalar")
    if type(value).__module__ == "torch":
        return "a tensor"
    if type(value).__module__ == "numpy":
        return "a numpy array" if type(value).__name__ == "ndarray" else "a numpy scalar"
    return f"a {type(value).__qualname__}"


def _invalid(fields: Mapping[str, Any], problem: str, error: type[VgsCkptError] | None,
             fix: str) -> VGSState:
    """Raise ``error`` for an invalid state, or (None) warn and return ``fields`` as
    they are."""
    if error is not None:
        raise error(f"{problem}{'; ' + fix if fix else ''}") from None
    warn(f"{problem}; returned as stored - fix parameters[{KEY!r}] before saving or "
         "upgrading it", InvalidVGSStateWarning)
    return VGSState.model_construct(**{name: fields.get(name) for name in VGSState.model_fields})


# The types a VGS state's scalars have in a tree (spec section 8): plain values, never a
# tensor, a numpy scalar or a string standing for a number.
_NUMBER = (int, float)
_TREE_TYPES: dict[str, tuple[type, ...]] = {
    "enabled": (bool,), "warmup_steps": (int,), "step_count": (int,),
    **{key: _NUMBER for key in ("beta", "alpha", "eps", "min_scaling_factor",
                                "variance_cap", "grad_mean_ema", "grad_var_ema",
                                "grad_norm_ema", "grad_max_ema")},
}


def _fields(state: Mapping[Any, Any], tree: Mapping[str, Any], where: str
            ) -> tuple[dict[str, Any], dict[str, str]]:
    """The summary's fields for a stored state, and the problems of the state's own
    types by key (a scalar that is not a plain value, a per-parameter member that is not
    a tensor). Raises UnsupportedVersionError for an unknown version."""
    fields: dict[str, Any] = {"vgs_version": version_of(state, where)}
    problems: dict[str, str] = {}
    for key in SCALAR_KEYS:
        if key not in state:  # a required one is reported missing by the model
            continue
        value = fields[key] = state[key]
        if value is not None and type(value) not in _TREE_TYPES[key]:
            kinds = " or ".join(t.__name__ for t in _TREE_TYPES[key])
            problems[key] = (f"{KEY}.{key}: must be a plain {kinds} (not a tensor, numpy "
                             f"scalar or string), got {_kind(value)}")
    if fields.get("enabled") is None:
        fields["enabled"] = DEFAULTS["enabled"]
    nodes = dict(_vgs_items(tree))
    for key in TENSOR_KEYS:
        node = nodes.get(key)
        if type(node) is dict and type(node.get("tensor")) is str:
            fields[key] = node["tensor"]
        else:
            fields[key] = None
            if state.get(key) is not None:
                problems[key] = (f"{KEY}.{key}: must be a torch tensor (a tensor node) or "
                                 f"None, got {_kind(state.get(key))}")
    return fields, problems


def summary(parameters: Mapping[Any, Any], tree: Mapping[str, Any], where: str,
            error: type[VgsCkptError] | None = UsageError, fix: str = "",
            kind_error: type[VgsCkptError] = UsageError) -> VGSState | None:
    """The header's ``vgs`` field for ``parameters[KEY]``, or None when there is none.

    ``tree`` is the encoded tree (it names the per-parameter tensors). ``error`` and
    ``fix`` are as for :func:`check`; a state that is neither a dict nor None raises
    ``kind_error``.
    """
    state = parameters.get(KEY)
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise kind_error(
            f"{where}: {KEY!r} must be a dict (a VGS state_dict()) or None, got "
            f"{type(state).__qualname__}")
    fields, problems = _fields(state, tree, where)
    model, problem = _validate(fields, problems, KEY)
    if model is not None:
        return model
    return _invalid(fields, f"{where}: invalid VGS state: {problem}", error, fix)


def check_stored(structure: Mapping[Any, Any], tree: Mapping[str, Any], stored: Any,
                 where: str, as_stored: bool) -> VGSState | None:
    """The header's ``vgs`` of a v2 file, checked against the decoded tree
    (``structure``, tensors as specs; spec section 8).

    A valid state needs a summary that matches it, else FormatError. An invalid one is
    a FormatError too, unless the file is read ``as_stored``: then an
    InvalidVGSStateWarning names the problems and the summary is kept as stored,
    unchecked (salvage). A state that is neither a dict nor null is a FormatError, an
    unknown ``vgs_version`` an UnsupportedVersionError, in every case.
    """
    state = structure.get(KEY)
    if state is None:
        if stored is not None:
            raise FormatError(f"{where}: the header has a VGS summary but the tree has no "
                              f"{KEY!r}; the file is corrupt")
        return None
    if not isinstance(state, Mapping):
        raise FormatError(f"{where}: {KEY!r} must be a dict node or null, got "
                          f"{type(state).__qualname__}; the file is corrupt")
    fields, problems = _fields(state, tree, where)
    model, problem = _validate(fields, problems, KEY)
    if model is None:  # salvage: the summary is kept as stored, unchecked
        return _invalid(stored if type(stored) is dict else {},
                        f"{where}: invalid VGS state: {problem}",
                        None if as_stored else FormatError,
                        "load it with upgrade=False to salvage the data")
    if type(stored) is not dict:
        raise FormatError(f"{where}: the header's VGS summary must be an object for the "
                          f"stored {KEY!r}, got {stored!r:.40}; the file is corrupt")
    try:
        found = VGSState.model_validate(stored)
    except pydantic.ValidationError as exc:
        raise FormatError(f"{where}: the header's VGS summary is invalid: "
                          f"{describe_validation(exc, 'vgs')}; the file is corrupt") from None
    differ = _differing(found, model)
    if differ:
        raise FormatError(f"{where}: the header's VGS summary does not match the stored "
                          f"{KEY!r} (differs in {', '.join(differ)}); the file is corrupt")
    return found


def _vgs_items(tree: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """The (key, node) pairs of the encoded tree's VGS state (none if it has none)."""
    for key, node in dict_items(tree):
        if key == KEY:
            return dict_items(node)
    return []


def _differing(a: VGSState, b: VGSState) -> list[str]:
    """The fields in which two summaries differ (NaN equals NaN)."""
    return [n for n in VGSState.model_fields if not _same(getattr(a, n), getattr(b, n))]


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return bool(x == y) and type(x) is type(y)
