"""A seeded fuzzer for every reader of vgs_ckpt: byte mutations and hostile structures.

Seeds: v2 files (with and without VGS state), zip and non-zip legacy files of every
layout. Mutations: bit flips, byte overwrites, truncations, insertions, header-length
edits, JSON edits inside the safetensors header and inside the ``__metadata__``
header (deep nesting, wrong types, huge numbers, removed keys). Each case goes
through ``load_bytes``, ``detect_format`` and, written to a file, ``load``,
``read_header`` and the CLI's ``verify`` and ``inspect``. The only acceptable outcomes are success
or a ``VgsCkptError``; anything else is an escape.

Structured mode (``--structured``) builds files that are wrong in one structural way
each: torch.save payloads of hostile shapes (odd payload and field types, stride-0,
strided and offset views, shared references, broken VGS states), protocol-2 pickles
built opcode by opcode (forbidden and allowed globals, memo references to nothing,
deep stacks), torch zips re-packed with other compressions, duplicate and traversal
names, missing or extra records and decompression bombs, and valid files whose
header has one field, tree node or tensor entry replaced with an out-of-range,
wrong-type or overflowing value. Every case is also checked for ``load(path)``
agreeing with ``load_bytes``, and the campaign reports its time and memory.

    python -m tests.fuzz --minutes 10          # a longer campaign
    python -m tests.fuzz --minutes 10 --structured
    python -m tests.fuzz --cases 2000 --seed 3

tests/test_fuzz.py runs a bounded slice of it in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import random
import re
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vgs_ckpt
from vgs_ckpt import VgsCkptError, cli
from vgs_ckpt.testing import assert_trees_equal

from .conftest import make_member
from .legacy_files import LAYOUTS, payload

_LEN = struct.Struct("<Q")


def seed_files() -> dict[str, bytes]:
    """The files every mutation starts from."""
    member = make_member()
    seeds = {
        "v2": vgs_ckpt.save_bytes(member, step=7, performance=0.5, member_id="m",
                                  hyperparams={"lr": 1e-3}),
        "v2-novgs": vgs_ckpt.save_bytes({**member, "vgs_state": None}, step=1),
        "v1": vgs_ckpt.save_bytes(member["policy"], step=3,
                                  format=vgs_ckpt.CheckpointFormat.V1_POLICY_ONLY),
    }
    for layout in LAYOUTS:
        for zipped in (True, False):
            buffer = io.BytesIO()
            torch.save(payload(layout), buffer, _use_new_zipfile_serialization=zipped)
            seeds[f"legacy-{layout}-{'zip' if zipped else 'nozip'}"] = buffer.getvalue()
    return seeds


# --- mutations ------------------------------------------------------------------------

def _flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _overwrite(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    start = rng.randrange(len(out))
    for i in range(start, min(len(out), start + rng.randint(1, 16))):
        out[i] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    return bytes(out)


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))]


def _insert(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32))) + data[i:]


def _header_length(data: bytes, rng: random.Random) -> bytes:
    if len(data) < 8:
        return data
    (length,) = _LEN.unpack_from(data)
    new = rng.choice((0, 1, length - 1, length + 1, length + 8, len(data), 2**63, 2**64 - 1,
                      rng.randrange(2**32)))
    return _LEN.pack(new % 2**64) + data[8:]


def _split(data: bytes) -> tuple[dict | None, bytes]:
    if len(data) < 8:
        return None, b""
    (length,) = _LEN.unpack_from(data)
    try:
        return json.loads(data[8:8 + length]), data[8 + length:]
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, b""


_DEEP = re.compile(r'"__deep_(\d+)__"')


def _dumps(value: object) -> str:
    """json.dumps, with deep-nesting markers expanded as text (json cannot encode them)."""
    return _DEEP.sub(lambda m: "[" * int(m[1]) + "0" + "]" * int(m[1]), json.dumps(value))


def _join(header: object, rest: bytes) -> bytes:
    raw = _dumps(header).encode()
    return _LEN.pack(len(raw)) + raw + rest


_NASTY = [None, True, -1, 2**70, 1e308, "", "x" * 300, [], {}, [[[]]], {"a": {"b": {}}},
          float("nan"), "v99_future", "v2_full_parameters", "v1_policy_only"]


def _deep(depth: int) -> str:
    return f"__deep_{depth}__"


def _mutate_value(value: object, rng: random.Random) -> object:
    """Replace one node somewhere inside a JSON value."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        out = dict(value)
        action = rng.random()
        if action < 0.15:
            del out[key]
        elif action < 0.25:
            out[key + "_x" if isinstance(key, str) else key] = rng.choice(_NASTY)
        else:
            out[key] = _mutate_value(value[key], rng)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out_list = list(value)
        i = rng.randrange(len(out_list))
        out_list[i] = _mutate_value(out_list[i], rng)
        return out_list
    if rng.random() < 0.1:
        return _deep(rng.choice((100, 600, 1200, 5000, 50000)))
    return rng.choice(_NASTY)


