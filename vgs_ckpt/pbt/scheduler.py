"""A drop-in PBT scheduler with the original's configuration, built on the store and
:func:`vgs_ckpt.pbt.exploit`. Framework-neutral: it takes and returns plain trees."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import CheckpointNotFoundError, UsageError, warn
from vgs_ckpt.models import CheckpointFormat, CheckpointV2, ExploitSource, Lineage
from vgs_ckpt.pbt.store import CheckpointRef, CheckpointStore, check_member_id
from vgs_ckpt.pbt.transfer import OptimizerStrategy, exploit

__all__ = ["HyperparamSpec", "PBTConfig", "PBTScheduler", "PopulationMember",
           "truncation_count"]

logger = logging.getLogger("vgs_ckpt")


@dataclass(frozen=True)
class HyperparamSpec:
    """How one hyperparameter is sampled and perturbed.

    Either a numeric range (``min_value``..``max_value``, optionally ``log_scale``,
    optionally ``integer``) or categorical ``values``.
    """

    name: str
    min_value: float | None = None
    max_value: float | None = None
    log_scale: bool = False
    values: Sequence[Any] | None = None
    integer: bool = False

    def __post_init__(self) -> None:
        if self.values is not None:
            if not self.values:
                raise UsageError(f"hyperparameter {self.name!r}: values must not be empty")
            return
        if self.min_value is None or self.max_value is None or self.min_value > self.max_value:
            raise UsageError(f"hyperparameter {self.name!r}: give values=[...] or "
                             "min_value <= max_value")
        if self.log_scale and self.min_value <= 0:
            raise UsageError(f"hyperparameter {self.name!r}: log_scale needs min_value > 0")

    def sample(self, rng: random.Random) -> Any:
        if self.values is not None:
            return rng.choice(list(self.values))
        assert self.min_value is not None and self.max_value is not None
        if self.log_scale:
            value = math.exp(rng.uniform(math.log(self.min_value), math.log(self.max_value)))
        else:
            value = rng.uniform(self.min_value, self.max_value)
        return self._fit(value)

    def perturb(self, value: Any, factors: Sequence[float], rng: random.Random) -> Any:
        if self.values is not None:
            options = list(self.values)
            if value not in options:
                return rng.choice(options)
            index = options.index(value) + rng.choice((-1, 1))
            return options[min(max(index, 0), len(options) - 1)]
        return self._fit(float(value) * rng.choice(list(factors)))

    def _fit(self, value: float) -> float | int:
        assert self.min_value is not None and self.max_value is not None
        value = min(max(value, self.min_value), self.max_value)
        return round(value) if self.integer else value


def truncation_count(population: int, ratio: float) -> int:
    """How many members form the top and the bottom of truncation selection.

    The original used ``int(n * ratio)``, which is 0 for 4 members at 0.2, so nobody
    ever exploited. Here it is ``ceil(n * ratio)``, at least 1 once there are two
    members, and at most ``n // 2`` so the top and the bottom never overlap.
    """
    if population < 2:
        return 0
    return min(max(1, math.ceil(population * ratio)), population // 2)


@dataclass(frozen=True)
class PBTConfig:
    """The original scheduler's configuration."""

    checkpoint_dir: str
    hyperparams: Sequence[HyperparamSpec] = ()
    population_size: int = 8
    perturbation_interval: int = 10
    truncation_ratio: float = 0.25
    exploit_method: Literal["truncation", "binary_tournament"] = "truncation"
    explore_method: Literal["perturb", "resample", "both"] = "both"
    perturbation_factors: tuple[float, ...] = (0.8, 1.2)
    resample_probability: float = 0.25
    metric_mode: Literal["max", "min"] = "max"
    optimizer_strategy: OptimizerStrategy = "copy"
    keep_last: int = 2
    keep_best: int = 1
    seed: int | None = None
    # What to do when checkpoint_dir already holds checkpoints: "refuse" (a UsageError),
    # "auto" (resume them; start fresh when there are none), "must" (resume; a
    # UsageError when there is nothing to resume) or "fresh" (move them aside into
    # checkpoint_dir/_previous_runs/<time>/ and start over; nothing is deleted).
    # "never" is the same as "fresh".
    resume: Literal["refuse", "auto", "must", "fresh", "never"] = "refuse"
    # Save in the background (vgs_ckpt.save_async): update_performance returns once the
    # tensors are snapshotted; an exploit of a donor waits for the donor's pending save.
    async_save: bool = False
    # For a checkpoint_dir that is a URL (s3://bucket/run): the options of its
    # filesystem (fsspec's: credentials, client_kwargs={"endpoint_url": ...}, ...).
    storage_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.population_size >= 2, "population_size must be >= 2"),
            (self.perturbation_interval >= 1, "perturbation_interval must be >= 1"),
            (0 < self.truncation_ratio <= 0.5, "truncation_ratio must be in (0, 0.5]"),
            (self.exploit_method in ("truncation", "binary_tournament"),
             "exploit_method must be 'truncation' or 'binary_tournament'"),
            (self.explore_method in ("perturb", "resample", "both"),
             "explore_method must be 'perturb', 'resample' or 'both'"),
            (0 <= self.resample_probability <= 1, "resample_probability must be in [0, 1]"),
            (self.metric_mode in ("max", "min"), "metric_mode must be 'max' or 'min'"),
            (self.optimizer_strategy in ("copy", "reset"),
             "optimizer_strategy must be 'copy' or 'reset'"),
            (len(self.perturbation_factors) > 0, "perturbation_factors must not be empty"),
            (self.resume in ("refuse", "auto", "must", "fresh", "never"),
             "resume must be 'refuse', 'auto', 'must', 'fresh' or 'never'"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(f"invalid PBTConfig: {message}")


@dataclass
class PopulationMember:
    """One member of the population, as the scheduler tracks it."""

    member_id: str
    hyperparams: dict[str, Any]
    performance: float | None = None
    step: int = 0
    last_ready_step: int = 0
    exploited_from: ExploitSource | None = None
    history: list[tuple[int, float | None]] = field(default_factory=list)


class PBTScheduler:
    """Population-Based Training: update performance, then exploit and explore.

    Example:
        >>> scheduler = PBTScheduler(PBTConfig("ckpts", [HyperparamSpec("lr", 1e-5, 1e-2,
        ...                                                               log_scale=True)]))
        >>> members = scheduler.initialize_population()
        >>> scheduler.update_performance(members[0], 0.8, 100,
        ...                              model_parameters=model.get_parameters())
        >>> params, hp, fmt = scheduler.exploit_and_explore(members[0])
    """

    def __init__(self, config: PBTConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.store = CheckpointStore(config.checkpoint_dir, keep_last=config.keep_last,
                                     keep_best=config.keep_best, mode=config.metric_mode,
                                     async_save=config.async_save,
                                     storage_options=config.storage_options)
        root = self.store.root
        existing = self.store.member_ids()
        self.moved_to: Path | str | None = None
        if existing and config.resume == "refuse":
            raise UsageError(
                f"{root} already holds checkpoints of {len(existing)} member(s) "
                f"({', '.join(existing[:8])}{', ...' if len(existing) > 8 else ''}); pass "
                "PBTConfig(resume='auto') to continue that population, resume='fresh' to "
                "move them aside and start over, or choose another checkpoint_dir")
        if not existing and config.resume == "must":
            raise UsageError(f"resume='must' but {root} holds no checkpoints to resume")
        if existing and config.resume in ("fresh", "never"):
            self.moved_to = self.store.archive_run()
            logger.warning("moved the previous run's checkpoints to %s", self.moved_to)
        self.members: dict[str, PopulationMember] = {}
        self.resumed = bool(existing) and config.resume in ("auto", "must")
        if self.resumed:
            for member_id in existing:
                self._resume_member(member_id)
            logger.info("resumed %d member(s) from %s", len(self.members), root)

    def _resume_member(self, member_id: str) -> None:
        """Rebuild a member from its most recent readable checkpoint's header (each of
        its files' headers is read once; unreadable files are skipped)."""
        # In write order; the store skips unreadable files with a warning.
        headers = [ref.header for ref in self.store.checkpoints(member_id)
                   if ref.header is not None]
        if not headers:
            logger.warning("resume: member %s has no readable checkpoint; it starts afresh",
                           member_id)
            return
        header = headers[-1]
        hyperparams, source = {}, None  # v1 files hold no hyperparams or lineage
        if isinstance(header, CheckpointV2):
            hyperparams, source = dict(header.hyperparams), header.lineage.exploited_from
        self.members[member_id] = PopulationMember(
            member_id, hyperparams, performance=header.performance, step=header.step,
            # The check at the saved step may or may not have run before the process
            # died; the next one comes a full interval later.
            last_ready_step=header.step,
            exploited_from=source,
            history=[(h.step, h.performance) for h in headers])

    def load_member(self, member: PopulationMember | str, **load_kwargs: Any
                    ) -> Checkpoint | None:
        """The member's most recent checkpoint, loaded and upgraded (training continues
        from its ``parameters``), or None when it has none."""
        m = self.member(member)
        try:
            return self.store.load_latest(m.member_id, **load_kwargs)[0]
        except CheckpointNotFoundError:
            return None

    def initialize_population(self, hyperparams: Sequence[Mapping[str, Any]] | None = None
                              ) -> list[PopulationMember]:
        """Create ``population_size`` members ("0", "1", ...) with sampled (or given)
        hyperparameters. After a resume, the resumed members are kept as they were
        rebuilt, and only missing ids are created."""
        size = self.config.population_size
        if hyperparams is not None and len(hyperparams) != size:
            raise UsageError(f"got {len(hyperparams)} hyperparameter sets for a population "
                             f"of {size}")
        for i in range(size):
            hp = dict(hyperparams[i]) if hyperparams is not None else {
                spec.name: spec.sample(self.rng) for spec in self.config.hyperparams}
            if str(i) not in self.members:
                self.add_member(str(i), hp)
        return list(self.members.values())

    def add_member(self, member_id: str, hyperparams: Mapping[str, Any]) -> PopulationMember:
        member = PopulationMember(check_member_id(member_id), dict(hyperparams))
        self.members[member.member_id] = member
        return member

    def member(self, member: PopulationMember | str) -> PopulationMember:
        """The member (given by id or as itself).

        Raises:
            UsageError: no such member.
        """
        member_id = member.member_id if isinstance(member, PopulationMember) else str(member)
        if member_id not in self.members:
            raise UsageError(f"unknown member {member_id!r}; add it with add_member() or "
                             "initialize_population()")
        return self.members[member_id]

    def update_performance(self, member: PopulationMember | str, performance: float, step: int,
                           model_parameters: Mapping[Any, Any] | None = None,
                           model_state_dict: Mapping[str, Any] | None = None,
                           ) -> CheckpointRef | None:
        """Record a member's performance and save its checkpoint.

        ``model_parameters`` (e.g. ``model.get_parameters()``) writes a
        ``v2_full_parameters`` checkpoint with optimizer and VGS state.
        ``model_state_dict`` is deprecated: it writes ``v1_policy_only`` (policy
        weights only) and warns. A non-finite performance (a diverged member) is
        recorded as None and ranks last.
        """
        m = self.member(member)
        if model_parameters is not None and model_state_dict is not None:
            raise UsageError("give model_parameters or model_state_dict, not both")
        perf: float | None = float(performance)
        if perf is not None and not math.isfinite(perf):
            logger.warning("member %s reported performance %r; it ranks last", m.member_id, perf)
            perf = None
        m.performance, m.step = perf, step
        m.history.append((step, perf))
        lineage = Lineage(exploited_from=m.exploited_from)
        if model_parameters is not None:
            return self.store.save(m.member_id, model_parameters, step=step, performance=perf,
                                   hyperparams=m.hyperparams, lineage=lineage)
        if model_state_dict is not None:
            message = ("update_performance(model_state_dict=...) is deprecated: it saves only "
                       "the policy weights (v1_policy_only), so an exploit loses the optimizer "
                       "and VGS state; pass model_parameters=model.get_parameters()")
            warn(message, DeprecationWarning)
            return self.store.save(m.member_id, model_state_dict, step=step, performance=perf,
                                   format=CheckpointFormat.V1_POLICY_ONLY)
        return None

    def flush(self) -> None:
        """Wait for every background save (``PBTConfig(async_save=True)``); raise the
        first that failed. Call it before reading the checkpoints from elsewhere."""
        self.store.flush()

    def ready(self, member: PopulationMember | str) -> bool:
        """Whether the member trained ``perturbation_interval`` steps since it was last
        considered for exploitation."""
        m = self.member(member)
        return m.step - m.last_ready_step >= self.config.perturbation_interval

    def _ranked(self) -> list[PopulationMember]:
        sign = 1 if self.config.metric_mode == "max" else -1
        return sorted(self.members.values(), reverse=True, key=lambda m: (
            m.performance is not None, sign * (m.performance or 0.0)))

    def _better(self, a: PopulationMember, b: PopulationMember) -> bool:
        if a.performance is None:
            return False
        if b.performance is None:
            return True
        return (a.performance > b.performance if self.config.metric_mode == "max"
                else a.performance < b.performance)

    def choose_donor(self, member: PopulationMember | str) -> PopulationMember | None:
        """The member to exploit, or None if ``member`` should keep its own state."""
        m = self.member(member)
        with_checkpoint = [x for x in self._ranked()
                           if x.member_id == m.member_id or self.store.latest(x.member_id)]
        if self.config.exploit_method == "binary_tournament":
            others = [x for x in with_checkpoint if x.member_id != m.member_id]
            if not others:
                return None
            opponent = self.rng.choice(others)
            return opponent if self._better(opponent, m) else None
        k = truncation_count(len(with_checkpoint), self.config.truncation_ratio)
        if k == 0 or m not in with_checkpoint[-k:]:
            return None
        top = [x for x in with_checkpoint[:k] if self._better(x, m)]
        return self.rng.choice(top) if top else None

    def explore(self, hyperparams: Mapping[str, Any]) -> dict[str, Any]:
        """New hyperparameters from a donor's: perturbed, resampled, or either."""
        out = dict(hyperparams)
        method = self.config.explore_method
        for spec in self.config.hyperparams:
            resample = method == "resample" or spec.name not in out or (
                method == "both" and self.rng.random() < self.config.resample_probability)
            out[spec.name] = (spec.sample(self.rng) if resample else
                              spec.perturb(out[spec.name], self.config.perturbation_factors,
                                           self.rng))
        return out

    def exploit_and_explore(self, member: PopulationMember | str
                            ) -> tuple[dict[Any, Any] | None, dict[str, Any],
                                       CheckpointFormat | None]:
        """If the member is ready and behind, copy a better member's state and explore.

        Returns:
            ``(parameters, hyperparams, checkpoint_format)``: the donor's parameter tree
            with the new hyperparameters applied to its optimizer param groups (and VGS
            knobs), the new hyperparameters, and the donor checkpoint's format. When the
            member keeps its own state: ``(None, its hyperparams, None)``.
        """
        m = self.member(member)
        if not self.ready(m):
            return None, dict(m.hyperparams), None
        m.last_ready_step = m.step
        donor = self.choose_donor(m)
        if donor is None:
            return None, dict(m.hyperparams), None
        hyperparams = self.explore(donor.hyperparams)
        # The caller gets the hyperparameters back and applies its own.
        result = exploit(self.store, m.member_id, donor.member_id, hyperparams,
                         optimizer_strategy=self.config.optimizer_strategy,
                         caller_keys=hyperparams)
        logger.info("member %s exploited member %s (step %d, performance %s) via %s",
                    m.member_id, donor.member_id, result.source.step,
                    result.source.performance, result.format.value)
        m.hyperparams = hyperparams
        m.exploited_from = result.source
        return result.parameters, dict(hyperparams), result.format
