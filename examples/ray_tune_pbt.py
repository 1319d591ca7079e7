"""Ray Tune PopulationBasedTraining with full-state vgs_ckpt checkpoints.

A small torch model trained with Adam and the reference VGS; Ray's PBT clones the
better trials' checkpoints into the worse ones, and every exploit carries weights,
optimizer state and VGS statistics, with the recipient's own explored learning rate
and VGS alpha applied after the restore.

    pip install -e '.[ray]'
    python examples/ray_tune_pbt.py --storage-path /tmp/ray_pbt

Every report also carries a digest of the state that was saved (saved_digest)
and, after a restore, of the state that was restored (restored_digest), so the
tests can check that each exploit restored exactly the donor's checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Any

import torch

from vgs_ckpt.integrations import exit_without_extra, ray_tune
from vgs_ckpt.pbt.learner import TorchLearner
from vgs_ckpt.vgs import VarianceGradientScaler

STEPS_PER_ITERATION = 20


def make_learner(config: dict[str, Any]) -> TorchLearner:
    torch.manual_seed(config.get("seed", 0))
    policy = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(policy.parameters(), lr=config["lr"])
    vgs = VarianceGradientScaler(policy.parameters(), alpha=config["vgs_alpha"], warmup_steps=5)
    return TorchLearner(policy, optimizer, vgs)


def state_digest(learner: TorchLearner) -> str:
    """A digest of the weights and the VGS statistics (not the config knobs)."""
    h = hashlib.sha256()
    for tensor in learner.policy.state_dict().values():
        h.update(tensor.detach().contiguous().numpy().tobytes())
    state = learner.vgs.state_dict()
    h.update(str(state["step_count"]).encode())
    for key in ("param_grad_mean_ema", "param_grad_sq_ema", "param_numel"):
        if state[key] is not None:
            h.update(state[key].numpy().tobytes())
    return h.hexdigest()


def train_iteration(learner: TorchLearner, gen: torch.Generator) -> float:
    """One iteration: STEPS_PER_ITERATION steps, then the loss on a fresh batch."""
    for _ in range(STEPS_PER_ITERATION):
        x = torch.randn(32, 4, generator=gen)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        learner.train_step(lambda x=x, y=y: (learner.policy(x) - y).pow(2).mean())
    with torch.no_grad():
        x = torch.randn(256, 4, generator=gen)
        return float((learner.policy(x) - torch.sin(x.sum(dim=1, keepdim=True))).pow(2).mean())


def trainable(config: dict[str, Any]) -> None:
    learner = make_learner(config)
    restored = ray_tune.restore(config)
    lineage, iteration, info = None, 0, {}
    if restored is not None:
        learner.set_parameters(restored.parameters)
        lineage, iteration = restored.lineage, restored.header.step
        info = {"restored_from": restored.source.member_id,
                "restored_file": restored.source.file,
                "restored_iteration": restored.source.step, "restored_cloned": restored.cloned,
                "restored_restarted": restored.restarted,
                "restored_digest": state_digest(learner),
                "restored_vgs_step_count": learner.vgs.step_count}
    gen = torch.Generator().manual_seed(config.get("seed", 0) + iteration)
    while True:
        iteration += 1
        loss = train_iteration(learner, gen)
        metrics = {"loss": loss, "iteration": iteration, "saved_digest": state_digest(learner),
                   "optimizer_lr": learner.optimizer.param_groups[0]["lr"],
                   "vgs_alpha_in_use": learner.vgs.alpha,
                   "vgs_step_count": learner.vgs.step_count, **info}
        info = {}
        ray_tune.report(metrics, learner.get_parameters(), step=iteration, config=config,
                        lineage=lineage, performance_metric="loss")


def run(storage_path: str, *, num_samples: int = 4, iterations: int = 8,
        perturbation_interval: int = 2, seed: int = 0) -> Any:
    """Run the PBT experiment on a local Ray instance (2 CPUs); return the ResultGrid."""
    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    if __name__ != "__main__":
        # Imported (by the tests, say): ship this module's code to the workers by
        # value, since examples/ is not on their import path.
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=perturbation_interval,
        hyperparam_mutations={"lr": tune.loguniform(1e-4, 1e-1),
                              "vgs_alpha": [0.05, 0.1, 0.2, 0.4]},
        quantile_fraction=0.5, resample_probability=0.25, synch=True)
    tuner = tune.Tuner(
        trainable,
        param_space={"lr": tune.loguniform(1e-4, 1e-1), "vgs_alpha": 0.1,
                     "seed": tune.randint(0, 1000)},
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler,
                                    num_samples=num_samples),
        run_config=tune.RunConfig(name="vgs_ckpt_pbt", storage_path=os.path.abspath(storage_path),
                                  stop={"training_iteration": iterations}, verbose=0,
                                  # A trial whose worker died restarts from its last
                                  # checkpoint instead of stalling the synchronous PBT.
                                  failure_config=tune.FailureConfig(max_failures=3)),
    )
    return tuner.fit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage-path", default="ray_results")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=8)
    args = parser.parse_args()
    exit_without_extra("ray", "ray", what="examples/ray_tune_pbt.py")
    results = run(args.storage_path, num_samples=args.samples, iterations=args.iterations)
    for result in results:
        frame = result.metrics_dataframe
        exploits = frame[frame.get("restored_cloned", False) == True]  # noqa: E712
        print(f"trial {result.metrics['trial_id']}: final loss {result.metrics['loss']:.4f}, "
              f"{len(exploits)} exploits")


if __name__ == "__main__":
    main()
