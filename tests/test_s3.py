"""Checkpoints on S3: a real S3 protocol server (moto, on 127.0.0.1, started here)
and the real s3fs client. Every request is recorded by the server, so the tests
count what actually went over the wire."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto")

import vgs_ckpt
from vgs_ckpt import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    UsageError,
    reader,
)
from vgs_ckpt.pbt import CheckpointStore, PBTScheduler, exploit
from vgs_ckpt.storage import FsspecStorage, resolve
from vgs_ckpt.storage import objects as objects_module

from . import crash_driver
from .s3server import S3Server

pytestmark = pytest.mark.s3
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with S3Server() as running:
        yield running


@pytest.fixture
def bucket(server: S3Server) -> str:
    return server.bucket()


@pytest.fixture(autouse=True)
def fresh_head_hint(server: S3Server) -> None:
    """Each test starts with the default size of the first GET (a backend learns the
    size of the headers it reads)."""
    backend, _ = resolve("s3://any/key", storage_options=server.storage_options)
    assert isinstance(backend, FsspecStorage)
    backend.head_hint = objects_module.HEAD_BYTES


def tree(policy_mb: float = 1.0, rest_mb: float = 3.0, seed: int = 0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    n_policy, n_rest = int(policy_mb * 2**18), int(rest_mb * 2**18)  # float32: 4 bytes
    return {"policy": {"w": torch.randn(n_policy // 2, generator=gen),
                       "b": torch.randn(n_policy - n_policy // 2, generator=gen)},
            "policy.optimizer": {"state": {"m": torch.randn(n_rest, generator=gen)}},
            "counter": 7}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def gets(requests: list[Any]) -> list[Any]:
    return [r for r in requests if r.method == "GET"]


# -- the codec on s3:// -------------------------------------------------------------


def test_save_load_round_trip_writes_the_same_bytes_as_a_local_file(
        server: S3Server, bucket: str, tmp_path: Path) -> None:
    params, options = tree(), server.storage_options
    url = f"s3://{bucket}/run/a.safetensors"
    created = "2026-01-02T03:04:05Z"
    vgs_ckpt.save(url, params, step=3, performance=0.5, created_at=created,
                  storage_options=options)
    vgs_ckpt.save(tmp_path / "a.safetensors", params, step=3, performance=0.5,
                  created_at=created)
    assert server.filesystem().cat(url) == (tmp_path / "a.safetensors").read_bytes()
    loaded = vgs_ckpt.load(url, storage_options=options)
    assert same(loaded.parameters, params) and loaded.header.step == 3
    assert vgs_ckpt.read_header(url, storage_options=options).performance == 0.5
    assert vgs_ckpt.detect_format(url, storage_options=options).container == "safetensors"
    assert reader.container_of(url, storage_options=options) == "safetensors"


def test_save_async_to_s3(server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/async.safetensors"
    params = tree(0.5, 0.5)
    handle = vgs_ckpt.save_async(url, params, step=9, storage_options=server.storage_options)
    assert handle.result(60).step == 9
    assert same(vgs_ckpt.load(url, storage_options=server.storage_options).parameters, params)


def test_a_small_checkpoint_is_one_put_and_a_large_one_a_multipart_upload_completed_last(
        server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = server.storage_options
    mark = server.mark()
    vgs_ckpt.save(f"s3://{bucket}/small.safetensors", tree(0.1, 0.1), step=1,
                  storage_options=options)
    writes = [r for r in server.since(mark) if r.method in ("PUT", "POST")]
    assert [(r.method, "uploadId" in r.query) for r in writes] == [("PUT", False)]
    monkeypatch.setattr(objects_module, "PART_BYTES", 5 * 2**20)
    mark = server.mark()
    vgs_ckpt.save(f"s3://{bucket}/large.safetensors", tree(4, 8), step=1,
                  storage_options=options)
    writes = [r for r in server.since(mark) if r.method in ("PUT", "POST")]
    assert writes[0].method == "POST" and "uploads" in writes[0].query  # create
    assert all("partNumber" in r.query for r in writes[1:-1]) and len(writes) >= 4
    assert writes[-1].method == "POST" and "uploadId" in writes[-1].query  # complete, last
    assert same(vgs_ckpt.load(f"s3://{bucket}/large.safetensors",
                              storage_options=options).parameters, tree(4, 8))


def test_a_failed_write_leaves_no_object_and_no_upload(
        server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objects_module, "PART_BYTES", 5 * 2**20)
    backend, key = resolve(f"s3://{bucket}/broken.safetensors",
                           storage_options=server.storage_options)

    def write(stream: IO[bytes]) -> None:
        stream.write(b"x" * (12 * 2**20))  # two parts uploaded already
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError):
        backend.commit(key, write)
    fs = server.filesystem()
    assert not fs.exists(key)
    assert fs.list_multipart_uploads(bucket) == []  # aborted, not left behind


def test_exclusive_commit_never_replaces_an_object(server: S3Server, bucket: str) -> None:
    backend, key = resolve(f"s3://{bucket}/once.safetensors",
                           storage_options=server.storage_options)
    backend.commit(key, lambda f: f.write(b"first"), exclusive=True)
    with pytest.raises(CheckpointExistsError, match="already exists"):
        backend.commit(key, lambda f: f.write(b"second"), exclusive=True)
    assert server.filesystem().cat(key) == b"first"
    backend.commit(key, lambda f: f.write(b"third"))  # a plain commit replaces
    assert server.filesystem().cat(key) == b"third"


def test_lazy_open_reads_the_header_and_the_policy_with_two_ranged_gets(
        server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/lazy.safetensors"
    params = tree(policy_mb=4, rest_mb=12)
    vgs_ckpt.save(url, params, step=1, storage_options=server.storage_options)
    mark = server.mark()
    with vgs_ckpt.open(url, storage_options=server.storage_options) as reader:
        policy = reader["policy"]
    requests = server.since(mark)
    assert same(policy, params["policy"])
    assert len(requests) == 2 and all(r.range for r in gets(requests)), requests
    policy_bytes = sum(t.numel() * 4 for t in params["policy"].values())
    transferred = sum(r.sent for r in requests)
    assert transferred <= 1.05 * policy_bytes, (transferred, policy_bytes)


def test_a_header_larger_than_the_first_read_takes_one_more_get(
        server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/bighead.safetensors"
    params = {"policy": {f"layer{i}": torch.full((2,), float(i)) for i in range(3000)}}
    vgs_ckpt.save(url, params, step=1, storage_options=server.storage_options)
    header = vgs_ckpt.read_header(url, storage_options=server.storage_options)
    assert len(header.tensors) == 3000
    backend, _ = resolve(url, storage_options=server.storage_options)
    backend.head_hint = objects_module.HEAD_BYTES  # read_header taught it this size
    mark = server.mark()
    with vgs_ckpt.open(url, storage_options=server.storage_options) as reader:
        assert len(server.since(mark)) == 2  # the first 16 KiB, then the rest of the header
        assert same(reader["policy"], params["policy"])
    assert len(server.since(mark)) == 3
    # The backend now knows how large this store's headers are: one GET for the next.
    mark = server.mark()
    assert len(vgs_ckpt.read_header(url, storage_options=server.storage_options).tensors
               ) == 3000
    assert [r.range for r in server.since(mark)] == [f"bytes=0-{backend.head_hint - 1}"]


_MEASURE_LOAD = textwrap.dedent("""
    import json, resource, sys, vgs_ckpt
    options = json.loads(sys.argv[3])
    vgs_ckpt.load(sys.argv[2], storage_options=options)  # warm up: imports, connections
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    vgs_ckpt.load(sys.argv[1], storage_options=options)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


