"""The PBT adapter and scheduler: the seed's scenario, store behaviour, exploit rules."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import CheckpointFormat, UsageError
from vgs_ckpt.pbt import (
    CheckpointStore,
    HyperparamSpec,
    PBTConfig,
    PBTScheduler,
    apply_hyperparams,
    exploit,
    reset_optimizer_state,
    truncation_count,
)

from .pbt_helpers import make_learner, train, vgs_tensors


def _two_members(tmp_path: Path, **config: Any) -> tuple[PBTScheduler, Any, Any]:
    scheduler = PBTScheduler(PBTConfig(str(tmp_path / "ckpts"), population_size=2,
                                       perturbation_interval=1, truncation_ratio=0.5,
                                       explore_method="perturb", seed=0,
                                       hyperparams=[HyperparamSpec("lr", 1e-4, 1e-1,
                                                                   log_scale=True)], **config))
    a, b = scheduler.initialize_population([{"lr": 1e-2}, {"lr": 1e-2}])
    return scheduler, a, b


def test_seed_scenario_v2_exploit_carries_vgs_state_bit_for_bit(tmp_path: Path) -> None:
    scheduler, a, b = _two_members(tmp_path)
    learner_a, learner_b = make_learner(1), make_learner(2)
    train(learner_a, 4, seed=1)
    train(learner_b, 10, seed=2)
    assert (learner_a.vgs.step_count, learner_b.vgs.step_count) == (4, 10)
    scheduler.update_performance(a, 0.1, 4, model_parameters=learner_a.get_parameters())
    scheduler.update_performance(b, 0.9, 10, model_parameters=learner_b.get_parameters())
    donor_vgs = vgs_tensors(learner_b)

    params, hyperparams, fmt = scheduler.exploit_and_explore(a)

    assert fmt == "v2_full_parameters" and fmt is CheckpointFormat.V2_FULL_PARAMETERS
    assert params is not None
    learner_a.set_parameters(params)
    assert learner_a.vgs.step_count == 10
    for key, value in vgs_tensors(learner_a).items():
        assert torch.equal(value, donor_vgs[key]), key
    for name, tensor in learner_b.policy.state_dict().items():
        assert torch.equal(learner_a.policy.state_dict()[name], tensor)
    # The explored learning rate is in the optimizer, not the donor's saved one.
    assert hyperparams["lr"] != 1e-2
    assert learner_a.optimizer.param_groups[0]["lr"] == hyperparams["lr"]
    train(learner_a, 3, seed=3)  # training continues
    assert learner_a.vgs.step_count == 13
    # The recipient's next checkpoint records where its state came from.
    ref = scheduler.update_performance(a, 0.5, 13, model_parameters=learner_a.get_parameters())
    assert ref is not None
    header = vgs_ckpt.read_header(ref.path)
    assert isinstance(header, vgs_ckpt.CheckpointV2)
    source = header.lineage.exploited_from
    assert source is not None
    assert (source.member_id, source.step, source.performance) == ("1", 10, 0.9)
    assert source.file is not None and source.file.endswith("1_step_000000000010.safetensors")
    assert header.hyperparams == {"lr": hyperparams["lr"]}


def test_seed_scenario_policy_only_path_is_v1_warns_and_keeps_stale_vgs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    scheduler, a, b = _two_members(tmp_path)
    learner_a, learner_b = make_learner(1), make_learner(2)
    train(learner_a, 4, seed=1)
    train(learner_b, 10, seed=2)
    with pytest.warns(DeprecationWarning, match="model_parameters"):
        scheduler.update_performance(a, 0.1, 4, model_state_dict=learner_a.policy.state_dict())
    with pytest.warns(DeprecationWarning, match="v1_policy_only"):
        scheduler.update_performance(b, 0.9, 10,
                                     model_state_dict=learner_b.policy.state_dict())
    with caplog.at_level(logging.WARNING, logger="vgs_ckpt"):
        params, _, fmt = scheduler.exploit_and_explore(a)
    assert fmt == "v1_policy_only"
    assert "v1_policy_only" in caplog.text
    assert params is not None and set(params) == {"policy"}
    learner_a.set_parameters(params)
    assert learner_a.vgs.step_count == 4  # the original bug, reproduced and reported
    train(learner_a, 2, seed=3)


def test_not_ready_or_best_member_keeps_its_state(tmp_path: Path) -> None:
    scheduler, a, b = _two_members(tmp_path)
    learner = make_learner(0)
    scheduler.update_performance(a, 0.1, 1, model_parameters=learner.get_parameters())
    scheduler.update_performance(b, 0.9, 1, model_parameters=learner.get_parameters())
    assert scheduler.exploit_and_explore(b) == (None, {"lr": 1e-2}, None)  # best member
    assert scheduler.exploit_and_explore(a)[2] is not None
    assert scheduler.exploit_and_explore(a) == (None, scheduler.members["0"].hyperparams,
                                                None)  # not ready again until it trains


def test_optimizer_reset_drops_every_optimizer_state(tmp_path: Path) -> None:
    scheduler, a, b = _two_members(tmp_path, optimizer_strategy="reset")
    learner = make_learner(0)
    train(learner, 3)
    tree = learner.get_parameters()
    tree["optimizer_state"] = learner.optimizer.state_dict()  # include_optimizer=True copy
    scheduler.update_performance(a, 0.1, 3, model_parameters=tree)
    scheduler.update_performance(b, 0.9, 3, model_parameters=tree)
    params, hp, _ = scheduler.exploit_and_explore(a)
    assert params is not None
    assert params["policy.optimizer"]["state"] == {}
    assert params["optimizer_state"]["state"] == {}
    assert params["policy.optimizer"]["param_groups"][0]["lr"] == hp["lr"]
    fresh = make_learner(5)
    fresh.set_parameters(params)
    assert fresh.optimizer.state_dict()["state"] == {}
    train(fresh, 1)


def test_copy_strategy_keeps_optimizer_state(tmp_path: Path) -> None:
    scheduler, a, b = _two_members(tmp_path, optimizer_strategy="copy")
    learner = make_learner(0)
    train(learner, 3)
    scheduler.update_performance(a, 0.1, 3, model_parameters=learner.get_parameters())
    scheduler.update_performance(b, 0.9, 3, model_parameters=learner.get_parameters())
    params, _, _ = scheduler.exploit_and_explore(a)
    assert params is not None
    saved = learner.optimizer.state_dict()["state"]
    assert set(params["policy.optimizer"]["state"]) == set(saved)
    assert torch.equal(params["policy.optimizer"]["state"][0]["exp_avg"], saved[0]["exp_avg"])


def test_apply_hyperparams_touches_every_optimizer_and_vgs_knobs() -> None:
    learner = make_learner(0)
    train(learner, 1)
    tree = learner.get_parameters()
    tree["actor.optimizer"] = learner.optimizer.state_dict()
    new = apply_hyperparams(tree, {"learning_rate": 0.5, "weight_decay": 0.1, "vgs_alpha": 0.3,
                                   "gamma": 0.9, "betas": [0.8, 0.9]})
    for key in ("policy.optimizer", "actor.optimizer"):
        group = new[key]["param_groups"][0]
        assert (group["lr"], group["weight_decay"], group["betas"]) == (0.5, 0.1, (0.8, 0.9))
        assert "gamma" not in group
    assert new["vgs_state"]["alpha"] == 0.3
    assert tree["policy.optimizer"]["param_groups"][0]["lr"] != 0.5  # input untouched
    assert reset_optimizer_state(tree)["policy.optimizer"]["state"] == {}
    assert tree["policy.optimizer"]["state"] != {}


@pytest.mark.parametrize(("n", "ratio", "k"), [(4, 0.2, 1), (2, 0.25, 1), (8, 0.25, 2),
                                               (10, 0.5, 5), (1, 0.5, 0), (3, 0.5, 1)])
def test_truncation_never_rounds_to_nobody(n: int, ratio: float, k: int) -> None:
    assert truncation_count(n, ratio) == k


def test_four_members_at_ratio_0_2_do_exploit(tmp_path: Path) -> None:
    scheduler = PBTScheduler(PBTConfig(str(tmp_path), population_size=4, truncation_ratio=0.2,
                                       perturbation_interval=1, seed=1))
    members = scheduler.initialize_population([{}] * 4)
    learner = make_learner(0)
    for i, m in enumerate(members):
        scheduler.update_performance(m, float(i), 1, model_parameters=learner.get_parameters())
    assert scheduler.exploit_and_explore(members[0])[0] is not None


def test_binary_tournament_and_min_mode(tmp_path: Path) -> None:
    scheduler = PBTScheduler(PBTConfig(str(tmp_path), population_size=2,
                                       exploit_method="binary_tournament", metric_mode="min",
                                       perturbation_interval=1, seed=0))
    a, b = scheduler.initialize_population([{}, {}])
    learner = make_learner(0)
    scheduler.update_performance(a, 5.0, 1, model_parameters=learner.get_parameters())
    scheduler.update_performance(b, 1.0, 1, model_parameters=learner.get_parameters())
    assert scheduler.exploit_and_explore(b)[0] is None  # lower loss is better
    assert scheduler.exploit_and_explore(a)[0] is not None


def test_diverged_member_ranks_last(tmp_path: Path) -> None:
    scheduler, a, b = _two_members(tmp_path)
    learner = make_learner(0)
    scheduler.update_performance(a, float("nan"), 1, model_parameters=learner.get_parameters())
    scheduler.update_performance(b, -100.0, 1, model_parameters=learner.get_parameters())
    assert scheduler.members["0"].performance is None
    assert scheduler.exploit_and_explore(a)[0] is not None


def test_explore_respects_ranges_log_scale_and_categories(tmp_path: Path) -> None:
    specs = [HyperparamSpec("lr", 1e-4, 1e-2, log_scale=True),
             HyperparamSpec("batch", values=[32, 64, 128]),
             HyperparamSpec("layers", 1, 4, integer=True)]
    for method in ("perturb", "resample", "both"):
        scheduler = PBTScheduler(PBTConfig(str(tmp_path), hyperparams=specs, seed=3,
                                           explore_method=method))  # type: ignore[arg-type]
        for _ in range(50):
            hp = scheduler.explore({"lr": 1e-2, "batch": 128, "layers": 4, "other": "kept"})
            assert 1e-4 <= hp["lr"] <= 1e-2
            assert hp["batch"] in (32, 64, 128)
            assert hp["layers"] in (1, 2, 3, 4)
            assert hp["other"] == "kept"


@pytest.mark.parametrize("bad", [{"population_size": 1}, {"truncation_ratio": 0.0},
                                 {"exploit_method": "x"}, {"optimizer_strategy": "keep"}])
def test_invalid_config_is_refused(tmp_path: Path, bad: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        PBTConfig(str(tmp_path), **bad)


@pytest.mark.parametrize("member_id", ["..", "../x", "a/b", "", ".hidden", "-x", "a" * 200,
                                       "x\0y"])
def test_member_ids_cannot_escape_the_store(tmp_path: Path, member_id: str) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(UsageError, match="invalid member id"):
        store.save(member_id, {"w": torch.ones(1)}, step=0)


def test_store_retention_keeps_last_n_plus_best(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=1)
    for step, perf in [(1, 0.5), (2, 0.9), (3, 0.1), (4, 0.2), (5, 0.3)]:
        store.save("m", {"w": torch.ones(1)}, step=step, performance=perf)
    assert [r.step for r in store.checkpoints("m")] == [2, 4, 5]
    latest, best = store.latest("m"), store.best("m")
    assert latest is not None and best is not None
    assert (latest.step, best.step) == (5, 2)
    assert store.latest("nobody") is None


def test_checkout_hard_links_and_survives_donor_deletion(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save("donor", {"w": torch.arange(3.0)}, step=7, performance=1.0)
    ref = store.checkout("donor", "recipient")
    latest = store.latest("donor")
    assert latest is not None
    assert os.stat(ref.path).st_ino == os.stat(latest.path).st_ino  # no bytes copied
    latest.path.unlink()  # the donor rotates its files away
    assert torch.equal(vgs_ckpt.load(ref.path).parameters["w"], torch.arange(3.0))


def test_checkout_without_donor_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(vgs_ckpt.CheckpointNotFoundError, match="no checkpoint"):
        CheckpointStore(tmp_path).checkout("donor", "recipient")


def test_exploit_function_for_your_own_loop(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    learner = make_learner(0)
    train(learner, 2)
    store.save("b", learner.get_parameters(), step=2, performance=1.0)
    result = exploit(store, "a", "b", {"lr": 0.123})
    assert result.format == "v2_full_parameters"
    assert result.parameters["policy.optimizer"]["param_groups"][0]["lr"] == 0.123
    assert result.source.member_id == "b" and result.source.step == 2


def _worker(root: str, member: str, others: list[str], rounds: int, errors: Any) -> None:
    import vgs_ckpt as vc
    from vgs_ckpt.pbt import CheckpointStore as Store

    store = Store(root, keep_last=1, keep_best=0, durable=False)
    gen = torch.Generator().manual_seed(int(member))
    for step in range(rounds):
        payload = torch.randn(20_000, generator=gen)
        store.save(member, {"w": payload, "sum": float(payload.sum())}, step=step,
                   performance=float(step))
        for other in others:
            try:
                ref = store.checkout(other, member)
            except vc.CheckpointNotFoundError:
                continue
            try:
                tree = vc.load(ref.path).parameters
                if abs(float(tree["w"].sum()) - tree["sum"]) > 1e-2:
                    errors.put(f"{member}: inconsistent tree from {other}")
            except vc.VgsCkptError as exc:  # a torn or corrupt file would land here
                errors.put(f"{member}: {exc}")


def test_concurrent_processes_never_read_torn_files_and_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    members = ["0", "1", "2"]
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), m,
                                               [o for o in members if o != m], 25, errors))
             for m in members]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == []
    store = CheckpointStore(tmp_path)
    for m in members:
        latest = store.latest(m)
        assert latest is not None and latest.step == 24


def test_load_latest_returns_the_newest_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in (1, 2):
        store.save("m", {"w": torch.full((2,), float(step))}, step=step)
    ckpt, ref = store.load_latest("m")
    assert ref.step == 2 and torch.equal(ckpt.parameters["w"], torch.full((2,), 2.0))
    with pytest.raises(vgs_ckpt.CheckpointNotFoundError):
        store.load_latest("nobody")


def test_store_save_takes_the_format_as_a_string(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ref = store.save("m", {"w": torch.ones(1)}, step=1, hyperparams={"lr": 0.1},
                     format="v2_full_parameters")
    header = vgs_ckpt.read_header(ref.path)
    assert isinstance(header, vgs_ckpt.CheckpointV2) and header.hyperparams == {"lr": 0.1}
