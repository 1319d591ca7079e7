"""SIGKILL the PBT driver at random moments; every resume loses nothing.

The driver runs in a forked child, so each kill costs no interpreter start-up.
CI runs 20 kills. A longer campaign: VGS_CKPT_CRASH_KILLS=200 pytest
tests/test_crash.py.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import vgs_ckpt
from vgs_ckpt.pbt import CheckpointStore, PBTScheduler

from . import crash_driver
from .crash_driver import MEMBERS, config

KILLS = int(os.environ.get("VGS_CKPT_CRASH_KILLS", "20"))


def _start(directory: Path, seed: int) -> tuple[multiprocessing.process.BaseProcess, Any]:
    """The driver in a forked child (no interpreter start-up per kill)."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    process = context.Process(target=crash_driver.main, args=(str(directory), seed, ready),
                              daemon=True)
    process.start()
    return process, ready


def _state(directory: Path, swept: list[Path]) -> dict[str, int]:
    """Each member's latest step, after checking that every checkpoint verifies."""
    store = CheckpointStore(directory)  # opening sweeps the dead writer's temp files
    swept += store.swept
    leftovers = [p for p in directory.rglob(".*") if p.suffix in (".tmp", ".link")]
    assert not leftovers, f"temp files outlived their writer: {leftovers}"
    latest = {}
    for member_id in store.member_ids():
        for ref in store.checkpoints(member_id):
            vgs_ckpt.load(ref.path, verify=True)
        ref = store.latest(member_id)
        assert ref is not None
        latest[member_id] = ref.step
    return latest


def test_sigkilled_driver_resumes_with_nothing_lost(tmp_path: Path) -> None:
    rng = random.Random(1234)
    directory = tmp_path / "population"
    seen: dict[str, int] = {}
    swept: list[Path] = []
    kills = 0
    for attempt in range(KILLS):
        process, ready = _start(directory, attempt)
        assert ready.wait(60), f"the driver did not start (exit code {process.exitcode})"
        time.sleep(rng.uniform(0.0, 0.5))
        process.kill()  # SIGKILL
        process.join()
        kills += process.exitcode == -signal.SIGKILL
        state = _state(directory, swept)
        lost = set(seen) - set(state)
        assert not lost, f"kill {attempt}: members {lost} lost their checkpoints"
        for member_id, step in state.items():
            assert step >= seen.get(member_id, 0), (
                f"kill {attempt}: member {member_id} went back from step {seen[member_id]} "
                f"to {step}")
        seen = state
    assert kills == KILLS
    assert len(seen) == MEMBERS
    print(f"{kills} SIGKILLs, {len(swept)} temp files of killed saves swept, latest steps "
          f"{seen}")

    # Resume in this process: every member is rebuilt from its latest header, and the
    # next exploit works.
    scheduler = PBTScheduler(config(str(directory), resume="must"))
    assert scheduler.resumed
    members = {m.member_id: m for m in scheduler.initialize_population()}
    assert len(members) == MEMBERS
    for member_id, member in members.items():
        header = vgs_ckpt.read_header(scheduler.store.latest(member_id).path)
        assert member.step == header.step == seen[member_id]
        assert member.hyperparams == header.hyperparams and "lr" in member.hyperparams
        assert member.performance == header.performance
    ranked = sorted(members.values(), key=lambda m: m.performance)
    worst, best = ranked[0], ranked[-1]
    if worst.performance == best.performance:
        pytest.skip("all members tied")
    step = worst.step + 2
    checkpoint = scheduler.load_member(worst)
    scheduler.update_performance(worst.member_id, worst.performance, step,
                                 model_parameters=checkpoint.parameters)
    parameters, _, fmt = scheduler.exploit_and_explore(worst.member_id)
    assert parameters is not None and fmt == "v2_full_parameters"
    assert scheduler.members[worst.member_id].exploited_from is not None
