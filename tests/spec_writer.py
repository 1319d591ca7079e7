"""An independent writer of docs/spec.md's byte form (section 2.11), for tests.

Written from the spec's text only: struct, the standard json module for string
escapes, numpy for tensor bytes and xxhash for digests; no vgs_ckpt code. Numbers are
formatted by the spec's rule (shortest round-trip digits, fixed notation for decimal
exponents -4..15), not by Python's repr, so that the rule itself is tested.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict
from typing import Any

import torch
import xxhash

CODES = {torch.bool: ("BOOL", 1), torch.uint8: ("U8", 1), torch.int8: ("I8", 1),
         torch.int16: ("I16", 2), torch.int32: ("I32", 4), torch.int64: ("I64", 8),
         torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2),
         torch.float32: ("F32", 4), torch.float64: ("F64", 8)}


def number(x: float) -> str:
    """A finite float in the writers' form (spec section 2.11)."""
    if x == 0:
        return "-0.0" if math.copysign(1, x) < 0 else "0.0"
    for precision in range(17):
        text = f"{x:.{precision}e}"
        if float(text) == x:
            break
    mantissa, exponent = text.split("e")
    digits = mantissa.replace(".", "").lstrip("-")
    digits = digits.rstrip("0") or "0"
    e = int(exponent)
    sign = "-" if x < 0 else ""
    if -4 <= e < 16:
        if e >= 0:
            whole = (digits + "0" * (e + 1))[:e + 1]
            frac = digits[e + 1:] or "0"
            return f"{sign}{whole}.{frac}"
        return f"{sign}0.{'0' * (-e - 1)}{digits}"
    body = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
    return f"{sign}{body}e{'+' if e >= 0 else '-'}{abs(e):02d}"


def text(value: Any) -> str:
    """JSON text in the writers' form: no whitespace, raw UTF-8, numbers as above."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return str(value)
    if type(value) is float:
        return number(value)
    if type(value) is str:
        return json.dumps(value, ensure_ascii=False)
    if type(value) is list:
        return "[" + ",".join(text(v) for v in value) + "]"
    if type(value) is dict:
        return "{" + ",".join(f"{text(k)}:{text(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _segment(key: str | int) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def write(tree: dict[str, Any], *, step: int, created_at: str, performance: float | None,
          member_id: str | None, hyperparams: dict[str, Any], producer: tuple[str, str]
          ) -> bytes:
    """A v2_full_parameters file of a tree without VGS state or numpy leaves."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}

    def encode(value: Any, path: tuple[str | int, ...]) -> Any:
        if value is None or type(value) in (bool, int, str):
            return value
        if type(value) is float:
            if math.isnan(value):
                return {"float": "nan"}
            if math.isinf(value):
                return {"float": "inf" if value > 0 else "-inf"}
            return {"float": value}
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(),
                   tuple(value.shape), tuple(value.stride()), value.dtype)
            name = seen.get(key) if value.numel() else None
            if name is None:
                name = "/".join(_segment(k) for k in path)
                tensors[name] = value
                if value.numel():
                    seen[key] = name
            node: dict[str, Any] = {"tensor": name}
            if value.requires_grad:
                node["requires_grad"] = True
            if isinstance(value, torch.nn.Parameter):
                node["parameter"] = True
            return node
        if isinstance(value, dict):
            node = {"dict": [[k, encode(v, (*path, k))] for k, v in value.items()]}
            if type(value) is OrderedDict:
                node["ordered"] = True
            return node
        tag = "list" if type(value) is list else "tuple"
        return {tag: [encode(v, (*path, i)) for i, v in enumerate(value)]}

    node = encode(tree, ())
    data = {name: t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            for name, t in tensors.items()}
    header = {
        "format_version": "v2_full_parameters", "step": step, "performance": performance,
        "member_id": member_id, "producer": {"name": producer[0], "version": producer[1]},
        "created_at": created_at, "tree": node,
        "tensors": {name: {"dtype": CODES[t.dtype][0], "shape": list(t.shape),
                           "digest": "xxh3-128:" + xxhash.xxh3_128_hexdigest(data[name])}
                    for name, t in tensors.items()},
        "provenance": None, "hyperparams": hyperparams,
        "lineage": {"exploited_from": None}, "vgs": None,
    }
    order = sorted(tensors, key=lambda n: (-CODES[tensors[n].dtype][1], n))
    container: dict[str, Any] = {"__metadata__": {
        "format": "pt", "vgs_ckpt.format_version": "v2_full_parameters",
        "vgs_ckpt.header": text(header)}}
    offset = 0
    for name in order:
        t = tensors[name]
        container[name] = {"dtype": CODES[t.dtype][0], "shape": list(t.shape),
                           "data_offsets": [offset, offset + len(data[name])]}
        offset += len(data[name])
    raw = text(container).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(data[n] for n in order)

