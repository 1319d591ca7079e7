from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
import torch


def make_vgs_state(step_count: int = 10, num_params: int = 2) -> dict[str, Any]:
    """A VGS 3.2 state_dict() as the original scaler returns it."""
    return {
        "enabled": True, "beta": 0.99, "alpha": 0.1, "eps": 1e-8, "warmup_steps": 100,
        "step_count": step_count, "min_scaling_factor": 0.1, "variance_cap": 50.0,
        "param_grad_mean_ema": torch.linspace(-1, 1, num_params),
        "param_grad_sq_ema": torch.linspace(0, 2, num_params),
        "param_numel": torch.tensor([12.0, 3.0][:num_params]),
        "grad_mean_ema": None, "grad_var_ema": 2.408418e-06, "grad_norm_ema": None,
        "grad_max_ema": None, "vgs_version": "3.2",
    }


def make_member(seed: int = 0, step_count: int = 10) -> dict[str, Any]:
    """A realistic SB3-style get_parameters() tree: policy, Adam state, VGS, KL state."""
    torch.manual_seed(seed)
    policy = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    for _ in range(2):
        optimizer.zero_grad()
        policy(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
    return {
        "policy": OrderedDict(policy.state_dict()),
        "policy.optimizer": optimizer.state_dict(),
        "vgs_state": make_vgs_state(step_count, num_params=2),
        "kl_penalty_state": {"kl_beta": 0.5, "kl_err_int": 0.0, "kl_err_prev": -0.0,
                             "kl_penalty_error": 0.01, "kl_pid_p": 1.0, "kl_pid_i": 0.1,
                             "kl_pid_d": 0.0},
    }


@pytest.fixture
def member() -> dict[str, Any]:
    return make_member()


@contextlib.contextmanager
def raises_exactly(cls: type[BaseException], match: str | None = None) -> Iterator[None]:
    """``pytest.raises`` that also requires the exact class, not a subclass (the error
    taxonomy, docs/spec.md section 13, is part of the API)."""
    with pytest.raises(cls, match=match) as info:
        yield
    assert type(info.value) is cls, f"raised {type(info.value).__name__}, not {cls.__name__}"