def test_load_streams_with_one_get_and_bounded_memory_and_verifies(
        server: S3Server, bucket: str) -> None:
    import json

    url, small = f"s3://{bucket}/stream.safetensors", f"s3://{bucket}/small.safetensors"
    params = tree(policy_mb=10, rest_mb=30)
    options = server.storage_options
    vgs_ckpt.save(url, params, step=1, storage_options=options)
    vgs_ckpt.save(small, tree(0.01, 0.01), step=1, storage_options=options)
    mark = server.mark()
    assert same(vgs_ckpt.load(url, storage_options=options).parameters, params)
    requests = gets(server.since(mark))
    assert len(requests) == 2 and all(r.range for r in requests)  # the header, the data
    # The tensors (40 MiB) are read into their own memory; besides, only chunks: a
    # client that held the body and then copied it would need twice as much.
    grown = int(subprocess.run([sys.executable, "-c", _MEASURE_LOAD, url, small,
                                json.dumps(options)], cwd=ROOT, capture_output=True,
                               text=True, check=True, timeout=120).stdout)
    assert grown < 1.3 * 40 * 2**20, grown / 2**20
    # A flipped byte in the data is caught as the bytes arrive.
    fs = server.filesystem()
    data = bytearray(fs.cat(url))
    data[-100] ^= 0xFF
    fs.pipe(url, bytes(data))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        vgs_ckpt.load(url, storage_options=options)


