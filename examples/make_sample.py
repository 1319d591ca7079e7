"""Write a sample v2 checkpoint of a small PBT member: policy, Adam state, VGS state.

    python examples/make_sample.py /tmp/member_3.safetensors
    vgs-ckpt inspect /tmp/member_3.safetensors
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch

import vgs_ckpt


def main(path: str) -> None:
    torch.manual_seed(3)
    policy = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    optimizer = torch.optim.Adam(policy.parameters(), lr=5e-4)
    for _ in range(10):
        optimizer.zero_grad()
        policy(torch.randn(16, 8)).pow(2).mean().backward()
        optimizer.step()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    vgs_state = {  # the state_dict() keys of a VGS 3.2 scaler
        "enabled": True, "beta": 0.99, "alpha": 0.1, "eps": 1e-8, "warmup_steps": 100,
        "step_count": 10, "min_scaling_factor": 0.1, "variance_cap": 50.0,
        "param_grad_mean_ema": torch.stack([g.mean() for g in grads]) * 0.1,
        "param_grad_sq_ema": torch.stack([g.pow(2).mean() for g in grads]) * 0.1,
        "param_numel": torch.tensor([float(g.numel()) for g in grads]),
        "grad_mean_ema": None, "grad_var_ema": 2.408418e-06, "grad_norm_ema": None,
        "grad_max_ema": None, "vgs_version": "3.2",
    }
    parameters = {"policy": OrderedDict(policy.state_dict()),
                  "policy.optimizer": optimizer.state_dict(), "vgs_state": vgs_state}
    vgs_ckpt.save(path, parameters, step=150, performance=0.9, member_id="3",
                  hyperparams={"lr": 5e-4})
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "member_3.safetensors")
