"""Run the library against the conformance vectors: ``python -m vgs_ckpt.conformance [DIR]``.

``DIR`` (default ``conformance``) holds ``manifest.json`` and the vector files that
``conformance/generate.py`` writes. Each vector is read twice, as any reader of
``docs/spec.md`` can: as stored (``load(path, upgrade=False)``) and upgraded to the
latest format (``load(path)``). The outcome of each read, ``ok`` or the error class of
spec section 13, must be the manifest's; for ``ok`` the header and the decoded tree,
in the JSON form below, must be the manifest's too. Nothing else is compared, so an
implementation in another language can use the manifest without Python.

The decoded-tree form (spec appendix B) is the tree encoding of spec section 5 with
each tensor reference replaced by what the reader returns:

- ``null``, booleans, strings and integers as themselves; a float as
  ``{"float": F}`` (``F`` a JSON number, or ``"nan"``, ``"inf"``, ``"-inf"``);
- ``{"dict": [[key, node], ...]}`` (plus ``"ordered": true``), ``{"list": [...]}``,
  ``{"tuple": [...]}``;
- a torch tensor as ``{"tensor": {"dtype": CODE, "shape": [...], "hex": BYTES},
  "object": N}`` plus ``"requires_grad": true`` and ``"parameter": true`` when they
  hold; a numpy array as ``{"ndarray": {...}, "object": N}``; a numpy scalar as
  ``{"npscalar": {...}}``. ``BYTES`` is the value's bytes in C order, little-endian,
  as lowercase hex; ``N`` numbers the distinct tensor and array objects in the order
  they are first met (depth first), so two leaves with one ``N`` are one object.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vgs_ckpt._dtypes import BY_TORCH, numpy_entry
from vgs_ckpt._header import header_data
from vgs_ckpt._tree import Array, float_node
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import VgsCkptError
from vgs_ckpt.loading import load

__all__ = ["Disagreement", "header_form", "main", "outcome", "run", "tree_form"]

# Header members compared (the tree and tensor index are compared through the tree form;
# a legacy file's created_at is its modification time, so it is not compared).
HEADER_MEMBERS = ("format_version", "step", "performance", "member_id", "producer",
                  "created_at", "provenance", "has_optimizer_state", "hyperparams",
                  "lineage", "vgs")


def tree_form(value: Any) -> Any:
    """``value`` (a decoded tree, or the tree given to ``save``) in the decoded-tree form."""
    ids: dict[int, int] = {}
    keep: list[Any] = []  # the objects numbered, alive until the end (ids are addresses)

    def number(obj: Any) -> int:
        if id(obj) not in ids:
            ids[id(obj)] = len(ids)
            keep.append(obj)
        return ids[id(obj)]

    def form(item: Any) -> Any:
        if item is None or type(item) in (bool, int, str):
            return item
        if type(item) is float:
            return float_node(item)
        if isinstance(item, np.generic):
            return {"npscalar": _array_form(np.asarray(item))}
        if isinstance(item, torch.Tensor):
            node: dict[str, Any] = {"tensor": _array_form(item), "object": number(item)}
            if item.requires_grad:
                node["requires_grad"] = True
            if isinstance(item, torch.nn.Parameter):
                node["parameter"] = True
            return node
        if type(item) is np.ndarray:
            return {"ndarray": _array_form(item), "object": number(item)}
        if isinstance(item, dict):
            found: dict[str, Any] = {"dict": [[k, form(v)] for k, v in item.items()]}
            if type(item) is OrderedDict:
                found["ordered"] = True
            return found
        if type(item) in (list, tuple):
            return {"list" if type(item) is list else "tuple": [form(v) for v in item]}
        raise TypeError(f"no decoded-tree form for {type(item).__qualname__}")

    return form(value)


def _array_form(value: Any) -> dict[str, Any]:
    """A tensor's or array's dtype, shape and bytes (C order, little-endian, as a writer
    stores them: :meth:`vgs_ckpt._tree.Array.data`)."""
    if isinstance(value, torch.Tensor):
        dtype = BY_TORCH[value.dtype]
    else:
        found = numpy_entry(value.dtype)
        if found is None or found.numpy is None:
            raise TypeError(f"no decoded-tree form for numpy dtype {value.dtype}")
        dtype = found
    shape = tuple(value.shape)
    return {"dtype": dtype.code, "shape": list(shape),
            "hex": bytes(Array(dtype, shape, value).data()).hex()}


def header_form(checkpoint: Checkpoint) -> dict[str, Any]:
    """The header members that the manifest records, as JSON (a legacy file's
    ``created_at`` and ``producer`` are left out: they describe the reading)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a salvaged VGS summary holds what the file held
        data = header_data(checkpoint.header, repr)
    members = [m for m in HEADER_MEMBERS
               if checkpoint.container == "safetensors" or m not in ("created_at", "producer")]
    return {m: data[m] for m in members if m in data}


