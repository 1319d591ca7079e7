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

A restart is not an exploit. Ray restarts a failed trial (its node died, or the
driver was restored) from the latest checkpoint it knows for it, which is the
donor's when the trial was cloned and had not reported since (or when Ray's saved
experiment state predates its reports). ``restore`` tells the two apart with a
marker it writes next to a cloned checkpoint (``.vgs_ckpt-restored-by-<trial id>``,
through the checkpoint's own filesystem, so it outlives the node) holding the
trial's config: a restore of the same checkpoint with the same config is a restart
(``cloned=False``, ``restarted=True``, the same lineage); a new exploit of it comes
with a newly explored config and counts as one.
"""

from __future__ import annotations

import json
import logging
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

logger = logging.getLogger("vgs_ckpt")
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
    # True when this is an exploit: another trial's checkpoint, restored by this trial
    # for the first time (a restart from the same checkpoint is not one).
    cloned: bool
    lineage: Lineage  # what this trial's next checkpoint should record
    restarted: bool = False  # a restart of this trial from a checkpoint it had restored


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
    foreign = header.member_id is not None and me is not None and header.member_id != me
    restarted = foreign and _marked(checkpoint, me, config)
    cloned = foreign and not restarted
    if cloned:
        _mark(checkpoint, me, config)
    parameters = apply_hyperparams(loaded.parameters, config)
    if foreign and optimizer_strategy == "reset":
        parameters = reset_optimizer_state(parameters)
    lineage = Lineage(exploited_from=source) if foreign else header.lineage
    return Restored(parameters, header, source, cloned, lineage, restarted)


_MARKER = ".vgs_ckpt-restored-by-"


def _marker_path(checkpoint: Any, trial_id: str | None) -> tuple[Any, str] | None:
    filesystem, path = getattr(checkpoint, "filesystem", None), getattr(checkpoint, "path", None)
    if filesystem is None or path is None or trial_id is None:
        return None
    return filesystem, f"{str(path).rstrip('/')}/{_MARKER}{trial_id}"


def _config_key(config: Mapping[str, Any]) -> bytes:
    return json.dumps(_json_hyperparams(config), sort_keys=True).encode()


def _marked(checkpoint: Any, trial_id: str | None, config: Mapping[str, Any]) -> bool:
    """Whether this trial restored ``checkpoint`` before with this same ``config``: a
    restart. (A new exploit of the same checkpoint comes with a newly explored
    config; an unreadable marker counts the restore as an exploit.)"""
    where = _marker_path(checkpoint, trial_id)
    if where is None:
        return False
    filesystem, path = where
    try:
        with filesystem.open_input_stream(path) as stream:
            return bool(stream.read() == _config_key(config))
    except Exception:  # no marker (FileNotFoundError, or the filesystem's own error)
        return False


def _mark(checkpoint: Any, trial_id: str | None, config: Mapping[str, Any]) -> None:
    """Record, next to the cloned checkpoint (on the checkpoint's own filesystem, so it
    outlives this node), that this trial restored it with ``config``."""
    where = _marker_path(checkpoint, trial_id)
    if where is None:
        return
    filesystem, path = where
    try:
        with filesystem.open_output_stream(path) as stream:
            stream.write(_config_key(config))
    except Exception as exc:  # a read-only checkpoint: no restart detection
        logger.warning("could not mark the cloned checkpoint %s (%s): a restart from it "
                       "would count as another exploit", path, exc)


def restore(config: Mapping[str, Any], **kwargs: Any) -> Restored | None:
    """Restore from ``tune.get_checkpoint()`` (None when the trial starts fresh)."""
    checkpoint = _tune().get_checkpoint()
    if checkpoint is None:
        return None
    return restore_checkpoint(checkpoint, config, **kwargs)
