"""Non-blocking saves (issue #11): save_async, CheckpointStore(async_save=True)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import vgs_ckpt
from vgs_ckpt import CheckpointIOError, UsageError
from vgs_ckpt.async_save import AsyncSaver
from vgs_ckpt.pbt import CheckpointStore, HyperparamSpec, PBTConfig, PBTScheduler
from vgs_ckpt.testing import assert_trees_equal

from .conftest import make_member, raises_exactly
from .disk_faults import full_disk, killed_mid_write_script, slow_disk
from .pbt_helpers import make_learner, train


def _big(n: int = 4_000_000) -> dict[str, Any]:
    return {"policy": {"w": torch.randn(n), "t": torch.randn(64, 64).t()},
            "extra": {"a": np.arange(1000, dtype=np.float64), "s": np.float32(2.5)}}


def _clone(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, np.ndarray | np.generic):
        return tree.copy()
    if isinstance(tree, dict):
        return type(tree)((k, _clone(v)) for k, v in tree.items())
    return tree


def test_the_file_holds_the_snapshot_not_later_changes(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    slow_disk(monkeypatch)
    tree = _big()
    expected = _clone(tree)
    handle = vgs_ckpt.save_async(tmp_path / "m.safetensors", tree, step=3)
    assert not handle.done()  # the write is still running: change everything now
    tree["policy"]["w"].fill_(7.0)
    tree["policy"]["t"].mul_(0)
    tree["extra"]["a"][:] = -1
    header = handle.result(timeout=60)
    assert header.step == 3 and handle.done()
    loaded = vgs_ckpt.load(tmp_path / "m.safetensors").parameters
    assert_trees_equal(loaded, expected)


def test_modifying_while_the_write_runs_never_reaches_the_file(tmp_path: Path) -> None:
    tensor = torch.zeros(2_000_000)
    run, paused, stop = threading.Event(), threading.Event(), threading.Event()
    changes = [0]

    def trainer() -> None:  # changes the tensor as fast as it can while `run` is set
        while not stop.is_set():
            if not run.is_set():
                paused.set()
                run.wait(0.01)
                continue
            paused.clear()
            tensor.add_(1.0)
            changes[0] += 1

    worker = threading.Thread(target=trainer)
    worker.start()
    try:
        for step in range(3):
            run.clear()
            assert paused.wait(10)  # training waits only while the snapshot is taken
            expected = tensor.clone()
            handle = vgs_ckpt.save_async(tmp_path / f"m{step}.safetensors", {"w": tensor},
                                         step=step)
            before = changes[0]
            run.set()
            handle.result(timeout=60)
            assert changes[0] > before or handle.snapshot_seconds >= 0
            saved = vgs_ckpt.load(tmp_path / f"m{step}.safetensors").parameters["w"]
            assert torch.equal(saved, expected)
    finally:
        stop.set()
        run.set()
        worker.join()
    assert changes[0] > 0


def test_a_failure_on_the_background_thread_raises_at_result(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    handle = vgs_ckpt.save_async(tmp_path / "file" / "m.safetensors", {"w": torch.ones(3)},
                                 step=0)  # returns: the failure is in the background
    with raises_exactly(CheckpointIOError, match="writable directory"):
        handle.result(timeout=60)
    assert handle.done() and "failed" in repr(handle)


def test_a_failed_background_write_leaves_the_old_file_and_no_temp(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.zeros(4)}, step=1)
    before = path.read_bytes()
    full_disk(monkeypatch, after=4096)
    handle = vgs_ckpt.save_async(path, {"w": torch.ones(100_000)}, step=2)
    with raises_exactly(CheckpointIOError, match="intact"):
        handle.result(timeout=60)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    # The saver keeps working after a failure.
    monkeypatch.undo()
    vgs_ckpt.save_async(path, {"w": torch.ones(3)}, step=3).result(timeout=60)
    assert vgs_ckpt.read_header(path).step == 3


def test_invalid_arguments_raise_at_the_call(tmp_path: Path) -> None:
    with raises_exactly(UsageError, match="step"):
        vgs_ckpt.save_async(tmp_path / "m.safetensors", {"w": torch.ones(1)}, step=-1)
    with raises_exactly(UsageError, match="swap"):
        vgs_ckpt.save_async({"w": torch.ones(1)}, tmp_path / "m.safetensors",  # type: ignore
                            step=0)
    with raises_exactly(vgs_ckpt.UnsupportedTypeError):
        vgs_ckpt.save_async(tmp_path / "m.safetensors", {"f": object()}, step=0)
    with raises_exactly(UsageError, match="max_pending"):
        AsyncSaver(max_pending=0)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_closed_saver_refuses_and_wait_times_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_disk(monkeypatch, delay=0.2)
    saver = AsyncSaver()
    handle = saver.save(tmp_path / "a.safetensors", {"w": torch.ones(10)}, step=0)
    with pytest.raises(TimeoutError, match="still pending"):
        saver.wait(timeout=0.01)
    saver.close()  # finishes the pending save first
    assert handle.result(timeout=0).step == 0
    with raises_exactly(UsageError, match="closed.*new AsyncSaver"):
        saver.save(tmp_path / "b.safetensors", {"w": torch.ones(1)}, step=1)


def test_saves_to_one_path_commit_in_call_order(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    saver = AsyncSaver(max_pending=3)
    handles = [saver.save(path, {"w": torch.full((100_000,), float(i))}, step=i)
               for i in range(5)]
    assert [h.result(timeout=60).step for h in handles] == list(range(5))
    assert vgs_ckpt.read_header(path).step == 4
    assert torch.equal(vgs_ckpt.load(path).parameters["w"], torch.full((100_000,), 4.0))
    saver.close()


def test_back_pressure_holds_at_most_max_pending_snapshots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_disk(monkeypatch)
    saver = AsyncSaver(max_pending=1)
    first = saver.save(tmp_path / "a.safetensors", _big(1_000_000), step=1)
    assert not first.done()
    second = saver.save(tmp_path / "b.safetensors", _big(1_000_000), step=2)
    assert first.done()  # the second snapshot had to wait for the first buffer
    assert second.snapshot_seconds > first.snapshot_seconds
    second.result(timeout=60)
    assert saver.pending() == 0
    saver.close()


def test_pending_saves_finish_at_interpreter_exit(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    script = textwrap.dedent(f"""
        import torch, vgs_ckpt
        torch.manual_seed(0)
        handle = vgs_ckpt.save_async({str(path)!r}, {{"w": torch.randn(20_000_000)}}, step=9)
        assert not handle.done()
        print("exiting with the save pending", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, timeout=120)
    assert "pending" in proc.stdout
    torch.manual_seed(0)
    assert torch.equal(vgs_ckpt.load(path).parameters["w"], torch.randn(20_000_000))


