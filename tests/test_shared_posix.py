"""One store directory shared by several hosts (NFS, Lustre): two processes that
pretend to be two hosts (``VGS_CKPT_HOST``), on a file system without ``flock``,
write the same members at the same time; nothing is lost or swept."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import vgs_ckpt
from vgs_ckpt.pbt import CheckpointStore
from vgs_ckpt.storage import local

SAVES = 40


def _host(root: str, host: str, results: Any, go: Any) -> None:
    os.environ["VGS_CKPT_HOST"] = host
    local.fcntl = None  # type: ignore[assignment]  # as where flock is not supported
    written = []
    go.wait()  # both hosts start writing together
    for i in range(SAVES):
        store = CheckpointStore(root, keep_last=1000, keep_best=0)  # each open sweeps
        params = {"policy": {"w": torch.full((4096,), float(i))}, "host": host}
        for member in ("shared", host):
            ref = store.save(member, params, step=i, performance=float(i))
            written.append((member, os.path.basename(ref.path)))
    results.put((host, written))


def test_two_hosts_writing_one_store_without_flock_lose_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    # What a writer on host-b that died mid-save left: host-a must never sweep it
    # (its pid means nothing on host-a), host-b itself removes it.
    (root / "shared").mkdir()
    foreign = (root / "shared" /
               ".step_000000000001_w000000000009.safetensors.vgsckpt-host-b-999999999.x.tmp")
    foreign.write_bytes(b"partial")
    context = multiprocessing.get_context("spawn")
    results, go = context.Queue(), context.Barrier(3)
    hosts = [context.Process(target=_host, args=(str(root), name, results, go))
             for name in ("host-a", "host-b")]
    for process in hosts:
        process.start()
    go.wait()
    written = dict(results.get(timeout=300) for _ in hosts)
    for process in hosts:
        process.join(60)
        assert process.exitcode == 0
    store = CheckpointStore(root, keep_last=1000, keep_best=0)
    assert sorted(store.member_ids()) == ["host-a", "host-b", "shared"]
    shared = store.checkpoints("shared")
    assert len(shared) == 2 * SAVES  # every save of both hosts is there
    names = {os.path.basename(r.path) for r in shared}
    assert names == {n for h in written.values() for m, n in h if m == "shared"}
    by_host = sorted((vgs_ckpt.load(r.path).parameters["host"], r.step) for r in shared)
    assert by_host == sorted((h, i) for h in ("host-a", "host-b") for i in range(SAVES))
    assert not foreign.exists()  # removed by host-b's own sweep (its pid is gone) ...


def test_another_hosts_temp_file_is_left_alone(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("VGS_CKPT_HOST", "host-a")
    (tmp_path / "m").mkdir()
    foreign = tmp_path / "m" / ".x.safetensors.vgsckpt-host-b-999999999.abc.tmp"
    foreign.write_bytes(b"partial")
    mine = tmp_path / "m" / ".x.safetensors.vgsckpt-host-a-999999999.abc.tmp"
    mine.write_bytes(b"partial")
    store = CheckpointStore(tmp_path)
    assert [Path(p).name for p in store.swept] == [mine.name]  # a dead pid of this host
    assert foreign.exists()  # ... but never another host's, until it is a day old
    old = foreign.stat().st_mtime - local.OTHER_HOST_TEMP_AGE - 10
    os.utime(foreign, (old, old))
    assert [Path(p).name for p in CheckpointStore(tmp_path).swept] == [foreign.name]


def test_exclusive_local_commit_never_replaces_a_file(tmp_path: Path) -> None:
    target = str(tmp_path / "once.bin")
    local.LOCAL.commit(target, lambda f: f.write(b"first"), exclusive=True)
    with pytest.raises(vgs_ckpt.CheckpointExistsError, match="already exists") as info:
        local.LOCAL.commit(target, lambda f: f.write(b"second"), exclusive=True)
    assert isinstance(info.value, FileExistsError)
    assert Path(target).read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["once.bin"]  # no temp file left
