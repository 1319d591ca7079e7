"""Write a sample v2 checkpoint of a small PBT member: policy, Adam state, VGS state.

    python examples/make_sample.py /tmp/member_3.safetensors
    vgs-ckpt inspect /tmp/member_3.safetensors
"""

from __future__ import annotations

import sys

import torch

import vgs_ckpt
from vgs_ckpt.pbt.learner import TorchLearner


def main(path: str) -> None:
    torch.manual_seed(3)
    policy = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    learner = TorchLearner(policy, torch.optim.Adam(policy.parameters(), lr=5e-4))
    for _ in range(10):  # ten steps of Adam and of the reference VGS
        x = torch.randn(16, 8)
        learner.train_step(lambda x=x: policy(x).pow(2).mean())
    vgs_ckpt.save(path, learner.get_parameters(), step=150, performance=0.9, member_id="3",
                  hyperparams={"lr": 5e-4})
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "member_3.safetensors")
