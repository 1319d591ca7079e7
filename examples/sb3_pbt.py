"""A small PPO+VGS population on CartPole-v1 with full-state PBT exploits.

Stock Stable-Baselines3 PPO, the reference VGS attached with
vgs_ckpt.integrations.sb3.attach_vgs, and the drop-in PBTScheduler. Every
--interval timesteps each member reports its mean episode return and saves its
whole state (weights, Adam moments, VGS statistics) as a v2 checkpoint; the worst
member takes the best one's state and explores a new learning rate and VGS alpha.
Each exploit prints the recipient's VGS step_count before and after: after, it is
the donor's. About a minute on 2 CPU cores; nothing is downloaded.

    pip install -e '.[sb3]'
    python examples/sb3_pbt.py [--members 4] [--timesteps 12288] [--async] [--dir DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from typing import Any

from vgs_ckpt.integrations import exit_without_extra, sb3
from vgs_ckpt.pbt import HyperparamSpec, PBTConfig, PBTScheduler


def make_model(seed: int, hyperparams: dict) -> Any:
    from stable_baselines3 import PPO

    model = PPO("MlpPolicy", "CartPole-v1", n_steps=256, batch_size=64, n_epochs=4,
                policy_kwargs={"net_arch": [32, 32]}, seed=seed, device="cpu")
    sb3.attach_vgs(model, warmup_steps=20)
    sb3.set_hyperparams(model, hyperparams)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--timesteps", type=int, default=12288,
                        help="timesteps per member (times its speed with --async)")
    parser.add_argument("--interval", type=int, default=1024,
                        help="timesteps between PBT checks")
    parser.add_argument("--async", dest="asynchronous", action="store_true",
                        help="members run at different speeds (1x to 2x)")
    parser.add_argument("--dir", help="checkpoint directory (default: a new temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    exit_without_extra("sb3", "stable_baselines3", "sb3_contrib", "gymnasium",
                       what="examples/sb3_pbt.py")
    logging.getLogger("vgs_ckpt").setLevel(logging.WARNING)

    directory = args.dir or tempfile.mkdtemp(prefix="vgs_ckpt-sb3-")
    scheduler = PBTScheduler(PBTConfig(
        directory, population_size=args.members, perturbation_interval=args.interval,
        truncation_ratio=0.25, seed=args.seed,
        hyperparams=[HyperparamSpec("learning_rate", 1e-4, 3e-3, log_scale=True),
                     HyperparamSpec("vgs_alpha", 0.05, 0.5)]))
    members = scheduler.initialize_population()
    models = {m.member_id: make_model(args.seed * 100 + i, m.hyperparams)
              for i, m in enumerate(members)}
    speeds = ({m: 1.0 + i / max(1, args.members - 1) for i, m in enumerate(models)}
              if args.asynchronous else None)

    def show(event: sb3.ExploitEvent) -> None:
        hp = event.hyperparams
        print(f"  exploit: member {event.member_id} (at {event.timestep} timesteps) <- member "
              f"{event.donor_id} (checkpoint at {event.donor_step}); VGS step_count "
              f"{event.vgs_step_before} -> {event.vgs_step_after} (donor's: "
              f"{event.donor_vgs_step}); lr {hp['learning_rate']:.2e}, "
              f"vgs_alpha {hp['vgs_alpha']:.3f}")

    callbacks = {m: sb3.PBTCallback(scheduler, m, interval=args.interval, on_exploit=show)
                 for m in models}
    start = time.perf_counter()
    sb3.train_population(scheduler, models, total_timesteps=args.timesteps,
                         interval=args.interval, speeds=speeds, callbacks=callbacks,
                         progress=print)
    seconds = time.perf_counter() - start

    events = [e for cb in callbacks.values() for e in cb.events]
    matched = sum(e.vgs_step_after == e.donor_vgs_step for e in events)
    print(f"\n{len(events)} exploits in {seconds:.0f} s; after {matched} of them the "
          "recipient's VGS step_count equals the donor's")
    for member_id, model in models.items():
        member = scheduler.members[member_id]
        perf = "n/a" if member.performance is None else f"{member.performance:.1f}"
        print(f"member {member_id}: {model.num_timesteps} timesteps, mean return {perf}, "
              f"lr {member.hyperparams['learning_rate']:.2e}, VGS step_count "
              f"{sb3.vgs_scaler(model).step_count}")
    print(f"checkpoints: {directory} (try `vgs-ckpt inspect` on one)")


if __name__ == "__main__":
    main()
