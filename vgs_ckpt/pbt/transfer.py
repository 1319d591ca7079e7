"""What happens to a parameter tree on exploit: hyperparameters, optimizer strategy."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

from vgs_ckpt import loading
from vgs_ckpt.errors import UsageError
from vgs_ckpt.models import CheckpointFormat, ExploitSource
from vgs_ckpt.pbt.store import CheckpointStore
from vgs_ckpt.upgrades import upgrade
from vgs_ckpt.vgs_state import HYPERPARAM_PREFIX as VGS_HYPERPARAM_PREFIX
from vgs_ckpt.vgs_state import KEY as VGS_KEY
from vgs_ckpt.vgs_state import KNOBS as VGS_KNOBS

__all__ = ["ExploitResult", "OptimizerStrategy", "apply_hyperparams",
           "exploit", "optimizer_state_paths", "reset_optimizer_state", "update_param_group"]

logger = logging.getLogger("vgs_ckpt")
OptimizerStrategy = Literal["copy", "reset"]
_ALIASES = {"learning_rate": "lr"}


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


def update_param_group(group: MutableMapping[str, Any], hyperparams: Mapping[str, Any]
                       ) -> None:
    """Set every hyperparameter the optimizer ``param_group`` already has (``lr``,
    ``weight_decay``, ``betas``, ...; ``learning_rate`` is read as ``lr``) in place."""
    for key, value in hyperparams.items():
        name = _ALIASES.get(key, key)
        if name in group and name != "params":
            group[name] = tuple(value) if isinstance(group[name], tuple) else value


def apply_hyperparams(parameters: Mapping[Any, Any], hyperparams: Mapping[str, Any]
                      ) -> dict[Any, Any]:
    """Apply explored hyperparameters to a loaded tree, so saved values don't win.

    - A key that an optimizer ``param_group`` already has (``lr``, ``weight_decay``,
      ``betas``, ``eps``, ...; ``learning_rate`` is read as ``lr``) is set in the param
      groups of every optimizer state in the tree (see :func:`update_param_group`).
    - ``vgs_<knob>`` (``vgs_alpha``, ``vgs_beta``, ``vgs_warmup_steps``, ...) sets that
      knob of ``parameters["vgs_state"]`` when there is one.
    Other keys are left to the caller. The input is not modified.
    """
    out: dict[Any, Any] = dict(parameters)
    for path in optimizer_state_paths(out):
        state = dict(_get(out, path))
        groups = [dict(group) for group in state["param_groups"]]
        for group in groups:
            update_param_group(group, hyperparams)
        state["param_groups"] = groups
        out = _replace(out, path, state)
    vgs = out.get(VGS_KEY)
    if isinstance(vgs, Mapping):
        knobs = {key[len(VGS_HYPERPARAM_PREFIX):]: value for key, value in hyperparams.items()
                 if key.startswith(VGS_HYPERPARAM_PREFIX)
                 and key[len(VGS_HYPERPARAM_PREFIX):] in VGS_KNOBS}
        if knobs:
            out[VGS_KEY] = {**vgs, **knobs}
    return out


def reset_optimizer_state(parameters: Mapping[Any, Any]) -> dict[Any, Any]:
    """Drop the per-parameter state (moments, step counts) of every optimizer in the tree.

    The param groups (learning rate and the like) stay, so ``load_state_dict`` still
    works and the optimizer restarts its moments from zero.
    """
    out: dict[Any, Any] = dict(parameters)
    for path in optimizer_state_paths(out):
        out = _replace(out, path, {**_get(out, path), "state": {}})
    return out


@dataclass(frozen=True)
class ExploitResult:
    """The recipient's new state after exploiting a donor."""

    parameters: dict[Any, Any]
    format: CheckpointFormat
    source: ExploitSource


def exploit(store: CheckpointStore, recipient_id: str, donor_id: str,
            hyperparams: Mapping[str, Any], *,
            optimizer_strategy: OptimizerStrategy = "copy",
            map_location: str = "cpu") -> ExploitResult:
    """Take the donor's latest checkpoint into the recipient: pin it (hard link), load it,
    apply the recipient's explored ``hyperparams`` after the load, and apply the optimizer
    strategy (``"copy"`` keeps the donor's optimizer state, ``"reset"`` drops all of it).
    """
    if optimizer_strategy not in ("copy", "reset"):
        raise UsageError(f"optimizer_strategy must be 'copy' or 'reset', got "
                         f"{optimizer_strategy!r}")
    ref = store.checkout(donor_id, recipient_id)
    ckpt = loading.load(ref.path, map_location=map_location, upgrade=False)
    fmt = ckpt.format
    if fmt is CheckpointFormat.V1_POLICY_ONLY:
        # Only the policy travels; the recipient keeps whatever else it has, exactly
        # as with the original scheduler (hence the warning).
        logger.warning("member %s exploited member %s through a legacy v1_policy_only "
                       "checkpoint (%s): only the policy weights were transferred, not the "
                       "optimizer or VGS state; save with model_parameters= to fix this",
                       recipient_id, donor_id, os.fspath(ref.path))
        tree: dict[Any, Any] = {"policy": ckpt.parameters}
    else:
        tree = upgrade(ckpt)[0].parameters
    parameters = apply_hyperparams(tree, hyperparams)
    if optimizer_strategy == "reset":
        parameters = reset_optimizer_state(parameters)
    source = ExploitSource(member_id=donor_id, step=ref.step, performance=ref.performance,
                           file=os.fspath(ref.path))
    return ExploitResult(parameters, fmt, source)

