"""A seeded mutation fuzzer for every reader of vgs_ckpt.

Seeds: v2 files (with and without VGS state), zip and non-zip legacy files of every
layout. Mutations: bit flips, byte overwrites, truncations, insertions, header-length
edits, JSON edits inside the safetensors header and inside the ``__metadata__``
header (deep nesting, wrong types, huge numbers, removed keys). Each case goes
through ``load_bytes``, ``detect_format`` and, written to a file, ``load``,
``read_header`` and the CLI's ``verify`` and ``inspect``. The only acceptable outcomes are success
or a ``VgsCkptError``; anything else is an escape.

    python -m tests.fuzz --minutes 10          # a longer campaign
    python -m tests.fuzz --cases 2000 --seed 3

tests/test_fuzz.py runs a bounded slice of it in CI.
"""

from __future__ import annotations

import argparse
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


# --- running ----------------------------------------------------------------------------

@dataclass
class Report:
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    escapes: list[tuple[str, str, str]] = field(default_factory=list)  # (case, entry, traceback)
    slowest: float = 0.0

    def line(self) -> str:
        return (f"{self.cases} cases, {sum(self.outcomes.values())} reader calls: "
                f"{self.outcomes['ok']} loaded, {self.outcomes['error']} clean errors, "
                f"{len(self.escapes)} escapes; slowest case {self.slowest:.2f} s")


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

        for command in ("verify", "inspect"):
            _call(report, case, f"cli {command}", lambda command=command: _cli(command, path))
    report.cases += 1
    report.slowest = max(report.slowest, time.perf_counter() - start)


def fuzz(*, seed: int = 0, cases: int | None = None, seconds: float | None = None,
         progress: Callable[[str], None] | None = None) -> Report:
    """Run ``cases`` mutated files (or as many as fit in ``seconds``)."""
    rng = random.Random(seed)
    log = logging.getLogger("vgs_ckpt")
    level = log.level
    log.setLevel(logging.CRITICAL)  # upgrade notices
    try:
        return _fuzz(rng, seed, cases, seconds, progress)
    finally:
        log.setLevel(level)


def _fuzz(rng: random.Random, seed: int, cases: int | None, seconds: float | None,
          progress: Callable[[str], None] | None) -> Report:
    seeds = seed_files()
    names = sorted(seeds)
    report = Report()
    deadline = time.monotonic() + seconds if seconds is not None else None
    with tempfile.TemporaryDirectory(prefix="vgs_ckpt-fuzz-") as tmp:
        i = 0
        while (cases is None or i < cases) and (deadline is None or time.monotonic() < deadline):
            name = rng.choice(names)
            data = seeds[name]
            kinds = [rng.choice(list(MUTATIONS)) for _ in range(rng.choice((1, 1, 2, 3)))]
            for kind in kinds:
                data = MUTATIONS[kind](data, rng) if data else data
            run_case(data, f"seed={seed} case={i} {name} {'+'.join(kinds)}", Path(tmp), report)
            i += 1
            if progress is not None and i % 500 == 0:
                progress(report.line())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="mutation fuzzer for vgs_ckpt's readers")
    parser.add_argument("--minutes", type=float, help="run this long")
    parser.add_argument("--cases", type=int, help="run this many cases")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.minutes is None and args.cases is None:
        args.cases = 1000
    report = fuzz(seed=args.seed, cases=args.cases,
                  seconds=None if args.minutes is None else args.minutes * 60, progress=print)
    print(report.line())
    for case, entry, trace in report.escapes[:20]:
        print(f"\nESCAPE in {entry}: {case}\n{trace}")
    return 1 if report.escapes else 0


if __name__ == "__main__":
    sys.exit(main())
