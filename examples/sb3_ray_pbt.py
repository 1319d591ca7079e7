"""An SB3 PPO+VGS population with VecNormalize as a Ray Tune PBT trainable.

The way the original project's models scale out: each trial is a stock
Stable-Baselines3 PPO on Pendulum-v1 behind VecNormalize, with the
reference VGS attached (vgs_ckpt.integrations.sb3.attach_vgs). Every
iteration reports the mean return of deterministic episodes together with the
trial's *whole* learner state (sb3.get_state: networks, Adam moments, VGS
statistics, the VecNormalize observation and reward statistics, counters and
generators) as a vgs_ckpt checkpoint (ray_tune.report). When Ray's PBT clones a
better trial, sb3.set_state puts all of it into the recipient, with the
recipient's explored learning rate and VGS alpha applied; the recipient keeps its
own random generators (a restart of a trial from its own checkpoint restores
those too).

    pip install -e '.[ray,sb3]'
    python examples/sb3_ray_pbt.py [--samples 4] [--iterations 6] [--storage-path DIR]
    python examples/sb3_ray_pbt.py --address 127.0.0.1:6379 --storage-path s3://bucket/pbt

Each exploit is printed with the recipient's normalizer mean before and after (it
becomes the donor's) and its VGS step_count; about 2 minutes on 2 CPU cores with
the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vgs_ckpt.integrations import exit_without_extra

STEPS_PER_ITERATION = 1024


def make_model(config: dict[str, Any]) -> Any:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from vgs_ckpt.integrations import sb3

    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=config["seed"]))
    model = PPO("MlpPolicy", env, n_steps=512, batch_size=64, n_epochs=4, gamma=0.9,
                policy_kwargs={"net_arch": [32, 32]}, seed=config["seed"], device="cpu")
    sb3.attach_vgs(model, warmup_steps=20)
    sb3.set_hyperparams(model, _hyperparams(config))
    return model


def _hyperparams(config: dict[str, Any]) -> dict[str, Any]:
    return {"learning_rate": config["learning_rate"], "vgs_alpha": config["vgs_alpha"]}


def evaluate(model: Any, episodes: int = 3) -> float:
    """Mean return of deterministic episodes on a copy of the env, normalized with the
    trial's (frozen) observation statistics."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    train_env = model.get_env()
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=1, seed=12345), training=False,
                       norm_reward=False)
    env.obs_rms = train_env.obs_rms.copy()
    mean, _ = evaluate_policy(model, env, n_eval_episodes=episodes, deterministic=True)
    return float(mean)


def trainable(config: dict[str, Any]) -> None:
    import torch

    from vgs_ckpt.integrations import ray_tune, sb3

    torch.set_num_threads(1)
    model = make_model(config)
    restored = ray_tune.restore(config)
    lineage, iteration, info = None, 0, {}
    if restored is not None:
        before = model.get_env().obs_rms.mean.copy()
        # Ray starts a cloned trial in a new process: it has no counters of its own
        # left, so it continues the donor's (timesteps, updates); its generators are
        # its own (seeded) unless this is a restart of its own checkpoint.
        sb3.set_state(model, restored.parameters, hyperparams=_hyperparams(config),
                      restore_counters=True, restore_rng=not restored.cloned)
        lineage, iteration = restored.lineage, restored.header.step
        info = {"restored_from": restored.source.member_id,
                "restored_iteration": restored.source.step,
                "restored_cloned": restored.cloned,
                "obs_mean_before": float(before[0]),
                "obs_mean_after": float(model.get_env().obs_rms.mean[0]),
                "vgs_step_count": sb3.vgs_scaler(model).step_count}
    while True:
        iteration += 1
        model.learn(STEPS_PER_ITERATION, reset_num_timesteps=False)
        metrics = {"mean_return": evaluate(model), "iteration": iteration,
                   "timesteps": model.num_timesteps, **info}
        info = {}
        ray_tune.report(metrics, sb3.get_state(model), step=iteration, config=config,
                        lineage=lineage, performance_metric="mean_return")


def run(storage_path: str, *, samples: int = 4, iterations: int = 6, interval: int = 2,
        address: str | None = None, storage_options: dict[str, Any] | None = None) -> Any:
    """Run the population; the ResultGrid. ``address`` joins a running Ray cluster."""
    import ray
    from ray import cloudpickle, tune
    from ray.tune.schedulers import PopulationBasedTraining

    if __name__ != "__main__":  # shipped by value: examples/ is not on the workers' path
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=interval,
        hyperparam_mutations={"learning_rate": tune.loguniform(1e-4, 3e-3),
                              "vgs_alpha": [0.05, 0.1, 0.2, 0.4]},
        quantile_fraction=0.5, resample_probability=0.25, synch=True)
    storage: dict[str, Any] = {}
    if storage_path.startswith("s3://"):
        from pyarrow import fs as arrow

        client = (storage_options or {}).get("client_kwargs", {})
        endpoint = client.get("endpoint_url")
        scheme, _, host = (endpoint or "https://").partition("://")
        storage = {"storage_path": storage_path[len("s3://"):], "storage_filesystem":
                   arrow.S3FileSystem(access_key=(storage_options or {}).get("key"),
                                      secret_key=(storage_options or {}).get("secret"),
                                      region=client.get("region_name"),
                                      endpoint_override=host or None, scheme=scheme)}
    else:
        storage = {"storage_path": os.path.abspath(storage_path)}
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"learning_rate": tune.loguniform(1e-4, 3e-3), "vgs_alpha": 0.1,
                     "seed": tune.randint(0, 1000)},
        tune_config=tune.TuneConfig(metric="mean_return", mode="max", scheduler=scheduler,
                                    num_samples=samples),
        run_config=tune.RunConfig(name="vgs_ckpt_sb3_pbt", verbose=0,
                                  stop={"training_iteration": iterations},
                                  failure_config=tune.FailureConfig(max_failures=3),
                                  **storage))
    return tuner.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--interval", type=int, default=2, help="PBT perturbation interval")
    parser.add_argument("--storage-path", default="ray_results")
    parser.add_argument("--address", help="a running Ray cluster (default: a local Ray)")
    args = parser.parse_args(argv)
    exit_without_extra("ray", "ray", what="examples/sb3_ray_pbt.py")
    exit_without_extra("sb3", "stable_baselines3", "gymnasium", what="examples/sb3_ray_pbt.py")
    results = run(args.storage_path, samples=args.samples, iterations=args.iterations,
                  interval=args.interval, address=args.address)
    exploits = 0
    for result in results:
        frame = result.metrics_dataframe
        cloned = frame[frame.get("restored_cloned", False) == True]  # noqa: E712
        exploits += len(cloned)
        for _, row in cloned.iterrows():
            print(f"exploit: trial {result.metrics['trial_id']} <- {row['restored_from']} "
                  f"(iteration {row['restored_iteration']}): VecNormalize obs mean[0] "
                  f"{row['obs_mean_before']:.3f} -> {row['obs_mean_after']:.3f}, VGS "
                  f"step_count {row['vgs_step_count']}")
        print(f"trial {result.metrics['trial_id']}: mean return "
              f"{result.metrics['mean_return']:.1f} after {result.metrics['timesteps']} "
              "timesteps")
    print(f"{exploits} exploits, each with the donor's normalizer statistics")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
