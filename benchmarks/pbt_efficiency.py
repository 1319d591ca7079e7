"""Does full-state transfer pay? PBT efficiency on real RL, with confidence intervals.

Populations of Stable-Baselines3 members with the reference VGS (PPO on
CartPole-v1, SAC on Pendulum-v1) train under the drop-in PBTScheduler with
truncation selection. The same seeds and hyperparameter space run in every arm;
the arms differ only in what an exploit carries from the donor:

- ``full``: weights, optimizer state and VGS state (v2);
- ``policy_only``: the policy weights only (v1, the original bug: the recipient
  keeps its own optimizer moments and VGS statistics);
- ``no_vgs_state``: everything but the VGS state (the recipient keeps its own);
- ``optimizer_reset``: weights and VGS state, optimizer moments reset;
- ``no_vgs``: full transfer, but no VGS at all (a baseline).

Two schedules: ``sync`` (every member checked at the same step counts) and
``async`` (members at speeds 0.5, 0.75, 1.25 and 1.5, so donors and recipients
meet at different step counts; the population's total steps are the same).

Metrics per run, each summarised over seeds with a bootstrap 95% interval:
area under the best-member and mean-member return curves against the
population's environment steps (reported as the mean return over the run),
population steps until the best member first reports the task's threshold, and
the post-exploit dip: the recipient's mean episode return over the next
``interval`` timesteps after an exploit, minus the donor's performance recorded
in the checkpoint it took.

    python benchmarks/pbt_efficiency.py --quick          # CI smoke run, under 3 minutes
    python benchmarks/pbt_efficiency.py --out results.json --plot pbt.png --markdown t.md
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ARMS = ("full", "policy_only", "no_vgs_state", "optimizer_reset", "no_vgs",
        "no_vecnorm_state")
TRANSIENT_INTERVALS = 3  # post-exploit intervals whose return is measured one by one
VGS_ARMS = ("full", "no_vgs_state", "policy_only")
SCHEDULES = ("sync", "async")
ASYNC_SPEEDS = (0.5, 0.75, 1.25, 1.5)


@dataclass(frozen=True)
class Task:
    name: str
    env: str
    algo: str
    timesteps: int  # per member, at speed 1
    interval: int  # timesteps between PBT checks (and rounds)
    threshold: float  # return the best member must report
    lr_range: tuple[float, float]
    arms: tuple[str, ...] = ARMS[:5]  # part II arms are given per task
    # Part II (docs/experiments.md): the settings where a state mismatch may cost.
    vec_normalize: bool = False  # PPO behind VecNormalize (its statistics are state)
    warmup_steps: int = 100  # the reference VGS default
    variance_cap: float | None = 50.0  # the reference VGS default; None: uncapped
    optimizer: str = "adam"  # or "sgd" (momentum 0.9)
    alpha_range: tuple[float, float] = (0.05, 0.5)  # explored vgs_alpha
    n_steps: int = 256  # PPO rollout length
    n_epochs: int = 4
    gamma: float = 0.99


FULL_TASKS = {
    "cartpole": Task("cartpole", "CartPole-v1", "PPO", 12288, 1024, 400.0, (1e-4, 3e-3)),
    "pendulum": Task("pendulum", "Pendulum-v1", "SAC", 4000, 500, -300.0, (1e-4, 3e-3),
                     arms=ARMS[:4]),
}
# Part II. PPO + VecNormalize on Pendulum-v1 (rl-zoo's settings, one env): the
# normalizer's statistics are the state in question. Then three PPO CartPole-v1
# settings chosen so that the VGS factor depends on its statistics: exploits inside a
# long warm-up (400 of the ~750 optimizer steps of a member); no variance cap, with a
# vgs_alpha small enough (0.002-0.02) that at the normalized variance CartPole's
# gradients reach (a few hundred, measured: see the probe table) the factor stays
# between its floor and 1 instead of sitting at the floor; and that uncapped VGS with
# SGD and momentum, which, unlike Adam, does not normalize the gradient's scale away.
FULL_TASKS.update({
    "pendulum_vecnorm": Task("pendulum_vecnorm", "Pendulum-v1", "PPO", 40960, 4096, -400.0,
                             (3e-4, 3e-3), arms=("full", "no_vecnorm_state", "policy_only"),
                             vec_normalize=True, n_steps=1024, n_epochs=10, gamma=0.9),
    "cartpole_warmup": Task("cartpole_warmup", "CartPole-v1", "PPO", 12288, 512, 400.0,
                            (1e-4, 3e-3), arms=VGS_ARMS, warmup_steps=400),
    "cartpole_uncapped": Task("cartpole_uncapped", "CartPole-v1", "PPO", 12288, 1024, 400.0,
                              (1e-4, 3e-3), arms=VGS_ARMS, variance_cap=None,
                              alpha_range=(0.002, 0.02)),
    "cartpole_sgd": Task("cartpole_sgd", "CartPole-v1", "PPO", 12288, 1024, 400.0,
                         (3e-3, 1e-1), arms=VGS_ARMS, optimizer="sgd", variance_cap=None,
                         alpha_range=(0.002, 0.02)),
})
PART_II = ("pendulum_vecnorm", "cartpole_warmup", "cartpole_uncapped", "cartpole_sgd")
QUICK_TASKS = {
    "cartpole": replace(FULL_TASKS["cartpole"], timesteps=1024, interval=256),
    "pendulum": replace(FULL_TASKS["pendulum"], timesteps=300, interval=100, arms=ARMS[:5]),
    "pendulum_vecnorm": replace(FULL_TASKS["pendulum_vecnorm"], timesteps=1024,
                                interval=256, n_steps=256, n_epochs=2),
    "cartpole_warmup": replace(FULL_TASKS["cartpole_warmup"], timesteps=768, interval=256,
                               warmup_steps=20),
    "cartpole_uncapped": replace(FULL_TASKS["cartpole_uncapped"], timesteps=768,
                                 interval=256),
    "cartpole_sgd": replace(FULL_TASKS["cartpole_sgd"], timesteps=768, interval=256),
}


@dataclass(frozen=True)
class RunSpec:
    task: Task
    schedule: str
    arm: str
    seed: int
    members: int = 4


# --- one population run (in a worker process) ---------------------------------------

def _make_model(task: Task, seed: int, quick: bool) -> Any:
    import torch
    from stable_baselines3 import PPO, SAC

    if task.algo == "PPO":
        env: Any = task.env
        policy_kwargs: dict[str, Any] = {"net_arch": [32, 32]}
        extra: dict[str, Any] = {}
        if task.vec_normalize:
            from stable_baselines3.common.env_util import make_vec_env
            from stable_baselines3.common.vec_env import VecNormalize

            env = VecNormalize(make_vec_env(task.env, n_envs=1, seed=seed), gamma=task.gamma)
            policy_kwargs = {"net_arch": [64, 64]}
            extra = {"gae_lambda": 0.95, "use_sde": True, "sde_sample_freq": 4}
        if task.optimizer == "sgd":
            policy_kwargs.update(optimizer_class=torch.optim.SGD,
                                 optimizer_kwargs={"momentum": 0.9})
        return PPO("MlpPolicy", env, n_steps=task.n_steps, batch_size=64,
                   n_epochs=task.n_epochs, gamma=task.gamma, policy_kwargs=policy_kwargs,
                   seed=seed, device="cpu", **extra)
    return SAC("MlpPolicy", task.env, learning_starts=64 if quick else 256, batch_size=64,
               buffer_size=20000, policy_kwargs={"net_arch": [64, 64]}, seed=seed,
               device="cpu")


def run_population(spec: RunSpec, quick: bool = False) -> dict[str, Any]:
    """Train one population; return its curves, exploits and episodes."""
    import torch

    from vgs_ckpt.integrations import sb3
    from vgs_ckpt.pbt import HyperparamSpec, PBTConfig, PBTScheduler

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the policy-only arm's deprecation warnings
    logging.getLogger("vgs_ckpt").setLevel(logging.ERROR)
    task, arm = spec.task, spec.arm
    with_vgs = arm != "no_vgs"

    class ArmCallback(sb3.PBTCallback):
        """PBTCallback with the arm's transfer, and a log of every episode."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.episodes: list[tuple[int, float]] = []
            # Per exploit with a VecNormalize: its observation count before, after, and
            # in the donor's checkpoint (None when the checkpoint has none).
            self.normalizer: list[tuple[float, float, float | None]] = []

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", ()):
                if "episode" in info:
                    self.episodes.append((self.model.num_timesteps, float(info["episode"]["r"])))
            return super()._on_step()

        def report(self, performance: float) -> None:
            if arm == "policy_only":  # the original scheduler: policy.state_dict() only
                self.scheduler.update_performance(
                    self.member_id, performance, step=self.model.num_timesteps,
                    model_state_dict=self.model.policy.state_dict())
            else:
                super().report(performance)

        def restore(self, parameters: Mapping[Any, Any], hyperparams: Mapping[str, Any]
                    ) -> None:
            tree = dict(parameters)
            hp = dict(hyperparams)
            if arm == "no_vgs_state":
                tree["vgs_state"] = sb3.vgs_scaler(self.model).state_dict()
            donor_rms = ((parameters.get("vec_normalize") or {}).get("obs_rms") or {})
            if arm == "no_vecnorm_state":  # the recipient keeps its own normalizer
                tree.pop("vec_normalize", None)
            if not with_vgs:
                hp = {k: v for k, v in hp.items() if not k.startswith("vgs_")}
            env = self.model.get_env()
            before = float(env.obs_rms.count) if hasattr(env, "obs_rms") else None
            sb3.set_state(self.model, tree, hyperparams=hp)
            if before is not None:
                donor = donor_rms.get("count") if isinstance(donor_rms, dict) else None
                self.normalizer.append((before, float(env.obs_rms.count),
                                        float(donor) if donor is not None else None))

    directory = tempfile.mkdtemp(prefix="vgs_pbt_eff-")
    try:
        scheduler = PBTScheduler(PBTConfig(
            directory, population_size=spec.members, perturbation_interval=task.interval,
            truncation_ratio=0.25, seed=spec.seed, keep_last=1, keep_best=0,
            optimizer_strategy="reset" if arm == "optimizer_reset" else "copy",
            hyperparams=[HyperparamSpec("learning_rate", *task.lr_range, log_scale=True),
                         HyperparamSpec("vgs_alpha", *task.alpha_range)]))
        members = scheduler.initialize_population()
        models, callbacks = {}, {}
        for i, member in enumerate(members):
            model = _make_model(task, spec.seed * 1000 + i, quick)
            hp = dict(member.hyperparams)
            if with_vgs:
                sb3.attach_vgs(model, warmup_steps=task.warmup_steps,
                               variance_cap=task.variance_cap)
            else:
                hp = {k: v for k, v in hp.items() if not k.startswith("vgs_")}
            sb3.set_hyperparams(model, hp)
            models[member.member_id] = model
            callbacks[member.member_id] = ArmCallback(scheduler, member.member_id,
                                                      interval=task.interval)
        speeds = (dict(zip(models, ASYNC_SPEEDS, strict=False)) if spec.schedule == "async"
                  else None)
        # The whole run's budget: the rounds below are one train_population call each,
        # and only the run's end (not each round's) goes without an exploit.
        for member_id, cb in callbacks.items():
            cb.total_timesteps = round(task.timesteps * (speeds or {}).get(member_id, 1.0))
        rounds = task.timesteps // task.interval
        curve = []  # (population steps, [each member's latest performance])
        probe = []  # per round: each member's (VGS step_count, global normalized variance)
        for r in range(1, rounds + 1):
            sb3.train_population(scheduler, models, total_timesteps=r * task.interval,
                                 interval=task.interval, speeds=speeds, callbacks=callbacks)
            latest = [cb.reports[-1][1] if cb.reports else math.nan
                      for cb in callbacks.values()]
            curve.append((sum(m.num_timesteps for m in models.values()), latest))
            if with_vgs:
                probe.append([_global_nv(sb3.vgs_scaler(m)) for m in models.values()])
        exploits = []
        for cb in callbacks.values():
            for e in cb.events:
                episodes = callbacks[e.member_id].episodes
                after = [ret for t, ret in episodes
                         if e.timestep < t <= e.timestep + task.interval]
                # The transient: the recipient's mean return in each of the next few
                # intervals, minus the donor's recorded performance.
                transient = []
                for k in range(1, TRANSIENT_INTERVALS + 1):
                    window = [ret for t, ret in episodes if e.timestep + (k - 1)
                              * task.interval < t <= e.timestep + k * task.interval]
                    transient.append(float(np.mean(window)) - e.donor_performance
                                     if window and e.donor_performance is not None else None)
                exploits.append({
                    "member": e.member_id, "donor": e.donor_id, "timestep": e.timestep,
                    "donor_step": e.donor_step, "donor_performance": e.donor_performance,
                    "vgs_step_before": e.vgs_step_before, "vgs_step_after": e.vgs_step_after,
                    "donor_vgs_step": e.donor_vgs_step, "format": str(e.format.value),
                    "return_after": float(np.mean(after)) if after else None,
                    "transient": transient})
        return {"task": task.name, "schedule": spec.schedule, "arm": arm, "seed": spec.seed,
                "curve": curve, "exploits": exploits, "vgs_probe": probe,
                "normalizer": [list(n) for cb in callbacks.values() for n in cb.normalizer],
                "timesteps": {m: model.num_timesteps for m, model in models.items()}}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _global_nv(scaler: Any) -> tuple[int, float | None]:
    """The scaler's step count and the global normalized variance its factor uses
    (the 0.9 quantile of the per-parameter values, before any cap)."""
    import torch

    nv = scaler.normalized_variance()
    if nv.numel() == 0:
        return scaler.step_count, None
    return scaler.step_count, float(torch.quantile(nv.double(), 0.9))


