"""#18: the storage seam, the header's fields defined once, the two readers, the
store's public layout, and the one hyperparameter module."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import ArgumentError, CheckpointNotFoundError, UsageError
from vgs_ckpt.async_save import AsyncSaver
from vgs_ckpt.hyperparams import apply_to_scaler, apply_to_tree, split
from vgs_ckpt.models import FIELDS, HeaderFields
from vgs_ckpt.pbt import CheckpointStore, PBTConfig, PBTScheduler
from vgs_ckpt.pbt.learner import TorchLearner
from vgs_ckpt.readers import CheckpointReader, LegacyReader, SafetensorsReader
from vgs_ckpt.storage import LOCAL, Capabilities, LocalStorage, Storage
from vgs_ckpt.testing import assert_trees_equal
from vgs_ckpt.vgs import VarianceGradientScaler

from .legacy_files import write_legacy


def tree() -> dict[str, Any]:
    return {"policy": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)},
            "extra": {"n": 3}}


class ForwardOnly(io.RawIOBase):
    """A write stream that cannot seek (as fsspec's object-store writers)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(bytes(b))

    def seekable(self) -> bool:
        return False

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("forward only")


class CountingStorage(LocalStorage):
    """LocalStorage whose commit hands the writer a forward-only stream, counting calls:
    what a backend without seekable writes sees."""

    capabilities = Capabilities(atomic_rename=True, hard_links=False, locks=False,
                                conditional_create=False, seekable_writes=False, mmap=False)

    def __init__(self) -> None:
        self.calls: list[str] = []

    def commit(self, key: str, write: Callable[[IO[bytes]], None], *,
               durable: bool = True, exclusive: bool = False) -> None:
        self.calls.append(f"commit {Path(key).name}")
        stream = ForwardOnly()
        write(stream)  # type: ignore[arg-type]
        super().commit(key, lambda f: f.write(stream.data), durable=durable,
                       exclusive=exclusive)

    def open(self, key: str, *, mmap: bool = False) -> Any:
        self.calls.append(f"open {Path(key).name}")
        return super().open(key, mmap=mmap)

    def pin(self, source: str, target: str, *, overwrite: bool = True) -> None:
        self.calls.append(f"pin {Path(target).name}")
        with self.open(source) as src:
            data = src.stream().read()
        super().commit(target, lambda f: f.write(data))


def test_local_storage_is_a_storage_and_says_what_it_supports() -> None:
    assert isinstance(LOCAL, Storage) and isinstance(CountingStorage(), Storage)
    caps = LOCAL.capabilities
    assert caps.atomic_rename and caps.hard_links and caps.seekable_writes and caps.mmap


def test_a_forward_only_stream_gets_the_same_bytes_as_a_local_file(tmp_path: Path) -> None:
    created = datetime(2026, 1, 2, tzinfo=UTC)
    local, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    storage = CountingStorage()
    vgs_ckpt.save(local, tree(), step=3, created_at=created)
    vgs_ckpt.save(other, tree(), step=3, created_at=created, storage=storage)
    assert other.read_bytes() == local.read_bytes()
    assert storage.calls == ["commit b.safetensors"]
    assert vgs_ckpt.save_bytes(tree(), step=3, created_at=created) == local.read_bytes()


def test_every_reader_goes_through_the_storage(tmp_path: Path) -> None:
    storage = CountingStorage()
    path = tmp_path / "m.safetensors"
    vgs_ckpt.save(path, tree(), step=1, storage=storage)
    assert_trees_equal(vgs_ckpt.load(path, storage=storage).parameters, tree())
    assert vgs_ckpt.read_header(path, storage=storage).step == 1
    with vgs_ckpt.open(path, storage=storage) as reader:
        assert reader.keys() == ["policy", "extra"]
    assert vgs_ckpt.detect_format(path, storage=storage).container == "safetensors"
    assert storage.calls.count("open m.safetensors") == 4


def test_a_save_async_goes_through_the_storage(tmp_path: Path) -> None:
    storage = CountingStorage()
    with AsyncSaver() as saver:
        handle = saver.save(tmp_path / "m.safetensors", tree(), step=2, storage=storage)
    assert handle.done() and handle.result().step == 2
    assert storage.calls == ["commit m.safetensors"]
    with pytest.raises(UsageError, match="closed"):
        saver.save(tmp_path / "n.safetensors", tree(), step=2)


def test_a_store_runs_on_any_storage_and_passes_every_header_field(tmp_path: Path) -> None:
    storage = CountingStorage()
    created = datetime(2025, 5, 5, tzinfo=UTC)
    provenance = {"original_format": "v1_policy_only", "original_container": "torch-zip",
                  "applied_steps": ["v1->v2"]}
    with CheckpointStore(tmp_path, storage=storage, keep_last=1, keep_best=0) as store:
        store.save("a", tree(), step=1, performance=0.5, created_at=created,
                   provenance=provenance, hyperparams={"lr": 0.1})
        store.save("a", tree(), step=2, performance=0.7, created_at=created,
                   provenance=provenance)
        ref = store.latest("a")
        assert ref is not None and ref.header is not None
        assert ref.header.created_at == created and ref.step == 2
        assert ref.header.provenance is not None
        assert ref.header.provenance.applied_steps == ["v1->v2"]
        assert [r.step for r in store.checkpoints("a")] == [2]  # retention via storage
        pinned = store.checkout("a", "b")
        assert vgs_ckpt.read_header(pinned.path).step == 2
    assert "pin a_step_000000000002.safetensors" in storage.calls


def test_a_store_save_refuses_another_members_id_and_unknown_fields(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(UsageError, match="names another member"):
        store.save("a", tree(), step=1, member_id="b")
    with pytest.raises(ArgumentError, match="stp"):
        store.save("a", tree(), stp=1)  # type: ignore[call-arg]
    with pytest.raises(UsageError, match="step must be"):
        store.save("a", tree(), step=-1)
    assert store.member_ids() == []


def test_header_fields_are_defined_once() -> None:
    assert set(HeaderFields.__annotations__) == FIELDS
    with pytest.raises(ArgumentError, match="unknown header argument"):
        vgs_ckpt.save_bytes(tree(), step=1, performnce=1.0)  # type: ignore[call-arg]
    for function in (vgs_ckpt.save, vgs_ckpt.save_async):
        with pytest.raises(ArgumentError, match="unknown header argument"):
            function("x.safetensors", tree(), step=1, performnce=1.0)  # type: ignore
    with pytest.raises(ArgumentError, match="needs step"):
        vgs_ckpt.save_bytes(tree())  # type: ignore[call-arg]
    assert issubclass(ArgumentError, TypeError) and issubclass(ArgumentError, UsageError)


def test_open_picks_the_reader_from_the_bytes(tmp_path: Path) -> None:
    ours = tmp_path / "m.safetensors"
    vgs_ckpt.save(ours, tree(), step=1)
    legacy = write_legacy(tmp_path / "l.pt", "L2")
    with vgs_ckpt.open(ours) as a, vgs_ckpt.open(legacy) as b:
        assert isinstance(a, SafetensorsReader) and isinstance(b, LegacyReader)
        assert isinstance(a, CheckpointReader) and isinstance(b, CheckpointReader)
        assert a.legacy_layout is None and b.legacy_layout == "L2"
    with pytest.raises(TypeError):
        CheckpointReader("x", None)  # type: ignore[abstract]


def test_the_legacy_reader_dates_a_file_by_its_modification_time(tmp_path: Path) -> None:
    legacy = write_legacy(tmp_path / "l.pt", "L2")
    os.utime(legacy, (1_700_000_000, 1_700_000_000))
    with vgs_ckpt.open(legacy) as reader:
        assert reader.header.created_at == datetime.fromtimestamp(1_700_000_000, UTC)
    with pytest.warns(vgs_ckpt.LegacyFormatWarning):
        assert vgs_ckpt.load_bytes(legacy.read_bytes()).header.created_at is not None


def test_the_store_archives_a_run_and_the_scheduler_uses_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.archive_run() is None  # nothing to move
    store.save("a", tree(), step=1)
    archive = store.archive_run()
    assert archive is not None and archive.parent == tmp_path / "_previous_runs"
    assert store.member_ids() == [] and (archive / "a").is_dir()
    store.save("a", tree(), step=2)
    scheduler = PBTScheduler(PBTConfig(checkpoint_dir=str(tmp_path), resume="fresh"))
    assert scheduler.moved_to is not None and scheduler.moved_to != archive
    assert sorted(p.name for p in (tmp_path / "_previous_runs").iterdir()) == sorted(
        [archive.name, scheduler.moved_to.name])


def test_a_store_context_keeps_the_original_error(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, async_save=True)

    def fail() -> None:
        with store:
            store.save("a", tree(), step=1)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        fail()
    assert store.latest("a") is not None  # the pending save still finished


def test_a_pin_of_a_vanished_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        LOCAL.pin(os.fspath(tmp_path / "gone"), os.fspath(tmp_path / "pin"))
    (tmp_path / "src").write_bytes(b"x")
    (tmp_path / "taken").write_bytes(b"y")
    with pytest.raises(FileExistsError):
        LOCAL.pin(os.fspath(tmp_path / "src"), os.fspath(tmp_path / "taken"), overwrite=False)
    assert (tmp_path / "taken").read_bytes() == b"y"


def test_hyperparameters_are_parsed_once() -> None:
    parsed = split({"lr": 1e-3, "vgs_alpha": 0.2, "vgs_custom": 1})
    assert parsed.vgs == {"alpha": 0.2} and parsed.other == {"lr": 1e-3, "vgs_custom": 1}
    with pytest.raises(UsageError, match="no knob 'custom'"):
        split({"vgs_custom": 1}, strict=True)
    model = torch.nn.Linear(2, 2)
    learner = TorchLearner(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    learner.set_hyperparams({"learning_rate": 5e-4, "vgs_alpha": 0.3})
    assert learner.optimizer.param_groups[0]["lr"] == 5e-4 and learner.vgs.alpha == 0.3
    with pytest.raises(UsageError):
        learner.set_hyperparams({"lr": 1e-2, "vgs_beta": 7.0})
    assert learner.optimizer.param_groups[0]["lr"] == 5e-4  # nothing applied
    applied = apply_to_tree(learner.get_parameters(), {"lr": 0.25, "vgs_eps": 1e-6})
    assert applied["policy.optimizer"]["param_groups"][0]["lr"] == 0.25
    assert applied["vgs_state"]["eps"] == 1e-6
    scaler = VarianceGradientScaler(model.parameters())
    with pytest.raises(UsageError):
        apply_to_scaler(scaler, {"alpha": 0.5, "warmup_steps": -1})
    assert scaler.alpha != 0.5


def test_a_pin_into_a_missing_directory_says_so(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x")
    for overwrite in (True, False):
        with pytest.raises(vgs_ckpt.CheckpointIOError, match="does not exist; create it") as got:
            LOCAL.pin(os.fspath(tmp_path / "src"), os.fspath(tmp_path / "no" / "pin"),
                      overwrite=overwrite)
        assert not isinstance(got.value, CheckpointNotFoundError)


def test_local_storage_failures_are_checkpoint_io_errors(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(vgs_ckpt.CheckpointIOError, match="cannot remove"):
        LOCAL.delete(os.fspath(tmp_path / "d"))  # a directory is not an object
    LOCAL.delete(os.fspath(tmp_path / "missing"))  # a missing key is not an error
    with pytest.raises(vgs_ckpt.CheckpointIOError, match="cannot move"):
        LOCAL.move(os.fspath(tmp_path / "missing"), os.fspath(tmp_path / "elsewhere"))
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(vgs_ckpt.CheckpointIOError, match="cannot create the directory"):
        LOCAL.makedirs(os.fspath(tmp_path / "file" / "sub"))
    assert LOCAL.entries(os.fspath(tmp_path / "file")) == []  # not a directory: empty
    assert LOCAL.entries(os.fspath(tmp_path / "nothing")) == []


def test_paths_and_storages_that_are_not_are_usage_errors(tmp_path: Path) -> None:
    class BytesPath:
        def __fspath__(self) -> bytes:
            return b"m.safetensors"

    with pytest.raises(UsageError, match="a bytes path"):
        vgs_ckpt.load(BytesPath())  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="must implement vgs_ckpt.storage.Storage"):
        vgs_ckpt.save(tmp_path / "m.safetensors", tree(), step=1,
                      storage="s3://bucket")  # type: ignore[arg-type]
    assert not (tmp_path / "m.safetensors").exists()