def _json_edit(data: bytes, rng: random.Random) -> bytes:
    header, rest = _split(data)
    if header is None:
        return _flip(data, rng)
    return _join(_mutate_value(header, rng), rest)


def _metadata_edit(data: bytes, rng: random.Random) -> bytes:
    """Edit the vgs_ckpt header JSON inside ``__metadata__`` (kept a valid container)."""
    header, rest = _split(data)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        return _json_edit(data, rng)
    key = rng.choice(list(meta))
    try:
        inner = json.loads(meta[key])
    except (ValueError, RecursionError, TypeError):
        inner = meta[key]
    mutated = _mutate_value(inner, rng)
    meta = {**meta, key: _dumps(mutated) if rng.random() < 0.9 else str(mutated)}
    return _join({**header, "__metadata__": meta}, rest)


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip": _flip, "overwrite": _overwrite, "truncate": _truncate, "insert": _insert,
    "header-length": _header_length, "json": _json_edit, "metadata-json": _metadata_edit,
}


# --- hostile structures ------------------------------------------------------------------
# Not byte mutations of valid files: files built to be wrong in one structural way each,
# the way an attacker (or an unlucky tool) makes them.

def _torch_bytes(obj: object, zipped: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zipped)
    return buffer.getvalue()


def _odd_tensor(rng: random.Random) -> torch.Tensor:
    base = torch.arange(24.0)
    return rng.choice([
        lambda: torch.zeros(1).expand(rng.choice((10, 10**6, 10**9))),  # stride 0
        lambda: base[::rng.randint(1, 5)],                                # strided
        lambda: base.view(4, 6).t(),                                      # non-contiguous
        lambda: base[3:9],                                                # offset view
        lambda: torch.zeros(0, 3),
        lambda: torch.tensor(rng.choice((1, 1.5, True))),                 # 0-d
        lambda: torch.ones(2, dtype=rng.choice((torch.int8, torch.bfloat16, torch.float16,
                                                torch.complex64, torch.bool, torch.uint8))),
        lambda: torch.nn.Parameter(torch.ones(2)),
        lambda: torch.ones(1, 1, 1, 1, 1, 1, 1, 1),
    ])()