# --- metrics -------------------------------------------------------------------------

def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def run_metrics(run: Mapping[str, Any], threshold: float) -> dict[str, float | None]:
    """AUCs (as mean return over the run), steps to threshold, post-exploit dip."""
    xs = [0.0] + [float(x) for x, _ in run["curve"]]
    best, mean = [], []
    for _, latest in run["curve"]:
        finite = _finite(latest)
        best.append(max(finite) if finite else math.nan)
        mean.append(float(np.mean(finite)) if finite else math.nan)

    def auc(ys: list[float]) -> float | None:
        # Step function: each round's value holds from the previous round's end.
        pairs = [(x1 - x0, y) for x0, x1, y in zip(xs, xs[1:], ys, strict=False)
                 if math.isfinite(y)]
        width = sum(w for w, _ in pairs)
        return sum(w * y for w, y in pairs) / width if width else None

    reached = next((x for x, y in zip(xs[1:], best, strict=True) if y >= threshold), None)
    dips = [e["return_after"] - e["donor_performance"] for e in run["exploits"]
            if e["return_after"] is not None and e["donor_performance"] is not None]
    mismatched = [e for e in run["exploits"] if e["vgs_step_before"] is not None
                  and e["donor_vgs_step"] is not None
                  and e["vgs_step_before"] != e["donor_vgs_step"]]
    transient = {}
    for k in range(TRANSIENT_INTERVALS):
        values = [e["transient"][k] for e in run["exploits"]
                  if len(e.get("transient") or ()) > k and e["transient"][k] is not None]
        transient[f"transient_{k + 1}"] = float(np.mean(values)) if values else None
    return {"auc_best": auc(best), "auc_mean": auc(mean), "final_best": best[-1],
            "steps_to_threshold": reached, "budget": xs[-1],
            "dip": float(np.mean(dips)) if dips else None, **transient,
            "exploits": float(len(run["exploits"])),
            "mismatched_exploits": float(len(mismatched))}