def test_an_object_replaced_while_it_is_read_is_an_error_not_a_mix(
        server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/replaced.safetensors"
    options = server.storage_options
    vgs_ckpt.save(url, tree(1, 1, seed=1), step=1, storage_options=options)
    with vgs_ckpt.open(url, storage_options=options) as reader:
        vgs_ckpt.save(url, tree(1, 1, seed=2), step=2, storage_options=options)
        with pytest.raises(vgs_ckpt.FormatError, match="replaced while it was being read"):
            reader["policy"]


def test_errors_name_the_url(server: S3Server, bucket: str) -> None:
    options = server.storage_options
    with pytest.raises(CheckpointNotFoundError, match=f"s3://{bucket}/none"):
        vgs_ckpt.load(f"s3://{bucket}/none.safetensors", storage_options=options)
    vgs_ckpt.save(f"s3://{bucket}/dir/x.safetensors", {"a": 1}, step=0, storage_options=options)
    with pytest.raises(UsageError, match="is a prefix"):
        vgs_ckpt.load(f"s3://{bucket}/dir", storage_options=options)
    with pytest.raises(CheckpointNotFoundError, match="bucket 'no-such-bucket'"):
        CheckpointStore("s3://no-such-bucket/run", storage_options=options)
    with pytest.raises(UsageError, match="storage_options apply to URLs"):
        vgs_ckpt.load("local.safetensors", storage_options=options)
    with pytest.raises(UsageError, match="not both"):
        vgs_ckpt.load("s3://b/k", storage=FsspecStorage(server.filesystem()),
                      storage_options=options)
    with pytest.raises(UsageError, match="must be a mapping"):
        vgs_ckpt.load("s3://b/k", storage_options=["key"])  # type: ignore[arg-type]
    import fsspec
    with pytest.raises(UsageError, match="not supported"):
        FsspecStorage(fsspec.filesystem("file"))


def test_memory_urls_work_for_tests() -> None:
    params = tree(0.1, 0.1)
    vgs_ckpt.save("memory://vgs-test/m.safetensors", params, step=2)
    assert same(vgs_ckpt.load("memory://vgs-test/m.safetensors").parameters, params)
    store = CheckpointStore("memory://vgs-test/store", keep_last=1, keep_best=0)
    store.save("a", params, step=1)
    store.save("a", params, step=2)
    assert [r.step for r in store.checkpoints("a")] == [2]


# -- the store on s3:// ---------------------------------------------------------------


def test_store_save_latest_best_retention_checkout_exploit(server: S3Server, bucket: str
                                                          ) -> None:
    root = f"s3://{bucket}/population"
    store = CheckpointStore(root, keep_last=2, keep_best=1, storage_options=server.storage_options)
    assert store.root == root
    for step, perf in [(10, 0.9), (20, 0.1), (30, 0.2), (40, 0.3)]:
        ref = store.save("donor", tree(0.25, 0.25, seed=step), step=step, performance=perf)
        assert ref.path == f"{root}/donor/step_{step:012d}_w{step // 10:012d}.safetensors"
    assert [r.step for r in store.checkpoints("donor")] == [10, 30, 40]  # best + last two
    assert store.latest("donor").step == 40 and store.best("donor").step == 10
    assert store.member_ids() == ["donor"]

    mark = server.mark()
    pinned = store.checkout("donor", "recipient")
    requests = server.since(mark)
    copies = [r for r in requests if r.copy_source]
    assert len(copies) == 1  # one server-side CopyObject
    assert len(requests) <= 8  # O(1): listings, one header read, HEAD and copy
    # No tensor bytes through the client: the header read asks for the header only.
    header_reads = [r for r in requests if r.range]
    assert len(header_reads) == 1
    end = int(header_reads[0].range.split("-")[1]) + 1
    head = server.filesystem().cat_file(str(pinned.path), start=0, end=8)
    assert end == 8 + int.from_bytes(head, "little")
    assert sum(r.sent + r.received for r in requests) < end + 8192  # plus listing XML
    assert pinned.path == f"{root}/recipient/_exploits/donor_step_000000000040.safetensors"
    # The donor's retention may now delete its file: the recipient's copy is its own.
    for step in (50, 60, 70):
        store.save("donor", tree(0.25, 0.25, seed=step), step=step, performance=0.0)
    assert 40 not in [r.step for r in store.checkpoints("donor")]
    assert same(vgs_ckpt.load(str(pinned.path), storage_options=server.storage_options
                              ).parameters, tree(0.25, 0.25, seed=40))
    store.save("recipient", tree(0.25, 0.25, seed=1), step=5, performance=0.0)
    result = exploit(store, "recipient", "donor", {"lr": 0.1})
    assert result.source.step == 70 and result.source.file.startswith("s3://")
    assert same(result.parameters["policy"], tree(0.25, 0.25, seed=70)["policy"])


def test_a_write_number_taken_by_another_writer_goes_to_the_next(
        server: S3Server, bucket: str) -> None:
    """Two writers of one member pick the same write number; the loser of the
    conditional create takes the next one, and neither file is lost."""
    root = f"s3://{bucket}/race"
    options = server.storage_options
    store = CheckpointStore(root, keep_last=10, storage_options=options)
    rival = CheckpointStore(root, keep_last=10, storage_options=options)
    real_commit = store.storage.commit
    raced: list[str] = []

    def commit(key: str, write: Callable[[IO[bytes]], None], **kwargs: Any) -> None:
        if not raced:  # the rival commits this very key first
            raced.append(key)
            rival.storage.commit(key, lambda f: f.write(vgs_ckpt.save_bytes(
                tree(0.1, 0.1, seed=99), step=1, member_id="m")), exclusive=True)
        real_commit(key, write, **kwargs)

    store.storage.commit = commit  # type: ignore[method-assign]
    try:
        ref = store.save("m", tree(0.1, 0.1, seed=1), step=1)
    finally:
        del store.storage.commit  # type: ignore[method-assign]
    assert raced and raced[0].endswith("_w000000000001.safetensors")
    assert str(ref.path).endswith("_w000000000002.safetensors")
    steps = [(r.path, r.header.step) for r in store.checkpoints("m")]
    assert len(steps) == 2


def test_concurrent_writers_of_one_member_lose_nothing(server: S3Server, bucket: str) -> None:
    root = f"s3://{bucket}/concurrent"
    options = server.storage_options
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        written = pool.starmap(_write_many, [(root, options, 0), (root, options, 1)])
    store = CheckpointStore(root, keep_last=100, storage_options=options)
    refs = store.checkpoints("m")
    assert len(refs) == sum(written) == 12
    assert len({r.path for r in refs}) == 12
    assert sorted(r.header.performance for r in refs) == sorted(
        [float(w * 100 + i) for w in (0, 1) for i in range(6)])


def _write_many(root: str, options: dict[str, Any], writer: int) -> int:
    store = CheckpointStore(root, keep_last=100, storage_options=options)
    for i in range(6):
        store.save("m", tree(0.05, 0.05, seed=i), step=i, performance=float(writer * 100 + i))
    return 6


def test_async_store_saves_on_s3(server: S3Server, bucket: str) -> None:
    root = f"s3://{bucket}/async-store"
    with CheckpointStore(root, async_save=True, keep_last=3,
                         storage_options=server.storage_options) as store:
        for step in range(3):
            store.save("a", tree(0.1, 0.1, seed=step), step=step, performance=float(step))
        assert store.latest("a").step == 2
    assert [r.step for r in store.checkpoints("a")] == [0, 1, 2]


def test_archive_run_moves_a_population_aside_on_s3(server: S3Server, bucket: str) -> None:
    root = f"s3://{bucket}/archive"
    store = CheckpointStore(root, storage_options=server.storage_options)
    store.save("a", {"x": 1}, step=1)
    archived = store.archive_run()
    assert isinstance(archived, str) and "/_previous_runs/" in archived
    assert store.member_ids() == []
    moved = server.filesystem().find(archived)
    assert [p.rsplit("/", 2)[-2:] for p in moved] == [["a", "step_000000000001_w000000000001"
                                                              ".safetensors"]]


# -- killed writers and killed populations ----------------------------------------------

_SLOW_WRITER = textwrap.dedent("""
    import sys, torch, vgs_ckpt
    from vgs_ckpt.storage import objects
    objects.PART_BYTES = 5 * 2**20
    import json
    options = json.loads(sys.argv[2])
    print("START", flush=True)
    vgs_ckpt.save(sys.argv[1], {"policy": {"w": torch.randn(60 * 2**18)}}, step=1,
                  storage_options=options)
    print("DONE", flush=True)
""")


def test_sigkill_mid_upload_leaves_no_visible_object_and_the_sweep_aborts_it(
        server: S3Server, bucket: str) -> None:
    import json
    root = f"s3://{bucket}/killed"
    url = f"{root}/m/step_000000000001_w000000000001.safetensors"
    options = server.storage_options
    mark = server.mark()
    child = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, url, json.dumps(options)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any("partNumber" in r.query for r in server.since(mark)):
        assert child.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline, "no part was uploaded"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    fs = server.filesystem()
    assert not fs.exists(url)  # nothing visible
    assert [u["Key"] for u in fs.list_multipart_uploads(bucket)] == [url.split("/", 3)[3]]
    backend, _ = resolve(root, storage_options=options)
    assert backend.sweep(root, recursive=True, dry_run=True, min_age=0) == [url]
    assert fs.list_multipart_uploads(bucket) != []  # a dry run aborts nothing
    # Opening the store sweeps uploads older than an hour. (moto reports every upload
    # as initiated in 2010, so this one qualifies; the age bound is tested below.)
    store = CheckpointStore(root, storage_options=options)
    assert store.swept == [url]
    assert store.latest("m") is None
    assert fs.list_multipart_uploads(bucket) == []


def test_the_sweep_leaves_young_uploads_to_their_writers(
        server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime, timedelta

    backend, root = resolve(f"s3://{bucket}/young", storage_options=server.storage_options)
    assert isinstance(backend, FsspecStorage)
    now = datetime.now(UTC)
    uploads = [{"Key": "young/m/a.safetensors", "UploadId": "1", "Initiated": now},
               {"Key": "young/m/b.safetensors", "UploadId": "2",
                "Initiated": now - timedelta(hours=2)},
               {"Key": "young/m/notes.txt", "UploadId": "3",
                "Initiated": now - timedelta(hours=2)}]
    monkeypatch.setattr(backend, "_uploads", lambda *args: uploads)
    assert backend.sweep(root, recursive=True, dry_run=True) == [f"{root}/m/b.safetensors"]
    assert backend.sweep(root, recursive=True, dry_run=True, min_age=0) == [
        f"{root}/m/a.safetensors", f"{root}/m/b.safetensors"]  # never anything else
    assert backend.sweep(root, dry_run=True, min_age=0) == []  # not recursive: not below


def test_a_population_on_s3_is_killed_and_resumes_with_nothing_lost(
        server: S3Server, bucket: str) -> None:
    root = f"s3://{bucket}/population"
    options = server.storage_options
    context = multiprocessing.get_context("spawn")
    seen: dict[str, int] = {}
    for attempt in range(3):
        ready = context.Event()
        process = context.Process(target=crash_driver.main, args=(root, attempt, ready, options),
                                  daemon=True)
        process.start()
        assert ready.wait(120), f"the driver did not start (exit code {process.exitcode})"
        time.sleep(1.5 + attempt)
        process.kill()
        process.join()
        assert process.exitcode == -signal.SIGKILL
        store = CheckpointStore(root, storage_options=options)
        state = {}
        for member_id in store.member_ids():
            for ref in store.checkpoints(member_id):
                vgs_ckpt.load(str(ref.path), storage_options=options)  # every one verifies
            state[member_id] = store.latest(member_id).step
        assert set(seen) <= set(state), f"kill {attempt}: members lost their checkpoints"
        assert all(state[m] >= step for m, step in seen.items())
        seen = state
    assert len(seen) == crash_driver.MEMBERS
    scheduler = PBTScheduler(crash_driver.config(root, resume="must", storage_options=options))
    assert scheduler.resumed
    members = {m.member_id: m for m in scheduler.initialize_population()}
    assert {m: members[m].step for m in members} == seen
    checkpoint = scheduler.load_member("0")
    assert checkpoint is not None and checkpoint.header.step == seen["0"]
    # And resume="auto" on an empty prefix starts fresh.
    fresh = PBTScheduler(crash_driver.config(f"s3://{bucket}/empty", resume="auto",
                                             storage_options=options))
    assert not fresh.resumed


def test_cli_reads_s3_with_storage_options(server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/cli/m.safetensors"
    vgs_ckpt.save(url, tree(0.1, 0.1), step=4, storage_options=server.storage_options)
    endpoint = server.storage_options["client_kwargs"]["endpoint_url"]
    flags = ["--storage-option", "key=testing", "--storage-option", "secret=testing",
             "--storage-option", f"client_kwargs.endpoint_url={endpoint}",
             "--storage-option", "client_kwargs.region_name=eu-west-1"]
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    for command in (["inspect", url], ["verify", url], ["sweep", f"s3://{bucket}/cli"]):
        done = subprocess.run([sys.executable, "-m", "vgs_ckpt", *command, *flags], cwd=ROOT,
                              check=False, capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert "s3://" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "vgs_ckpt", "inspect", url,
                          "--storage-option", "novalue"], cwd=ROOT, check=False,
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "KEY=VALUE" in bad.stderr


def test_save_bytes_matches_an_s3_object(server: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/bytes.safetensors"
    params = tree(0.1, 0.1)
    vgs_ckpt.save(url, params, step=1, created_at="2026-01-01T00:00:00Z",
                  storage_options=server.storage_options)
    data = vgs_ckpt.save_bytes(params, step=1, created_at="2026-01-01T00:00:00Z")
    assert io.BytesIO(server.filesystem().cat(url)).read() == data


def test_upgrade_reads_and_writes_urls(server: S3Server, bucket: str) -> None:
    """`vgs-ckpt upgrade s3://.../legacy/ --out s3://.../upgraded/`: a legacy torch file
    on S3 becomes a v2 file next to it, with its provenance."""
    from vgs_ckpt.upgrades.files import upgrade_files

    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3), "b": torch.zeros(2)}, buffer)
    fs = server.filesystem()
    fs.pipe(f"{bucket}/legacy/member_0_step_100.pt", buffer.getvalue())
    results = upgrade_files([f"s3://{bucket}/legacy"], out=f"s3://{bucket}/upgraded",
                            in_place=False, storage_options=server.storage_options)
    assert [r.result for r in results] == ["upgraded"], results
    target = f"s3://{bucket}/upgraded/member_0_step_100.safetensors"
    assert results[0].target == target
    loaded = vgs_ckpt.load(target, storage_options=server.storage_options)
    assert torch.equal(loaded.parameters["policy"]["w"], torch.ones(3))
    assert loaded.header.provenance


def test_an_object_smaller_than_the_first_read_takes_one_get(server: S3Server,
                                                             bucket: str) -> None:
    url = f"s3://{bucket}/tiny.safetensors"
    params = {"policy": {"w": torch.ones(4)}}
    vgs_ckpt.save(url, params, step=1, storage_options=server.storage_options)
    mark = server.mark()
    assert same(vgs_ckpt.load(url, storage_options=server.storage_options).parameters, params)
    assert len(server.since(mark)) == 1
    # The backend has learnt the header's size: the next open reads exactly the header,
    # then the policy.
    with vgs_ckpt.open(url, storage_options=server.storage_options) as reader:
        assert same(reader["policy"], params["policy"])
    end = 8 + int.from_bytes(server.filesystem().cat_file(url, start=0, end=8), "little")
    assert [r.range for r in server.since(mark)[1:3]] == [f"bytes=0-{end - 1}",
                                                          f"bytes={end}-{end + 15}"]


# -- hostile and broken URLs and objects ------------------------------------------------


def test_unsupported_protocols_are_refused_before_any_filesystem_is_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a filesystem was made (an ftp:// one connects at once)")

    monkeypatch.setattr(fsspec.core, "url_to_fs", never)
    for url in ("ftp://198.51.100.1/x.safetensors", "http://example.com/x.safetensors",
                "sftp://198.51.100.1/x.safetensors"):
        with pytest.raises(UsageError, match="is not supported"):
            vgs_ckpt.load(url)


def test_a_missing_filesystem_names_its_extra() -> None:
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(vgs_ckpt.MissingDependencyError, match=r"vgs_ckpt\[gcs\]") as info:
        vgs_ckpt.load("gs://bucket/m.safetensors")
    assert isinstance(info.value, ImportError) and "gs://bucket/m.safetensors" in str(
        info.value)


def test_a_huge_header_is_not_learnt_as_the_next_first_read(server: S3Server,
                                                            bucket: str) -> None:
    """A store's backend asks for the size of the last header first; a header of
    megabytes (hostile, or just odd) must not make every later first GET that big."""
    url = f"s3://{bucket}/bighyper.safetensors"
    vgs_ckpt.save(url, {"policy": {"w": torch.ones(2)}}, step=1,
                  hyperparams={"notes": "x" * (5 * 2**20)},
                  storage_options=server.storage_options)
    assert len(vgs_ckpt.read_header(url, storage_options=server.storage_options
                                    ).hyperparams["notes"]) == 5 * 2**20
    backend, _ = resolve(url, storage_options=server.storage_options)
    assert backend.head_hint == objects_module.HEAD_BYTES


def test_without_conditional_writes_an_exclusive_commit_checks_first(
        server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that ignores If-None-Match (detected by the probe): the fallback still
    refuses a key that exists."""
    backend, key = resolve(f"s3://{bucket}/fallback.safetensors",
                           storage_options=server.storage_options)
    assert isinstance(backend, FsspecStorage)
    assert backend._conditional_works(key)  # moto honours it (the probe said so)
    monkeypatch.setattr(backend, "_conditional_works", lambda key: False)
    backend.commit(key, lambda f: f.write(b"first"), exclusive=True)
    with pytest.raises(CheckpointExistsError, match="already exists"):
        backend.commit(key, lambda f: f.write(b"second"), exclusive=True)
    assert server.filesystem().cat(key) == b"first"


def test_upgrade_of_a_missing_object_says_so(server: S3Server, bucket: str) -> None:
    from vgs_ckpt.upgrades.files import upgrade_files

    results = upgrade_files([f"s3://{bucket}/none.pt"], out=f"s3://{bucket}/out",
                            in_place=False, storage_options=server.storage_options)
    assert [r.result for r in results] == ["failed: no such file"]
