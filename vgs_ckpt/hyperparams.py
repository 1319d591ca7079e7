"""Explored hyperparameters: the one place they are parsed and applied.

A PBT member's hyperparameters are a flat mapping (``{"lr": 3e-4, "vgs_alpha":
0.1, ...}``). :func:`split` parses it once: ``vgs_<knob>`` entries are VGS knobs
(:data:`vgs_ckpt.vgs_state.KNOBS`), the rest are the learner's. Then:

- :func:`apply_to_tree` sets them in a loaded parameter tree (optimizer param
  groups, the VGS state), for the transfer on exploit and the Ray integration;
- :func:`apply_to_optimizer` and :func:`apply_to_scaler` set them on live
  objects (the hand-written learner, and the SB3 integration, whose own settings
  such as ``ent_coef`` or ``clip_range`` extend this in
  :mod:`vgs_ckpt.integrations.sb3.hyperparams`).

``learning_rate`` is read as ``lr`` wherever a param group is concerned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vgs_ckpt.errors import UsageError
from vgs_ckpt.vgs import VarianceGradientScaler, plain
from vgs_ckpt.vgs_state import HYPERPARAM_PREFIX, KNOBS
from vgs_ckpt.vgs_state import KEY as VGS_KEY

__all__ = ["ALIASES", "GROUP_KEYS", "Split", "apply_to_optimizer", "apply_to_scaler",
           "apply_to_tree", "optimizer_state_paths", "reset_optimizer_state", "split",
           "unapplied", "update_param_group"]

ALIASES = {"learning_rate": "lr"}  # hyperparameter name -> param-group key


@dataclass(frozen=True)
class Split:
    """A hyperparameter mapping, parsed: VGS knobs and everything else."""

    vgs: dict[str, Any] = field(default_factory=dict)  # knob -> value (prefix removed)
    other: dict[str, Any] = field(default_factory=dict)  # the learner's own


def split(hyperparams: Mapping[str, Any], *, strict: bool = False) -> Split:
    """Separate the ``vgs_<knob>`` entries from the rest.

    With ``strict``, a ``vgs_`` entry that names no knob is a UsageError; without,
    it is left among the others (a learner may have its own ``vgs_``-named setting).
    """
    vgs: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for key, value in hyperparams.items():
        knob = key[len(HYPERPARAM_PREFIX):] if key.startswith(HYPERPARAM_PREFIX) else None
        if knob in KNOBS:
            vgs[knob] = value
        elif knob is not None and strict:
            raise UsageError(f"hyperparameter {key!r}: VGS has no knob {knob!r} (knobs: "
                             f"{', '.join(KNOBS)})")
        else:
            other[key] = value
    return Split(vgs, other)


def update_param_group(group: MutableMapping[str, Any], hyperparams: Mapping[str, Any]
                       ) -> None:
    """Set every hyperparameter the optimizer ``param_group`` already has (``lr``,
    ``weight_decay``, ``betas``, ...; ``learning_rate`` is read as ``lr``) in place."""
    for key, value in hyperparams.items():
        name = ALIASES.get(key, key)
        if name in group and name != "params":
            group[name] = tuple(value) if isinstance(group[name], tuple) else value


def apply_to_optimizer(optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
                       hyperparams: Mapping[str, Any]) -> None:
    """:func:`update_param_group` on every param group of the optimizer(s)."""
    found = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers
    for optimizer in found:
        for group in optimizer.param_groups:
            update_param_group(group, hyperparams)


def check_knobs(scaler: VarianceGradientScaler, knobs: Mapping[str, Any]) -> None:
    """Raise the UsageError the scaler would for these knob values (nothing is set)."""
    VarianceGradientScaler([], **{**scaler.config(), **knobs})


def apply_to_scaler(scaler: VarianceGradientScaler, knobs: Mapping[str, Any]) -> None:
    """Set VGS knobs (``split(...).vgs``) on a live scaler, all or none: a bad value is
    a UsageError and nothing is set."""
    check_knobs(scaler, knobs)
    for knob, value in knobs.items():
        setattr(scaler, knob, plain(value))


def _is_optimizer_state(value: Any) -> bool:
    return (isinstance(value, Mapping) and isinstance(value.get("state"), Mapping)
            and isinstance(value.get("param_groups"), list | tuple))


def optimizer_state_paths(tree: Mapping[Any, Any]) -> list[tuple[Any, ...]]:
    """Paths of every torch optimizer ``state_dict()`` in a tree (``"policy.optimizer"``,
    ``"optimizer_state"``, ``"actor.optimizer"``, ... wherever they are)."""
    found: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if _is_optimizer_state(node):
            found.append(path)
        elif isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, (*path, key))

    walk(tree, ())
    return found


def _replace(tree: Mapping[Any, Any], path: tuple[Any, ...], value: Any) -> dict[Any, Any]:
    """A copy of ``tree`` with ``value`` at ``path``; only the containers on the path are
    copied, so tensors are shared, not duplicated."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _replace(tree[path[0]], path[1:], value)
    return out


