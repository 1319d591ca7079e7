"""Loading: reading a checkpoint (:mod:`vgs_ckpt.reader`) and upgrading it
(:mod:`vgs_ckpt.upgrades`) to the latest format in memory; the thin layer above
both."""

from __future__ import annotations

import os

import torch

from vgs_ckpt._container import BytesSource
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import FormatError, LegacyFormatWarning, UsageError, warn
from vgs_ckpt.reader import CheckpointReader, device_of, open_source
from vgs_ckpt.storage import Storage, StorageOptions, resolve
from vgs_ckpt.upgrades import upgrade as upgrade_checkpoint

__all__ = ["load", "load_bytes"]


def load(path: str | os.PathLike[str], *, map_location: str | torch.device | None = "cpu",
         verify: bool = True, upgrade: bool = True, mmap: bool = False,
         storage: Storage | None = None, storage_options: StorageOptions | None = None
         ) -> Checkpoint:
    """Load a checkpoint file: a vgs_ckpt file or a legacy ``torch.save`` one.

    The format is recognised from the bytes. Legacy torch files are read with
    ``torch.load(weights_only=True)`` only, so loading never runs code. Every tensor
    byte is read once and hashed at most once (legacy files have no digests).

    Args:
        path: the file (or, with ``storage``, the key) to read.
        map_location: device for every torch tensor (numpy arrays stay numpy).
        verify: recompute every tensor's digest and compare it with the header.
        upgrade: upgrade an older format (or VGS state) to the latest in memory, with a
            :class:`LegacyFormatWarning`. With False the checkpoint is returned as
            stored, even with invalid VGS settings (an ``InvalidVGSStateWarning`` names
            them), so its data can be salvaged.
        mmap: map the tensor data from the file (private, copy-on-write) instead of
            reading it into memory the process owns (the default). Faster when the
            file is in the page cache, but a writer that rewrites the file in place
            (``cp``, a shell redirect, ``torch.save`` to the same name) changes the
            tensors already verified, and truncating it kills the process with
            SIGBUS. vgs_ckpt's own writers replace files atomically, which is safe.
            Legacy torch files are always read into memory.
        storage: where the file lives (default: the local file system, or for a URL
            such as ``s3://bucket/key`` its object store).
        storage_options: options of a URL's filesystem (fsspec's: credentials,
            ``endpoint_url``, ...).

    Returns:
        A :class:`Checkpoint` with ``parameters``, ``header`` and ``format``.

    Raises:
        CheckpointNotFoundError: no such file.
        FormatError: the bytes are not a valid checkpoint (or, with ``upgrade``, its VGS
            state fails validation).
        IntegrityError: a tensor's bytes do not match its digest (the tensor is named).
        UnsupportedVersionError: the file has a newer format than this library knows.
        UnsafeCheckpointError: a legacy pickle asks for a forbidden global (nothing runs).

    Example:
        >>> ckpt = vgs_ckpt.load("member_3.safetensors")
        >>> ckpt.header.step, ckpt.format
    """
    device = device_of(map_location)
    backend, key = resolve(path, storage, storage_options=storage_options, function="load")
    with open_source(backend.open(key, mmap=mmap), path=key, device=device, verify=verify,
                     readahead=True, vgs_error=FormatError if upgrade else None) as reader:
        return _finish(reader, upgrade)


def load_bytes(data: bytes | bytearray | memoryview, *,
               map_location: str | torch.device | None = "cpu",
               verify: bool = True, upgrade: bool = True) -> Checkpoint:
    """Load a checkpoint from bytes (as :func:`load` does for a file)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UsageError(f"load_bytes() takes bytes, got {type(data).__qualname__}; use "
                         "load for a path")
    with open_source(BytesSource(data), path=None, device=device_of(map_location),
                     verify=verify, readahead=False,
                     vgs_error=FormatError if upgrade else None) as reader:
        return _finish(reader, upgrade)


def _finish(reader: CheckpointReader, upgrade: bool) -> Checkpoint:
    """The whole tree of an open reader as a Checkpoint, upgraded when asked."""
    parameters = reader.load()
    if not isinstance(parameters, dict):
        raise FormatError(f"{reader.where}: the root of the tree is not a dict node; the "
                          "file is corrupt")
    header = reader.header  # a vgs_ckpt file's VGS summary was checked when it was opened
    checkpoint = Checkpoint(parameters, header, reader.container, reader.path)
    if not upgrade:
        return checkpoint
    upgraded, applied = upgrade_checkpoint(checkpoint)
    if reader.container != "safetensors":
        _warn_upgraded(reader.where, f"{checkpoint.format.value} ({reader.container}, layout "
                       f"{reader.legacy_layout})", applied or ["read from a torch.save container"])
    elif applied:
        _warn_upgraded(reader.where, checkpoint.format.value, applied)
    return upgraded


def _warn_upgraded(where: str, original: str, applied: list[str]) -> None:
    warn(f"{where}: legacy checkpoint format {original!r} upgraded in memory "
         f"({', '.join(applied)}); run `vgs-ckpt upgrade` to convert the file",
         LegacyFormatWarning)
