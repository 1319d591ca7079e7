"""Writers of every legacy layout, exactly as the original scheduler called torch.save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .conftest import make_member


def vgs_state_of_version(version: str, step_count: int = 10) -> dict[str, Any]:
    """A VGS state_dict as each original version wrote it."""
    state: dict[str, Any] = {"enabled": True, "beta": 0.99, "alpha": 0.1, "eps": 1e-8,
                             "warmup_steps": 100, "step_count": step_count,
                             "grad_mean_ema": 0.5, "grad_var_ema": 6.678962e-06,
                             "grad_norm_ema": 1.0, "grad_max_ema": 2.0}
    if version == "1.0":
        return state
    state.update(vgs_version=version, param_grad_mean_ema=torch.tensor([0.1, 0.2]),
                 param_grad_sq_ema=torch.tensor([0.01, 0.04]),
                 param_numel=torch.tensor([12.0, 3.0]))
    if version == "3.2":
        state.update(min_scaling_factor=0.1, variance_cap=50.0)
    return state


def payload(layout: str, vgs_version: str = "3.2") -> Any:
    member = make_member()
    member["vgs_state"] = vgs_state_of_version(vgs_version)
    if layout == "L0":
        return member["policy"]
    data = member["policy"] if layout.startswith("L1") else member
    obj: dict[str, Any] = {
        "format_version": "v1_policy_only" if layout.startswith("L1") else "v2_full_parameters",
        "data": data, "step": 150, "performance": 0.9}
    if layout.endswith("+flag"):
        obj["has_optimizer_state"] = "optimizer_state" in data
    return obj


LAYOUTS = ["L0", "L1", "L2", "L1+flag", "L2+flag"]
EXPECTED_FORMAT = {"L0": "v1_policy_only", "L1": "v1_policy_only", "L1+flag": "v1_policy_only",
                   "L2": "v2_full_parameters", "L2+flag": "v2_full_parameters"}


def write_legacy(path: Path, layout: str, *, zip_container: bool = True,
                 vgs_version: str = "3.2") -> Path:
    torch.save(payload(layout, vgs_version), path, _use_new_zipfile_serialization=zip_container)
    return path
