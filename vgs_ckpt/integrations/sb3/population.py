"""A PBT population in SB3's idiom: :class:`PBTCallback`, :func:`restore_member`,
:func:`train_population`, and saving durably on preemption (SIGTERM)."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from types import FrameType
from typing import Any

from vgs_ckpt.errors import UsageError
from vgs_ckpt.integrations.sb3._base import (
    REPLAY_BUFFER_KEY,
    BaseCallback,
    check_model,
    logger,
    require,
)
from vgs_ckpt.integrations.sb3.hooks import vgs_scaler
from vgs_ckpt.integrations.sb3.state import COUNTERS_KEY, get_state, set_state
from vgs_ckpt.models import CheckpointFormat
from vgs_ckpt.pbt.scheduler import PBTScheduler, PopulationMember
from vgs_ckpt.vgs_state import KEY as VGS_KEY

__all__ = ["ExploitEvent", "PBTCallback", "preempted", "restore_member", "train_population"]

Progress = Callable[[str], None] | bool | None


@dataclass(frozen=True)
class ExploitEvent:
    """One exploit, as :class:`PBTCallback` applied it."""

    member_id: str
    donor_id: str
    timestep: int  # the recipient's num_timesteps
    donor_step: int  # the donor checkpoint's step (its num_timesteps when saved)
    donor_performance: float | None  # the performance recorded in that checkpoint
    format: CheckpointFormat
    hyperparams: dict[str, Any]
    vgs_step_before: int | None  # the recipient's VGS step_count before / after
    vgs_step_after: int | None
    donor_vgs_step: int | None  # step_count in the donor's checkpoint (None: none there)


# --- preemption --------------------------------------------------------------------------

class _Preemption:
    """One SIGTERM handler for the process, however many callbacks are training.

    The handler only records the signal; the callbacks see it at the next env step,
    SB3 ends ``learn()`` after the gradient step in progress, and the member saves.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self._depth = 0
        self._previous: Any = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # signal handlers can only be set from the main thread
        if self._depth == 0:
            self._previous = signal.signal(signal.SIGTERM, self.handler)
        self._depth += 1
        return True

    def uninstall(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def exit(self) -> None:
        """Exit as a process ended by the signal conventionally does (128 + signum)."""
        signum = self.signum or signal.SIGTERM
        self.signum = None  # a process that catches the SystemExit may train on
        logger.warning("preempted (signal %d): checkpoints saved %.2f s after the signal; "
                       "exiting", signum, time.monotonic() - (self.received_at or 0.0))
        raise SystemExit(128 + signum)


_PREEMPTION = _Preemption()


def preempted() -> bool:
    """Whether this process received SIGTERM while a :class:`PBTCallback` trained."""
    return _PREEMPTION.signum is not None


# --- the callback ------------------------------------------------------------------------

class PBTCallback(BaseCallback):
    """PBT for one member, as an SB3 callback: every ``interval`` timesteps, report the
    member's performance, save its :func:`~.state.get_state` through the scheduler,
    and apply ``exploit_and_explore`` in place with :func:`~.state.set_state`.

    The check runs between rollouts (before the next rollout starts, and when
    ``learn()`` ends), never in the middle of one, so PPO never trains on a rollout
    that another member's policy did not collect. The scheduler's
    ``perturbation_interval`` counts timesteps here.

    Args:
        scheduler: the population's :class:`~vgs_ckpt.pbt.PBTScheduler`.
        member: this model's member (or its id).
        interval: timesteps between checks.
        performance_fn: ``f(model) -> float``; default: the mean return of the
            episodes that ended since the last check (SB3's Monitor records, the ones
            in ``ep_info_buffer``), or of ``ep_info_buffer`` when none ended; NaN
            (ranks last) when there are none at all.
        on_exploit: called with each :class:`ExploitEvent`.
        total_timesteps: the member's budget. A check at or past it saves but does
            not exploit, so the member's last checkpoint holds its final state
            (:func:`train_population` sets it).
        replay_buffer: also save the replay buffer (off-policy algorithms), so a
            resumed member (:func:`restore_member`) continues with its own
            experience. An exploit never takes the donor's buffer.
        preemption: on SIGTERM (a spot instance, SLURM preemption), finish the
            gradient step in progress, save the member, wait for pending background
            saves and exit with status 143 (128 + SIGTERM). Default True; the handler
            is installed only while ``learn()`` runs, and only from the main thread.

    Example:
        >>> model.learn(100_000, callback=PBTCallback(scheduler, "0", interval=4096))
    """

    def __init__(self, scheduler: PBTScheduler, member: PopulationMember | str, *,
                 interval: int, performance_fn: Callable[[Any], float] | None = None,
                 on_exploit: Callable[[ExploitEvent], None] | None = None,
                 total_timesteps: int | None = None, replay_buffer: bool = False,
                 preemption: bool = True, verbose: int = 0) -> None:
        require()
        super().__init__(verbose)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise UsageError(f"interval must be a positive number of timesteps, got "
                             f"{interval!r}")
        self.scheduler = scheduler
        self.member_id = scheduler.member(member).member_id  # UsageError if unknown
        self.interval = interval
        self.performance_fn = performance_fn
        self.on_exploit = on_exploit
        self.total_timesteps = total_timesteps
        self.replay_buffer = replay_buffer
        self.preemption = preemption
        self.events: list[ExploitEvent] = []
        self.reports: list[tuple[int, float]] = []  # (timestep, performance)
        self._returns: list[float] = []
        self._last_check: int | None = None
        self._saved_at: int | None = None  # num_timesteps of the state last saved
        self._installed = False
        self.driven = False  # set by train_population: it handles the exit
        self.budget_from_driver = False  # total_timesteps was set by train_population

    def _on_training_start(self) -> None:
        if self._last_check is None:
            self._last_check = self.model.num_timesteps
        if self.preemption and not self._installed:
            self._installed = _PREEMPTION.install()

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            episode = info.get("episode") if isinstance(info, Mapping) else None
            if episode is not None:
                self._returns.append(float(episode["r"]))
        return not preempted()

    def _due(self) -> bool:
        return self.model.num_timesteps - (self._last_check or 0) >= self.interval

    def _on_rollout_start(self) -> None:
        if self._due() and not preempted():
            self.check()

    def _on_training_end(self) -> None:
        if self._installed:
            _PREEMPTION.uninstall()
            self._installed = False
        if preempted():
            self.finish()
            if not self.driven:
                self.scheduler.flush()
                _PREEMPTION.exit()
            return
        if self._due():
            self.check()

    def performance(self) -> float:
        """This interval's performance (see ``performance_fn``)."""
        if self.performance_fn is not None:
            return float(self.performance_fn(self.model))
        returns = self._returns or [float(e["r"]) for e in self.model.ep_info_buffer or ()]
        return sum(returns) / len(returns) if returns else math.nan

    def report(self, performance: float) -> None:
        """Record the performance and save the full state (override to save less)."""
        self.scheduler.update_performance(self.member_id, performance,
                                          step=self.model.num_timesteps,
                                          model_parameters=get_state(
                                              self.model, replay_buffer=self.replay_buffer))
        self._saved_at = self.model.num_timesteps

    def restore(self, parameters: Mapping[Any, Any], hyperparams: Mapping[str, Any]) -> None:
        """Load an exploited tree and the explored hyperparameters into the model (the
        recipient keeps its own replay buffer)."""
        tree = {k: v for k, v in parameters.items() if k != REPLAY_BUFFER_KEY}
        set_state(self.model, tree, hyperparams=hyperparams)
        self._saved_at = None  # the model now holds a state no file of this member has

    def finish(self) -> bool:
        """Save the member unless its last checkpoint already holds its current state
        (the end of a run, a preemption). Returns whether it saved.

        The performance recorded is this interval's, or the donor's when the member
        has not trained since it exploited that donor."""
        if self._saved_at is not None and self._saved_at == self.model.num_timesteps:
            return False
        event = self.events[-1] if self.events else None
        if self._saved_at is None and event is not None \
                and event.timestep == self.model.num_timesteps:
            performance = (event.donor_performance if event.donor_performance is not None
                           else math.nan)
        else:
            performance = self.performance()
        self._returns.clear()
        self.reports.append((self.model.num_timesteps, performance))
        self.report(performance)
        return True

    def check(self) -> ExploitEvent | None:
        """Report, save, and exploit-and-explore now (past ``total_timesteps``: only
        report and save)."""
        performance = self.performance()
        self._returns.clear()
        self._last_check = self.model.num_timesteps
        self.reports.append((self.model.num_timesteps, performance))
        self.report(performance)
        if self.total_timesteps is not None and self.model.num_timesteps >= self.total_timesteps:
            return None
        parameters, hyperparams, fmt = self.scheduler.exploit_and_explore(self.member_id)
        if parameters is None or fmt is None:
            return None
        member = self.scheduler.members[self.member_id]
        source = member.exploited_from
        scaler = vgs_scaler(self.model)
        before = scaler.step_count if scaler is not None else None
        self.restore(parameters, hyperparams)
        donor_vgs = parameters.get(VGS_KEY)
        event = ExploitEvent(
            member_id=self.member_id, donor_id=source.member_id if source else "?",
            timestep=self.model.num_timesteps, donor_step=source.step if source else -1,
            donor_performance=source.performance if source else None,
            format=fmt, hyperparams=dict(hyperparams), vgs_step_before=before,
            vgs_step_after=scaler.step_count if scaler is not None else None,
            donor_vgs_step=int(donor_vgs["step_count"]) if isinstance(donor_vgs, Mapping)
            else None)
        self.events.append(event)
        if self.verbose:
            print(f"member {event.member_id} exploited {event.donor_id} at step "
                  f"{event.timestep}: VGS step_count {before} -> {event.vgs_step_after}")
        if self.on_exploit is not None:
            self.on_exploit(event)
        return event


def restore_member(scheduler: PBTScheduler, member: PopulationMember | str, model: Any,
                   *, env: Any = None) -> bool:
    """Continue a resumed member (``PBTConfig(resume="auto")``) in ``model``.

    Loads the member's latest checkpoint with :func:`~.state.set_state` as a resume
    (attach the VGS first, as when the member was created): the whole state, its
    counters (``num_timesteps``, so :func:`train_population` continues the member's
    budget where it stopped; ``_n_updates``; schedule progress) and its generators,
    then applies the member's hyperparameters. ``env``: the env to restore the
    ``VecNormalize`` statistics and env generators into (default: the model's).

    Returns:
        False when the member has no checkpoint (the model is left as it is).
    """
    algo = check_model(model)
    m = scheduler.member(member)
    checkpoint = scheduler.load_member(m)
    if checkpoint is None:
        return False
    set_state(algo, checkpoint.parameters, hyperparams=m.hyperparams, env=env,
              restore_counters=True, restore_rng=True)
    if COUNTERS_KEY not in checkpoint.parameters:  # a file from before counters travelled
        algo.num_timesteps = checkpoint.header.step
    return True


class _Throttled:
    """The default progress: a line on stderr at most every ``every`` seconds, so
    short runs stay quiet and long ones show they are alive."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.last = time.monotonic()

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(line, file=sys.stderr, flush=True)


def _progress_fn(progress: Progress) -> Callable[[str], None] | None:
    if progress is None:
        return _Throttled()
    if progress is True:
        return lambda line: print(line, file=sys.stderr, flush=True)
    if progress is False:
        return None
    if not callable(progress):
        raise UsageError(f"train_population: progress must be a callable, True, False or "
                         f"None, got {progress!r}")
    return progress


def train_population(scheduler: PBTScheduler, models: Mapping[str, Any], *,
                     total_timesteps: int, interval: int, chunk: int | None = None,
                     speeds: Mapping[str, float] | None = None,
                     callbacks: Mapping[str, PBTCallback] | None = None,
                     progress: Progress = None) -> dict[str, PBTCallback]:
    """Train a whole population round-robin in this process.

    Each round, every member ``learn()``s ``chunk * speed`` more timesteps (``chunk``
    defaults to ``interval``), with its :class:`PBTCallback`. With every speed 1
    (the default) the population is synchronous: all members reach each check at
    the same timestep. Different ``speeds`` make it asynchronous, as with workers of
    different speeds: a member with speed 2 does twice the timesteps per round, so
    donors and recipients meet at different step counts. Training stops when
    ``total_timesteps * speed`` is reached for every member.

    The run never ends with a member whose state no checkpoint holds: a check at a
    member's budget saves without exploiting, and every member whose state changed
    since its last save is saved at the end. On SIGTERM, every member is saved, the
    background saves are flushed and the process exits with status 143.

    Training in rounds (one call a round with the same ``callbacks``, to record a curve
    between them): each call's budget replaces the one an earlier call set; set each
    callback's ``total_timesteps`` to the whole run's budget yourself, or the check at
    every round's end (where a synchronous population always is) saves without
    exploiting.

    Args:
        models: member id -> SB3 model; every id must be a member of ``scheduler``.
        callbacks: your own :class:`PBTCallback` per member (default: new ones).
        progress: where the one line per round goes: a callable (e.g. ``print``,
            every round), True (stderr, every round), False (nowhere), or None (the
            default: stderr, at most one line every 10 seconds).

    Returns:
        The callbacks, whose ``events`` and ``reports`` hold what happened.
    """
    require()
    if not models:
        raise UsageError("train_population: models must map at least one member id to an "
                         "SB3 model")
    speeds = dict(speeds or {})
    for member_id, model in models.items():
        check_model(model)
        scheduler.member(member_id)
        speed = speeds.setdefault(member_id, 1.0)
        if isinstance(speed, bool) or not isinstance(speed, Real) or not speed > 0:
            raise UsageError(f"speed of member {member_id!r} must be > 0, got {speed!r}")
    unknown = sorted(set(speeds) - set(models))
    if unknown:
        raise UsageError(f"train_population: speeds for unknown members {unknown}; give "
                         f"speeds only for the ids in models ({', '.join(models)})")
    if total_timesteps < 1:
        raise UsageError(f"train_population: total_timesteps must be >= 1, got "
                         f"{total_timesteps}")
    chunk = interval if chunk is None else chunk
    if chunk < 1:
        raise UsageError(f"train_population: chunk must be >= 1 timestep, got {chunk}")
    show = _progress_fn(progress)
    budgets = {m: round(total_timesteps * speeds[m]) for m in models}
    cbs = dict(callbacks or {})
    for member_id in models:
        cb = cbs.setdefault(member_id, PBTCallback(scheduler, member_id, interval=interval))
        # This call's budget ends the member's exploits: a callback given again (training
        # in rounds, one call a round) takes the new budget, not the first call's, which
        # would end its exploits after the first round. A budget the caller set stays
        # (set the whole run's budget there when training in rounds, so that only the
        # run's end, not every round's, goes without an exploit).
        if cb.total_timesteps is None or cb.budget_from_driver:
            cb.total_timesteps = budgets[member_id]
            cb.budget_from_driver = True
        cb.driven = True
    installed = _PREEMPTION.install()
    try:
        round_no = 0
        while any(models[m].num_timesteps < budgets[m] for m in models) and not preempted():
            round_no += 1
            for member_id, model in models.items():
                left = budgets[member_id] - model.num_timesteps
                if left <= 0 or preempted():
                    continue
                steps = min(left, max(1, round(chunk * speeds[member_id])))
                model.learn(steps, callback=cbs[member_id], reset_num_timesteps=False)
            if show is not None:
                best = max((m.performance for m in scheduler.members.values()
                            if m.performance is not None), default=math.nan)
                exploits = sum(len(cb.events) for cb in cbs.values())
                steps_done = ", ".join(f"{m}:{models[m].num_timesteps}" for m in models)
                show(f"round {round_no}: timesteps {steps_done}; best performance "
                     f"{best:.1f}; exploits so far {exploits}")
        for cb in cbs.values():
            if getattr(cb, "model", None) is not None:  # None: it never trained here
                cb.finish()
        if preempted():
            scheduler.flush()
            _PREEMPTION.exit()
    finally:
        if installed:
            _PREEMPTION.uninstall()
    return cbs
