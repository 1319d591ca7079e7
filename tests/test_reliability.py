"""Restarts, resumes, temp-file sweeping and the umask (issue: reliability)."""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import UsageError, cli
from vgs_ckpt.pbt import CheckpointStore, HyperparamSpec, PBTConfig, PBTScheduler
from vgs_ckpt.storage import LOCAL
from vgs_ckpt.storage.local import _umask, host_tag

from .conftest import make_member

HOST = host_tag()


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    LOCAL.commit(os.fspath(path), write)


def sweep_temp_files(directory: Path, *, dry_run: bool = False) -> list[Path]:
    return [Path(key) for key in LOCAL.sweep(os.fspath(directory), dry_run=dry_run)]


def _tree(value: float) -> dict:
    return {"w": torch.full((4,), value)}


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


# --- a restarted run keeps its checkpoints ----------------------------------------------

def test_restarted_run_is_never_pruned_for_a_dead_runs_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=0)
    for step in (207, 208):  # the dead run
        store.save("m", _tree(step), step=step)
    restarted = CheckpointStore(tmp_path, keep_last=2, keep_best=0)
    restarted.save("m", _tree(1), step=1)
    assert restarted.latest("m").step == 1
    restarted.save("m", _tree(2), step=2)
    assert [r.step for r in restarted.checkpoints("m")] == [1, 2]  # write order
    assert restarted.latest("m").step == 2
    loaded, _ = restarted.load_latest("m")
    assert torch.equal(loaded.parameters["w"], torch.full((4,), 2.0))


def test_keep_best_may_keep_an_old_runs_best_but_never_drops_the_new_ones(tmp_path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=1)
    store.save("m", _tree(0), step=500, performance=99.0)
    store.save("m", _tree(1), step=1, performance=1.0)
    assert [r.step for r in store.checkpoints("m")] == [500, 1]
    assert store.latest("m").step == 1 and store.best("m").step == 500


# --- temp files -------------------------------------------------------------------------

def _killed_writer(path: Path, started: multiprocessing.synchronize.Event) -> None:
    def write(handle):  # a save that never finishes
        handle.write(b"x" * 1024)
        handle.flush()
        started.set()
        time.sleep(60)
    atomic_write(path, write)


def test_sweep_removes_a_killed_writers_temp_file_and_keeps_a_live_ones(tmp_path) -> None:
    context = multiprocessing.get_context("fork")
    started = context.Event()
    dead = context.Process(target=_killed_writer, args=(tmp_path / "a.safetensors", started))
    dead.start()
    assert started.wait(30)
    os.kill(dead.pid, signal.SIGKILL)
    dead.join()
    started.clear()
    live = context.Process(target=_killed_writer, args=(tmp_path / "b.safetensors", started))
    live.start()
    try:
        assert started.wait(30)
        temps = sorted(p.name for p in tmp_path.iterdir())
        assert len(temps) == 2 and all(n.endswith(".tmp") for n in temps)
        assert f"-{dead.pid}." in temps[0] or f"-{dead.pid}." in temps[1]
        for path in tmp_path.iterdir():
            _age(path, 7200)  # old enough: the lock alone protects the live one
        removed = sweep_temp_files(tmp_path)
        assert [p.name for p in removed] == [n for n in temps if f"-{dead.pid}." in n]
        remaining = [p.name for p in tmp_path.iterdir()]
        assert remaining == [n for n in temps if f"-{live.pid}." in n]
    finally:
        live.kill()
        live.join()
    assert len(sweep_temp_files(tmp_path)) == 1  # now its writer is dead too
    assert list(tmp_path.iterdir()) == []


def test_an_unlocked_fresh_temp_file_of_a_live_pid_is_kept(tmp_path: Path) -> None:
    # A writer between creating its temp file and locking it: pid alive, not locked.
    path = tmp_path / f".x.safetensors.vgsckpt-{HOST}-{os.getpid()}.abcd1234.tmp"
    path.write_bytes(b"partial")
    assert sweep_temp_files(tmp_path) == []
    _age(path, 120)
    assert sweep_temp_files(tmp_path, dry_run=True) == [path] and path.exists()
    assert sweep_temp_files(tmp_path) == [path] and not path.exists()


