"""The ``vgs-ckpt upgrade`` command: converting checkpoint files on disk to the latest
format, in place (keeping a backup) or into another directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vgs_ckpt import loading, reader, writer
from vgs_ckpt.errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    UsageError,
    VgsCkptError,
)
from vgs_ckpt.storage import LOCAL, LocalStorage, Storage, StorageOptions, resolve
from vgs_ckpt.storage.objects import is_url
from vgs_ckpt.upgrades.checkpoint import upgrade

__all__ = ["FileResult", "find_checkpoints", "upgrade_file", "upgrade_files"]

_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors"}


@dataclass(frozen=True)
class FileResult:
    """What happened to one file (paths are Paths for local files, URLs otherwise)."""

    source: Path | str
    target: Path | str | None
    original: str  # the format (and container) the file had, or "?" if unreadable
    final: str
    steps: tuple[str, ...]
    result: str  # "upgraded", "up to date", "would upgrade", "failed: ..."
    backup: Path | str | None = None

    @property
    def failed(self) -> bool:
        return self.result.startswith("failed")


def _name(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[-1] if is_url(key) else Path(key).name


def _shown(key: str, storage: Storage) -> Path | str:
    return Path(key) if isinstance(storage, LocalStorage) else key


def find_checkpoints(paths: Iterable[str | os.PathLike[str]], *,
                     storage_options: StorageOptions | None = None
                     ) -> Iterator[tuple[str, str, Storage]]:
    """``(file, root, storage)`` for every file argument and every checkpoint-like file
    below a directory (or URL prefix) argument (by suffix, or by content for files
    without a known suffix). Hidden files, temporary files and backups are skipped."""
    for arg in paths:
        storage, key = resolve(arg, storage_options=storage_options, function="upgrade")
        listing = [info for info in storage.entries(key, recursive=True)
                   if info.key.rstrip("/") != key.rstrip("/")]
        directory = (os.path.isdir(key) if isinstance(storage, LocalStorage)
                     else bool(listing))
        if not directory:  # a file (or nothing: reported as missing)
            yield key, _parent(key), storage
            continue
        for info in listing:
            name = info.name
            suffixes = Path(name).suffixes
            if (info.directory or name.startswith(".") or ".bak" in suffixes
                    or name.endswith(".tmp")):
                continue
            if Path(name).suffix in _SUFFIXES or _sniffs(info.key, storage):
                yield info.key, key, storage


def _parent(key: str) -> str:
    return key.rstrip("/").rsplit("/", 1)[0] if is_url(key) else os.path.dirname(key)


def _relative(key: str, root: str) -> str:
    if is_url(key):
        return key[len(root.rstrip("/")) + 1:]
    return os.path.relpath(key, root or ".")


def _sniffs(key: str, storage: Storage) -> bool:
    """Whether a file without a known suffix is a checkpoint (by its first bytes)."""
    try:
        reader.container_of(key, storage=storage)
    except (OSError, VgsCkptError):
        return False
    return True


def _backup_path(key: str, storage: Storage) -> str:
    """Pin the file to the first free ``NAME.bak``, ``NAME.bak.1``, ...; never overwrite."""
    for n in range(10_000):
        candidate = f"{key}.bak" + (f".{n}" if n else "")
        try:
            storage.pin(key, candidate, overwrite=False)
        except FileExistsError:
            continue
        return candidate
    raise CheckpointIOError(f"no free backup name for {key}")


def _copy(source: str, target: str, storage: Storage, out: Storage) -> None:
    """Copy ``source`` to ``target`` atomically."""
    if out is storage and not storage.capabilities.hard_links:
        storage.pin(source, target)  # a server-side copy
        return
    with storage.open(source) as src:
        out.commit(target, lambda f: shutil.copyfileobj(src.stream(), f))


def upgrade_file(source: str | os.PathLike[str], target: str | os.PathLike[str] | None, *,
                 dry_run: bool = False, storage: Storage | None = None,
                 target_storage: Storage | None = None) -> FileResult:
    """Upgrade one file into ``target`` (None: in place, keeping a backup)."""
    backend = storage if storage is not None else LOCAL
    out = target_storage if target_storage is not None else backend
    src = os.fspath(source)
    dst = os.fspath(target) if target is not None else None
    shown_src = _shown(src, backend)
    shown_dst = _shown(dst, out) if dst is not None else None
    original = "?"
    try:
        try:
            loaded = loading.load(src, upgrade=False, storage=backend)
        except CheckpointNotFoundError:  # an object store's missing object: its one GET
            return FileResult(shown_src, shown_dst, original, "-", (), "failed: no such file")
        original = f"{loaded.format.value} ({loaded.container})"
        upgraded, steps = upgrade(loaded)
        final = upgraded.format.value
        if loaded.container != "safetensors" and not steps:
            steps = ["torch->safetensors"]
        done = shown_dst if shown_dst is not None else shown_src
        if dry_run:
            return FileResult(shown_src, done, original, final, tuple(steps),
                              "would upgrade" if steps else "up to date")
        if not steps:
            if dst is not None and not _same(src, dst, backend, out):
                _copy(src, dst, backend, out)
            return FileResult(shown_src, done, original, final, (), "up to date")
        backup = _shown(_backup_path(src, backend), backend) if dst is None else None
        writer.save(dst if dst is not None else src, upgraded.parameters,
                    storage=out if dst is not None else backend, **upgraded.save_fields())
        return FileResult(shown_src, done, original, final, tuple(steps), "upgraded", backup)
    except (VgsCkptError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return FileResult(shown_src, shown_dst, original, "-", (),
                          f"failed: {type(exc).__name__}: {first}")


def _same(a: str, b: str, storage_a: Storage, storage_b: Storage) -> bool:
    if storage_a is not storage_b:
        return False
    if isinstance(storage_a, LocalStorage):
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def upgrade_files(paths: Iterable[str | os.PathLike[str]], *, out: str | os.PathLike[str] | None,
                  in_place: bool, dry_run: bool = False,
                  progress: Callable[[int, int, Path], None] | None = None,
                  storage_options: StorageOptions | None = None) -> list[FileResult]:
    """Upgrade every checkpoint among ``paths`` into ``out`` or in place.

    With ``out``, a file found under directory argument D goes to
    ``out/<path relative to D>`` with the suffix ``.safetensors``. Paths and ``out``
    may be URLs (``s3://bucket/prefix``, opened with ``storage_options``).
    One file's failure does not stop the others.
    """
    if out is not None and in_place:
        raise UsageError("--out and --in-place exclude each other")
    if out is None and not in_place and not dry_run:
        raise UsageError("give exactly one of --out DIR or --in-place (or --dry-run)")
    files = list(find_checkpoints(paths, storage_options=storage_options))
    out_storage, out_key = (resolve(out, storage_options=storage_options, function="upgrade")
                            if out is not None else (LOCAL, ""))
    results: list[FileResult] = []
    claimed: dict[str, str] = {}
    for index, (source, root, storage) in enumerate(files):
        if progress:
            progress(index, len(files), Path(_name(source)))
        target: str | None = None
        if out is not None:
            relative = str(Path(_relative(source, root)).with_suffix(".safetensors"))
            target = out_storage.join(out_key, *relative.split(os.sep))
            seen = (os.path.realpath(target) if isinstance(out_storage, LocalStorage)
                    else target)
            if seen in claimed:
                results.append(FileResult(_shown(source, storage), _shown(target, out_storage),
                                          "?", "-", (), f"failed: {target} is also the output "
                                          f"of {claimed[seen]}; rename one"))
                continue
            claimed[seen] = source
        if isinstance(storage, LocalStorage) and not Path(source).is_file():
            results.append(FileResult(_shown(source, storage),
                                      _shown(target, out_storage) if target else None,
                                      "?", "-", (), "failed: no such file"))
            continue
        results.append(upgrade_file(source, target, dry_run=dry_run, storage=storage,
                                    target_storage=out_storage))
    if progress:
        progress(len(files), len(files), Path())
    return results