def _get(tree: Mapping[Any, Any], path: tuple[Any, ...]) -> Any:
    node: Any = tree
    for key in path:
        node = node[key]
    return node


def apply_to_tree(parameters: Mapping[Any, Any], hyperparams: Mapping[str, Any]
                  ) -> dict[Any, Any]:
    """Apply explored hyperparameters to a loaded tree, so saved values don't win.

    - A key that an optimizer ``param_group`` already has (``lr``, ``weight_decay``,
      ``betas``, ``eps``, ...; ``learning_rate`` is read as ``lr``) is set in the param
      groups of every optimizer state in the tree (see :func:`update_param_group`).
    - ``vgs_<knob>`` (``vgs_alpha``, ``vgs_beta``, ``vgs_warmup_steps``, ...) sets that
      knob of ``parameters["vgs_state"]`` when there is one.
    Other keys are left to the caller. The input is not modified.
    """
    parsed = split(hyperparams)
    out: dict[Any, Any] = dict(parameters)
    for path in optimizer_state_paths(out):
        state = dict(_get(out, path))
        groups = [dict(group) for group in state["param_groups"]]
        for group in groups:
            update_param_group(group, parsed.other)
        state["param_groups"] = groups
        out = _replace(out, path, state)
    vgs = out.get(VGS_KEY)
    if isinstance(vgs, Mapping) and parsed.vgs:
        out[VGS_KEY] = {**vgs, **parsed.vgs}
    return out


# Param-group keys of torch's optimizers: what an explored hyperparameter may set in an
# optimizer a tree does not carry (a policy-only exploit keeps the recipient's own).
GROUP_KEYS = frozenset({
    "lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "amsgrad",
    "alpha", "centered", "rho", "lr_decay", "initial_accumulator_value", "lambd", "t0",
    "etas", "step_sizes", "momentum_decay", "decoupled_weight_decay", "maximize",
    "initial_lr", "max_lr", "min_lr"})


def unapplied(parameters: Mapping[Any, Any], hyperparams: Mapping[str, Any]) -> list[str]:
    """The keys of ``hyperparams`` that :func:`apply_to_tree` can give no meaning to: not a
    param-group key of an optimizer in the tree (of any torch optimizer when the tree
    carries none), not ``learning_rate``, not ``vgs_<knob>``. A ``vgs_`` key naming no knob
    is among them."""
    groups = [group for path in optimizer_state_paths(parameters)
              for group in _get(parameters, path)["param_groups"]]
    known = ({k for group in groups for k in group if k != "params"} if groups
             else set(GROUP_KEYS))
    # split() takes the vgs_<knob> keys; a vgs_ key naming no knob stays among the others.
    return [key for key in split(hyperparams).other if ALIASES.get(key, key) not in known]


def reset_optimizer_state(parameters: Mapping[Any, Any]) -> dict[Any, Any]:
    """Drop the per-parameter state (moments, step counts) of every optimizer in the tree.

    The param groups (learning rate and the like) stay, so ``load_state_dict`` still
    works and the optimizer restarts its moments from zero.
    """
    out: dict[Any, Any] = dict(parameters)
    for path in optimizer_state_paths(out):
        out = _replace(out, path, {**_get(out, path), "state": {}})
    return out