def bootstrap_ci(values: Sequence[float], *, resamples: int = 10000, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap 95% interval of the mean."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    if data.size == 1:
        return float(data[0]), math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    return float(data.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means,
                                                                                      97.5))


def summarise(runs: list[dict[str, Any]], tasks: Mapping[str, Task]) -> list[dict[str, Any]]:
    """Per task, schedule and arm: each metric over seeds, and paired differences
    against ``full`` on the same seeds."""
    by_key: dict[tuple[str, str, str], dict[int, dict[str, Any]]] = {}
    for run in runs:
        metrics = run_metrics(run, tasks[run["task"]].threshold)
        by_key.setdefault((run["task"], run["schedule"], run["arm"]), {})[run["seed"]] = metrics
    rows = []
    for (task, schedule, arm), per_seed in sorted(by_key.items()):
        full = by_key.get((task, schedule, "full"), {})
        row: dict[str, Any] = {"task": task, "schedule": schedule, "arm": arm,
                               "seeds": len(per_seed)}
        for metric in ("auc_best", "auc_mean", "final_best", "dip", "exploits",
                       "mismatched_exploits",
                       *(f"transient_{k + 1}" for k in range(TRANSIENT_INTERVALS))):
            values = _finite([m[metric] for m in per_seed.values()
                              if m.get(metric) is not None])
            row[metric] = bootstrap_ci(values)
            paired = _finite([per_seed[s][metric] - full[s][metric] for s in per_seed
                              if s in full and per_seed[s].get(metric) is not None
                              and full[s].get(metric) is not None])
            row[f"{metric}_vs_full"] = bootstrap_ci(paired) if arm != "full" else None
        # Steps to threshold: a run that never reached it counts as its whole budget.
        steps = [m["steps_to_threshold"] if m["steps_to_threshold"] is not None
                 else m["budget"] for m in per_seed.values()]
        row["steps_to_threshold"] = bootstrap_ci(steps)
        row["reached"] = sum(m["steps_to_threshold"] is not None for m in per_seed.values())
        ratios = [(per_seed[s]["steps_to_threshold"] or per_seed[s]["budget"])
                  / (full[s]["steps_to_threshold"] or full[s]["budget"])
                  for s in per_seed if s in full]
        row["steps_ratio_vs_full"] = bootstrap_ci(ratios) if arm != "full" else None
        rows.append(row)
    return rows