def _odd_value(rng: random.Random, depth: int = 0) -> object:
    choices: list[Callable[[], object]] = [
        lambda: None, lambda: rng.choice((True, 0, -1, 2**64, 10**400, 1e308)),
        lambda: float(rng.choice(("nan", "inf", "-inf"))), lambda: "x" * rng.randint(0, 50),
        lambda: b"bytes", lambda: 1 + 2j, lambda: _odd_tensor(rng),
        lambda: (1, (2, (3,))), lambda: {1, 2}, lambda: {rng.randint(0, 3): 1, "0": 2},
    ]
    if depth < 4:
        choices += [lambda: [_odd_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                    lambda: {f"k{i}": _odd_value(rng, depth + 1) for i in range(3)}]
    return rng.choice(choices)()


def _shared(rng: random.Random) -> object:
    node: object = [torch.ones(1)]
    for _ in range(rng.choice((5, 20, 40, 60))):
        node = [node, node] if rng.random() < 0.8 else {"a": node, "b": node}
    return node


def _legacy_structure(rng: random.Random) -> tuple[str, bytes]:
    """A torch.save file with a payload of a hostile shape."""
    member = make_member()
    kind = rng.choice(["payload-type", "field-type", "odd-tensors", "shared", "vgs", "root"])
    fmt = rng.choice(["v1_policy_only", "v2_full_parameters", "v3_future", 7, None])
    if kind == "payload-type":
        obj: object = {"format_version": fmt, "data": _odd_value(rng), "step": 1}
    elif kind == "field-type":
        obj = {"format_version": fmt, "data": member,
               rng.choice(["step", "performance", "has_optimizer_state"]): _odd_value(rng)}
    elif kind == "odd-tensors":
        obj = {"format_version": "v2_full_parameters",
               "data": {**member, "extra": [_odd_tensor(rng) for _ in range(3)]}}
    elif kind == "shared":
        obj = {"format_version": "v2_full_parameters", "data": {**member, "x": _shared(rng)}}
    elif kind == "vgs":
        vgs = dict(member["vgs_state"])
        vgs[rng.choice(list(vgs))] = _odd_value(rng)
        obj = {"format_version": "v2_full_parameters", "data": {**member, "vgs_state": vgs}}
    else:
        obj = _odd_value(rng)
    try:
        return f"legacy-{kind}", _torch_bytes(obj, rng.random() < 0.7)
    except Exception:  # torch.save itself refuses some of these (sets, bytes)
        return f"legacy-{kind}", _torch_bytes({"w": torch.ones(1)}, True)


_FORBIDDEN_GLOBALS = [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"),
                      ("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict"),
                      ("torch", "FloatStorage"), ("torch._utils", "_rebuild_parameter"),
                      ("builtins", "getattr"), ("torch.nn.modules.linear", "Linear")]


def _pickle_structure(rng: random.Random) -> tuple[str, bytes]:
    """A protocol-2 pickle built opcode by opcode: globals (allowed and not), calls with
    wrong arguments, memo references to nothing, deep stacks, truncation."""
    ops = [b"\x80\x02"]
    magic = rng.random() < 0.5
    if magic:  # torch's legacy container: magic number, protocol, sys info, then data
        ops = [b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."]
        ops.append(b"\x80\x02M\xe9\x03.")
        ops.append(b"\x80\x02}q\x00.")
        ops.append(b"\x80\x02")
    for _ in range(rng.randint(1, 12)):
        choice = rng.random()
        if choice < 0.3:
            module, name = rng.choice(_FORBIDDEN_GLOBALS)
            ops.append(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
        elif choice < 0.45:
            ops.append(rng.choice([b")", b"(", b"t", b"R", b"0", b"2", b"e", b"a", b"s", b"u"]))
        elif choice < 0.6:
            ops.append(b"h" + bytes([rng.randrange(256)]))  # a memo GET, maybe of nothing
        elif choice < 0.75:
            ops.append(b"q" + bytes([rng.randrange(256)]))  # memo PUT
        elif choice < 0.9:
            ops.append(rng.choice([b"}", b"]", b"N", b"\x88", b"K\x05", b"X\x01\x00\x00\x00a"]))
        else:
            ops.append(b"(" * rng.choice((10, 1000, 100_000)))
    if rng.random() < 0.8:
        ops.append(b".")
    return "pickle-opcodes", b"".join(ops)


def _zip_structure(rng: random.Random) -> tuple[str, bytes]:
    """A torch zip re-packed in a hostile way: other compression, duplicate or traversal
    names, records missing or added, a decompression bomb."""
    import zipfile
    source = _torch_bytes(payload(rng.choice(LAYOUTS)), True)
    with zipfile.ZipFile(io.BytesIO(source)) as old:
        records = [(info.filename, old.read(info)) for info in old.infolist()]
    kind = rng.choice(["compression", "duplicate", "traversal", "missing", "extra", "bomb",
                       "order"])
    method = rng.choice([zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA,
                         zipfile.ZIP_STORED])
    if kind == "duplicate":
        records.append(rng.choice(records))
    elif kind == "traversal":
        name, data = records[rng.randrange(len(records))]
        records.append(("../" * rng.randint(1, 5) + name.split("/")[-1], data))
    elif kind == "missing":
        records.pop(rng.randrange(len(records)))
    elif kind == "extra":
        records.insert(rng.randrange(len(records) + 1), ("archive/data/999", bytes(64)))
    elif kind == "bomb":
        records.append(("archive/data/0", bytes(rng.choice((10, 40, 120)) * 1024 * 1024)))
        method = zipfile.ZIP_DEFLATED
    elif kind == "order":
        rng.shuffle(records)
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(out, "w", method) as new:
            for name, data in records:
                new.writestr(name, data)
    return f"zip-{kind}", out.getvalue()


_HEADER_VALUES = [None, True, -1, 0, 2**63, 2**64, 10**400, 1.5, 1e308, float("nan"), "",
                  "x" * 200, "\ud800", [], {}, [1], {"a": 1}, "0001-01-01T00:00:00+23:59",
                  "9999-12-31T23:59:59-23:59", "1700000000", 1700000000, "\x00\x1b[31m"]


def _header_structure(rng: random.Random) -> tuple[str, bytes]:
    """A valid file whose vgs_ckpt header has one field (or one tree node, or one
    tensor entry) replaced with an out-of-range, wrong-type or overflowing value; the
    tensors' digests stay valid."""
    member = make_member()
    tree = {**member, "a": __import__("numpy").zeros(2), "f": 1.5, "i": torch.arange(3),
            "e": torch.zeros(0, 2)}
    data = vgs_ckpt.save_bytes(tree, step=7, performance=0.5, member_id="m",
                               hyperparams={"lr": 1e-3})
    (length,) = _LEN.unpack_from(data)
    outer = json.loads(data[8:8 + length])
    inner = json.loads(outer["__metadata__"]["vgs_ckpt.header"])
    target = rng.choice(["field", "vgs", "tree", "tensor-info", "entry"])
    if target == "field":
        inner[rng.choice(list(inner))] = rng.choice(_HEADER_VALUES)
    elif target == "vgs" and isinstance(inner.get("vgs"), dict):
        inner["vgs"][rng.choice(list(inner["vgs"]))] = rng.choice(_HEADER_VALUES)
    elif target == "tree":
        pairs = inner["tree"]["dict"]
        i = rng.randrange(len(pairs))
        node = pairs[i][1]
        pairs[i][1] = rng.choice([
            {"float": rng.choice([10**400, 1e308, "nan", "Infinity", None])},
            {**node, "requires_grad": True} if isinstance(node, dict) else node,
            {**node, "parameter": True} if isinstance(node, dict) else node,
            {"npscalar": rng.choice(list(inner["tensors"]))},
            {"ndarray": rng.choice(list(inner["tensors"]))},
            {"tensor": "nope"}, {"dict": [[1, None], ["1", None]]}, {"list": 5},
            rng.choice(_HEADER_VALUES)])
    else:
        name = rng.choice([k for k in outer if k != "__metadata__"])
        shape = rng.choice([[1] * 65, [0, 2**64], [2**62, 2**62], [-1], [1.5], "3", None])
        if target == "tensor-info":
            inner["tensors"][name][rng.choice(["shape", "dtype"])] = shape
        else:
            outer[name]["shape"] = shape
            inner["tensors"][name]["shape"] = shape
    with contextlib.suppress(ValueError):  # an int json cannot write: keep the file valid
        outer["__metadata__"]["vgs_ckpt.header"] = json.dumps(inner)
    text = json.dumps(outer).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return f"header-{target}", _LEN.pack(len(text)) + text + data[8 + length:]


STRUCTURES: dict[str, Callable[[random.Random], tuple[str, bytes]]] = {
    "legacy": _legacy_structure, "pickle": _pickle_structure, "zip": _zip_structure,
    "header": _header_structure,
}


# --- running ----------------------------------------------------------------------------

@dataclass
class Report:
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    escapes: list[tuple[str, str, str]] = field(default_factory=list)  # (case, entry, traceback)
    slowest: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    start_mb: int = 0
    peak_mb: int = 0  # growth of the process's peak memory over the campaign

    def line(self) -> str:
        return (f"{self.cases} cases, {sum(self.outcomes.values())} reader calls: "
                f"{self.outcomes['ok']} loaded, {self.outcomes['error']} clean errors, "
                f"{len(self.escapes)} escapes; slowest case {self.slowest:.2f} s; peak "
                f"memory +{self.peak_mb} MB")


def _call(report: Report, case: str, entry: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except VgsCkptError as exc:
        if not str(exc):
            report.escapes.append((case, entry, f"{type(exc).__name__} with no message"))
        else:
            report.outcomes["error"] += 1
        return
    except Exception:
        report.escapes.append((case, entry, traceback.format_exc(limit=6)))
        return
    report.outcomes["ok"] += 1


def _cli(command: str, path: Path) -> None:
    """``vgs-ckpt COMMAND PATH`` must end with exit status 0 or 1, never a traceback."""
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main([command, str(path)])
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    if code not in (0, 1) or "Traceback" in err.getvalue():
        raise AssertionError(f"vgs-ckpt {command} exited {code}: {err.getvalue()}")


def _outcome(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as exc:
        return exc


def _agree(report: Report, case: str, path: Path, data: bytes) -> None:
    """``load(path)`` and ``load_bytes`` of the same bytes end the same way: the same
    error class, or equal trees."""
    by_path = _outcome(lambda: vgs_ckpt.load(path, upgrade=False))
    by_bytes = _outcome(lambda: vgs_ckpt.load_bytes(data, upgrade=False))
    if isinstance(by_path, Exception) or isinstance(by_bytes, Exception):
        if type(by_path) is not type(by_bytes):
            report.escapes.append((case, "load vs load_bytes",
                                   f"load(path): {by_path!r:.200}\nload_bytes: {by_bytes!r:.200}"))
        return
    try:
        assert_trees_equal(by_path.parameters, by_bytes.parameters)  # type: ignore[union-attr]
    except AssertionError as exc:
        report.escapes.append((case, "load vs load_bytes", f"different trees: {exc}"))


def peak_mb() -> int:
    """This process's peak resident memory so far, in MB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            line = next(x for x in status if x.startswith("VmHWM"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) // 1024


def run_case(data: bytes, case: str, directory: Path, report: Report) -> None:
    start = time.perf_counter()
    path = directory / "case.bin"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _call(report, case, "load_bytes", lambda: vgs_ckpt.load_bytes(data))
        _call(report, case, "detect_format(bytes)", lambda: vgs_ckpt.detect_format(data))
        _call(report, case, "load", lambda: vgs_ckpt.load(path))
        _call(report, case, "read_header", lambda: vgs_ckpt.read_header(path))
        _call(report, case, "load(upgrade=False)", lambda: vgs_ckpt.load(path, upgrade=False))
        _call(report, case, "open", lambda: vgs_ckpt.open(path).load())
        _agree(report, case, path, data)

        for command in ("verify", "inspect"):
            _call(report, case, f"cli {command}", lambda command=command: _cli(command, path))
    report.cases += 1
    report.slowest = max(report.slowest, time.perf_counter() - start)


def fuzz(*, seed: int = 0, cases: int | None = None, seconds: float | None = None,
         progress: Callable[[str], None] | None = None, structured: bool = False) -> Report:
    """Run ``cases`` mutated files (or as many as fit in ``seconds``); with
    ``structured``, files built as hostile structures instead (:data:`STRUCTURES`)."""
    rng = random.Random(seed)
    log = logging.getLogger("vgs_ckpt")
    level = log.level
    log.setLevel(logging.CRITICAL)  # upgrade notices
    try:
        return _fuzz(rng, seed, cases, seconds, progress, structured)
    finally:
        log.setLevel(level)


def _fuzz(rng: random.Random, seed: int, cases: int | None, seconds: float | None,
          progress: Callable[[str], None] | None, structured: bool) -> Report:
    seeds = seed_files()
    names = sorted(seeds)
    report = Report(start_mb=peak_mb())
    deadline = time.monotonic() + seconds if seconds is not None else None
    with tempfile.TemporaryDirectory(prefix="vgs_ckpt-fuzz-") as tmp:
        i = 0
        while (cases is None or i < cases) and (deadline is None or time.monotonic() < deadline):
            if structured:
                kind = rng.choice(list(STRUCTURES))
                name, data = STRUCTURES[kind](rng)
                label = f"seed={seed} case={i} structure {name}"
            else:
                name = rng.choice(names)
                data = seeds[name]
                kinds = [rng.choice(list(MUTATIONS)) for _ in range(rng.choice((1, 1, 2, 3)))]
                for kind in kinds:
                    data = MUTATIONS[kind](data, rng) if data else data
                label = f"seed={seed} case={i} {name} {'+'.join(kinds)}"
            report.kinds[name.split(" ")[0]] += 1
            run_case(data, label, Path(tmp), report)
            report.peak_mb = max(report.peak_mb, peak_mb() - report.start_mb)
            i += 1
            if progress is not None and i % 500 == 0:
                progress(report.line())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mutation fuzzer for vgs_ckpt's readers")
    parser.add_argument("--minutes", type=float, help="run this long")
    parser.add_argument("--cases", type=int, help="run this many cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structured", action="store_true",
                        help="hostile structures instead of byte mutations")
    args = parser.parse_args(argv)
    if args.minutes is None and args.cases is None:
        args.cases = 1000
    report = fuzz(seed=args.seed, cases=args.cases, structured=args.structured,
                  seconds=None if args.minutes is None else args.minutes * 60, progress=print)
    print(report.line())
    print("by kind:", dict(sorted(report.kinds.items())))
    for case, entry, trace in report.escapes[:20]:
        print(f"\nESCAPE in {entry}: {case}\n{trace}")
    return 1 if report.escapes else 0


if __name__ == "__main__":
    sys.exit(main())
