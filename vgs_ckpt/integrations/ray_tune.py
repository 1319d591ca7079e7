"""Ray Tune: full-state (weights, optimizer, VGS) checkpoints for PopulationBasedTraining.

Install with ``pip install 'vgs-ckpt[ray]'``. In a function trainable::

    from vgs_ckpt.integrations import ray_tune

    def trainable(config):
        learner = make_learner(config)
        lineage, start = None, 0
        restored = ray_tune.restore(config)           # None on a fresh start
        if restored is not None:
            learner.set_parameters(restored.parameters)  # the trial's own lr/VGS knobs applied
            lineage, start = restored.lineage, restored.header.step
        for step in range(start + 1, ...):
            ...
            ray_tune.report({"loss": loss}, learner.get_parameters(), step=step,
                            config=config, lineage=lineage)

When Ray's PBT clones another trial's checkpoint into this trial, ``restore``
loads it, applies *this* trial's (explored) hyperparameters from ``config`` to the
optimizer ``param_groups`` and to the VGS knobs (``vgs_alpha``, ...), so the donor's
saved values do not override them, and returns the lineage (donor trial and
iteration) that the next checkpoint records.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

from vgs_ckpt import loading, writer
from vgs_ckpt.errors import FormatError, MissingDependencyError
from vgs_ckpt.models import CheckpointV2, ExploitSource, HeaderFields, Lineage
from vgs_ckpt.pbt.transfer import OptimizerStrategy, apply_hyperparams, reset_optimizer_state
from vgs_ckpt.upgrades import upgrade

__all__ = ["CHECKPOINT_FILE", "Restored", "report", "restore", "restore_checkpoint",
           "save_checkpoint"]

CHECKPOINT_FILE = "vgs_ckpt.safetensors"
INSTALL = "pip install 'vgs-ckpt[ray]'"


def _tune() -> Any:
    try:
        from ray import tune
    except ImportError:
        raise MissingDependencyError(f"the Ray Tune integration needs Ray: {INSTALL}") from None
    return tune


def _trial_id() -> str | None:
    try:
        return str(_tune().get_context().get_trial_id())
    except (AttributeError, RuntimeError):
        return None


def _json_hyperparams(config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-representable, finite scalar entries of a trial config."""
    return {k: v for k, v in config.items() if isinstance(k, str) and (
        isinstance(v, bool | int | str) or (isinstance(v, float) and math.isfinite(v)))}


def save_checkpoint(directory: str | os.PathLike[str], parameters: Mapping[Any, Any], *,
                    config: Mapping[str, Any] | None = None, trial_id: str | None = None,
                    **fields: Unpack[HeaderFields]) -> Any:
    """Write a v2 checkpoint into ``directory`` and return it as a ``ray.tune.Checkpoint``.

    ``fields`` are the header's (:class:`~vgs_ckpt.HeaderFields`; ``step`` is the
    iteration). By default the header records the trial id (``trial_id``, else the
    current trial's) as ``member_id`` and the trial's JSON-representable ``config``
    entries as ``hyperparams``; explicit ``member_id=`` or ``hyperparams=`` win.
    """
    tune = _tune()
    path = Path(directory) / CHECKPOINT_FILE
    fields.setdefault("member_id", trial_id or _trial_id())
    fields.setdefault("hyperparams", _json_hyperparams(config or {}))
    writer.save(path, parameters, **fields)
    return tune.Checkpoint.from_directory(os.fspath(directory))


def report(metrics: Mapping[str, Any], parameters: Mapping[Any, Any], *, step: int,
           config: Mapping[str, Any] | None = None, lineage: Lineage | None = None,
           performance_metric: str | None = None) -> None:
    """``tune.report(metrics, checkpoint=...)`` with a full-state v2 checkpoint.

    ``performance_metric`` names the metric stored as the header's performance.
    """
    tune = _tune()
    performance = None
    if performance_metric is not None:
        value = metrics[performance_metric]
        performance = float(value) if math.isfinite(float(value)) else None
    with tempfile.TemporaryDirectory(prefix="vgs_ckpt-") as directory:
        checkpoint = save_checkpoint(directory, parameters, step=step, performance=performance,
                                     config=config, lineage=lineage)
        tune.report(dict(metrics), checkpoint=checkpoint)


@dataclass(frozen=True)
class Restored:
    """A restored trial state."""

    parameters: dict[Any, Any]  # with this trial's hyperparameters applied
    header: CheckpointV2
    source: ExploitSource  # the trial and iteration the checkpoint was written by
    cloned: bool  # True when it came from another trial (Ray's PBT exploit)
    lineage: Lineage  # what this trial's next checkpoint should record


def restore_checkpoint(checkpoint: Any, config: Mapping[str, Any], *,
                       trial_id: str | None = None, map_location: str = "cpu",
                       optimizer_strategy: OptimizerStrategy = "copy") -> Restored:
    """Load a vgs_ckpt checkpoint from a ``ray.tune.Checkpoint`` and apply ``config``.

    Raises:
        FormatError: the checkpoint has no vgs_ckpt file.
    """
    with checkpoint.as_directory() as directory:
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            raise FormatError(f"{directory}: no {CHECKPOINT_FILE} in this Ray checkpoint; "
                              "was it written with vgs_ckpt.integrations.ray_tune?")
        loaded, _ = upgrade(loading.load(path, map_location=map_location))
        # The tensors are in memory this process owns: they stay valid after Ray
        # deletes a temporary download directory.
    header = loaded.header
    if not isinstance(header, CheckpointV2):
        raise FormatError(f"{path}: expected a v2_full_parameters checkpoint, got "
                          f"{header.format_version.value}")
    me = trial_id or _trial_id()
    source = ExploitSource(member_id=header.member_id or "unknown", step=header.step,
                           performance=header.performance, file=os.fspath(checkpoint.path))
    cloned = header.member_id is not None and me is not None and header.member_id != me
    parameters = apply_hyperparams(loaded.parameters, config)
    if cloned and optimizer_strategy == "reset":
        parameters = reset_optimizer_state(parameters)
    lineage = Lineage(exploited_from=source) if cloned else header.lineage
    return Restored(parameters, header, source, cloned, lineage)


def restore(config: Mapping[str, Any], **kwargs: Any) -> Restored | None:
    """Restore from ``tune.get_checkpoint()`` (None when the trial starts fresh)."""
    checkpoint = _tune().get_checkpoint()
    if checkpoint is None:
        return None
    return restore_checkpoint(checkpoint, config, **kwargs)
