"""Recognising a checkpoint's container and format from its bytes, never its name."""

from __future__ import annotations

import os
from typing import IO, Literal, NamedTuple, TypeAlias

from vgs_ckpt import _header, legacy
from vgs_ckpt._container import (
    BytesSource,
    FileSource,
    Source,
    looks_like_safetensors,
    open_file,
    read_container,
)
from vgs_ckpt.errors import FormatError
from vgs_ckpt.models import CheckpointFormat

__all__ = ["ContainerKind", "Detection", "detect_format", "sniff_container"]

ContainerKind: TypeAlias = Literal["safetensors", "torch-zip", "torch-pickle"]

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (non-zip) container starts with the pickled magic number
# 0x1950a86a20f9469cfc6c: PROTO 2, LONG1 of 10 bytes.
_TORCH_PICKLE_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_PREFIX = 64


class Detection(NamedTuple):
    """What a checkpoint is: its format version and its container."""

    format: CheckpointFormat
    container: ContainerKind


def sniff_container(prefix: bytes, where: str) -> ContainerKind:
    """The container kind from the first bytes of a file."""
    if prefix.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if prefix.startswith(_TORCH_PICKLE_MAGIC):
        return "torch-pickle"
    if looks_like_safetensors(prefix):
        return "safetensors"
    raise FormatError(f"{where}: not a checkpoint: the first bytes {prefix[:16]!r} are neither "
                      "a safetensors header nor a torch.save container")


def _source_of(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
               ) -> tuple[Source, IO[bytes] | None]:
    if isinstance(path_or_bytes, bytes | bytearray | memoryview):
        return BytesSource(path_or_bytes), None
    handle = open_file(path_or_bytes)  # closed by detect_format
    return FileSource(handle, os.fspath(path_or_bytes)), handle


def detect_format(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
                  ) -> Detection:
    """The format and container of a checkpoint, read from its bytes.

    For safetensors files only the header is read. For legacy torch files the
    pickle is read with ``torch.load(weights_only=True)`` (zip files memory-mapped,
    so no tensor bytes are read).

    Returns:
        ``Detection(format, container)``, which unpacks as a tuple.

    Raises:
        FormatError: the bytes are not a checkpoint.
        UnsupportedVersionError: the file names a format newer than this library.
        UnsafeCheckpointError: a legacy pickle asks for a forbidden global.

    Example:
        >>> fmt, container = vgs_ckpt.detect_format("member_3.safetensors")
    """
    source, handle = _source_of(path_or_bytes)
    try:
        size = source.size()
        container = sniff_container(source.read(0, min(_PREFIX, size)), source.where)
        if container == "safetensors":
            header = _header.parse(read_container(source), source.where)
            return Detection(header.format_version, container)
        data = path_or_bytes if handle is None else source.where
        loaded = legacy.read_legacy(data, container=container, map_location="cpu")
        return Detection(loaded.format, container)
    finally:
        if handle is not None:
            handle.close()