def _fmt(ci: tuple[float, float, float] | None, digits: int = 0) -> str:
    if ci is None:
        return "—"
    mean, lo, hi = ci
    if math.isnan(mean):
        return "n/a"
    if math.isnan(lo):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as Markdown tables (one per task and schedule)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        for schedule in SCHEDULES:
            sel = [r for r in rows if r["task"] == task and r["schedule"] == schedule]
            if not sel:
                continue
            sel.sort(key=lambda r: ARMS.index(r["arm"]))
            out.append(f"\n**{task}, {schedule}** (mean over {sel[0]['seeds']} seeds "
                       "[bootstrap 95% CI]; differences are paired with `full` on the same "
                       "seeds)\n")
            out.append("| arm | AUC best | AUC best - full | AUC mean | AUC mean - full | "
                       "steps to threshold (reached) | ÷ full | post-exploit dip | "
                       "dip - full | exploits (step mismatch) |")
            out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for r in sel:
                out.append(
                    f"| {r['arm']} | {_fmt(r['auc_best'])} | {_fmt(r['auc_best_vs_full'])} | "
                    f"{_fmt(r['auc_mean'])} | {_fmt(r['auc_mean_vs_full'])} | "
                    f"{_fmt(r['steps_to_threshold'])} ({r['reached']}/{r['seeds']}) | "
                    f"{_fmt(r['steps_ratio_vs_full'], 2)} | {_fmt(r['dip'])} | "
                    f"{_fmt(r['dip_vs_full'])} | {_fmt(r['exploits'], 1)} "
                    f"({_fmt(r['mismatched_exploits'], 1)}) |")
    return "\n".join(out) + "\n"


