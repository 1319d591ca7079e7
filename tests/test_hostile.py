"""Regression tests for the hostile-input and fault campaign (issue 17): every numbered
case ends in a VgsCkptError naming the file, or reads correctly; nothing is lost,
nothing hangs, memory stays bounded."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import vgs_ckpt
from vgs_ckpt import FormatError, UsageError, VgsCkptError, cli
from vgs_ckpt.pbt import CheckpointStore, PBTConfig, PBTScheduler
from vgs_ckpt.pbt.store import check_member_id
from vgs_ckpt.testing import assert_trees_equal

from .conftest import make_member
from .legacy_files import payload, write_legacy

ROOT = Path(__file__).parent.parent
# The peak resident memory of this process in MB (VmHWM: unlike ru_maxrss it is not
# inherited from the parent across exec).
PEAK_MB = ("peak_mb = lambda: int(next(x for x in open('/proc/self/status') "
           "if x.startswith('VmHWM')).split()[1]) // 1024")


def entry_points(path: Path) -> dict[str, object]:
    """Every way a file is read; each must end in a result or a VgsCkptError."""
    def inspect() -> int:
        code = cli.main(["inspect", str(path)])
        if code != 0:
            raise FormatError("inspect failed")
        return code

    return {
        "load": lambda: vgs_ckpt.load(path),
        "load(upgrade=False)": lambda: vgs_ckpt.load(path, upgrade=False),
        "load_bytes": lambda: vgs_ckpt.load_bytes(path.read_bytes()),
        "open": lambda: vgs_ckpt.open(path).load(),
        "detect_format": lambda: vgs_ckpt.detect_format(path),
        "detect_format(bytes)": lambda: vgs_ckpt.detect_format(path.read_bytes()),
        "upgrade": lambda: vgs_ckpt.upgrade(vgs_ckpt.load(path, upgrade=False)),
        "inspect": inspect,
    }


def assert_refused(path: Path, match: str = "") -> None:
    for name, call in entry_points(path).items():
        with pytest.raises(VgsCkptError, match=match if name != "inspect" else None):
            call()  # type: ignore[operator]


def assert_same(a, b) -> None:
    assert_trees_equal(a, b)


# --- 1, 2: one meaning per file ----------------------------------------------------------

def _repack(source: Path, target: Path, method: int) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", method) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info), compress_type=method)
    return target


@pytest.mark.parametrize("layout", ["L0", "L1", "L2"])
def test_a_legacy_zip_repacked_with_deflate_reads_correctly_everywhere(tmp_path, layout) -> None:
    original = write_legacy(tmp_path / "m.pt", layout)
    deflated = _repack(original, tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(deflated) as archive:
        assert any(i.compress_type == zipfile.ZIP_DEFLATED for i in archive.infolist())
    expected = vgs_ckpt.load(original, upgrade=False).parameters
    by_path = vgs_ckpt.load(deflated, upgrade=False).parameters
    by_bytes = vgs_ckpt.load_bytes(deflated.read_bytes(), upgrade=False).parameters
    assert_same(by_path, expected)
    assert_same(by_bytes, expected)
    truth = torch.load(deflated, weights_only=True)  # what torch itself reads
    data = truth.get("data", truth)
    policy = data.get("policy", data)
    got = by_path.get("policy", by_path)
    for key, value in policy.items():
        assert torch.equal(got[key], value)
    out = tmp_path / "out"
    assert cli.main(["upgrade", str(deflated), "--out", str(out)]) == 0
    assert cli.main(["verify", str(out / "deflated.safetensors")]) == 0
    upgraded = vgs_ckpt.load(out / "deflated.safetensors").parameters
    assert torch.equal((upgraded.get("policy") or upgraded)[next(iter(policy))],
                       next(iter(policy.values())))


def test_a_deflate_bomb_is_refused_within_bounded_memory(tmp_path) -> None:
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", bytes(200 * 1024 * 1024))
    assert bomb.stat().st_size < 1024 * 1024
    code = textwrap.dedent(f"""
        import vgs_ckpt
        {PEAK_MB}
        before = peak_mb()
        try:
            vgs_ckpt.load({str(bomb)!r})
        except vgs_ckpt.FormatError as exc:
            print("refused", "bomb" in str(exc))
        print(peak_mb() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out[:2] == ["refused", "True"]
    assert int(out[2]) < 150  # MB beyond the interpreter: far below the 200 MB it claims


def test_a_zip_with_two_records_of_one_name_is_refused(tmp_path) -> None:
    original = write_legacy(tmp_path / "m.pt", "L1")
    twice = tmp_path / "twice.pt"
    with zipfile.ZipFile(original) as old, zipfile.ZipFile(twice, "w") as new:
        for info in old.infolist():
            new.writestr(info, old.read(info))
        pickle_name = next(i.filename for i in old.infolist() if i.filename.endswith(".pkl"))
        with pytest.warns(UserWarning, match="Duplicate name"):
            new.writestr(pickle_name, b"\x80\x02}q\x00.")
    assert_refused(twice, "two records named")


def test_a_zip_and_safetensors_polyglot_reads_as_safetensors(tmp_path) -> None:
    # The first 8 bytes, as a little-endian u64, are a zip local header's magic:
    # a safetensors header of exactly 0x04034B50 bytes.
    length = struct.unpack("<Q", b"PK\x03\x04\x00\x00\x00\x00")[0]
    tensor = {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    head = json.dumps({"t": tensor["t"], "__metadata__": {"pad": ""}}).encode()
    pad = length - len(head)
    head = json.dumps({"t": tensor["t"], "__metadata__": {"pad": "x" * pad}}).encode()
    assert len(head) == length and head[:1] == b"{"
    path = tmp_path / "polyglot.bin"
    path.write_bytes(struct.pack("<Q", length) + head + struct.pack("<f", 123.0))
    assert path.read_bytes()[:4] == b"PK\x03\x04"
    from safetensors.torch import load_file
    assert load_file(str(path))["t"].item() == 123.0  # what safetensors reads
    assert vgs_ckpt.reader.container_of(path) == "safetensors"  # and so do we
    with pytest.raises(FormatError, match="a safetensors file but not a vgs_ckpt checkpoint"):
        vgs_ckpt.load(path)


# --- 3: verified bytes are the bytes you hold ------------------------------------------

def _file_with(tmp_path, value: float = 123.0) -> Path:
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, {"w": torch.full((1024,), value)}, step=1)
    return path


def test_loaded_tensors_do_not_change_when_the_file_is_rewritten_in_place(tmp_path) -> None:
    path = _file_with(tmp_path)
    loaded = vgs_ckpt.load(path).parameters["w"]
    with vgs_ckpt.open(path) as lazy:
        lazy_w = lazy["w"]
    with open(path, "r+b") as handle:  # a non-atomic writer: same inode, new bytes
        handle.seek(-4096, os.SEEK_END)
        handle.write(bytes(4096))
    assert torch.all(loaded == 123.0) and torch.all(lazy_w == 123.0)
    assert vgs_ckpt.load(path, verify=False).parameters["w"].sum() == 0  # the file did change
    with pytest.raises(vgs_ckpt.IntegrityError):
        vgs_ckpt.load(path)


def test_truncating_a_loaded_file_cannot_kill_the_process(tmp_path) -> None:
    path = _file_with(tmp_path)
    code = textwrap.dedent(f"""
        import os, vgs_ckpt
        tree = vgs_ckpt.load({str(path)!r}).parameters
        reader = vgs_ckpt.open({str(path)!r})
        first = reader["w"]
        os.truncate({str(path)!r}, 100)
        print(float(tree["w"].sum()), float(first.sum()))
        try:
            vgs_ckpt.open({str(path)!r}).load()
        except vgs_ckpt.FormatError:
            print("refused")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr  # not -7 (SIGBUS)
    assert result.stdout.split() == [str(123.0 * 1024)] * 2 + ["refused"]


def test_mmap_remains_available_as_an_explicit_choice(tmp_path) -> None:
    path = _file_with(tmp_path)
    mapped = vgs_ckpt.load(path, mmap=True).parameters["w"]
    assert torch.all(mapped == 123.0)
    with vgs_ckpt.open(path, mmap=True) as reader:
        assert torch.all(reader["w"] == 123.0)


# --- 4: what save writes, load reads -------------------------------------------------------

@pytest.mark.parametrize(("tree", "match"), [
    ({"s": "a" * (105 * 1024 * 1024)}, "over the 104857600-byte limit"),
    ({"s": "\x01" * (20 * 1024 * 1024)}, "over the 104857600-byte limit"),  # escaping x6
    ({"x": 10**5000}, "more than 4300 decimal digits"),
    ({"deep": {"n": [10**4301]}}, r"\['deep'\]\['n'\]\[0\]"),
])
def test_save_refuses_before_writing_what_load_would_refuse(tmp_path, tree, match) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(UsageError, match=match):
        vgs_ckpt.save(path, tree, step=1)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match=match):
        vgs_ckpt.save_bytes(tree, step=1)


def test_a_store_save_that_is_refused_loses_nothing(tmp_path) -> None:
    store = CheckpointStore(tmp_path, keep_last=1)
    store.save("0", {"w": torch.ones(2)}, step=1)
    with pytest.raises(UsageError):
        store.save("0", {"s": "a" * (105 * 1024 * 1024)}, step=2)
    assert store.latest("0").step == 1
    store.save("0", {"w": torch.ones(2)}, step=3)
    assert [r.step for r in store.checkpoints("0")] == [3]  # retention still works


def test_upgrade_reports_a_file_it_cannot_write_and_converts_the_rest(tmp_path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    write_legacy(legacy / "good.pt", "L2")
    torch.save({"format_version": "v1_policy_only", "data": {"s": "a" * (105 * 2**20)}},
               legacy / "huge.pt")
    torch.save({"format_version": "v1_policy_only", "data": [1, 2]}, legacy / "list.pt")
    out = tmp_path / "out"
    assert cli.main(["upgrade", str(legacy), "--out", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["good.safetensors"]


# --- 5, 6, 7, 10, 11: the store ---------------------------------------------------------

def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_a_clock_that_stepped_back_never_prunes_new_checkpoints(tmp_path) -> None:
    store = CheckpointStore(tmp_path / "s", keep_last=2, keep_best=0)
    for step in (100, 208):
        store.save("0", {"w": torch.ones(2)}, step=step)
    for path in (tmp_path / "s" / "0").iterdir():
        _age(path, -3600)  # the dead run's files are "in the future" after the step back
    restarted = CheckpointStore(tmp_path / "s", keep_last=2, keep_best=0)
    for step in (1, 2, 3):
        restarted.save("0", {"w": torch.full((2,), float(step))}, step=step)
        assert restarted.latest("0").step == step
    assert [r.step for r in restarted.checkpoints("0")] == [2, 3]


def test_an_unreadable_file_in_a_member_directory_blocks_nothing(tmp_path, caplog) -> None:
    store = CheckpointStore(tmp_path, keep_last=1, keep_best=0)
    store.save("0", {"w": torch.ones(2)}, step=1)
    empty = tmp_path / "0" / "step_000000000005_w000000000099.safetensors"
    empty.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="vgs_ckpt"):
        for step in (2, 3, 4):
            store.save("0", {"w": torch.ones(2)}, step=step)
    assert store.latest("0").step == 4
    assert [r.step for r in store.checkpoints("0")] == [4]  # retention went on
    assert empty.exists()  # never deleted
    assert caplog.text.count("skipping unreadable") == 1  # said once, not at every save
    scheduler = PBTScheduler(PBTConfig(str(tmp_path), population_size=2, resume="auto"))
    assert scheduler.members["0"].step == 4
    assert cli.main(["sweep", str(tmp_path), "--dry-run"]) == 0


def test_sweep_lists_unreadable_checkpoints_and_keeps_them(tmp_path, capsys) -> None:
    (tmp_path / "0").mkdir()
    bad = tmp_path / "0" / "step_000000000001_w000000000001.safetensors"
    bad.write_bytes(b"")
    assert cli.main(["sweep", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "unreadable checkpoint (kept" in out and str(bad) in out
    assert bad.exists()


def test_a_store_over_a_users_directory_touches_none_of_their_files(tmp_path) -> None:
    home = tmp_path / "home"
    mine = [home / ".x.y.tmp", home / "projects" / ".notes.1234.abcd.tmp",
            home / "0" / ".draft.txt.99999.zzz.tmp", home / ".cache" / "a.tmp"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"user data")
        _age(path, 10 * 86400)
    store = CheckpointStore(home)
    assert store.swept == []
    assert cli.main(["sweep", str(home)]) == 0
    assert all(path.exists() for path in mine)


def test_a_store_on_a_directory_it_cannot_write_opens_for_reading(tmp_path, monkeypatch,
                                                                  caplog) -> None:
    store = CheckpointStore(tmp_path)
    store.save("0", {"w": torch.ones(2)}, step=1)
    stale = tmp_path / "0" / f".x.safetensors.vgsckpt-{_host()}-999999.abcd.tmp"
    stale.write_bytes(b"x")
    _age(stale, 7200)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path
                        else real_access(p, mode, **k))
    with caplog.at_level(logging.WARNING, logger="vgs_ckpt"):
        readonly = CheckpointStore(tmp_path)
    assert readonly.read_only and "reading only" in caplog.text
    assert readonly.latest("0").step == 1 and stale.exists()


def test_a_temp_file_that_cannot_be_removed_is_a_warning_not_an_error(tmp_path, monkeypatch,
                                                                      caplog) -> None:
    (tmp_path / "0").mkdir()
    stale = tmp_path / "0" / f".x.safetensors.vgsckpt-{_host()}-999999.abcd.tmp"
    stale.write_bytes(b"x")
    _age(stale, 7200)

    def refuse(self, missing_ok=False):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "unlink", refuse)
    with caplog.at_level(logging.WARNING, logger="vgs_ckpt"):
        store = CheckpointStore(tmp_path)
    assert store.swept == [] and "cannot remove the stale temp file" in caplog.text


def _host() -> str:
    from vgs_ckpt.storage.local import host_tag
    return host_tag()


@pytest.mark.parametrize("member_id", ["m\n", "m\r", "\tm", "m\x00", "m/../x", "..", "-m"])
def test_member_ids_with_control_characters_or_paths_are_refused(member_id) -> None:
    with pytest.raises(UsageError, match="invalid member id"):
        check_member_id(member_id)


def test_load_bytes_takes_a_non_contiguous_memoryview() -> None:
    data = vgs_ckpt.save_bytes(make_member(), step=1)
    doubled = memoryview(bytes(b for pair in zip(data, data, strict=True) for b in pair))[::2]
    assert not doubled.c_contiguous
    assert_same(vgs_ckpt.load_bytes(doubled).parameters, vgs_ckpt.load_bytes(data).parameters)


# --- 8, 9: every error is a VgsCkptError that names the file ------------------------------

@pytest.mark.parametrize("obj", [
    {"format_version": "v1_policy_only", "data": [1, 2]},
    {"format_version": "v2_full_parameters", "data": None},
    {"format_version": "v2_full_parameters", "data": "weights"},
    {"format_version": "v1_policy_only", "data": torch.ones(2)},
    {"format_version": "v2_full_parameters", "data": {"w": torch.ones(1)},
     "performance": 10**400},
    {"format_version": "v2_full_parameters", "data": {"w": torch.ones(1)},
     "performance": torch.tensor(1.0)},
    {"format_version": "v2_full_parameters", "data": {"w": torch.ones(1)},
     "has_optimizer_state": torch.tensor([1, 1])},
    [1, 2, 3],
], ids=["data-list", "data-none", "data-str", "data-tensor", "perf-10^400", "perf-tensor",
        "flag-tensor", "not-a-dict"])
def test_legacy_payloads_of_the_wrong_shape_are_format_errors(tmp_path, obj) -> None:
    path = tmp_path / "bad.pt"
    torch.save(obj, path)
    for name, call in entry_points(path).items():
        with pytest.raises(VgsCkptError) as info:
            call()  # type: ignore[operator]
        assert name == "inspect" or "bad.pt" in str(info.value) or name.endswith("(bytes)") \
            or name == "load_bytes", (name, info.value)


def _rewrite_header(data: bytes, change) -> bytes:
    """The same file with its vgs_ckpt header changed (digests stay valid)."""
    (length,) = struct.unpack("<Q", data[:8])
    outer = json.loads(data[8:8 + length])
    inner = json.loads(outer["__metadata__"]["vgs_ckpt.header"])
    change(inner, outer)
    outer["__metadata__"]["vgs_ckpt.header"] = json.dumps(inner)
    text = json.dumps(outer).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


def _node(inner, key):
    return next(pair for pair in inner["tree"]["dict"] if pair[0] == key)


def _shape(outer, inner, name, shape):
    outer[name]["shape"] = shape
    inner["tensors"][name]["shape"] = shape


V2_CASES = {
    "created_at-out-of-range":
        lambda i, o: i.__setitem__("created_at", "0001-01-01T00:00:00+23:59"),
    "float-401-digits": lambda i, o: _node(i, "f").__setitem__(1, {"float": 10**400}),
    "requires_grad-int": lambda i, o: _node(i, "i")[1].__setitem__("requires_grad", True),
    "ndarray-65-dims": lambda i, o: _shape(o, i, "a", [1] * 65),
    "shape-overflow": lambda i, o: _shape(o, i, "e", [0, 2**64, 2**64]),
}


@pytest.mark.parametrize("case", list(V2_CASES))
def test_hostile_v2_headers_with_valid_digests_are_format_errors(tmp_path, case) -> None:
    tree = {"i": torch.arange(3), "f": 1.5, "a": np.zeros(1), "e": torch.zeros(0, 1, 1)}
    data = _rewrite_header(vgs_ckpt.save_bytes(tree, step=1), V2_CASES[case])
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(data)
    for name, call in entry_points(path).items():
        with pytest.raises(FormatError) as info:
            call()  # type: ignore[operator]
        assert name in ("inspect", "load_bytes", "detect_format(bytes)") \
            or str(path) in str(info.value), (name, info.value)
    with pytest.raises(FormatError):
        vgs_ckpt.read_header(path)
    # In a store: skipped, and the population resumes past it.
    store = CheckpointStore(tmp_path / "pop")
    store.save("0", {"w": torch.ones(1)}, step=1, performance=1.0)
    (tmp_path / "pop" / "0" / "step_000000000009_w000000000009.safetensors").write_bytes(data)
    assert store.latest("0").step == 1
    store.save("0", {"w": torch.ones(1)}, step=10, performance=1.0)
    scheduler = PBTScheduler(PBTConfig(str(tmp_path / "pop"), population_size=2,
                                       resume="auto"))
    assert scheduler.members["0"].step == 10


# --- 12, 13: nothing hangs ---------------------------------------------------------------

def _finishes(call, seconds: float = 10.0):
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(_outcome(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "hung"
    return result[0]


def _outcome(call):
    try:
        return call()
    except BaseException as exc:  # the test looks at what it was
        return exc


def test_a_fifo_at_a_checkpoint_path_is_refused_without_blocking(tmp_path) -> None:
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    calls = {"load": lambda: vgs_ckpt.load(fifo), "read_header": lambda: vgs_ckpt.read_header(fifo),
             "open": lambda: vgs_ckpt.open(fifo),
             "detect_format": lambda: vgs_ckpt.detect_format(fifo),
             "inspect": lambda: cli.main(["inspect", str(fifo)]),
             "verify": lambda: cli.main(["verify", str(fifo)])}
    for name, call in calls.items():
        outcome = _finishes(call)
        assert isinstance(outcome, VgsCkptError) or outcome == 1, (name, outcome)
        if isinstance(outcome, VgsCkptError):
            assert "a FIFO" in str(outcome)
    member = tmp_path / "pop" / "0"
    member.mkdir(parents=True)
    os.mkfifo(member / "step_000000000001_w000000000001.safetensors")
    store = CheckpointStore(tmp_path / "pop")
    assert _finishes(lambda: store.latest("0")) is None
    (tmp_path / "dir").mkdir()
    assert isinstance(_finishes(lambda: vgs_ckpt.load(tmp_path / "dir")), VgsCkptError)
    assert isinstance(_finishes(lambda: vgs_ckpt.load("/dev/zero")), VgsCkptError)


FORK_MODES = {
    "os.fork": "pid = os.fork()\nif pid == 0:\n    sys.exit(0)\nos.waitpid(pid, 0)",
    "os.fork + os._exit": "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)",
    "multiprocessing fork": ("p = multiprocessing.get_context('fork').Process(target=int)\n"
                             "p.start(); p.join()"),
    "fork, then save in the child": (
        "pid = os.fork()\nif pid == 0:\n"
        # (small: torch's own thread pool cannot run a large copy in a forked child)
        "    vgs_ckpt.save_async(sys.argv[1] + '.child', {'w': torch.ones(8)}, step=2)"
        ".result()\n"
        "    sys.exit(0)\nos.waitpid(pid, 0)"),
}


@pytest.mark.parametrize("mode", list(FORK_MODES))
def test_a_forked_child_does_not_wait_for_the_parents_pending_saves(tmp_path, mode) -> None:
    script = "\n".join([
        "import multiprocessing, os, sys, time, torch, vgs_ckpt",
        "from vgs_ckpt.async_save import default_saver",
        "tree = {'w': torch.ones(4 * 1024 * 1024)}",
        "handle = vgs_ckpt.save_async(sys.argv[1], tree, step=1)",
        FORK_MODES[mode],
        "handle.result()",
        "print('parent done', os.path.exists(sys.argv[1]))"])
    target = tmp_path / "m.safetensors"
    result = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "parent done True" in result.stdout
    vgs_ckpt.load(target)
    if "child" in mode:
        vgs_ckpt.load(str(target) + ".child")


# --- 14: bounded work -----------------------------------------------------------------

def _bounded(path: Path, match: str) -> None:
    code = textwrap.dedent(f"""
        import time, vgs_ckpt
        {PEAK_MB}
        before = peak_mb()
        start = time.monotonic()
        try:
            vgs_ckpt.load({str(path)!r})
            print("loaded")
        except vgs_ckpt.FormatError as exc:
            print("refused", {match!r} in str(exc))
        print(round(time.monotonic() - start, 2), peak_mb() - before)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out[:2] == ["refused", "True"], out
    assert float(out[2]) < 10 and int(out[3]) < 100, out  # seconds, MB beyond the start


def test_a_pickle_of_shared_references_is_refused_quickly(tmp_path) -> None:
    nested: list = []
    for _ in range(40):
        nested = [nested, nested]
    path = tmp_path / "shared.pt"
    torch.save({"w": torch.ones(1), "l": nested}, path)
    assert path.stat().st_size < 4096
    _bounded(path, "shared references")


def test_a_self_containing_pickle_is_refused(tmp_path) -> None:
    loop: list = []
    loop.append(loop)
    path = tmp_path / "cycle.pt"
    torch.save({"w": torch.ones(1), "l": loop}, path)
    with pytest.raises(FormatError, match="contains itself"):
        vgs_ckpt.load(path)


def test_a_stride_0_tensor_claiming_gigabytes_is_refused(tmp_path) -> None:
    path = tmp_path / "expand.pt"
    torch.save({"w": torch.zeros(1).expand(500_000_000)}, path)
    _bounded(path, "stride-0")
    out = tmp_path / "out"
    assert cli.main(["upgrade", str(path), "--out", str(out)]) == 1
    assert not out.exists() or not list(out.iterdir())


def test_vgs_emas_that_are_stride_0_views_are_refused_in_a_plain_load(tmp_path) -> None:
    state = payload("L2")
    big = torch.zeros(1).expand(400_000_000)
    state["data"]["vgs_state"].update(param_grad_mean_ema=big, param_grad_sq_ema=big,
                                      param_numel=big)
    path = tmp_path / "vgs.pt"
    torch.save(state, path)
    _bounded(path, "stride-0")


def test_legacy_bounds_leave_real_files_alone(tmp_path) -> None:
    # A real member with shared (tied) weights and optimizer state reads as before.
    member = make_member()
    member["tied"] = member["policy"]["0.weight"]
    path = tmp_path / "real.pt"
    torch.save({"format_version": "v2_full_parameters", "data": member, "step": 3}, path)
    assert_same(vgs_ckpt.load(path, upgrade=False).parameters, member)
    assert io  # imported for the zip helpers


def test_a_damaged_record_reads_the_same_from_a_path_and_from_bytes(tmp_path) -> None:
    # Found by the fuzzer's load(path)/load_bytes check: torch's file and memory readers
    # returned different tensor bytes for one damaged zip, and neither checks the CRC
    # of a stored record. Every record is now read, CRC-checked, through zipfile.
    original = write_legacy(tmp_path / "m.pt", "L2")
    with zipfile.ZipFile(original) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size)
    data = bytearray(original.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len + 1] ^= 0x40  # inside the record
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    for call in (lambda: vgs_ckpt.load(damaged), lambda: vgs_ckpt.load_bytes(bytes(data))):
        with pytest.raises(FormatError, match="CRC|corrupt"):
            call()
