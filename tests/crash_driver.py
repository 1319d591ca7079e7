"""A PBT driver (scheduler, store and members in one process) for the crash test.

    python -m tests.crash_driver DIR SEED

DIR may be a URL (``s3://...``, with ``storage_options``).

Resumes whatever DIR holds (``resume="auto"``), prints ``READY`` and trains forever:
each member trains a few steps, reports, saves its full state and exploits. The
crash test SIGKILLs it at random moments.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch

from vgs_ckpt.pbt import HyperparamSpec, PBTConfig, PBTScheduler
from vgs_ckpt.pbt.learner import TorchLearner
from vgs_ckpt.vgs import VarianceGradientScaler

MEMBERS = 4


def make_learner(seed: int, lr: float) -> TorchLearner:
    torch.manual_seed(seed)
    policy = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    return TorchLearner(policy, optimizer, VarianceGradientScaler(policy.parameters(),
                                                                  warmup_steps=3))


def config(directory: str, resume: str = "auto",
           storage_options: dict[str, Any] | None = None) -> PBTConfig:
    return PBTConfig(directory, population_size=MEMBERS, perturbation_interval=2,
                     truncation_ratio=0.25, keep_last=2, keep_best=1, seed=0, resume=resume,
                     hyperparams=[HyperparamSpec("lr", 1e-4, 1e-2, log_scale=True)],
                     storage_options=storage_options)


def main(directory: str, seed: int, ready: Any = None,
         storage_options: dict[str, Any] | None = None) -> None:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    scheduler = PBTScheduler(config(directory, storage_options=storage_options))
    learners, steps = {}, {}
    for member in scheduler.initialize_population():
        learner = make_learner(int(member.member_id), member.hyperparams["lr"])
        checkpoint = scheduler.load_member(member)
        if checkpoint is not None:  # continue from the member's latest checkpoint
            learner.set_parameters(checkpoint.parameters)
        learner.set_hyperparams(member.hyperparams)
        learners[member.member_id], steps[member.member_id] = learner, member.step
    if ready is not None:
        ready.set()
    print("READY", flush=True)
    target = torch.randn(8)
    while True:
        for member_id, learner in learners.items():
            for _ in range(rng.randint(1, 3)):
                x = torch.randn(32, 8)
                learner.train_step(lambda x=x, learner=learner:
                                   (learner.policy(x).squeeze(1) - x @ target).pow(2).mean())
                steps[member_id] += 1
            with torch.no_grad():
                x = torch.randn(64, 8)
                score = -float((learner.policy(x).squeeze(1) - x @ target).pow(2).mean())
            scheduler.update_performance(member_id, score, steps[member_id],
                                         model_parameters=learner.get_parameters())
            parameters, hyperparams, _ = scheduler.exploit_and_explore(member_id)
            if parameters is not None:
                learner.set_parameters(parameters)
                learner.set_hyperparams(hyperparams)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
