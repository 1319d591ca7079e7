"""A reference Variance Gradient Scaler (VGS 3.2) for torch parameters.

Per optimizer step, after the update, :meth:`VarianceGradientScaler.update`
folds each parameter's gradient into two EMAs (of its mean and of its mean
square). Before the next update, :meth:`VarianceGradientScaler.scale_gradients`
multiplies every gradient by one factor that shrinks when the gradients' normalized
variance is high. ``state_dict()`` has exactly the keys and types of the original
scaler's version 3.2, so its states load here and these load there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from vgs_ckpt import vgs_state
from vgs_ckpt.errors import UsageError
from vgs_ckpt.upgrades.steps import upgrade_vgs_state
from vgs_ckpt.vgs_state import DEFAULTS, KNOBS

__all__ = ["VarianceGradientScaler"]

_MAX_GLOBAL = 1e6
_MIN_MEAN_SQ = 1e-12
_QUANTILE = 0.9


class VarianceGradientScaler:
    """Scales gradients down when their per-parameter normalized variance is high.

    Args:
        parameters: the parameters whose gradients are scaled (order matters: the
            per-parameter statistics follow it).
        enabled: with False, the scale is always 1 (statistics are still kept).
        beta: EMA decay of the statistics, in (0, 1).
        alpha: strength of the scaling, >= 0.
        eps: added to the squared mean in the normalization, > 0.
        warmup_steps: steps during which the scale is 1.
        min_scaling_factor: lower bound of the scale, in (0, 1].
        variance_cap: upper bound of the global normalized variance, or None.

    Example:
        >>> vgs = VarianceGradientScaler(model.parameters())
        >>> loss.backward(); vgs.scale_gradients(); optimizer.step(); vgs.update()
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], *,
                 enabled: bool = DEFAULTS["enabled"], beta: float = DEFAULTS["beta"],
                 alpha: float = DEFAULTS["alpha"], eps: float = DEFAULTS["eps"],
                 warmup_steps: int = DEFAULTS["warmup_steps"],
                 min_scaling_factor: float = DEFAULTS["min_scaling_factor"],
                 variance_cap: float | None = DEFAULTS["variance_cap"]) -> None:
        self.params = list(parameters)
        # Knobs are kept as plain Python values (a numpy or 0-d tensor number sampled by a
        # tuner becomes its float or int): a checkpoint stores plain values (spec 8.1).
        self.enabled: bool = plain(enabled)
        self.beta: float = plain(beta)
        self.alpha: float = plain(alpha)
        self.eps: float = plain(eps)
        self.warmup_steps: int = plain(warmup_steps)
        self.min_scaling_factor: float = plain(min_scaling_factor)
        self.variance_cap: float | None = plain(variance_cap)
        # Refuse a bad configuration early.
        vgs_state.check({"vgs_version": vgs_state.LATEST, **self.config(), "step_count": 0},
                        "VarianceGradientScaler", UsageError, "fix the scaler's arguments",
                        what="invalid VGS configuration: ")
        self.reset()

    def config(self) -> dict[str, Any]:
        """The knobs (``vgs_state.KNOBS``) as keyword arguments of the constructor."""
        return {knob: getattr(self, knob) for knob in KNOBS}

    def reset(self) -> None:
        """Forget every statistic (as for a member whose VGS state was absent)."""
        self.step_count = 0
        self.param_grad_mean_ema: torch.Tensor | None = None
        self.param_grad_sq_ema: torch.Tensor | None = None
        self.param_numel: torch.Tensor | None = None
        self.grad_mean_ema: float | None = None
        self.grad_var_ema: float | None = None
        self.grad_norm_ema: float | None = None
        self.grad_max_ema: float | None = None
        # (count, sum, sum of squares, max |g|) of the gradients folded this step.
        self._pending: tuple[int, float, float, float] = (0, 0.0, 0.0, 0.0)

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current gradients into the statistics (call after optimizer.step())."""
        self.fold(range(len(self.params)))
        self.advance()

    @torch.no_grad()
    def fold(self, indices: Iterable[int]) -> None:
        """Fold the gradients of the parameters at ``indices`` into their EMAs.

        For models whose parameters are stepped by several optimizers (an actor and a
        critic): each optimizer's step folds its own parameters, and :meth:`advance`
        closes the training step. :meth:`update` is ``fold(all)`` then ``advance()``.
        """
        if self.param_grad_mean_ema is None or self.param_grad_sq_ema is None:
            n = len(self.params)
            self.param_grad_mean_ema = torch.zeros(n, dtype=torch.float32)
            self.param_grad_sq_ema = torch.zeros(n, dtype=torch.float32)
        if self.param_numel is None:
            self.param_numel = torch.tensor([float(p.numel()) for p in self.params],
                                            dtype=torch.float32)
        present = [i for i in indices if self.params[i].grad is not None]
        if not present:
            return
        grads = [self.params[i].grad.detach().float() for i in present]  # type: ignore[union-attr]
        mean = torch.stack([g.mean() for g in grads])
        mean_sq = torch.stack([g.pow(2).mean() for g in grads])
        where = torch.tensor(present)
        numel = self.param_numel[where].double()
        beta = self.beta
        self.param_grad_mean_ema[where] = beta * self.param_grad_mean_ema[where] + (1 - beta) * mean
        self.param_grad_sq_ema[where] = (beta * self.param_grad_sq_ema[where]
                                         + (1 - beta) * mean_sq)
        # Moments of all folded gradients together, for the global statistics.
        count, total, total_sq, peak = self._pending
        peaks = [g.abs().max() for g in grads if g.numel()]
        self._pending = (count + int(numel.sum()),
                         total + float((mean.double() * numel).sum()),
                         total_sq + float((mean_sq.double() * numel).sum()),
                         max(peak, float(torch.stack(peaks).max())) if peaks else peak)

    def advance(self) -> None:
        """Close one training step: count it, and fold the moments of the gradients
        folded since the last call into the global statistics."""
        self.step_count += 1
        count, total, total_sq, peak = self._pending
        self._pending = (0, 0.0, 0.0, 0.0)
        if count:
            mean = total / count
            self.grad_mean_ema = self._ema(self.grad_mean_ema, mean)
            self.grad_var_ema = self._ema(self.grad_var_ema, max(total_sq / count - mean * mean,
                                                                 0.0))
            self.grad_norm_ema = self._ema(self.grad_norm_ema, total_sq ** 0.5)
            self.grad_max_ema = self._ema(self.grad_max_ema, peak)

    def _ema(self, old: float | None, value: float) -> float:
        # The legacy global statistics are for logging; they start at the first value.
        return value if old is None else self.beta * old + (1 - self.beta) * value

    @torch.no_grad()
    def normalized_variance(self) -> torch.Tensor:
        """Per-parameter normalized variance of the gradients (bias-corrected)."""
        if self.step_count == 0 or self.param_grad_mean_ema is None \
                or self.param_grad_sq_ema is None:
            return torch.zeros(len(self.params))
        bc = 1 - self.beta ** self.step_count
        mean = self.param_grad_mean_ema / bc
        var = torch.clamp(self.param_grad_sq_ema / bc - mean.pow(2), min=0.0)
        nv = var / (torch.clamp(mean.pow(2), min=_MIN_MEAN_SQ) + self.eps)
        return torch.where(torch.isfinite(nv), nv, torch.zeros_like(nv))

    def scaling_factor(self) -> float:
        """The factor the gradients are multiplied by now, in [min_scaling_factor, 1]."""
        if not self.enabled or self.step_count < self.warmup_steps or self.step_count == 0:
            return 1.0
        nv = self.normalized_variance()
        if nv.numel() == 0:
            return 1.0
        global_nv = min(max(float(torch.quantile(nv.double(), _QUANTILE)), 0.0), _MAX_GLOBAL)
        if self.variance_cap is not None:
            global_nv = min(global_nv, self.variance_cap)
        scale = 1.0 / (1.0 + self.alpha * global_nv)
        return min(max(scale, self.min_scaling_factor), 1.0)

    @torch.no_grad()
    def scale_gradients(self, parameters: Iterable[torch.Tensor] | None = None) -> float:
        """Multiply every gradient (or those of ``parameters``) by :meth:`scaling_factor`
        (call before optimizer.step())."""
        scale = self.scaling_factor()
        if scale != 1.0:
            for param in self.params if parameters is None else parameters:
                if param.grad is not None:
                    param.grad.mul_(scale)
        return scale

    def pending(self) -> dict[str, Any]:
        """The moments of the gradients folded since the last :meth:`advance` (non-zero
        only between the optimizer steps of one training step, with several
        optimizers). Not part of :meth:`state_dict`, whose keys are those of 3.2; save it
        beside the state to lose nothing between two steps (the SB3 integration does)."""
        count, total, total_sq, peak = self._pending
        return {"count": count, "sum": total, "sum_sq": total_sq, "max": peak}

    def load_pending(self, pending: Mapping[str, Any] | None) -> None:
        """Restore what :meth:`pending` returned (None: nothing pending).

        Raises:
            UsageError: not a mapping of ``count`` (an int >= 0) and finite
                ``sum``, ``sum_sq`` and ``max``. Nothing is changed.
        """
        if pending is None:
            self._pending = (0, 0.0, 0.0, 0.0)
            return
        keys = ("count", "sum", "sum_sq", "max")
        if not isinstance(pending, Mapping) or set(pending) != set(keys):
            raise UsageError(f"VGS pending moments must be a mapping with exactly the keys "
                             f"{', '.join(keys)}, got {pending!r}; pass what pending() returned")
        count = pending["count"]
        values = [pending[key] for key in keys[1:]]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in values):
            raise UsageError(f"VGS pending moments: count must be an int >= 0 and sum, sum_sq "
                             f"and max finite numbers, got {dict(pending)!r}")
        self._pending = (count, *(float(v) for v in values))  # type: ignore[assignment]

    def state_dict(self) -> dict[str, Any]:
        """The state, with exactly the keys and types of the original scaler's 3.2:
        every field of ``vgs_state`` (knobs, statistics, tensors) and the version."""
        state: dict[str, Any] = {key: getattr(self, key) for key in vgs_state.SCALAR_KEYS}
        state.update({key: _copy(getattr(self, key)) for key in vgs_state.TENSOR_KEYS})
        state["vgs_version"] = vgs_state.LATEST
        return {key: state[key] for key in vgs_state.STATE_KEYS}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> list[str]:
        """Load a state of any known version; older ones go through the migrations.

        ``None`` (a checkpoint without VGS state) resets the statistics.

        Returns:
            The names of the migration steps applied (empty for a 3.2 state).

        Raises:
            UnsupportedVersionError: unknown ``vgs_version``.
            UsageError: invalid values, or per-parameter tensors whose length does not
                match this scaler's parameters. Nothing is changed.
        """
        if state is None:
            self.reset()
            return []
        new, applied = upgrade_vgs_state(state)
        checked = vgs_state.check(
            {"vgs_version": new.get("vgs_version"),
             **{k: new[k] for k in vgs_state.SCALAR_KEYS if new.get(k) is not None}},
            "load_state_dict", UsageError, "the state cannot drive this scaler")
        tensors = {k: new.get(k) for k in vgs_state.TENSOR_KEYS}
        for key, value in tensors.items():
            if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 1
                                      or value.numel() != len(self.params)):
                raise UsageError(
                    f"{vgs_state.KEY}.{key} must be a 1-D tensor with one entry per parameter "
                    f"({len(self.params)}), got {getattr(value, 'shape', type(value).__name__)}; "
                    "the state belongs to a model with different parameters")
        for key in vgs_state.SCALAR_KEYS:
            setattr(self, key, getattr(checked, key))
        if self.min_scaling_factor is None:
            self.min_scaling_factor = DEFAULTS["min_scaling_factor"]
        for key, value in tensors.items():
            setattr(self, key, _copy(value))
        self._pending = (0, 0.0, 0.0, 0.0)
        return applied


def plain(value: Any) -> Any:
    """A numpy scalar or a one-element tensor as its Python value; anything else as is."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        return value.item()
    return value


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    return tensor.detach().to("cpu", torch.float32).clone()
