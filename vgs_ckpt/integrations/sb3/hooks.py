"""VGS inside the gradient step of a stock SB3 algorithm.

The scaler runs as a pre-step and a post-step hook of each optimizer
(``Optimizer.register_step_pre_hook``): it scales the gradients *after* SB3's
``clip_grad_norm_`` (PPO, A2C, DQN) and right before the update, and folds the
gradients into its statistics right after it. Clipping first keeps ``max_grad_norm``
meaning what it says: the VGS factor is at most 1, so a clipped norm stays within
the bound.

Algorithms with several optimizers (SAC: actor, critics, entropy temperature; TD3
and DDPG: actor and critics) get one scaler over the parameters of all of them. Each
optimizer scales and folds its own parameters; the scaler's ``step_count`` advances
once per gradient step, at the step of the *primary* optimizer: ``critic.optimizer``
when the algorithm has one, else ``policy.optimizer``. Between the primary step and
the next one, the scaler holds the moments of the other optimizers' gradients
(``VarianceGradientScaler.pending()``); ``get_state`` saves them under
``"vgs_pending"``, so a save between two steps loses nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vgs_ckpt.errors import UsageError
from vgs_ckpt.integrations.sb3._base import check_model, optimizers
from vgs_ckpt.vgs import VarianceGradientScaler
from vgs_ckpt.vgs_state import KNOBS as VGS_KNOBS

__all__ = ["attach_vgs", "detach_vgs", "vgs_scaler"]


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
    algo = check_model(model)
    if algo in _ATTACHED:
        raise UsageError(f"this {type(algo).__name__} already has a VGS attached; use "
                         "vgs_scaler(model) to reach it, or detach_vgs(model) first")
    unknown = sorted(set(vgs_kwargs) - set(VGS_KNOBS))
    if unknown:
        raise UsageError(f"unknown VGS knob(s) {', '.join(unknown)}; the knobs are "
                         f"{', '.join(VGS_KNOBS)}")
    found = optimizers(algo)
    if not found:
        raise UsageError(f"this {type(algo).__name__} has no torch optimizer to attach "
                         "a VGS to; VGS scales gradients at an optimizer step, so it needs "
                         "a gradient-based algorithm (ARS, for one, is gradient-free; "
                         "get_state, set_state and sb3.save work without a VGS)")
    names = [name for name, _ in found]
    primary_name = next((n for n in ("critic.optimizer", "policy.optimizer") if n in names),
                        names[0])
    params: list[torch.nn.Parameter] = []
    index: dict[int, int] = {}
    groups: list[tuple[str, torch.optim.Optimizer, list[int]]] = []
    for name, optimizer in found:
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
    attachment = _ATTACHED.get(check_model(model))
    return attachment.scaler if attachment is not None else None


def detach_vgs(model: Any) -> VarianceGradientScaler | None:
    """Remove the VGS hooks from ``model``; returns the scaler that was attached."""
    attachment = _ATTACHED.pop(check_model(model), None)
    if attachment is None:
        return None
    for handle in attachment.handles:
        handle.remove()
    return attachment.scaler
