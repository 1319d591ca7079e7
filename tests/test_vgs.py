"""The reference VGS 3.2: the formula on hand-computed values, and its state_dict."""

from __future__ import annotations

import math

import pytest
import torch

from vgs_ckpt import UnsupportedVersionError, UsageError
from vgs_ckpt.vgs import VarianceGradientScaler

from .legacy_files import vgs_state_of_version

ORIGINAL_3_2_KEYS = ["enabled", "beta", "alpha", "eps", "warmup_steps", "step_count",
                     "min_scaling_factor", "variance_cap", "param_grad_mean_ema",
                     "param_grad_sq_ema", "param_numel", "grad_mean_ema", "grad_var_ema",
                     "grad_norm_ema", "grad_max_ema", "vgs_version"]


def _params(*grads: list[float]) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


def test_emas_follow_the_formula() -> None:
    params = _params([1.0, 3.0], [2.0, -2.0])
    vgs = VarianceGradientScaler(params, beta=0.5, warmup_steps=0)
    vgs.update()
    # m = 0.5*0 + 0.5*mean(g); s = 0.5*0 + 0.5*mean(g^2)
    assert vgs.param_grad_mean_ema is not None and vgs.param_grad_sq_ema is not None
    assert vgs.param_grad_mean_ema.tolist() == [1.0, 0.0]
    assert vgs.param_grad_sq_ema.tolist() == [2.5, 2.0]
    vgs.update()
    assert vgs.param_grad_mean_ema.tolist() == [1.5, 0.0]
    assert vgs.param_grad_sq_ema.tolist() == [3.75, 3.0]
    assert vgs.step_count == 2
    assert vgs.param_numel is not None and vgs.param_numel.tolist() == [2.0, 2.0]


def test_scaling_factor_on_hand_computed_values() -> None:
    params = _params([1.0, 3.0], [2.0, -2.0])
    vgs = VarianceGradientScaler(params, beta=0.5, alpha=0.1, eps=1e-8, warmup_steps=0,
                                 min_scaling_factor=0.1, variance_cap=50.0)
    vgs.update()
    # step 1: bc = 0.5; mean = [2, 0]; sq/bc = [5, 4]; var = [1, 4]
    # nv = [1/(4+1e-8), 4/(1e-12+1e-8)] = [0.25, ~396039.6]
    nv = vgs.normalized_variance()
    assert nv[0].item() == pytest.approx(0.25)
    assert nv[1].item() == pytest.approx(4 / (1e-12 + 1e-8), rel=1e-5)
    # quantile 0.9 of two values: 0.25 + 0.9*(nv1 - 0.25); capped at 50
    global_nv = min(0.25 + 0.9 * (nv[1].item() - 0.25), 50.0)
    assert vgs.scaling_factor() == pytest.approx(1 / (1 + 0.1 * global_nv))
    assert vgs.scaling_factor() == pytest.approx(1 / 6)


def test_scale_is_clipped_and_gated() -> None:
    params = _params([1.0, 3.0], [2.0, -2.0])
    vgs = VarianceGradientScaler(params, beta=0.5, alpha=10.0, warmup_steps=0,
                                 min_scaling_factor=0.25, variance_cap=None)
    vgs.update()
    assert vgs.scaling_factor() == 0.25  # clipped below
    vgs.enabled = False
    assert vgs.scaling_factor() == 1.0
    vgs.enabled, vgs.warmup_steps = True, 5
    assert vgs.scaling_factor() == 1.0  # still warming up


def test_scale_gradients_multiplies_every_gradient() -> None:
    params = _params([1.0, 3.0], [2.0, -2.0])
    vgs = VarianceGradientScaler(params, beta=0.5, warmup_steps=0)
    vgs.update()
    scale = vgs.scale_gradients()
    assert scale == pytest.approx(1 / 6)
    assert params[0].grad is not None
    assert params[0].grad.tolist() == pytest.approx([scale * 1.0, scale * 3.0])


def test_non_finite_normalized_variance_counts_as_zero() -> None:
    params = _params([math.inf, 1.0])
    vgs = VarianceGradientScaler(params, warmup_steps=0)
    vgs.update()
    assert vgs.normalized_variance().tolist() == [0.0]
    assert vgs.scaling_factor() == 1.0


def test_state_dict_has_exactly_the_original_3_2_keys_and_types() -> None:
    vgs = VarianceGradientScaler(_params([1.0, 2.0]))
    vgs.update()
    state = vgs.state_dict()
    assert list(state) == ORIGINAL_3_2_KEYS
    assert state["vgs_version"] == "3.2" and type(state["step_count"]) is int
    assert type(state["beta"]) is float and type(state["enabled"]) is bool
    for key in ("param_grad_mean_ema", "param_grad_sq_ema", "param_numel"):
        assert state[key].dtype == torch.float32 and state[key].dim() == 1


def test_state_round_trips_through_load_state_dict() -> None:
    a = VarianceGradientScaler(_params([1.0, 2.0], [3.0]), warmup_steps=0)
    for _ in range(3):
        a.update()
    b = VarianceGradientScaler(_params([0.0, 0.0], [0.0]))
    assert b.load_state_dict(a.state_dict()) == []
    sa, sb = a.state_dict(), b.state_dict()
    for key in ORIGINAL_3_2_KEYS:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key])
        else:
            assert sa[key] == sb[key]


@pytest.mark.parametrize(("version", "steps", "step_count"), [
    ("1.0", ["vgs_1.0->3.1", "vgs_3.1->3.2"], 0), ("2.0", ["vgs_2.0->3.1", "vgs_3.1->3.2"], 0),
    ("3.0", ["vgs_3.0->3.1", "vgs_3.1->3.2"], 0), ("3.1", ["vgs_3.1->3.2"], 10)])
def test_older_states_load_through_the_migrations(version: str, steps: list[str],
                                                   step_count: int) -> None:
    vgs = VarianceGradientScaler(_params([1.0], [2.0]))
    assert vgs.load_state_dict(vgs_state_of_version(version, step_count=10)) == steps
    assert vgs.step_count == step_count
    assert vgs.min_scaling_factor == 0.1 and vgs.variance_cap == 50.0
    if version == "3.1":
        assert vgs.param_grad_mean_ema is not None
    else:
        assert vgs.param_grad_mean_ema is None


def test_load_state_dict_errors() -> None:
    vgs = VarianceGradientScaler(_params([1.0], [2.0], [3.0]))
    with pytest.raises(UsageError, match="one entry per parameter"):
        vgs.load_state_dict(vgs_state_of_version("3.2"))  # 2 entries, 3 parameters
    with pytest.raises(UnsupportedVersionError):
        vgs.load_state_dict({**vgs_state_of_version("3.2"), "vgs_version": "7.0"})
    with pytest.raises(UsageError, match="beta"):
        vgs.load_state_dict({**vgs_state_of_version("1.0"), "beta": 2.0})


def test_none_state_resets_the_statistics() -> None:
    vgs = VarianceGradientScaler(_params([1.0]))
    vgs.update()
    vgs.load_state_dict(None)
    assert vgs.step_count == 0 and vgs.param_grad_mean_ema is None


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(UsageError, match="beta"):
        VarianceGradientScaler(_params([1.0]), beta=1.0)
