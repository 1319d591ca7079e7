"""Explored hyperparameters applied where SB3 reads them on the next ``learn()``: the
SB3 extension of :mod:`vgs_ckpt.hyperparams` (which parses them and applies the
VGS knobs)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import torch

from vgs_ckpt.errors import UsageError
from vgs_ckpt.hyperparams import apply_to_optimizer, apply_to_scaler, check_knobs, split
from vgs_ckpt.integrations.sb3._base import BaseAlgorithm, check_model, optimizers
from vgs_ckpt.integrations.sb3.hooks import vgs_scaler
from vgs_ckpt.vgs import VarianceGradientScaler

__all__ = ["plan_hyperparams", "set_hyperparams"]

_MISSING = object()


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
    algo = check_model(model)
    for step in plan_hyperparams(algo, hyperparams, vgs_scaler(algo)):
        step()


_PLAIN = {"gae_lambda": float, "target_kl": float, "max_grad_norm": float, "vf_coef": float,
          "tau": float, "batch_size": int, "n_epochs": int}


def plan_hyperparams(algo: BaseAlgorithm, hyperparams: Mapping[str, Any],
                      scaler: VarianceGradientScaler | None) -> list[Callable[[], None]]:
    """Check every hyperparameter and return the steps that apply them."""
    kind = type(algo).__name__
    steps: list[Callable[[], None]] = []
    parsed = split(hyperparams, strict=True)
    if parsed.vgs and scaler is None:
        raise UsageError(f"hyperparameter 'vgs_{next(iter(parsed.vgs))}': this {kind} has "
                         "no VGS; call attach_vgs(model) first")
    for key, value in parsed.other.items():
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
    if parsed.vgs and scaler is not None:
        check_knobs(scaler, parsed.vgs)  # a bad value raises before anything is applied
        steps.append(lambda: apply_to_scaler(scaler, parsed.vgs))
    return steps


def _constant(value: float) -> Callable[[float], float]:
    """A constant SB3 schedule (stored by its value by :func:`~.files.save`)."""
    from stable_baselines3.common.utils import FloatSchedule
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
        for _, optimizer in optimizers(algo):
            apply_to_optimizer(optimizer, {"lr": lr})
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