WARMUP = 100  # the reference VGS's default warmup_steps, used by every member here


def transient_table(rows: list[dict[str, Any]]) -> str:
    """The post-exploit transient: the recipient's return in each of the next intervals
    minus the donor's recorded performance (mean over seeds of each run's mean over its
    exploits), and its paired difference against ``full``."""
    keys = [f"transient_{k + 1}" for k in range(TRANSIENT_INTERVALS)]
    sel = [r for r in rows if any(not math.isnan(r[k][0]) for k in keys if r.get(k))]
    if not sel:
        return ""
    out = ["\n**Post-exploit transient** (recipient's mean return in the k-th interval after "
           "an exploit minus the donor's recorded performance; mean over seeds [bootstrap 95% "
           "CI]; - full: paired with `full` on the same seeds)\n",
           "| task | schedule | arm | " + " | ".join(
               f"interval {k + 1} | - full" for k in range(TRANSIENT_INTERVALS)) + " |",
           "| --- | --- | --- | " + " | ".join("--- | ---" for _ in keys) + " |"]
    for r in sorted(sel, key=lambda r: (r["task"], r["schedule"], ARMS.index(r["arm"]))):
        cells = [f"{_fmt(r[k])} | {_fmt(r.get(f'{k}_vs_full'))}" for k in keys]
        out.append(f"| {r['task']} | {r['schedule']} | {r['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def probe_table(runs: list[dict[str, Any]], tasks: Mapping[str, Task]) -> str:
    """The global normalized variance the VGS saw past its warm-up (checked after every
    round, every member, every arm with a VGS), against the task's variance cap: the
    factor depends on the statistics only while the variance is below the cap."""
    out = ["\n**Global normalized variance past warm-up** (the 0.9 quantile the VGS factor "
           "uses, before the cap; every member after every round)\n",
           "| task | variance cap | checks | median | 90th percentile | max | at or above "
           "the cap |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in sorted({r["task"] for r in runs}):
        task = tasks[name]
        values = [nv for r in runs if r["task"] == name for round_ in r.get("vgs_probe", ())
                  for step, nv in round_ if nv is not None and step >= task.warmup_steps]
        if not values:
            continue
        cap = task.variance_cap
        at_cap = (f"{sum(v >= cap for v in values) / len(values):.0%}" if cap is not None
                  else "no cap")
        out.append(f"| {name} | {cap if cap is not None else 'none'} | {len(values)} | "
                   f"{np.median(values):.3g} | {np.percentile(values, 90):.3g} | "
                   f"{max(values):.3g} | {at_cap} |")
    return "\n".join(out) + "\n" if len(out) > 3 else ""


def normalizer_table(runs: list[dict[str, Any]]) -> str:
    """What each arm did to the recipient's VecNormalize at its exploits: how often its
    statistics became the donor's, and how often they differed from the donor's
    before (the exploits where the arms can differ at all)."""
    out = ["\n**VecNormalize at the exploits** (observation-statistics counts: the "
           "recipient's after the exploit against the donor's checkpoint)\n",
           "| task | arm | exploits | recipient's differed from the donor's | took the "
           "donor's |", "| --- | --- | --- | --- | --- |"]
    for task in sorted({r["task"] for r in runs}):
        for arm in ARMS:
            moves = [m for r in runs if (r["task"], r["arm"]) == (task, arm)
                     for m in r.get("normalizer", ())]
            if not moves:
                continue
            differed = sum(m[2] is None or m[0] != m[2] for m in moves)
            took = sum(m[2] is not None and m[1] == m[2] for m in moves)
            out.append(f"| {task} | {arm} | {len(moves)} | {differed} | {took} |")
    return "\n".join(out) + "\n" if len(out) > 3 else ""


def report(runs: list[dict[str, Any]], tasks: Mapping[str, Task]) -> str:
    """Every table of the report."""
    rows = summarise(runs, tasks)
    return (markdown(rows) + exploit_analysis(runs, tasks) + transient_table(rows)
            + normalizer_table(runs) + probe_table(runs, tasks))


def exploit_analysis(runs: list[dict[str, Any]],
                     tasks: Mapping[str, Task] | None = None) -> str:
    """Post-exploit dip by the recipient's VGS situation at the exploit, pooled over
    seeds (a bootstrap over exploits, so the interval ignores seed clustering)."""
    out = ["\n**Post-exploit dip by VGS step-count situation** (recipient's mean return "
           "over the next interval minus the donor's recorded performance; exploits pooled "
           "over seeds and schedules)\n",
           "| task | arm | recipient in warm-up, donor past it | other step-count "
           "differences | counts equal |",
           "| --- | --- | --- | --- | --- |"]
    for task in sorted({r["task"] for r in runs}):
        for arm in ARMS:
            groups: dict[str, list[float]] = {"warmup": [], "differ": [], "equal": []}
            for run in runs:
                if (run["task"], run["arm"]) != (task, arm):
                    continue
                for e in run["exploits"]:
                    before, donor = e["vgs_step_before"], e["donor_vgs_step"]
                    if e["return_after"] is None or e["donor_performance"] is None:
                        continue
                    if before is None or donor is None:
                        continue  # no VGS (no_vgs), or a v1 file without VGS state
                        # (policy_only): the donor's count is not in the checkpoint
                    dip = e["return_after"] - e["donor_performance"]
                    warmup = tasks[task].warmup_steps if tasks else WARMUP
                    if before < warmup <= donor:
                        groups["warmup"].append(dip)
                    elif before != donor:
                        groups["differ"].append(dip)
                    else:
                        groups["equal"].append(dip)
            if not any(groups.values()):
                continue
            cells = [f"{_fmt(bootstrap_ci(v))} (n={len(v)})" if v else "n/a"
                     for v in groups.values()]
            out.append(f"| {task} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(runs: list[dict[str, Any]], tasks: Mapping[str, Task], path: str) -> None:
    """Best-member return against population steps, mean over seeds, per arm."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["schedule"]) for r in runs},
                    key=lambda p: (p[0], SCHEDULES.index(p[1])))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (task, schedule) in zip(axes[0], panels, strict=True):
        for arm in ARMS:
            sel = [r for r in runs if (r["task"], r["schedule"], r["arm"]) ==
                   (task, schedule, arm)]
            if not sel:
                continue
            length = min(len(r["curve"]) for r in sel)
            xs = np.mean([[x for x, _ in r["curve"][:length]] for r in sel], axis=0)
            ys = np.array([[max(_finite(v), default=math.nan) for _, v in r["curve"][:length]]
                           for r in sel])
            with warnings.catch_warnings():  # a round where no seed reported yet
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(ys, axis=0)
                sem = np.nanstd(ys, axis=0) / math.sqrt(len(sel))
            ax.plot(xs, mean, label=arm)
            ax.fill_between(xs, mean - sem, mean + sem, alpha=0.15)
        ax.axhline(tasks[task].threshold, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{task} ({tasks[task].algo}+VGS), {schedule}")
        ax.set_xlabel("population environment steps")
        ax.set_ylabel("best member's return")
        ax.legend(fontsize=7)  # every panel: the arms differ between tasks
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- driver --------------------------------------------------------------------------

def _machine() -> dict[str, Any]:
    import stable_baselines3
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "stable_baselines3": stable_baselines3.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform(), "commit": commit}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny budgets and 2 seeds: a smoke run (under 3 minutes)")
    parser.add_argument("--seeds", type=int, help="seeds per arm (default 5, quick 2)")
    parser.add_argument("--tasks", default="cartpole,pendulum",
                        help="comma-separated; part I: cartpole,pendulum; part II: "
                        f"{','.join(PART_II)} (or 'part2')")
    parser.add_argument("--arms", help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--schedules", default="sync,async")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes (one torch thread each)")
    parser.add_argument("--out", default="pbt_efficiency.json", help="JSON of every run")
    parser.add_argument("--plot", help="PNG of the best-member curves (needs matplotlib)")
    parser.add_argument("--markdown", help="write the summary tables to this file")
    parser.add_argument("--from-json", metavar="FILE",
                        help="summarise (and plot) the runs of an earlier --out file "
                        "instead of running")
    args = parser.parse_args(argv)

    catalogue = QUICK_TASKS if args.quick else FULL_TASKS
    tasks = {}
    for name in args.tasks.replace("part2", ",".join(PART_II)).split(","):
        if name not in catalogue:
            parser.error(f"unknown task {name!r}; choose from {', '.join(catalogue)}")
        tasks[name] = catalogue[name]
    arms = args.arms.split(",") if args.arms else None
    for arm in arms or ():
        if arm not in ARMS:
            parser.error(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    schedules = args.schedules.split(",")
    for schedule in schedules:
        if schedule not in SCHEDULES:
            parser.error(f"unknown schedule {schedule!r}; choose from sync, async")
    seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1")

    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        tasks = {k: Task(**{**v, "lr_range": tuple(v["lr_range"]), "arms": tuple(v["arms"]),
                            "alpha_range": tuple(v.get("alpha_range", (0.05, 0.5)))})
                 for k, v in earlier["tasks"].items()}
        runs = earlier["runs"]
        table = report(runs, tasks)
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table)
        if args.plot:
            plot(runs, tasks, args.plot)
        return 0

    specs = [RunSpec(task, schedule, arm, seed)
             for task in tasks.values() for schedule in schedules
             for arm in (arms or task.arms) if arm in task.arms or arms
             for seed in range(seeds)]
    random.Random(0).shuffle(specs)  # mix slow and fast runs across workers
    print(f"{len(specs)} population runs on {args.jobs} worker(s)", flush=True)
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_population, spec, args.quick): spec for spec in specs}
        for done, future in enumerate(as_completed(futures), 1):
            run = future.result()
            runs.append(run)
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (len(specs) - done)
            best = max(_finite(run["curve"][-1][1]), default=math.nan)
            print(f"[{done}/{len(specs)}] {run['task']} {run['schedule']} {run['arm']} "
                  f"seed {run['seed']}: final best {best:.1f}, {len(run['exploits'])} "
                  f"exploits ({elapsed:.0f} s elapsed, ~{eta:.0f} s left)", flush=True)
    seconds = time.perf_counter() - start
    runs.sort(key=lambda r: (r["task"], r["schedule"], ARMS.index(r["arm"]), r["seed"]))
    rows = summarise(runs, tasks)
    table = report(runs, tasks)
    print(table)
    command = "python benchmarks/pbt_efficiency.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    result = {"command": command, "seconds": seconds, "machine": _machine(),
              "tasks": {k: asdict(v) for k, v in tasks.items()}, "summary": rows,
              "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{len(runs)} runs in {seconds:.0f} s; every run in {args.out}")
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(runs, tasks, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
