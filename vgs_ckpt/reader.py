"""Reading checkpoints as stored: recognise a file by its bytes, pick its reader.

- :func:`open` is the lazy reader: the header and the tree's structure first,
  then only the subtrees or tensors asked for, each verified when first read.
- :func:`read_header`, :func:`detect_format` and :func:`container_of` read no
  tensor bytes (for vgs_ckpt files).

A vgs_ckpt file gets a :class:`~vgs_ckpt.readers.SafetensorsReader`, a legacy
``torch.save`` file a :class:`~vgs_ckpt.readers.LegacyReader`; both are
:class:`CheckpointReader`. Upgrading what was read is :mod:`vgs_ckpt.loading`
(``load``); bytes come from a :class:`~vgs_ckpt.storage.Storage` (default: local
files).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from vgs_ckpt._container import BytesSource, Source, sniff_source
from vgs_ckpt.errors import FormatError, UsageError, VgsCkptError
from vgs_ckpt.models import CheckpointFormat, CheckpointHeader, ContainerKind
from vgs_ckpt.readers import CheckpointReader, LegacyReader, SafetensorsReader, TensorSpec
from vgs_ckpt.readers.safetensors import read_header as _read_header
from vgs_ckpt.storage import Storage, StorageOptions, resolve

__all__ = ["CheckpointReader", "Detection", "TensorSpec", "container_of", "detect_format",
           "open", "open_source", "read_header"]


class Detection(NamedTuple):
    """What a checkpoint is: its format version and its container."""

    format: CheckpointFormat
    container: ContainerKind


def device_of(map_location: str | torch.device | None) -> torch.device:
    """The device a ``map_location`` argument names (a UsageError if none)."""
    try:
        return torch.device(map_location if map_location is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"invalid map_location {map_location!r}: {exc}; use e.g. 'cpu' or "
                         "'cuda:0'") from None


def open_source(source: Source, *, path: str | None, device: torch.device, verify: bool,
                readahead: bool, vgs_error: type[VgsCkptError] | None = None
                ) -> CheckpointReader:
    """The reader for ``source``, chosen from its first bytes. The reader owns the
    source (closing it closes the source); on failure the source is closed."""
    try:
        container = sniff_source(source)
        if container == "safetensors":
            return SafetensorsReader(source, path=path, device=device, verify=verify,
                                     readahead=readahead, vgs_error=vgs_error)
        return LegacyReader(source, container, path=path, device=device, vgs_error=vgs_error)
    except BaseException:
        source.close()
        raise


def open(path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu",
         verify: bool = True, mmap: bool = False, storage: Storage | None = None,
         storage_options: StorageOptions | None = None) -> CheckpointReader:
    """Open a checkpoint for lazy reading, like ``safetensors.safe_open``.

    Opening reads the header only. ``reader.structure()`` shows the tree with tensor
    shapes; ``reader.load(["policy"])`` (or ``reader["policy"]``) reads one subtree and
    ``reader.tensor("policy/w")`` one tensor, each verified against its digest the
    first time it is read. The file is read as stored (not upgraded). A legacy torch
    file has no lazy access: it is read when opened.

    Each tensor is read into memory the process owns (with ``mmap=True``: mapped
    from the file instead; see :func:`vgs_ckpt.load`). ``storage`` is where the file
    lives (default: the local file system; a URL such as ``s3://bucket/key`` opens its
    object store with ``storage_options``, and is read with ranged requests: the
    header with one, each subtree asked for with one more).

    Example:
        >>> with vgs_ckpt.open("member_3.safetensors") as reader:
        ...     policy = reader["policy"]

    Raises:
        CheckpointNotFoundError, FormatError, UnsupportedVersionError,
        UnsafeCheckpointError: as for :func:`vgs_ckpt.load`.
    """
    device = device_of(map_location)
    backend, key = resolve(path, storage, storage_options=storage_options, function="open")
    return open_source(backend.open(key, mmap=mmap), path=key, device=device, verify=verify,
                       readahead=False)


def container_of(path: str | os.PathLike[str], *, storage: Storage | None = None,
                 storage_options: StorageOptions | None = None) -> ContainerKind:
    """The container of a checkpoint file, from its first bytes only.

    Raises:
        FormatError: the file is not a checkpoint of any container.
    """
    backend, key = resolve(path, storage, storage_options=storage_options,
                           function="container_of")
    with backend.open(key) as source:
        return sniff_source(source)


def read_header(path: str | os.PathLike[str], *, storage: Storage | None = None,
                storage_options: StorageOptions | None = None) -> CheckpointHeader:
    """The validated header of a vgs_ckpt file, reading no tensor bytes.

    Raises:
        FormatError: the file is not a vgs_ckpt file (a legacy torch file is named as
            such: use :func:`vgs_ckpt.load` or :func:`open` for those) or is corrupt.
        UnsupportedVersionError: the file has a newer format than this library knows.
    """
    backend, key = resolve(path, storage, storage_options=storage_options,
                           function="read_header")
    with backend.open(key) as source:
        kind = sniff_source(source)
        if kind != "safetensors":
            raise FormatError(f"{key}: a legacy {kind} file (torch.save), not a vgs_ckpt "
                              "safetensors file, so it has no vgs_ckpt header; read it with "
                              "vgs_ckpt.load or vgs_ckpt.open, or convert it with "
                              "`vgs-ckpt upgrade`")
        return _read_header(source)[1]


def detect_format(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview, *,
                  storage: Storage | None = None,
                  storage_options: StorageOptions | None = None) -> Detection:
    """The format and container of a checkpoint, read from its bytes.

    For safetensors files only the header is read. For legacy torch files the
    pickle is read with ``torch.load(weights_only=True)``.

    Returns:
        ``Detection(format, container)``, which unpacks as a tuple.

    Raises:
        FormatError: the bytes are not a checkpoint.
        UnsupportedVersionError: the file names a format newer than this library.
        UnsafeCheckpointError: a legacy pickle asks for a forbidden global.

    Example:
        >>> fmt, container = vgs_ckpt.detect_format("member_3.safetensors")
    """
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        reader = open_source(BytesSource(path_or_bytes), path=None, device=torch.device("cpu"),
                             verify=False, readahead=False)
    else:
        reader = open(path_or_bytes, verify=False, storage=storage,
                      storage_options=storage_options)
    with reader:
        return Detection(reader.format, reader.container)
