"""Stable-Baselines3: VGS inside stock algorithms, and full-state PBT exploits.

Install with ``pip install 'vgs-ckpt[sb3]'``. Works with PPO, A2C, SAC, TD3, DDPG,
DQN and any algorithm built the same way (its optimizers are listed by SB3's
``_get_torch_save_params()``); no subclassing::

    from stable_baselines3 import PPO
    from vgs_ckpt.integrations import sb3

    model = PPO("MlpPolicy", "CartPole-v1")
    sb3.attach_vgs(model, warmup_steps=50)         # the reference VGS 3.2, in every step
    model.learn(10_000)
    vgs_ckpt.save("m.safetensors", sb3.get_state(model), step=model.num_timesteps)
    sb3.set_state(other, vgs_ckpt.load("m.safetensors").parameters,
                  hyperparams={"learning_rate": 1e-3, "vgs_alpha": 0.2})

Where VGS stands. The scaler runs as a pre-step and a post-step hook of each
optimizer (``Optimizer.register_step_pre_hook``): it scales the gradients *after*
SB3's ``clip_grad_norm_`` (PPO, A2C, DQN) and right before the update, and folds
the gradients into its statistics right after it. Clipping first keeps
``max_grad_norm`` meaning what it says: the VGS factor is at most 1, so a clipped
norm stays within the bound.

Algorithms with several optimizers (SAC: actor, critics, entropy temperature; TD3
and DDPG: actor and critics) get one scaler over the parameters of all of them.
Each optimizer scales and folds its own parameters; the scaler's ``step_count``
advances once per gradient step, at the step of the *primary* optimizer:
``critic.optimizer`` when the algorithm has one, else ``policy.optimizer``.
(TD3 steps its actor every ``policy_delay`` gradient steps, so the actor's EMAs
see fewer updates than ``step_count``; the bias correction treats them alike.)

What SB3 keeps where. ``get_state`` returns ``model.get_parameters()`` (every
network, target networks included, and every optimizer), SB3's "pytorch variables"
(SAC's ``log_ent_coef`` or ``ent_coef_tensor``) under ``"pytorch_variables"``, and
the VGS state under ``"vgs_state"``. It is a plain tree: ``vgs_ckpt.save`` writes
it as an ordinary ``v2_full_parameters`` checkpoint. The replay buffer, the
environment, ``num_timesteps`` and the RNG stay with the recipient, as PBT wants.

SB3's own ``model.save()`` / ``PPO.load()`` does not carry the VGS state (the
scaler is not part of the model's attributes, so nothing of it is pickled). Save
with ``vgs_ckpt.save(path, get_state(model))``; after ``PPO.load()``, call
``attach_vgs`` and ``set_state`` with that file's tree.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING, Any

import torch

from vgs_ckpt.errors import MissingDependencyError, UsageError
from vgs_ckpt.models import CheckpointFormat
from vgs_ckpt.pbt.scheduler import PBTScheduler, PopulationMember
from vgs_ckpt.vgs import VarianceGradientScaler
from vgs_ckpt.vgs_state import HYPERPARAM_PREFIX as VGS_HYPERPARAM_PREFIX
from vgs_ckpt.vgs_state import KEY as VGS_KEY
from vgs_ckpt.vgs_state import KNOBS as VGS_KNOBS

try:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.save_util import recursive_getattr
    from stable_baselines3.common.utils import get_schedule_fn
    _IMPORT_ERROR: ImportError | None = None
except ImportError as _exc:  # the core package works without SB3
    _IMPORT_ERROR = _exc
    if not TYPE_CHECKING:
        BaseAlgorithm = BaseCallback = object

__all__ = ["INSTALL", "VARIABLES_KEY", "ExploitEvent", "PBTCallback", "attach_vgs",
           "detach_vgs", "get_state", "restore_member", "set_hyperparams", "set_state",
           "train_population", "vgs_scaler"]

logger = logging.getLogger("vgs_ckpt")
INSTALL = "pip install 'vgs-ckpt[sb3]'"
VARIABLES_KEY = "pytorch_variables"
_RESERVED = (VGS_KEY, VARIABLES_KEY)


def _require() -> None:
    if _IMPORT_ERROR is not None:
        raise MissingDependencyError(
            f"the Stable-Baselines3 integration needs stable-baselines3 and gymnasium "
            f"({_IMPORT_ERROR}): {INSTALL}")


def _check_model(model: Any) -> BaseAlgorithm:
    _require()
    if not isinstance(model, BaseAlgorithm):
        raise UsageError(f"expected a Stable-Baselines3 algorithm (PPO, SAC, ...), got "
                         f"{type(model).__qualname__}")
    return model


def _optimizers(model: BaseAlgorithm) -> list[tuple[str, torch.optim.Optimizer]]:
    """The algorithm's optimizers, by SB3 name, in SB3's order, each once."""
    found: list[tuple[str, torch.optim.Optimizer]] = []
    for name in model._get_torch_save_params()[0]:
        attr = recursive_getattr(model, name)
        if isinstance(attr, torch.optim.Optimizer) and all(attr is not o for _, o in found):
            found.append((name, attr))
    return found


# --- VGS in the gradient step -------------------------------------------------------

@dataclass
class _Attachment:
    scaler: VarianceGradientScaler
    handles: list[Any]


# Kept beside the model, not in it: SB3 pickles a model's attributes on save().
_ATTACHED: weakref.WeakKeyDictionary[Any, _Attachment] = weakref.WeakKeyDictionary()


def attach_vgs(model: Any, **vgs_kwargs: Any) -> VarianceGradientScaler:
    """Install the reference VGS 3.2 into every optimizer step of ``model``.

    ``vgs_kwargs`` are the scaler's knobs (``beta``, ``alpha``, ``eps``,
    ``warmup_steps``, ``min_scaling_factor``, ``variance_cap``, ``enabled``). The
    scaler stays attached across ``learn()`` calls and ``set_state``.

    Raises:
        UsageError: ``model`` is not an SB3 algorithm, already has a VGS attached,
            has no optimizer, or a knob is unknown or invalid.
        MissingDependencyError: stable-baselines3 is not installed.
    """
    algo = _check_model(model)
    if algo in _ATTACHED:
        raise UsageError(f"this {type(algo).__name__} already has a VGS attached; use "
                         "vgs_scaler(model) to reach it, or detach_vgs(model) first")
    unknown = sorted(set(vgs_kwargs) - set(VGS_KNOBS))
    if unknown:
        raise UsageError(f"unknown VGS knob(s) {', '.join(unknown)}; the knobs are "
                         f"{', '.join(VGS_KNOBS)}")
    optimizers = _optimizers(algo)
    if not optimizers:
        raise UsageError(f"this {type(algo).__name__} has no torch optimizer to attach "
                         "a VGS to; VGS scales gradients at an optimizer step, so it needs "
                         "a gradient-based algorithm")
    names = [name for name, _ in optimizers]
    primary_name = next((n for n in ("critic.optimizer", "policy.optimizer") if n in names),
                        names[0])
    params: list[torch.nn.Parameter] = []
    index: dict[int, int] = {}
    groups: list[tuple[str, torch.optim.Optimizer, list[int]]] = []
    for name, optimizer in optimizers:
        indices = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                if id(param) not in index:
                    index[id(param)] = len(params)
                    params.append(param)
                indices.append(index[id(param)])
        groups.append((name, optimizer, indices))
    scaler = VarianceGradientScaler(params, **vgs_kwargs)
    handles = []
    for name, optimizer, indices in groups:
        own = [params[i] for i in indices]
        handles.append(optimizer.register_step_pre_hook(_scale_hook(scaler, own)))
        handles.append(optimizer.register_step_post_hook(
            _fold_hook(scaler, indices, advance=name == primary_name)))
    _ATTACHED[algo] = _Attachment(scaler, handles)
    return scaler


def _scale_hook(scaler: VarianceGradientScaler, params: list[torch.nn.Parameter]
                ) -> Callable[..., None]:
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        scaler.scale_gradients(params)
    return hook


def _fold_hook(scaler: VarianceGradientScaler, indices: list[int], *, advance: bool
               ) -> Callable[..., None]:
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        scaler.fold(indices)
        if advance:
            scaler.advance()
    return hook


def vgs_scaler(model: Any) -> VarianceGradientScaler | None:
    """The scaler :func:`attach_vgs` installed in ``model``, or None."""
    attachment = _ATTACHED.get(_check_model(model))
    return attachment.scaler if attachment is not None else None


def detach_vgs(model: Any) -> VarianceGradientScaler | None:
    """Remove the VGS hooks from ``model``; returns the scaler that was attached."""
    attachment = _ATTACHED.pop(_check_model(model), None)
    if attachment is None:
        return None
    for handle in attachment.handles:
        handle.remove()
    return attachment.scaler


# --- the whole trainable state as one tree ------------------------------------------

def get_state(model: Any) -> dict[str, Any]:
    """``model.get_parameters()``, SB3's pytorch variables and the VGS state, as one tree.

    Keys: every SB3 state-dict name (``"policy"``, ``"policy.optimizer"``,
    ``"actor.optimizer"``, ...), ``"pytorch_variables"`` (only when the algorithm has
    some: ``{"log_ent_coef": tensor}`` for SAC) and ``"vgs_state"`` (None without an
    attached VGS). Like ``state_dict()``, tensors share memory with the model: save
    the tree before training on.
    """
    algo = _check_model(model)
    tree: dict[str, Any] = algo.get_parameters()
    clash = [key for key in _RESERVED if key in tree]
    if clash:
        raise UsageError(f"{type(algo).__name__}.get_parameters() already has {clash}; "
                         "those names are reserved by this integration; rename those "
                         "attributes of your algorithm")
    variables = algo._get_torch_save_params()[1]
    if variables:
        tree[VARIABLES_KEY] = {name: recursive_getattr(algo, name).detach() for name in variables}
    scaler = vgs_scaler(algo)
    tree[VGS_KEY] = scaler.state_dict() if scaler is not None else None
    return tree


_MISSING = object()


def set_state(model: Any, tree: Mapping[str, Any], *,
              hyperparams: Mapping[str, Any] | None = None) -> None:
    """Restore a :func:`get_state` tree into ``model`` in place, then apply
    ``hyperparams`` (see :func:`set_hyperparams`).

    Parts the tree lacks keep their current state, with a warning (a policy-only
    ``{"policy": ...}`` tree from a legacy file loads the weights and nothing else).
    A ``"vgs_state"`` of None resets the attached scaler's statistics. Everything is
    checked before anything changes.

    Raises:
        UsageError: a part, variable or hyperparameter this algorithm does not have,
            VGS state for a model without :func:`attach_vgs`, or a module state dict
            whose keys differ from the model's.
    """
    algo = _check_model(model)
    parts = dict(tree)
    vgs = parts.pop(VGS_KEY, _MISSING)
    variables = parts.pop(VARIABLES_KEY, None) or {}
    names, variable_names = algo._get_torch_save_params()
    kind = type(algo).__name__
    unknown = [str(key) for key in parts if key not in names]
    if unknown:
        raise UsageError(f"{', '.join(unknown)}: not part of this {kind} (its parts are "
                         f"{', '.join(names)}); was the checkpoint written by another "
                         "algorithm or policy?")
    unknown = [str(key) for key in variables if key not in variable_names]
    if unknown:
        raise UsageError(f"{VARIABLES_KEY}: {', '.join(unknown)} not in this {kind} (it has "
                         f"{', '.join(variable_names) or 'none'}); e.g. a SAC with a learned "
                         "ent_coef cannot restore into one with a fixed ent_coef")
    for name, value in variables.items():
        target = recursive_getattr(algo, name)
        if not isinstance(value, torch.Tensor) or value.shape != target.shape:
            raise UsageError(f"{VARIABLES_KEY}.{name}: expected a tensor of shape "
                             f"{tuple(target.shape)}, got {getattr(value, 'shape', value)!r}")
    scaler = vgs_scaler(algo)
    if vgs is not _MISSING and vgs is not None:
        if scaler is None:
            raise UsageError(f"the tree carries VGS state but this {kind} has no VGS; call "
                             "attach_vgs(model) before set_state")
        # Load into a scratch scaler first: a bad state raises before anything changes.
        VarianceGradientScaler(scaler.params, **scaler.config()).load_state_dict(vgs)
    for name, part in parts.items():
        target = recursive_getattr(algo, name)
        if isinstance(target, torch.nn.Module):
            expected, given = set(target.state_dict()), set(part)
            if expected != given:
                raise UsageError(f"{name}: the state dict does not match this {kind}'s "
                                 f"(missing {sorted(expected - given)[:5]}, unexpected "
                                 f"{sorted(given - expected)[:5]}); the network "
                                 "architectures differ")
    apply = _plan_hyperparams(algo, hyperparams or {}, scaler)

    missing = [name for name in names if name not in parts]
    if missing:
        logger.warning("set_state: the tree has no %s; this %s keeps its own", missing, kind)
    algo.set_parameters(parts, exact_match=not missing, device=algo.device)
    with torch.no_grad():
        for name, value in variables.items():
            recursive_getattr(algo, name).copy_(value)
    if vgs is not _MISSING and scaler is not None:
        scaler.load_state_dict(vgs)
    for step in apply:
        step()


# --- hyperparameters that SB3 keeps ----------------------------------------------

def set_hyperparams(model: Any, hyperparams: Mapping[str, Any]) -> None:
    """Apply explored hyperparameters so that SB3 keeps them on the next ``learn()``.

    - ``learning_rate`` (or ``lr``): replaces ``lr_schedule`` with that constant and
      sets every optimizer's param groups (SB3 resets them from the schedule on
      each update, so setting the groups alone would not last).
    - ``ent_coef`` (PPO, A2C, SAC with a fixed coefficient), ``clip_range`` (PPO, as
      a constant schedule), ``gamma`` (also in the rollout buffer), ``gae_lambda``,
      ``target_kl``, ``max_grad_norm``, ``vf_coef``, ``tau``, ``batch_size``,
      ``n_epochs``: set where the algorithm has them.
    - ``vgs_<knob>`` (``vgs_alpha``, ``vgs_warmup_steps``, ...): the attached VGS.

    Raises:
        UsageError: a key the algorithm (or its VGS) does not have, or a bad value;
            nothing is applied then.
    """
    algo = _check_model(model)
    for step in _plan_hyperparams(algo, hyperparams, vgs_scaler(algo)):
        step()


_PLAIN = {"gae_lambda": float, "target_kl": float, "max_grad_norm": float, "vf_coef": float,
          "tau": float, "batch_size": int, "n_epochs": int}


def _plan_hyperparams(algo: BaseAlgorithm, hyperparams: Mapping[str, Any],
                      scaler: VarianceGradientScaler | None) -> list[Callable[[], None]]:
    """Check every hyperparameter and return the steps that apply them."""
    kind = type(algo).__name__
    steps: list[Callable[[], None]] = []
    knobs: dict[str, Any] = {}
    for key, value in hyperparams.items():
        if key.startswith(VGS_HYPERPARAM_PREFIX):
            knob = key[len(VGS_HYPERPARAM_PREFIX):]
            if knob not in VGS_KNOBS:
                raise UsageError(f"hyperparameter {key!r}: VGS has no knob {knob!r} (knobs: "
                                 f"{', '.join(VGS_KNOBS)})")
            if scaler is None:
                raise UsageError(f"hyperparameter {key!r}: this {kind} has no VGS; call "
                                 "attach_vgs(model) first")
            knobs[knob] = value
            continue
        number = _number(key, value, kind)
        if key in ("learning_rate", "lr"):
            steps.append(_lr_step(algo, number))
        elif key == "ent_coef":
            steps.append(_ent_coef_step(algo, number))
        elif key == "clip_range":
            if not callable(getattr(algo, "clip_range", None)):
                raise _lacks(key, kind)
            steps.append(_plain_step(algo, key, _constant(number)))
        elif key == "gamma":
            steps.append(_gamma_step(algo, number))
        elif key in _PLAIN:
            current = getattr(algo, key, _MISSING)
            if current is _MISSING or isinstance(current, bool) \
                    or (current is not None and not isinstance(current, Real)):
                raise _lacks(key, kind)
            if _PLAIN[key] is int and number != int(number):
                raise UsageError(f"hyperparameter {key!r} must be an integer, got {value!r}")
            steps.append(_plain_step(algo, key, _PLAIN[key](number)))
        else:
            raise _lacks(key, kind)
    if knobs and scaler is not None:
        config = {**scaler.config(), **knobs}
        VarianceGradientScaler([], **config)  # raises UsageError for a bad value
        steps.append(_knobs_step(scaler, knobs))
    return steps


def _knobs_step(scaler: VarianceGradientScaler, knobs: Mapping[str, Any]
                ) -> Callable[[], None]:
    def step() -> None:
        for knob, value in knobs.items():
            setattr(scaler, knob, value)
    return step


def _constant(value: float) -> Callable[[float], float]:
    """A constant SB3 schedule (picklable, so ``model.save()`` keeps working)."""
    try:
        from stable_baselines3.common.utils import FloatSchedule
    except ImportError:  # stable-baselines3 < 2.6
        return get_schedule_fn(value)
    return FloatSchedule(value)


def _number(key: str, value: Any, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise UsageError(f"hyperparameter {key!r} for {kind} must be a finite number, got "
                         f"{value!r}")
    return float(value)


def _lacks(key: str, kind: str) -> UsageError:
    return UsageError(f"hyperparameter {key!r}: {kind} has no such setting; remove it from "
                      "the explored hyperparameters (or apply it yourself)")


def _plain_step(algo: BaseAlgorithm, key: str, value: Any) -> Callable[[], None]:
    def step() -> None:
        setattr(algo, key, value)
        buffer = getattr(algo, "rollout_buffer", None)
        if key == "gae_lambda" and buffer is not None and hasattr(buffer, key):
            buffer.gae_lambda = value
    return step


def _lr_step(algo: BaseAlgorithm, lr: float) -> Callable[[], None]:
    if lr <= 0:
        raise UsageError(f"hyperparameter 'learning_rate' must be > 0, got {lr!r}")

    def step() -> None:
        algo.learning_rate = lr
        algo.lr_schedule = _constant(lr)
        for _, optimizer in _optimizers(algo):
            for group in optimizer.param_groups:
                group["lr"] = lr
    return step


def _ent_coef_step(algo: BaseAlgorithm, value: float) -> Callable[[], None]:
    kind = type(algo).__name__
    if not hasattr(algo, "ent_coef"):
        raise _lacks("ent_coef", kind)
    if getattr(algo, "ent_coef_optimizer", None) is not None:
        raise UsageError(f"hyperparameter 'ent_coef': this {kind} learns its entropy "
                         "coefficient (ent_coef='auto'); explore target_entropy or create "
                         "the model with a fixed ent_coef")

    def step() -> None:
        algo.ent_coef = value
        if hasattr(algo, "ent_coef_tensor"):
            algo.ent_coef_tensor = torch.tensor(value, device=algo.device)
    return step


def _gamma_step(algo: BaseAlgorithm, value: float) -> Callable[[], None]:
    if not hasattr(algo, "gamma"):
        raise _lacks("gamma", type(algo).__name__)

    def step() -> None:
        algo.gamma = value
        for buffer in (getattr(algo, "rollout_buffer", None), getattr(algo, "replay_buffer",
                                                                       None)):
            if buffer is not None and hasattr(buffer, "gamma"):
                buffer.gamma = value
    return step


# --- a population driver in SB3's idiom ----------------------------------------------

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


class PBTCallback(BaseCallback):
    """PBT for one member, as an SB3 callback: every ``interval`` timesteps, report the
    member's performance, save its :func:`get_state` through the scheduler, and apply
    ``exploit_and_explore`` in place with :func:`set_state`.

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

    Example:
        >>> model.learn(100_000, callback=PBTCallback(scheduler, "0", interval=4096))
    """

    def __init__(self, scheduler: PBTScheduler, member: PopulationMember | str, *,
                 interval: int, performance_fn: Callable[[Any], float] | None = None,
                 on_exploit: Callable[[ExploitEvent], None] | None = None,
                 verbose: int = 0) -> None:
        _require()
        super().__init__(verbose)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise UsageError(f"interval must be a positive number of timesteps, got "
                             f"{interval!r}")
        self.scheduler = scheduler
        self.member_id = member.member_id if isinstance(member, PopulationMember) else member
        scheduler._member(self.member_id)  # UsageError for an unknown member
        self.interval = interval
        self.performance_fn = performance_fn
        self.on_exploit = on_exploit
        self.events: list[ExploitEvent] = []
        self.reports: list[tuple[int, float]] = []  # (timestep, performance)
        self._returns: list[float] = []
        self._last_check: int | None = None

    def _on_training_start(self) -> None:
        if self._last_check is None:
            self._last_check = self.model.num_timesteps

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", ()):
            episode = info.get("episode") if isinstance(info, Mapping) else None
            if episode is not None:
                self._returns.append(float(episode["r"]))
        return True

    def _due(self) -> bool:
        return self.model.num_timesteps - (self._last_check or 0) >= self.interval

    def _on_rollout_start(self) -> None:
        if self._due():
            self.check()

    def _on_training_end(self) -> None:
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
                                          model_parameters=get_state(self.model))

    def restore(self, parameters: Mapping[Any, Any], hyperparams: Mapping[str, Any]) -> None:
        """Load an exploited tree and the explored hyperparameters into the model."""
        set_state(self.model, parameters, hyperparams=hyperparams)

    def check(self) -> ExploitEvent | None:
        """Report, save, and exploit-and-explore now."""
        performance = self.performance()
        self._returns.clear()
        self._last_check = self.model.num_timesteps
        self.reports.append((self.model.num_timesteps, performance))
        self.report(performance)
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


def restore_member(scheduler: PBTScheduler, member: PopulationMember | str, model: Any) -> bool:
    """Continue a resumed member (``PBTConfig(resume="auto")``) in ``model``.

    Loads the member's latest checkpoint with :func:`set_state` (attach the VGS
    first, as when the member was created), applies the member's hyperparameters
    and sets ``model.num_timesteps`` to the checkpoint's step, so
    :func:`train_population` continues the member's budget where it stopped.

    Returns:
        False when the member has no checkpoint (the model is left as it is).
    """
    algo = _check_model(model)
    m = scheduler._member(member)
    checkpoint = scheduler.load_member(m)
    if checkpoint is None:
        return False
    set_state(algo, checkpoint.parameters, hyperparams=m.hyperparams)
    algo.num_timesteps = checkpoint.header.step
    return True


def train_population(scheduler: PBTScheduler, models: Mapping[str, Any], *,
                     total_timesteps: int, interval: int, chunk: int | None = None,
                     speeds: Mapping[str, float] | None = None,
                     callbacks: Mapping[str, PBTCallback] | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, PBTCallback]:
    """Train a whole population round-robin in this process.

    Each round, every member ``learn()``s ``chunk * speed`` more timesteps (``chunk``
    defaults to ``interval``), with its :class:`PBTCallback`. With every speed 1
    (the default) the population is synchronous: all members reach each check at
    the same timestep. Different ``speeds`` make it asynchronous, as with workers of
    different speeds: a member with speed 2 does twice the timesteps per round, so
    donors and recipients meet at different step counts. Training stops when
    ``total_timesteps * speed`` is reached for every member.

    Args:
        models: member id -> SB3 model; every id must be a member of ``scheduler``.
        callbacks: your own :class:`PBTCallback` per member (default: new ones).
        progress: called with one line per round (e.g. ``print``).

    Returns:
        The callbacks, whose ``events`` and ``reports`` hold what happened.
    """
    _require()
    if not models:
        raise UsageError("train_population: models must map at least one member id to an "
                         "SB3 model")
    speeds = dict(speeds or {})
    for member_id, model in models.items():
        _check_model(model)
        scheduler._member(member_id)
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
    cbs = dict(callbacks or {})
    for member_id in models:
        cbs.setdefault(member_id, PBTCallback(scheduler, member_id, interval=interval))
    budgets = {m: round(total_timesteps * speeds[m]) for m in models}
    round_no = 0
    while any(models[m].num_timesteps < budgets[m] for m in models):
        round_no += 1
        for member_id, model in models.items():
            left = budgets[member_id] - model.num_timesteps
            if left <= 0:
                continue
            steps = min(left, max(1, round(chunk * speeds[member_id])))
            model.learn(steps, callback=cbs[member_id], reset_num_timesteps=False)
        if progress is not None:
            best = max((m.performance for m in scheduler.members.values()
                        if m.performance is not None), default=math.nan)
            exploits = sum(len(cb.events) for cb in cbs.values())
            steps_done = ", ".join(f"{m}:{models[m].num_timesteps}" for m in models)
            progress(f"round {round_no}: timesteps {steps_done}; best performance "
                     f"{best:.1f}; exploits so far {exploits}")
    return cbs

