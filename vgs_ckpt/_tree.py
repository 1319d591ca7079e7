"""Encoding of a parameter tree as a JSON node plus a table of arrays.

This module is the one home of the tree grammar (spec section 5): :data:`GRAMMAR`
defines the tagged nodes; the encoder, the decoder, the readers' walks
(:func:`references`, :func:`subnode`, :func:`dict_items`) and the JSON schema's
tree part (:func:`node_schema`, used by :mod:`vgs_ckpt.models`) all follow it.

    null | true | false | "string" | <JSON integer>
    {"float": <JSON number> | "nan" | "inf" | "-inf"}
    {"dict": [[key, node], ...], "ordered"?: true}     key: string or JSON integer
    {"list": [node, ...]}  |  {"tuple": [node, ...]}
    {"tensor": name, "requires_grad"?: true, "parameter"?: true}
    {"ndarray": name}  |  {"npscalar": name}
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vgs_ckpt._dtypes import BY_TORCH, MAX_DIMS, DType, numpy_entry
from vgs_ckpt.errors import FormatError, UnsupportedTypeError, UsageError

# Each tagged node: its tag, and every member it may carry with what that member holds
# ("pairs": [[key, node], ...]; "nodes": [node, ...]; "float": a JSON number or
# "nan"/"inf"/"-inf"; "name": a tensor name; "flag": true when present).
GRAMMAR: dict[str, dict[str, str]] = {
    "dict": {"dict": "pairs", "ordered": "flag"},
    "list": {"list": "nodes"},
    "tuple": {"tuple": "nodes"},
    "float": {"float": "float"},
    "tensor": {"tensor": "name", "requires_grad": "flag", "parameter": "flag"},
    "ndarray": {"ndarray": "name"},
    "npscalar": {"npscalar": "name"},
}
CONTAINER_TAGS = tuple(t for t, m in GRAMMAR.items() if m[t] in ("pairs", "nodes"))
REFERENCE_TAGS = tuple(t for t, m in GRAMMAR.items() if m[t] == "name")
SEPARATOR = "/"
RESERVED_NAMES = frozenset({"__metadata__"})
# Deepest nesting of dicts, lists and tuples save() accepts (spec section 5); its
# JSON stays well inside the readers' MAX_JSON_DEPTH.
MAX_TREE_DEPTH = 64
_FLOAT_SPECIALS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# JSON integers in a tree are at most this many decimal digits (CPython's default
# limit for parsing them; spec section 5): writers refuse bigger ones.
MAX_INT_DIGITS = 4300
_TOO_BIG = 10 ** MAX_INT_DIGITS
_SURE_SMALL_BITS = 14_000  # fewer bits than this is fewer than 4300 digits


def escape_key(key: str | int) -> str:
    """A tree key as one segment of a tensor name: ``~`` -> ``~0``, ``/`` -> ``~1``."""
    return str(key).replace("~", "~0").replace(SEPARATOR, "~1")


def join_path(path: tuple[str | int, ...]) -> str:
    return SEPARATOR.join(escape_key(k) for k in path)


def show_path(path: tuple[str | int, ...]) -> str:
    """A tree path for error messages, e.g. ``["policy.optimizer"]["state"][0]``."""
    return "".join(f"[{k!r}]" for k in path) or "<root>"


@dataclass(frozen=True)
class Array:
    """One array of a tree: what it is, and the value whose bytes :meth:`data` gives."""

    dtype: DType
    shape: tuple[int, ...]
    value: Any  # the torch tensor or numpy array (or scalar) it came from

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(self.shape)

    def data(self) -> memoryview:
        """The array's bytes: contiguous, little-endian, format "B" (a host copy only
        when the value is not already such a buffer)."""
        if isinstance(self.value, torch.Tensor):
            return _torch_data(self.value)
        return _numpy_data(np.asarray(self.value), self.dtype)


def float_node(value: float) -> dict[str, Any]:
    """The ``float`` node of a Python float: a JSON number, or "nan", "inf", "-inf"."""
    if math.isfinite(value):
        return {"float": value}
    return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


def _check_text(text: str, path: tuple[str | int, ...], what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedTypeError(
            f"{what} at {show_path(path)} is not valid Unicode ({exc.reason}); "
            "checkpoint strings must encode as UTF-8 - remove lone surrogates"
        ) from None


def _torch_dtype(value: torch.Tensor, path: tuple[str | int, ...], storable: bool) -> DType:
    """The format's dtype for a tensor; with ``storable``, also refuse tensors whose
    bytes cannot be written (sparse, quantized, meta)."""
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedTypeError(
            f"tensor subclass {type(value).__qualname__} at {show_path(path)} is not supported; "
            "store a plain torch.Tensor (e.g. `t.as_subclass(torch.Tensor)`)"
        )
    if storable and (value.layout is not torch.strided or value.is_quantized or value.is_meta):
        kind = "meta" if value.is_meta else str(value.layout)
        raise UnsupportedTypeError(
            f"{kind} tensor at {show_path(path)} cannot be stored; "
            "store a dense tensor with data (e.g. `t.to_dense()`)"
        )
    entry = BY_TORCH.get(value.dtype)
    if entry is None:
        raise UnsupportedTypeError(
            f"tensor dtype {value.dtype} at {show_path(path)} is not supported by the format; "
            "convert it (e.g. `t.to(torch.float32)`)"
        )
    return entry


def _torch_data(value: torch.Tensor) -> memoryview:
    flat = value.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    if flat.numel() and flat.stride(0) != 1:  # a size-1 view keeps any stride
        flat = flat.clone(memory_format=torch.contiguous_format)
    raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
    return raw.numpy().data.cast("B")


def _numpy_dtype(value: np.ndarray[Any, Any], path: tuple[str | int, ...]) -> DType:
    entry = numpy_entry(value.dtype)
    if entry is None or entry.numpy is None:
        raise UnsupportedTypeError(
            f"numpy dtype {value.dtype} at {show_path(path)} is not supported by the format; "
            "convert it (e.g. `a.astype(np.float32)`)"
        )
    return entry


def _numpy_data(value: np.ndarray[Any, Any], dtype: DType) -> memoryview:
    little = np.ascontiguousarray(value, dtype=dtype.numpy).reshape(-1)
    return little.view(np.uint8).data.cast("B")


def _storage_key(value: torch.Tensor) -> tuple[Any, ...] | None:
    if value.numel() == 0 or value.is_meta:
        return None
    try:
        base = value.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ("torch", str(value.device), base, value.storage_offset(), value.dtype,
            tuple(value.shape), tuple(value.stride()))


def _numpy_key(value: np.ndarray[Any, Any]) -> tuple[Any, ...] | None:
    if value.size == 0:
        return None
    return ("numpy", value.__array_interface__["data"][0], value.dtype.str,
            value.shape, value.strides)


class Encoder:
    """Turns a tree into a JSON node and the arrays it refers to (no bytes are read:
    :meth:`Array.data` does that, when a writer asks).

    ``storable=False`` describes a tree that holds tensors whose bytes cannot be
    written (meta, sparse: e.g. a legacy file loaded to ``"meta"``); save refuses them.
    """

    def __init__(self, storable: bool = True) -> None:
        self.arrays: dict[str, Array] = {}
        self._storable = storable
        # Arrays hold their source objects until written, so no memory address (used
        # to find shared tensors) is reused meanwhile.
        self._seen: dict[tuple[Any, ...], str] = {}

    def encode(self, value: Any, path: tuple[str | int, ...] = ()) -> Any:
        # bool before int (bool is an int); numpy before float (np.float64 is a float).
        if value is None or type(value) is bool:
            return value
        if isinstance(value, np.generic):
            return {"npscalar": self._add_numpy(np.asarray(value), path)}
        if type(value) is int:
            if value.bit_length() > _SURE_SMALL_BITS and abs(value) >= _TOO_BIG:
                raise UsageError(
                    f"{show_path(path)}: an int of more than {MAX_INT_DIGITS} decimal digits "
                    "cannot be stored (readers parse JSON integers up to that, spec section "
                    "5); store it as a string or a tensor")
            return value
        if type(value) is float:
            return float_node(value)
        if type(value) is str:
            _check_text(value, path, "string")
            return value
        if isinstance(value, torch.Tensor):
            node: dict[str, Any] = {"tensor": self._add_torch(value, path)}
            if value.requires_grad:
                node["requires_grad"] = True
            if isinstance(value, torch.nn.Parameter):
                node["parameter"] = True
            return node
        if type(value) is np.ndarray:
            return {"ndarray": self._add_numpy(value, path)}
        if type(value) in (dict, OrderedDict, list, tuple) and len(path) >= MAX_TREE_DEPTH:
            raise UsageError(f"the tree is nested more than {MAX_TREE_DEPTH} containers deep "
                            f"at {show_path(path[:3])}...; flatten it (e.g. dotted keys)")
        if type(value) in (dict, OrderedDict):
            items = []
            for key, item in value.items():
                if type(key) is str:
                    _check_text(key, path, f"key {key!r}")
                elif type(key) is not int:
                    raise UnsupportedTypeError(
                        f"dict key {key!r} of type {type(key).__qualname__} at {show_path(path)} "
                        "is not supported; keys must be str or int"
                    )
                items.append([key, self.encode(item, (*path, key))])
            node = {"dict": items}
            if type(value) is OrderedDict:
                node["ordered"] = True
            return node
        if type(value) in (list, tuple):
            tag = "list" if type(value) is list else "tuple"
            return {tag: [self.encode(item, (*path, i)) for i, item in enumerate(value)]}
        raise UnsupportedTypeError(
            f"value of type {type(value).__qualname__} at {show_path(path)} cannot be stored "
            "(vgs_ckpt never pickles); supported leaves are None, bool, int, float, str, "
            "torch.Tensor, numpy arrays and scalars, inside dicts, lists and tuples"
        )

    def _name(self, path: tuple[str | int, ...]) -> str:
        name = join_path(path)
        if name in RESERVED_NAMES:
            raise UsageError(
                f"tensor at {show_path(path)} would be named {name!r}, which safetensors "
                "reserves; rename that key"
            )
        if name in self.arrays:
            raise UsageError(
                f"two tensors at {show_path(path)} and another path both map to the tensor "
                f"name {name!r} (an int key and a str key that read the same); rename one key"
            )
        return name

    def _add(self, key: tuple[Any, ...] | None, path: tuple[str | int, ...], dtype: DType,
             value: Any) -> str:
        if key is not None and key in self._seen:
            return self._seen[key]
        if len(value.shape) > MAX_DIMS:
            raise UsageError(f"{show_path(path)}: a tensor of {len(value.shape)} dimensions "
                             f"cannot be stored (at most {MAX_DIMS}, spec section 2)")
        name = self._name(path)
        self.arrays[name] = Array(dtype, tuple(value.shape), value)
        if key is not None:
            self._seen[key] = name
        return name

    def _add_torch(self, value: torch.Tensor, path: tuple[str | int, ...]) -> str:
        dtype = _torch_dtype(value, path, self._storable)
        if (dtype.code == "BOOL" and self._storable and value.numel()
                and int(value.detach().view(torch.uint8).max()) > 1):
            _bad_bool(path)
        return self._add(_storage_key(value), path, dtype, value)

    def _add_numpy(self, value: np.ndarray[Any, Any], path: tuple[str | int, ...]) -> str:
        dtype = _numpy_dtype(value, path)
        if dtype.code == "BOOL" and value.size and int(value.view(np.uint8).max()) > 1:
            _bad_bool(path)
        return self._add(_numpy_key(value), path, dtype, value)


def _bad_bool(path: tuple[str | int, ...]) -> None:
    raise UsageError(f"the bool tensor at {show_path(path)} holds bytes other than 0 and 1 "
                     "(a view of other data as bool); readers refuse them (spec section 2) - "
                     "store `t != 0` instead")


def encode_tree(tree: Mapping[str, Any], *, storable: bool = True
                ) -> tuple[dict[str, Any], dict[str, Array]]:
    """Encode a parameter tree (the root must be a dict): its JSON node, and its arrays
    by tensor name. No tensor bytes are read or copied."""
    if type(tree) not in (dict, OrderedDict):
        raise UnsupportedTypeError(
            f"the parameter tree must be a dict (e.g. model.get_parameters()), "
            f"got {type(tree).__qualname__}"
        )
    encoder = Encoder(storable)
    node = encoder.encode(tree)
    return node, encoder.arrays


class Decoder:
    """Turns a JSON node back into a tree, given ``array(name, kind)`` that returns the
    named array as a torch tensor (kind ``"torch"``) or a numpy array (``"numpy"``)."""

    def __init__(self, array: Callable[[str, str], Any]) -> None:
        self._array = array
        # One object per name and node (tag and flags): every reference that reads the
        # same returns the same object (spec section 5).
        self._leaves: dict[tuple[Any, ...], Any] = {}

    def decode(self, node: Any, path: tuple[str | int, ...] = ()) -> Any:
        if node is None or type(node) in (bool, int, str):
            return node
        if type(node) is not dict or not node:
            raise FormatError(f"malformed tree node at {show_path(path)}: {node!r:.80}")
        _check_members(node, path)
        if len(path) >= MAX_TREE_DEPTH and any(tag in node for tag in CONTAINER_TAGS):
            raise FormatError(f"the tree is nested more than {MAX_TREE_DEPTH} containers deep "
                              f"at {show_path(path[:3])}... (spec section 5)")
        if "dict" in node:
            out: dict[Any, Any] = OrderedDict() if node.get("ordered") is True else {}
            for pair in _list(node["dict"], path):
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in (str, int):
                    raise FormatError(f"malformed dict item at {show_path(path)}: {pair!r:.80}")
                key, child = pair
                if key in out:
                    raise FormatError(f"duplicate key {key!r} at {show_path(path)}")
                out[key] = self.decode(child, (*path, key))
            return out
        if "list" in node or "tuple" in node:
            tag = "list" if "list" in node else "tuple"
            items = [self.decode(c, (*path, i)) for i, c in enumerate(_list(node[tag], path))]
            return items if tag == "list" else tuple(items)
        if "float" in node:
            value = node["float"]
            if type(value) in (int, float):
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
                if math.isinf(number):  # JSON has no infinity: this is an overflow
                    raise FormatError(f"float at {show_path(path)} overflows binary64 "
                                      f"({str(value)[:20]}...); write \"inf\" for infinity")
                return number
            if value in _FLOAT_SPECIALS:
                return _FLOAT_SPECIALS[value]
            raise FormatError(f"malformed float at {show_path(path)}: {value!r:.80}")
        tag = next(t for t in REFERENCE_TAGS if t in node)
        name = _name_of(node[tag], path)
        key = (tag, name, node.get("parameter") is True, node.get("requires_grad") is True)
        if key not in self._leaves:
            if tag == "tensor":
                self._leaves[key] = self.tensor(name, key[2], key[3])
            elif tag == "ndarray":
                self._leaves[key] = self._array(name, "numpy")
            else:
                self._leaves[key] = self.npscalar(name)
        return self._leaves[key]

    def tensor(self, name: str, parameter: bool, requires_grad: bool) -> Any:
        tensor = self._array(name, "torch")
        if requires_grad and not (tensor.is_floating_point() or tensor.is_complex()):
            raise FormatError(f"tensor {name!r} of dtype {tensor.dtype} is marked "
                              "requires_grad, which only floating-point and complex tensors "
                              "can be")
        if parameter:
            return torch.nn.Parameter(tensor, requires_grad=requires_grad)
        return tensor.detach().requires_grad_(True) if requires_grad else tensor

    def npscalar(self, name: str) -> Any:
        array = self._array(name, "numpy")
        self.check_scalar(name, array.shape)
        return array[()]

    @staticmethod
    def check_scalar(name: str, shape: tuple[int, ...]) -> None:
        if tuple(shape):
            raise FormatError(f"an npscalar node refers to tensor {name!r} of shape "
                              f"{list(shape)}; a numpy scalar is a 0-d tensor (shape [])")


_FLAGS = tuple(m for members in GRAMMAR.values() for m, kind in members.items()
               if kind == "flag")


def _check_members(node: dict[str, Any], path: tuple[str | int, ...]) -> None:
    tags = [tag for tag in GRAMMAR if tag in node]
    if len(tags) != 1:
        raise FormatError(f"tree node at {show_path(path)} must have exactly one of "
                        f"{', '.join(GRAMMAR)}, got {sorted(node)}")
    extra = set(node) - set(GRAMMAR[tags[0]])
    if extra:
        raise FormatError(f"{tags[0]} node at {show_path(path)} has unknown members "
                        f"{sorted(extra)}")
    for flag in _FLAGS:
        if flag in node and node[flag] is not True:
            raise FormatError(f"{flag!r} at {show_path(path)} must be true when present, "
                            f"got {node[flag]!r}")


def _list(value: Any, path: tuple[str | int, ...]) -> list[Any]:
    if type(value) is not list:
        raise FormatError(f"malformed tree node at {show_path(path)}: expected a list, "
                        f"got {value!r:.80}")
    return value


def _name_of(value: Any, path: tuple[str | int, ...]) -> str:
    if type(value) is not str:
        raise FormatError(f"malformed tensor reference at {show_path(path)}: {value!r:.80}")
    return value


def dict_items(node: Any) -> list[tuple[Any, Any]]:
    """The ``(key, child)`` pairs of a dict node (empty for any other node; malformed
    pairs are skipped, the decoder reports them)."""
    items = node.get("dict") if type(node) is dict else None
    if type(items) is not list:
        return []
    return [(p[0], p[1]) for p in items if type(p) is list and len(p) == 2]


def _children(node: Any) -> list[Any]:
    if type(node) is list:
        return node
    if type(node) is not dict:
        return []
    found: list[Any] = []
    for tag in CONTAINER_TAGS:
        items = node.get(tag)
        if type(items) is list:
            found += ([p[1] for p in items if type(p) is list and len(p) == 2]
                      if GRAMMAR[tag][tag] == "pairs" else items)
    return found


def references(node: Any) -> list[str]:
    """The tensor names a node refers to, in tree order, each once (malformed nodes
    are left to the decoder to report)."""
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            found += [item[tag] for tag in REFERENCE_TAGS if type(item.get(tag)) is str]
        stack.extend(reversed(_children(item)))
    return list(dict.fromkeys(found))


def check_names(tree: Any, entries: Mapping[str, Any]) -> None:
    """Check spec section 6 against a decoded file: every tensor of the container is
    referenced, and is named by the path of its first reference (depth-first, in the
    order of the encoding).

    Raises:
        FormatError: naming the first tensor that breaks a rule.
    """
    # Each node is walked with the tensor name its path gives (the escaped segments
    # joined), so a reference's expected name is at hand.
    first: dict[str, str] = {}
    stack: list[tuple[Any, str | None]] = [(tree, None)]
    while stack:
        node, name = stack.pop()
        if type(node) is not dict:
            continue
        for tag in REFERENCE_TAGS:
            ref = node.get(tag)
            if type(ref) is str and ref not in first:
                first[ref] = name or ""
                if ref != first[ref]:
                    raise FormatError(f"tensor {ref!r} is first referenced at the path "
                                      f"{first[ref]!r}, so it must be named {first[ref]!r} "
                                      "(spec section 6)")
        prefix = "" if name is None else name + SEPARATOR
        children: list[tuple[Any, str]] = [(child, prefix + escape_key(key))
                                           for key, child in dict_items(node)]
        for tag in ("list", "tuple"):
            if type(node.get(tag)) is list:
                children.extend((child, f"{prefix}{i}") for i, child in enumerate(node[tag]))
        stack.extend(reversed(children))
    unreferenced = [name for name in entries if name not in first]
    if unreferenced:
        raise FormatError(f"tensor {unreferenced[0]!r} is in the file but no tree node "
                          "refers to it (spec section 6)")


def subnode(tree: Any, path: tuple[str | int, ...] | list[str | int]) -> Any:
    """The node at ``path`` (dict keys, list/tuple indices) of an encoded tree.

    Raises:
        KeyError: with the shortest prefix of ``path`` that is not in the tree.
    """
    node = tree
    for depth, key in enumerate(path):
        if type(node) is dict and "dict" in node:
            match = [child for k, child in dict_items(node) if k == key and type(k) is type(key)]
            if match:
                node = match[0]
                continue
        elif type(node) is dict and type(key) is int and ("list" in node or "tuple" in node):
            items = node.get("list", node.get("tuple"))
            if type(items) is list and -len(items) <= key < len(items):
                node = items[key]
                continue
        raise KeyError(tuple(path[:depth + 1]))
    return node


def node_schema(ref: str) -> dict[str, Any]:
    """The JSON Schema of a tree node, generated from :data:`GRAMMAR` (``ref`` is the
    schema's reference to itself)."""
    values = {
        "pairs": {"type": "array", "items": {
            "type": "array", "minItems": 2, "maxItems": 2,
            "prefixItems": [{"type": ["string", "integer"]}, {"$ref": ref}]}},
        "nodes": {"type": "array", "items": {"$ref": ref}},
        "float": {"anyOf": [{"type": "number"}, {"enum": sorted(_FLOAT_SPECIALS)}]},
        "name": {"type": "string"},
        "flag": {"const": True},
    }
    return {
        "description": "A node of the encoded parameter tree (docs/spec.md section 5).",
        "anyOf": [
            {"type": ["null", "boolean", "string", "integer"]},
            *({"type": "object", "required": [tag], "additionalProperties": False,
               "properties": {member: values[kind] for member, kind in members.items()}}
              for tag, members in GRAMMAR.items()),
        ],
    }
