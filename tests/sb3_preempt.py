"""A PBT member (or a population) that trains until it is sent SIGTERM; for the
preemption tests and benchmarks/preemption.py:
``python -m tests.sb3_preempt DIR (member|population) [async] [default]``
(``default``: PPO's default sizes, 2048-step rollouts and 10 epochs, instead of tiny ones).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from stable_baselines3 import PPO

from vgs_ckpt.integrations import sb3
from vgs_ckpt.pbt import PBTConfig, PBTScheduler


def _timed_train(model: PPO, durations: list[float]) -> None:
    train = model.train

    def timed() -> None:
        start = time.perf_counter()
        train()
        durations.append(time.perf_counter() - start)
    model.train = timed  # type: ignore[method-assign]


def main(root: str, mode: str, async_save: bool, default_size: bool) -> None:
    interval = 4096 if default_size else 256
    scheduler = PBTScheduler(PBTConfig(root, population_size=2, perturbation_interval=interval,
                                       seed=0, async_save=async_save))
    scheduler.initialize_population([{}, {}])
    models = {}
    durations: list[float] = []
    for member_id in ("0", "1"):
        size: dict[str, Any] = ({} if default_size else
                                {"n_steps": 64, "batch_size": 64, "n_epochs": 1,
                                 "policy_kwargs": {"net_arch": [16]}})
        models[member_id] = model = PPO("MlpPolicy", "CartPole-v1", seed=int(member_id),
                                        device="cpu", **size)
        sb3.attach_vgs(model)
        _timed_train(model, durations)
    print("training", flush=True)
    try:
        if mode == "member":
            models["0"].learn(10**8, callback=sb3.PBTCallback(scheduler, "0",
                                                              interval=interval))
        else:
            sb3.train_population(scheduler, models, total_timesteps=10**8, interval=interval,
                                 progress=False)
    finally:  # what the tests and the benchmark compare with
        for member_id, model in models.items():
            print(f"member {member_id} at {model.num_timesteps}", flush=True)
        if durations:
            print(f"update seconds {sum(durations) / len(durations):.4f}", flush=True)
    print("not preempted", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "async" in sys.argv[3:], "default" in sys.argv[3:])
