"""The ``vgs-ckpt upgrade`` command: converting checkpoint files on disk to the latest
format, in place (keeping a backup) or into another directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vgs_ckpt import loading, reader, writer
from vgs_ckpt.errors import CheckpointIOError, UsageError, VgsCkptError
from vgs_ckpt.storage import LOCAL, Storage
from vgs_ckpt.upgrades.checkpoint import upgrade

__all__ = ["FileResult", "find_checkpoints", "upgrade_file", "upgrade_files"]

_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors"}


@dataclass(frozen=True)
class FileResult:
    """What happened to one file."""

    source: Path
    target: Path | None
    original: str  # the format (and container) the file had, or "?" if unreadable
    final: str
    steps: tuple[str, ...]
    result: str  # "upgraded", "up to date", "would upgrade", "failed: ..."
    backup: Path | None = None

    @property
    def failed(self) -> bool:
        return self.result.startswith("failed")


def find_checkpoints(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[Path, Path]]:
    """``(file, root)`` for every file argument and every checkpoint-like file below a
    directory argument (by suffix, or by content for files without a known suffix).
    Hidden files, temporary files and backups are skipped."""
    for arg in paths:
        path = Path(arg)
        if not path.is_dir():
            yield path, path.parent
            continue
        for info in LOCAL.entries(os.fspath(path), recursive=True):
            found, name = Path(info.key), info.name
            if (info.directory or name.startswith(".") or ".bak" in found.suffixes
                    or name.endswith(".tmp")):
                continue
            if found.suffix in _SUFFIXES or _sniffs(found):
                yield found, path


def _sniffs(path: Path) -> bool:
    """Whether a file without a known suffix is a checkpoint (by its first bytes)."""
    try:
        reader.container_of(path)
    except (OSError, VgsCkptError):
        return False
    return True


def _backup_path(path: Path, storage: Storage) -> Path:
    """Pin the file to the first free ``NAME.bak``, ``NAME.bak.1``, ...; never overwrite."""
    for n in range(10_000):
        candidate = path.with_name(f"{path.name}.bak" + (f".{n}" if n else ""))
        try:
            storage.pin(os.fspath(path), os.fspath(candidate), overwrite=False)
        except FileExistsError:
            continue
        return candidate
    raise CheckpointIOError(f"no free backup name for {path}")


def _copy(source: Path, target: Path, storage: Storage) -> None:
    """Copy ``source`` to ``target`` atomically."""
    with storage.open(os.fspath(source)) as src:
        storage.commit(os.fspath(target), lambda f: shutil.copyfileobj(src.stream(), f))


def upgrade_file(source: Path, target: Path | None, *, dry_run: bool = False,
                 storage: Storage | None = None) -> FileResult:
    """Upgrade one file into ``target`` (None: in place, keeping a backup)."""
    backend = storage if storage is not None else LOCAL
    original = "?"
    try:
        loaded = loading.load(source, upgrade=False, storage=backend)
        original = f"{loaded.format.value} ({loaded.container})"
        upgraded, steps = upgrade(loaded)
        final = upgraded.format.value
        if loaded.container != "safetensors" and not steps:
            steps = ["torch->safetensors"]
        done = target if target is not None else source
        if dry_run:
            return FileResult(source, done, original, final, tuple(steps),
                              "would upgrade" if steps else "up to date")
        if not steps:
            if target is not None and target.resolve() != source.resolve():
                _copy(source, target, backend)
            return FileResult(source, done, original, final, (), "up to date")
        backup = _backup_path(source, backend) if target is None else None
        writer.save(done, upgraded.parameters, storage=backend, **upgraded.save_fields())
        return FileResult(source, done, original, final, tuple(steps), "upgraded", backup)
    except (VgsCkptError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return FileResult(source, target, original, "-", (),
                          f"failed: {type(exc).__name__}: {first}")


def upgrade_files(paths: Iterable[str | os.PathLike[str]], *, out: str | os.PathLike[str] | None,
                  in_place: bool, dry_run: bool = False,
                  progress: Callable[[int, int, Path], None] | None = None) -> list[FileResult]:
    """Upgrade every checkpoint among ``paths`` into ``out`` or in place.

    With ``out``, a file found under directory argument D goes to
    ``out/<path relative to D>`` with the suffix ``.safetensors``.
    One file's failure does not stop the others.
    """
    if out is not None and in_place:
        raise UsageError("--out and --in-place exclude each other")
    if out is None and not in_place and not dry_run:
        raise UsageError("give exactly one of --out DIR or --in-place (or --dry-run)")
    files = list(find_checkpoints(paths))
    results: list[FileResult] = []
    claimed: dict[Path, Path] = {}
    for index, (source, root) in enumerate(files):
        if progress:
            progress(index, len(files), source)
        target = None
        if out is not None:
            target = Path(out) / source.relative_to(root).with_suffix(".safetensors")
            if target.resolve() in claimed:
                results.append(FileResult(source, target, "?", "-", (),
                                          f"failed: {target} is also the output of "
                                          f"{claimed[target.resolve()]}; rename one"))
                continue
            claimed[target.resolve()] = source
        if not source.is_file():
            results.append(FileResult(source, target, "?", "-", (),
                                      "failed: no such file"))
            continue
        results.append(upgrade_file(source, target, dry_run=dry_run))
    if progress:
        progress(len(files), len(files), Path())
    return results
