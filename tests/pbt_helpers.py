"""A small torch task and learners for the PBT tests."""

from __future__ import annotations

from typing import Any

import torch

from vgs_ckpt.pbt.learner import TorchLearner
from vgs_ckpt.vgs import VarianceGradientScaler


def make_learner(seed: int, lr: float = 1e-2) -> TorchLearner:
    torch.manual_seed(seed)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    vgs = VarianceGradientScaler(policy.parameters(), warmup_steps=2)
    return TorchLearner(policy, optimizer, vgs)


def train(learner: TorchLearner, steps: int, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    loss = 0.0
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        y = x.sum(dim=1, keepdim=True).sin()
        loss = learner.train_step(lambda x=x, y=y: (learner.policy(x) - y).pow(2).mean())
    return loss


def vgs_tensors(learner: TorchLearner) -> dict[str, Any]:
    state = learner.vgs.state_dict()
    return {k: state[k] for k in ("param_grad_mean_ema", "param_grad_sq_ema", "param_numel")}
