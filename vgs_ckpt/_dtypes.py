"""The one dtype table: safetensors dtype codes, torch dtypes and numpy dtypes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MAX_DIMS = 64  # numpy's and torch's limit on a shape; writers refuse more (spec section 2)


@dataclass(frozen=True)
class DType:
    code: str  # safetensors dtype string, as written in the file
    torch: torch.dtype
    numpy: np.dtype[np.generic] | None  # None where numpy has no such dtype
    itemsize: int

    def nbytes(self, shape: tuple[int, ...] | list[int]) -> int:
        """The bytes of an array of this dtype and shape."""
        return math.prod(shape) * self.itemsize


def _np(name: str) -> np.dtype[np.generic]:
    return np.dtype(name).newbyteorder("<")


_TABLE = (
    DType("BOOL", torch.bool, _np("bool"), 1),
    DType("U8", torch.uint8, _np("uint8"), 1),
    DType("I8", torch.int8, _np("int8"), 1),
    DType("U16", torch.uint16, _np("uint16"), 2),
    DType("I16", torch.int16, _np("int16"), 2),
    DType("U32", torch.uint32, _np("uint32"), 4),
    DType("I32", torch.int32, _np("int32"), 4),
    DType("U64", torch.uint64, _np("uint64"), 8),
    DType("I64", torch.int64, _np("int64"), 8),
    DType("F16", torch.float16, _np("float16"), 2),
    DType("BF16", torch.bfloat16, None, 2),
    DType("F32", torch.float32, _np("float32"), 4),
    DType("F64", torch.float64, _np("float64"), 8),
    DType("C64", torch.complex64, _np("complex64"), 8),
    DType("F8_E4M3", torch.float8_e4m3fn, None, 1),
    DType("F8_E4M3FNUZ", torch.float8_e4m3fnuz, None, 1),
    DType("F8_E5M2", torch.float8_e5m2, None, 1),
    DType("F8_E5M2FNUZ", torch.float8_e5m2fnuz, None, 1),
)

BY_CODE: dict[str, DType] = {d.code: d for d in _TABLE}
BY_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in _TABLE}
# Keyed by (kind, itemsize) so byte order does not matter for the lookup.
BY_NUMPY: dict[tuple[str, int], DType] = {
    (d.numpy.kind, d.numpy.itemsize): d for d in _TABLE if d.numpy is not None
}
CODES: tuple[str, ...] = tuple(BY_CODE)


def numpy_entry(dtype: np.dtype[np.generic]) -> DType | None:
    """The table entry of a numpy dtype, or None when the format cannot hold it."""
    return BY_NUMPY.get((dtype.kind, dtype.itemsize))
