"""Safe reading of the original scheduler's ``torch.save`` checkpoints (layouts L0-L2).

A legacy file is read from its bytes (the same bytes whether they come from a path
or from memory, so ``load(path)`` and ``load_bytes`` agree), with
``torch.load(weights_only=True)``, and the work is bounded by the file's size
(spec section 10):

- zip records may be stored or compressed (a zip tool re-packs with deflate):
  every record is read here with its CRC-32 checked (compressed ones decompressed,
  at most :data:`MAX_EXPANSION` times the file's size plus :data:`EXPANSION_SLACK`
  bytes in all) and handed to torch as a stored archive; duplicate record names
  are refused;
- the unpickled object may hold at most ``MAX_OBJECTS_PER_BYTE`` containers and
  leaves per byte of the file (plus :data:`OBJECT_SLACK`), counted as the tree
  would be written (a list referenced twice counts twice), and no cycle;
- its tensors may total at most :data:`MAX_EXPANSION` times the file's size
  (plus :data:`EXPANSION_SLACK`) as stored contiguously: a stride-0 view of one
  element that claims gigabytes is refused, not materialised.

Exceeding a bound is a :class:`FormatError` that names the file.

:class:`vgs_ckpt.readers.legacy.LegacyReader` serves such a file through the
reader protocol.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

from vgs_ckpt._container import Source
from vgs_ckpt.errors import FormatError, UnsafeCheckpointError, VgsCkptError
from vgs_ckpt.models import CheckpointFormat, check_format_version

__all__ = ["EXPANSION_SLACK", "MAX_EXPANSION", "MAX_OBJECTS_PER_BYTE", "OBJECT_SLACK",
           "LegacyCheckpoint", "read_legacy"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
MAX_EXPANSION = 16  # decompressed bytes, and tensor bytes, per byte of the file
EXPANSION_SLACK = 64 * 1024 * 1024
MAX_OBJECTS_PER_BYTE = 4
OBJECT_SLACK = 100_000
_MAX_RECORDS = 100_000
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LegacyCheckpoint:
    """A legacy file, classified exactly as the original scheduler did."""

    format: CheckpointFormat
    layout: str  # "L0", "L1", "L2"
    payload: Any  # the policy state_dict (v1) or get_parameters() (v2)
    step: int
    performance: float | None
    has_optimizer_state: bool | None  # None when the file has no such flag


def _stored_zip(data: IO[bytes], size: int, where: str) -> IO[bytes]:
    """The archive rebuilt with every record stored (uncompressed) and its CRC-32
    checked, within the bounds."""
    budget = MAX_EXPANSION * size + EXPANSION_SLACK
    try:
        with zipfile.ZipFile(data) as archive:
            infos = archive.infolist()
            if len(infos) > _MAX_RECORDS:
                raise FormatError(f"{where}: the zip holds {len(infos)} records (at most "
                                  f"{_MAX_RECORDS}); this is not a torch.save file")
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                duplicate = next(n for n in names if names.count(n) > 1)
                raise FormatError(f"{where}: the zip holds two records named {duplicate!r}; "
                                  "which one torch would read is ambiguous, so the file is "
                                  "refused")
            # Every archive is rebuilt from its records as zipfile reads them (each
            # one's CRC-32 checked), so torch only ever parses an archive written by
            # zipfile: its readers from a file and from memory disagree on damaged
            # local headers, and neither checks the CRC of a stored record.
            out = io.BytesIO()
            with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as stored:
                for info in infos:
                    target = zipfile.ZipInfo(info.filename, info.date_time)
                    with archive.open(info) as record, \
                            stored.open(target, "w", force_zip64=True) as copy:
                        while chunk := record.read(_CHUNK):
                            budget -= len(chunk)
                            if budget < 0:
                                raise FormatError(
                                    f"{where}: the compressed zip expands to more than "
                                    f"{MAX_EXPANSION} x its size + {EXPANSION_SLACK} bytes "
                                    "(a decompression bomb?); refused")
                            copy.write(chunk)
            return out
    except VgsCkptError:
        raise
    except Exception as exc:  # zipfile, zlib, bz2 and lzma fail on bad bytes in many ways
        # (BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, struct.error,
        # ValueError, ...): all of them mean a corrupt archive.
        raise FormatError(f"{where}: unreadable zip container ({type(exc).__name__}: "
                          f"{exc}); the file is corrupt or truncated") from None


def _torch_load(data: IO[bytes], size: int, container: str,
                map_location: str | torch.device, where: str) -> Any:
    if container == "torch-zip":
        data = _stored_zip(data, size, where)
    try:
        data.seek(0)
        return torch.load(data, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found or "weights only" in str(exc).lower():
            name = found.group(1) if found else "an unsupported global"
            raise UnsafeCheckpointError(
                f"{where}: refused to load: the pickle asks for {name}, which is not a plain "
                "container, number, string or tensor; nothing in it was run. If you trust "
                "the file, convert it yourself with torch.load(weights_only=False)") from None
        raise FormatError(f"{where}: corrupt torch pickle: {exc}") from None
    except VgsCkptError:
        raise
    except Exception as exc:  # torch's reader fails on damaged bytes in many ways
        # (RuntimeError, EOFError, KeyError, struct.error, BadZipFile, RecursionError,
        # AssertionError, MemoryError, ...): all of them mean a corrupt file.
        raise FormatError(f"{where}: unreadable torch checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is "
                          "corrupt or truncated") from None


def _check_bounds(obj: Any, size: int, where: str) -> None:
    """Refuse objects that would cost far more than the file's size to walk or to
    store: too many nodes (shared references expand), cycles, or tensors whose
    contiguous size dwarfs the file (stride-0 or overlapping views)."""
    node_budget = MAX_OBJECTS_PER_BYTE * size + OBJECT_SLACK
    byte_budget = MAX_EXPANSION * size + EXPANSION_SLACK
    nodes = 0
    tensor_bytes = 0
    seen_tensors: set[int] = set()
    active: set[int] = set()  # the containers on the current path (a cycle test)
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        item, leaving = stack.pop()
        if leaving:
            active.discard(id(item))
            continue
        nodes += 1
        if nodes > node_budget:
            raise FormatError(f"{where}: the pickle expands to more than {node_budget} "
                              "objects (shared references written out); it cannot be a "
                              "checkpoint of this size, so it is refused")
        if isinstance(item, torch.Tensor):
            if id(item) not in seen_tensors:
                seen_tensors.add(id(item))
                tensor_bytes += item.numel() * item.element_size()
                if tensor_bytes > byte_budget:
                    raise FormatError(
                        f"{where}: the tensors would take more than {byte_budget} bytes "
                        f"stored ({MAX_EXPANSION} x the file's {size} bytes + "
                        f"{EXPANSION_SLACK}): stride-0 or overlapping views that claim far "
                        "more data than the file holds; refused")
            continue
        if isinstance(item, Mapping | list | tuple):
            if id(item) in active:
                raise FormatError(f"{where}: the pickle holds a container that contains "
                                  "itself; a checkpoint tree has no cycles")
            active.add(id(item))
            stack.append((item, True))
            children = list(item.values()) if isinstance(item, Mapping) else list(item)
            if isinstance(item, Mapping):
                nodes += len(item)  # the keys
            stack.extend((child, False) for child in reversed(children))


def _performance(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FormatError(f"{where}: legacy 'performance' must be a number, got "
                          f"{type(value).__name__} {value!r:.60}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise FormatError(f"{where}: legacy 'performance' {value!r:.60} is not a finite "
                          "number; the file is corrupt")
    return number


def _flag(value: Any, where: str) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise FormatError(f"{where}: legacy 'has_optimizer_state' must be a bool, got "
                      f"{type(value).__name__} {value!r:.60}")


def read_legacy(source: Source, *, container: str,
                map_location: str | torch.device = "cpu") -> LegacyCheckpoint:
    """Read and classify a legacy ``torch.save`` checkpoint with ``weights_only=True``,
    from any source (a file and bytes are read by the same code: the results agree).

    Raises:
        UnsafeCheckpointError: the pickle asks for a global beyond the safe set.
        UnsupportedVersionError: the file names a newer format than this library knows.
        FormatError: the file is corrupt, not a checkpoint, or beyond the bounds above.
    """
    where, size = source.where, source.size()
    obj = _torch_load(source.stream(), size, container, map_location, where)
    _check_bounds(obj, size, where)
    if isinstance(obj, Mapping) and "format_version" in obj:
        fmt = check_format_version(obj["format_version"], where)
        if "data" not in obj:
            raise FormatError(f"{where}: legacy checkpoint of format {fmt.value!r} has no "
                              "'data' entry; the file is corrupt")
        payload = obj["data"]
        if not isinstance(payload, Mapping):
            raise FormatError(f"{where}: legacy 'data' must be a dict (a state_dict or "
                              f"get_parameters()), got {type(payload).__name__}; the file is "
                              "corrupt")
        step = obj.get("step", 0)
        if type(step) is not int or step < 0:
            raise FormatError(f"{where}: legacy 'step' must be a non-negative int, got "
                              f"{step!r:.60}")
        layout = "L1" if fmt is CheckpointFormat.V1_POLICY_ONLY else "L2"
        return LegacyCheckpoint(fmt, layout, payload, step,
                                _performance(obj.get("performance"), where),
                                _flag(obj.get("has_optimizer_state"), where))
    if not isinstance(obj, Mapping):
        raise FormatError(f"{where}: a torch file holding {type(obj).__qualname__}, not a "
                          "checkpoint dict; expected a state_dict or a wrapped checkpoint")
    return LegacyCheckpoint(CheckpointFormat.V1_POLICY_ONLY, "L0", obj, 0, None, None)
