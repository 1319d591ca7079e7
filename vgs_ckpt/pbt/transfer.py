"""What happens to a parameter tree on exploit: hyperparameters, optimizer strategy."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from vgs_ckpt import loading
from vgs_ckpt.errors import UsageError
from vgs_ckpt.hyperparams import (
    ALIASES,
    GROUP_KEYS,
    apply_to_tree,
    optimizer_state_paths,
    reset_optimizer_state,
    unapplied,
    update_param_group,
)
from vgs_ckpt.models import CheckpointFormat, ExploitSource
from vgs_ckpt.pbt.store import CheckpointStore
from vgs_ckpt.upgrades import upgrade
from vgs_ckpt.vgs_state import KNOBS

__all__ = ["ExploitResult", "OptimizerStrategy", "apply_hyperparams",
           "exploit", "optimizer_state_paths", "reset_optimizer_state", "update_param_group"]

logger = logging.getLogger("vgs_ckpt")
OptimizerStrategy = Literal["copy", "reset"]
# Re-exported from the one hyperparameter module (their home).
apply_hyperparams = apply_to_tree


@dataclass(frozen=True)
class ExploitResult:
    """The recipient's new state after exploiting a donor."""

    parameters: dict[Any, Any]
    format: CheckpointFormat
    source: ExploitSource


def exploit(store: CheckpointStore, recipient_id: str, donor_id: str,
            hyperparams: Mapping[str, Any], *,
            optimizer_strategy: OptimizerStrategy = "copy",
            map_location: str = "cpu", caller_keys: Collection[str] = ()) -> ExploitResult:
    """Take the donor's latest checkpoint into the recipient: pin it (hard link), load it,
    apply the recipient's explored ``hyperparams`` after the load, and apply the optimizer
    strategy (``"copy"`` keeps the donor's optimizer state, ``"reset"`` drops all of it).

    Every key of ``hyperparams`` must mean something to the tree: a param-group key of
    its optimizers (``lr``, ``weight_decay``, ...; ``learning_rate``), or ``vgs_<knob>``.
    Keys that the caller applies itself (a batch size, an entropy coefficient of its own
    loop) are named in ``caller_keys``.

    Raises:
        UsageError: a key that is neither (a typo such as ``lrr``), naming it and the
            closest known name; the recipient gets nothing (the donor's file was
            pinned under ``_exploits`` already, as for any exploit).
    """
    if optimizer_strategy not in ("copy", "reset"):
        raise UsageError(f"optimizer_strategy must be 'copy' or 'reset', got "
                         f"{optimizer_strategy!r}")
    ref = store.checkout(donor_id, recipient_id)
    ckpt = loading.load(os.fspath(ref.path), map_location=map_location, upgrade=False,
                        storage=store.storage)
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
    _check_keys(donor_id, tree, hyperparams, caller_keys)
    parameters = apply_hyperparams(tree, hyperparams)
    if optimizer_strategy == "reset":
        parameters = reset_optimizer_state(parameters)
    source = ExploitSource(member_id=donor_id, step=ref.step, performance=ref.performance,
                           file=os.fspath(ref.path))
    return ExploitResult(parameters, fmt, source)



def _check_keys(donor_id: str, tree: Mapping[Any, Any], hyperparams: Mapping[str, Any],
                caller_keys: Collection[str]) -> None:
    """Refuse explored hyperparameters that neither the donor's tree nor the caller takes:
    the same mistake ``sb3.set_state`` refuses by name."""
    wanted = {k: v for k, v in hyperparams.items() if k not in set(caller_keys)}
    unknown = unapplied(tree, wanted)
    if unknown:
        known = sorted({*GROUP_KEYS, *ALIASES, *(f"vgs_{k}" for k in KNOBS)})
        hints = [f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(
            key, known, n=1)) else repr(key) for key in unknown]
        raise UsageError(
            f"exploit of member {donor_id!r}: hyperparameter(s) {', '.join(hints)} set "
            "nothing in the checkpoint (not a param-group key of its optimizers, not "
            "learning_rate, not vgs_<knob>); fix the name, or pass caller_keys=[...] for "
            "the ones your learner applies itself")