def test_sigkill_during_a_background_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.zeros(4)}, step=1)
    before = path.read_bytes()
    script = killed_mid_write_script(tmp_path, f"""
        for _ in range(50):
            vgs_ckpt.save_async({str(path)!r}, {{"w": torch.ones(10_000_000)}}, step=2,
                                durable=False).result()
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert vgs_ckpt.load(path).header.step == 1


# --- the store and the scheduler ---------------------------------------------------

def test_async_store_exploit_waits_for_the_donors_pending_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=0, async_save=True)
    store.save("donor", make_member(0), step=1, performance=0.1).pending.result()  # type: ignore
    slow_disk(monkeypatch)
    newer = make_member(1)
    ref = store.save("donor", newer, step=2, performance=0.2)
    assert ref.pending is not None and not ref.pending.done()
    assert not ref.path.exists()  # nobody sees a file before it is complete
    pinned = store.checkout("donor", "recipient")  # waits for step 2
    assert pinned.step == 2 and ref.pending.done()
    assert_trees_equal(vgs_ckpt.load(pinned.path).parameters, newer)
    # Retention ran after the commit: only the newest file is kept.
    assert [r.step for r in store.checkpoints("donor")] == [2]


def test_async_store_flush_raises_a_failed_save_and_keeps_the_last_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path, async_save=True)
    store.save("m", {"w": torch.ones(2)}, step=1)
    store.flush()
    full_disk(monkeypatch, after=0)
    ref = store.save("m", {"w": torch.zeros(2)}, step=2)
    with pytest.raises(CheckpointIOError):
        ref.pending.result(timeout=60)  # type: ignore[union-attr]
    latest = store.latest("m")
    assert latest is not None and latest.step == 1
    with pytest.raises(CheckpointIOError):
        store.flush()
    store.flush()  # reported once


def test_scheduler_with_async_saves_carries_the_full_state(tmp_path: Path) -> None:
    config = PBTConfig(checkpoint_dir=str(tmp_path), population_size=2,
                       perturbation_interval=2, hyperparams=[HyperparamSpec("lr", 1e-4, 1e-2)],
                       seed=0, async_save=True)
    scheduler = PBTScheduler(config)
    members = scheduler.initialize_population()
    learners = [make_learner(i) for i in range(2)]
    for step in (2, 4):
        for member, learner, perf in zip(members, learners, (0.1, 0.9), strict=True):
            train(learner, 2, seed=step)
            scheduler.update_performance(member, perf, step,
                                         model_parameters=learner.get_parameters())
    params, _, fmt = scheduler.exploit_and_explore(members[0])
    assert fmt == "v2_full_parameters" and params is not None
    learners[0].set_parameters(params)
    assert learners[0].vgs.step_count == learners[1].vgs.step_count
    scheduler.flush()
