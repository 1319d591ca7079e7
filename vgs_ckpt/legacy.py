"""Safe reading of the original scheduler's ``torch.save`` checkpoints (layouts L0-L2)."""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vgs_ckpt.errors import FormatError, UnsafeCheckpointError, VgsCkptError
from vgs_ckpt.models import CheckpointFormat, check_format_version

__all__ = ["LegacyCheckpoint", "read_legacy"]

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


@dataclass(frozen=True)
class LegacyCheckpoint:
    """A legacy file, classified exactly as the original scheduler did."""

    format: CheckpointFormat
    layout: str  # "L0", "L1", "L2"
    payload: Any  # the policy state_dict (v1) or get_parameters() (v2)
    step: int
    performance: float | None
    has_optimizer_state: bool | None  # None when the file has no such flag


def _torch_load(data: str | bytes | bytearray | memoryview, container: str,
                map_location: str | torch.device, where: str) -> Any:
    # torch.load picks a loader by file name (".safetensors"); we go by the bytes,
    # so such a path is passed as an open file (which cannot be memory-mapped).
    by_path = isinstance(data, str) and not data.endswith(".safetensors")
    try:
        if isinstance(data, str) and not by_path:
            with open(data, "rb") as handle:
                return torch.load(handle, map_location=map_location, weights_only=True)
        target: Any = data if by_path else io.BytesIO(bytes(data))  # type: ignore[arg-type]
        return torch.load(target, map_location=map_location, weights_only=True,
                          mmap=container == "torch-zip" and by_path)
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


def read_legacy(data: str | os.PathLike[str] | bytes | bytearray | memoryview, *,
                container: str, map_location: str | torch.device = "cpu") -> LegacyCheckpoint:
    """Read and classify a legacy ``torch.save`` checkpoint with ``weights_only=True``.

    Raises:
        UnsafeCheckpointError: the pickle asks for a global beyond the safe set.
        UnsupportedVersionError: the file names a newer format than this library knows.
        FormatError: the file is corrupt or not a checkpoint.
    """
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    where = data if isinstance(data, str) else "<bytes>"
    obj = _torch_load(data, container, map_location, where)
    if isinstance(obj, Mapping) and "format_version" in obj:
        fmt = check_format_version(obj["format_version"], where)
        if "data" not in obj:
            raise FormatError(f"{where}: legacy checkpoint of format {fmt.value!r} has no "
                              "'data' entry; the file is corrupt")
        step = obj.get("step", 0)
        performance = obj.get("performance")
        if type(step) is not int or step < 0:
            raise FormatError(f"{where}: legacy 'step' must be a non-negative int, got {step!r}")
        if performance is not None and not isinstance(performance, int | float):
            raise FormatError(f"{where}: legacy 'performance' must be a number, "
                              f"got {performance!r}")
        flag = obj.get("has_optimizer_state")
        layout = "L1" if fmt is CheckpointFormat.V1_POLICY_ONLY else "L2"
        return LegacyCheckpoint(fmt, layout, obj["data"], step,
                                None if performance is None else float(performance),
                                None if flag is None else bool(flag))
    if not isinstance(obj, Mapping):
        raise FormatError(f"{where}: a torch file holding {type(obj).__qualname__}, not a "
                          "checkpoint dict; expected a state_dict or a wrapped checkpoint")
    return LegacyCheckpoint(CheckpointFormat.V1_POLICY_ONLY, "L0", obj, 0, None, None)
