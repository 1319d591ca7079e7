"""Continue a population started with the original scheduler: ``vgs-ckpt migrate``.

The original scheduler wrote ``<checkpoint_dir>/member_<id>_step_<step>.pt`` with
``torch.save``. :func:`migrate_population` reads every such file safely (any legacy
layout, either torch container), upgrades it to the latest format, and writes it
into a :class:`~vgs_ckpt.pbt.CheckpointStore` at ``dest``, the layout that
``PBTScheduler(PBTConfig(checkpoint_dir=dest, resume="must"))`` resumes:

- the member id comes from the file name (the original never stored it);
- the step comes from the file when it holds one (layouts L1 and L2), else from the
  name (layout L0, a bare state_dict); a file whose step disagrees with its name is
  reported and keeps the file's;
- performance and lineage come from the file where it has them; hyperparameters
  were never stored, so members resume with none (the scheduler's explore sets them);
- each member's files are written in step order, so the highest step is its latest;
- ``provenance`` records the upgrade steps, and ``provenance.legacy`` the source
  file (``source_file``) and where the step came from (``step_from``).

Files whose names do not match are reported and left alone, never guessed at. A
file that cannot be read is reported; the others are still migrated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import UsageError, VgsCkptError
from vgs_ckpt.models import CheckpointV2
from vgs_ckpt.pbt.store import CheckpointStore, check_member_id
from vgs_ckpt.reader import open as open_checkpoint
from vgs_ckpt.upgrades import upgrade

__all__ = ["MigratedFile", "migrate_population", "plan_population"]

ORIGINAL_NAME = re.compile(r"member_(?P<member>.+)_step_(?P<step>[0-9]+)\.pt")


@dataclass
class MigratedFile:
    """One file of the source directory and what became of it."""

    source: Path
    member_id: str | None = None
    name_step: int | None = None
    step: int | None = None
    layout: str | None = None  # "L0", "L1", "L2", or None for a vgs_ckpt file
    format: str | None = None  # the format as stored
    performance: float | None = None
    steps: list[str] = field(default_factory=list)  # the upgrade steps applied
    destination: Path | None = None
    result: str = "planned"  # "planned", "migrated", "skipped: ...", "failed: ..."
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.result.startswith("failed")

    @property
    def skipped(self) -> bool:
        return self.result.startswith("skipped")


def _scan(source: Path) -> list[MigratedFile]:
    if not source.is_dir():
        raise UsageError(f"{source} is not a directory; pass the original scheduler's "
                         "checkpoint_dir (it holds member_<id>_step_<step>.pt files)")
    found = []
    for path in sorted(p for p in source.iterdir() if not p.name.startswith(".")):
        item = MigratedFile(path)
        match = ORIGINAL_NAME.fullmatch(path.name)
        if not path.is_file():
            item.result = "skipped: not a file"
        elif match is None:
            item.result = "skipped: the name is not member_<id>_step_<step>.pt"
        else:
            try:
                item.member_id = check_member_id(match["member"])
            except UsageError:
                item.result = (f"skipped: member id {match['member']!r} is not one a store "
                               "can hold ([A-Za-z0-9][A-Za-z0-9_.-]*)")
            item.name_step = int(match["step"])
        found.append(item)
    return found


def _read(item: MigratedFile) -> Checkpoint:
    """The file, upgraded, with its layout, step and performance noted on ``item``."""
    assert item.member_id is not None and item.name_step is not None
    with open_checkpoint(item.source) as reader:
        item.layout, item.format = reader.legacy_layout, reader.format.value
        stored = Checkpoint(reader.load(), reader.header, reader.container, reader.path)
    upgraded, item.steps = upgrade(stored)
    has_step = item.layout != "L0"  # a bare state_dict holds no step
    item.step = stored.header.step if has_step else item.name_step
    if has_step and item.step != item.name_step:
        item.note = (f"the file says step {item.step}, its name {item.name_step}: the "
                     "file's is kept")
    item.performance = stored.header.performance
    return upgraded


def plan_population(source: str | os.PathLike[str], dest: str | os.PathLike[str]
                    ) -> list[MigratedFile]:
    """What :func:`migrate_population` would do, reading every file, writing none."""
    return migrate_population(source, dest, dry_run=True)


def migrate_population(source: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                       dry_run: bool = False,
                       progress: Callable[[int, int, Path], None] | None = None
                       ) -> list[MigratedFile]:
    """Migrate the original scheduler's ``checkpoint_dir`` into a store at ``dest``.

    Returns one :class:`MigratedFile` per entry of ``source`` (skipped, failed,
    planned or migrated).

    Raises:
        UsageError: ``source`` is not a directory, or ``dest`` already holds a
            population (migrate into a new directory).
    """
    src, out = Path(source), Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not an empty directory; migrate into "
                         "a new directory (it becomes the population's checkpoint_dir)")
    items = _scan(src)
    todo = [i for i in items if not i.skipped]
    # The plan: every file read once for its step (nothing kept: a population of large
    # checkpoints need not fit in memory), then written in step order, each read again.
    _each(todo, _read, progress)
    good = sorted((i for i in todo if not i.failed),
                  key=lambda i: (i.member_id or "", i.step or 0, i.source.name))
    numbers: dict[str, int] = {}
    for item in good:
        assert item.member_id is not None and item.step is not None
        numbers[item.member_id] = numbers.get(item.member_id, 0) + 1
        item.destination = (out / item.member_id /
                            f"step_{item.step:012d}_w{numbers[item.member_id]:012d}"
                            ".safetensors")
    if dry_run or not good:
        return items
    with CheckpointStore(out, keep_last=max(numbers.values()), keep_best=0) as store:
        _each(good, lambda item: _write(store, item, _read(item)), progress)
    return items


def _each(items: list[MigratedFile], work: Callable[[MigratedFile], Any],
          progress: Callable[[int, int, Path], None] | None) -> None:
    """``work`` on every item, with progress; an item it fails on is marked failed."""
    for index, item in enumerate(items):
        if progress:
            progress(index, len(items), item.source)
        try:
            work(item)
        except (VgsCkptError, OSError) as exc:
            item.result = f"failed: {exc}"
    if progress:
        progress(len(items), len(items), Path())


def _write(store: CheckpointStore, item: MigratedFile, checkpoint: Checkpoint) -> None:
    assert item.member_id is not None and item.step is not None
    header = checkpoint.header
    provenance: dict[str, Any] = (header.provenance.model_dump() if header.provenance else {
        "original_format": header.format_version.value,
        "original_container": checkpoint.container})
    provenance["legacy"] = {**provenance.get("legacy", {}), "source_file": item.source.name,
                            "step_from": "name" if item.layout == "L0" else "file"}
    v2 = header if isinstance(header, CheckpointV2) else None
    ref = store.save(item.member_id, checkpoint.parameters, step=item.step,
                     performance=header.performance, created_at=header.created_at,
                     hyperparams=v2.hyperparams if v2 else None,
                     lineage=v2.lineage if v2 else None, provenance=provenance)
    item.destination = Path(ref.path)
    item.result = "migrated"