def test_a_locked_temp_file_is_never_removed_whatever_its_age(tmp_path: Path) -> None:
    path = tmp_path / f".x.safetensors.vgsckpt-{HOST}-999999.abcd1234.tmp"  # no such pid
    path.write_bytes(b"partial")
    _age(path, 10 * 86400)
    with open(path, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        assert sweep_temp_files(tmp_path) == []
    assert sweep_temp_files(tmp_path) == [path]


def test_only_files_with_the_marker_are_ever_swept(tmp_path: Path) -> None:
    link = tmp_path / f".0_step_000000000004.safetensors.vgsckpt-{HOST}-999999.link"
    # Not ours: old-style names, a user's own hidden temp files, another host's fresh one.
    others = [tmp_path / ".step_000000000001.safetensors.k3j4h5x_.tmp",
              tmp_path / ".x.y.tmp", tmp_path / ".notes.txt.12345.abcd.tmp",
              tmp_path / ".hidden",
              tmp_path / ".a.safetensors.vgsckpt-otherhost-999999.abcd1234.tmp"]
    for path in (link, *others):
        path.write_bytes(b"x")
        _age(path, 7200)
    assert sweep_temp_files(tmp_path) == [link]
    assert all(path.exists() for path in others)
    # Another host's temp file only once it is a day old (its pid means nothing here).
    _age(others[-1], 2 * 86400)
    assert sweep_temp_files(tmp_path) == [others[-1]]


def test_store_sweeps_when_it_opens_and_the_cli_sweeps_a_tree(tmp_path, capsys) -> None:
    member = tmp_path / "m"
    (member / "_exploits").mkdir(parents=True)
    stale = [member / f".step_000000000003.safetensors.vgsckpt-{HOST}-999999.abcd1234.tmp",
             member / "_exploits" / f".d_step_000000000003.safetensors.vgsckpt-{HOST}-999999.link"]
    for path in stale:
        path.write_bytes(b"x")
    store = CheckpointStore(tmp_path)
    assert sorted(store.swept) == sorted(stale)
    nested = tmp_path / "deep" / "er"
    nested.mkdir(parents=True)
    (nested / f".f.safetensors.vgsckpt-{HOST}-999999.abcd1234.tmp").write_bytes(b"x")
    assert cli.main(["sweep", str(tmp_path), "--dry-run"]) == 0
    assert "would remove 1 temp file" in capsys.readouterr().out
    assert cli.main(["sweep", str(tmp_path)]) == 0
    assert "removed 1 temp file" in capsys.readouterr().out
    assert cli.main(["sweep", str(tmp_path / "nope")]) == 1  # "error: ...", as every command


# --- umask ------------------------------------------------------------------------------

def test_umask_is_read_without_changing_it(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        seen: list[int] = []
        stop = threading.Event()

        def watch() -> None:  # another thread: the umask must never flicker
            while not stop.is_set():
                mask = os.umask(0o027)
                seen.append(mask)
        thread = threading.Thread(target=watch)
        thread.start()
        for _ in range(200):
            assert _umask() == 0o027
        stop.set()
        thread.join()
        assert set(seen) == {0o027}
        vgs_ckpt.save(tmp_path / "a.safetensors", make_member(), step=1)
        assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o640
    finally:
        os.umask(previous)


# --- resuming a population --------------------------------------------------------------

def _population(directory: Path, resume: str = "refuse") -> PBTScheduler:
    return PBTScheduler(PBTConfig(str(directory), population_size=2, perturbation_interval=5,
                                  seed=0, resume=resume,
                                  hyperparams=[HyperparamSpec("lr", 1e-4, 1e-2)]))


def _run_some(directory: Path) -> PBTScheduler:
    scheduler = _population(directory, resume="auto")
    scheduler.initialize_population()
    scheduler.update_performance("0", 1.0, 10, model_parameters=make_member(0))
    scheduler.update_performance("1", 5.0, 10, model_parameters=make_member(1))
    parameters, _, _ = scheduler.exploit_and_explore("0")
    assert parameters is not None
    scheduler.update_performance("0", 2.0, 15, model_parameters=make_member(0))
    return scheduler


def test_a_population_directory_is_refused_by_default(tmp_path: Path) -> None:
    _run_some(tmp_path)
    with pytest.raises(UsageError, match=r"already holds checkpoints of 2 member\(s\) "
                                         r"\(0, 1\).*resume='auto'.*resume='fresh'"):
        _population(tmp_path)


def test_resume_rebuilds_every_member_from_the_headers(tmp_path: Path) -> None:
    before = _run_some(tmp_path)
    resumed = _population(tmp_path, resume="must")
    assert resumed.resumed
    members = {m.member_id: m for m in resumed.initialize_population()}
    for member_id, old in before.members.items():
        new = members[member_id]
        assert (new.hyperparams, new.performance, new.step) == (
            old.hyperparams, old.performance, old.step)
        assert new.last_ready_step == new.step
    assert members["0"].exploited_from is not None
    assert members["0"].exploited_from.member_id == "1"
    assert members["0"].history[-1] == (15, 2.0)
    assert not resumed.ready("0")
    checkpoint = resumed.load_member("0")
    assert checkpoint is not None and checkpoint.header.step == 15


def test_resume_skips_an_unreadable_file_with_a_warning(tmp_path: Path, caplog) -> None:
    _run_some(tmp_path)
    (latest,) = (tmp_path / "0").glob("step_000000000015_w*.safetensors")
    latest.write_bytes(b"not a checkpoint")  # damaged by hand, outside vgs_ckpt
    with caplog.at_level(logging.WARNING, logger="vgs_ckpt"):
        resumed = _population(tmp_path, resume="auto")
    assert resumed.members["0"].step == 10  # the newest readable header
    assert "skipping unreadable" in caplog.text and str(latest) in caplog.text


def test_resume_auto_on_an_empty_directory_starts_fresh(tmp_path: Path) -> None:
    scheduler = _population(tmp_path / "new", resume="auto")
    assert not scheduler.resumed and scheduler.members == {}
    with pytest.raises(UsageError, match="holds no checkpoints"):
        _population(tmp_path / "other", resume="must")


def test_fresh_moves_the_old_run_aside_and_deletes_nothing(tmp_path: Path) -> None:
    _run_some(tmp_path)
    old_files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.safetensors"))
    scheduler = _population(tmp_path, resume="fresh")
    assert not scheduler.resumed and scheduler.moved_to is not None
    assert scheduler.moved_to.parent == tmp_path / "_previous_runs"
    moved = sorted(p.relative_to(scheduler.moved_to)
                   for p in scheduler.moved_to.rglob("*.safetensors"))
    assert moved == old_files
    assert scheduler.store.member_ids() == []
    scheduler.initialize_population()
    scheduler.update_performance("0", 1.0, 1, model_parameters=make_member(0))
    assert scheduler.store.latest("0").step == 1
    again = _population(tmp_path, resume="fresh")  # a second fresh start keeps both
    assert len(list((tmp_path / "_previous_runs").iterdir())) == 2
    assert again.store.member_ids() == []


def test_never_is_fresh(tmp_path: Path) -> None:
    _run_some(tmp_path)
    scheduler = _population(tmp_path, resume="never")
    assert not scheduler.resumed and scheduler.moved_to is not None
    assert scheduler.store.member_ids() == []


def test_resume_must_be_a_known_mode(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="resume must be"):
        PBTConfig(str(tmp_path), resume="maybe")