@dataclass(frozen=True)
class Outcome:
    result: str  # "ok" or an error class name
    checkpoint: Checkpoint | None
    warnings: tuple[str, ...]
    message: str = ""

    def record(self) -> dict[str, Any]:
        """The outcome as the manifest records it."""
        found: dict[str, Any] = {"result": self.result}
        if self.warnings:
            found["warnings"] = list(self.warnings)
        if self.checkpoint is not None:
            found["header"] = header_form(self.checkpoint)
            found["tree"] = tree_form(self.checkpoint.parameters)
        return found


def outcome(read: Callable[[], Checkpoint]) -> Outcome:
    """What one read gives: ``ok`` and the checkpoint, or the error class's name."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            checkpoint = read()
        except VgsCkptError as exc:
            return Outcome(type(exc).__name__, None, (), str(exc))
    names = tuple(dict.fromkeys(w.category.__name__ for w in caught
                                if w.category.__module__.startswith("vgs_ckpt")))
    return Outcome("ok", checkpoint, names)


@dataclass(frozen=True)
class Disagreement:
    file: str
    read: str  # "stored" or "upgraded"
    expected: Any
    found: Any
    message: str


def canonical(value: Any) -> str:
    """JSON text for comparing forms: sorted members, NaN and -0.0 as they are."""
    return json.dumps(value, sort_keys=True, allow_nan=True)


def check_vector(directory: Path, entry: dict[str, Any]) -> list[Disagreement]:
    """The disagreements between the library and one manifest entry."""
    path = str(directory / entry["file"])
    found = []
    for read, upgrade in (("stored", False), ("upgraded", True)):
        expected = entry[read]
        got = outcome(lambda upgrade=upgrade: load(path, upgrade=upgrade))  # type: ignore[misc]
        record = got.record()
        if canonical(record) != canonical(expected):
            found.append(Disagreement(entry["file"], read, expected, record, got.message))
    return found


def run(directory: str | Path = "conformance") -> tuple[int, list[Disagreement]]:
    """Check every vector of ``directory``'s manifest: the number of vectors, and every
    disagreement found."""
    root = Path(directory)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    disagreements: list[Disagreement] = []
    for entry in manifest["vectors"]:
        disagreements += check_vector(root, entry)
    return len(manifest["vectors"]), disagreements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vgs_ckpt.conformance",
        description="Check this library against the conformance vectors of docs/spec.md: "
                    "each vector is loaded as stored and upgraded, and the outcome (ok, "
                    "or the error class), header and decoded tree must be the manifest's.")
    parser.add_argument("directory", nargs="?", default="conformance",
                        help="the folder with manifest.json (default: ./conformance)")
    args = parser.parse_args(argv)
    if not (Path(args.directory) / "manifest.json").is_file():
        print(f"error: {args.directory}/manifest.json not found; give the conformance "
              "folder of a vgs_ckpt checkout (or run conformance/generate.py)",
              file=sys.stderr)
        return 2
    count, disagreements = run(args.directory)
    for d in disagreements:
        print(f"FAIL {d.file} ({d.read}): expected {canonical(d.expected)[:300]}\n"
              f"     found    {canonical(d.found)[:300]}"
              f"{chr(10) + '     ' + d.message[:300] if d.message else ''}")
    failed = len({d.file for d in disagreements})
    print(f"{count} vectors: {count - failed} agree, {failed} disagree")
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
