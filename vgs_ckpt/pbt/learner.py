"""A minimal torch learner with Stable-Baselines3-style ``get_parameters`` /
``set_parameters``, for hand-written training loops (and the demo)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from vgs_ckpt.hyperparams import apply_to_optimizer, apply_to_scaler, split
from vgs_ckpt.vgs import VarianceGradientScaler
from vgs_ckpt.vgs_state import KEY as VGS_KEY

__all__ = ["TorchLearner"]

POLICY_KEY = "policy"
OPTIMIZER_KEY = "policy.optimizer"


class TorchLearner:
    """A model, its optimizer and its VGS, saved and restored as one parameter tree.

    Example:
        >>> learner = TorchLearner(model, torch.optim.Adam(model.parameters(), lr=1e-3))
        >>> loss = learner.train_step(lambda: criterion(model(x), y))
        >>> learner.set_parameters(vgs_ckpt.load(path).parameters)
    """

    def __init__(self, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 vgs: VarianceGradientScaler | None = None) -> None:
        self.policy = policy
        self.optimizer = optimizer
        self.vgs = vgs if vgs is not None else VarianceGradientScaler(policy.parameters())

    def get_parameters(self) -> dict[str, Any]:
        """``{"policy": ..., "policy.optimizer": ..., "vgs_state": ...}``."""
        return {POLICY_KEY: OrderedDict(self.policy.state_dict()),
                OPTIMIZER_KEY: self.optimizer.state_dict(),
                VGS_KEY: self.vgs.state_dict()}

    def set_parameters(self, parameters: Mapping[str, Any]) -> None:
        """Load whatever parts the tree has; parts it lacks keep their current state.

        A ``vgs_state`` of None (a checkpoint that never had VGS state) resets the
        scaler's statistics.
        """
        if POLICY_KEY in parameters:
            self.policy.load_state_dict(parameters[POLICY_KEY])
        if OPTIMIZER_KEY in parameters:
            self.optimizer.load_state_dict(parameters[OPTIMIZER_KEY])
        if VGS_KEY in parameters:
            self.vgs.load_state_dict(parameters[VGS_KEY])

    def set_hyperparams(self, hyperparams: Mapping[str, Any]) -> None:
        """Apply ``lr`` (and any other param-group key) to the optimizer, and
        ``vgs_<knob>`` entries to the VGS (a bad knob value is a UsageError, and then
        nothing is set)."""
        parsed = split(hyperparams)
        if parsed.vgs:
            apply_to_scaler(self.vgs, parsed.vgs)
        apply_to_optimizer(self.optimizer, parsed.other)

    def train_step(self, loss_fn: Any) -> float:
        """One step: backward, VGS scaling, optimizer step, VGS statistics update."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        self.vgs.scale_gradients()
        self.optimizer.step()
        self.vgs.update()
        return float(loss.detach())
