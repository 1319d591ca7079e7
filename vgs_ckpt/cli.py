"""The vgs-ckpt command line: demo, inspect, verify, upgrade, migrate, sweep, schema."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vgs_ckpt import loading, reader
from vgs_ckpt._dtypes import BY_CODE
from vgs_ckpt._header import header_data
from vgs_ckpt.errors import UsageError, VgsCkptError
from vgs_ckpt.pbt.store import unreadable_checkpoints
from vgs_ckpt.schema import missing_schemas, schema_drift, write_schemas
from vgs_ckpt.storage import LocalStorage, resolve
from vgs_ckpt.storage.local import MIN_TEMP_AGE
from vgs_ckpt.storage.objects import MIN_UPLOAD_AGE
from vgs_ckpt.upgrades.files import upgrade_files

__all__ = ["main"]


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` flags as fsspec storage_options: a dotted key
    nests (``client_kwargs.endpoint_url=...``); ``true``/``false``/numbers are parsed."""
    pairs = getattr(args, "storage_option", None) or []
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--storage-option {pair!r}: expected KEY=VALUE (for example "
                             "client_kwargs.endpoint_url=http://127.0.0.1:9000)")
        value = _value(raw)
        *parents, leaf = name.split(".")
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--storage-option {pair!r}: {part!r} is already a value")
            node = child
        node[leaf] = value
    return options


def _value(raw: str) -> Any:
    """A flag's value: a bool, an int, a finite float, or the string itself."""
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            continue
        return value if math.isfinite(value) else raw
    return raw


def _describe(path: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    # The file as it is: a vgs_ckpt header is read once (no tensor bytes), a legacy
    # pickle is unpickled once (weights_only).
    with reader.open(path, verify=False, storage_options=options) as opened:
        header, container = opened.header, opened.container
        model = _sb3_model(opened)
    info: dict[str, Any] = {"path": path, "container": container,
                            "format": header.format_version.value,
                            "header": json.loads(json.dumps(
                                {k: v for k, v in header_data(header, _shown).items()
                                 if k != "tree"}, default=_shown))}
    if model is not None:
        info["sb3_model"] = model
    info["tensors"] = [{"name": name, "dtype": t.dtype, "shape": t.shape,
                        "bytes": BY_CODE[t.dtype].nbytes(t.shape)}
                       for name, t in header.tensors.items()]
    return info


def _shown(value: Any) -> Any:
    """How a value the header cannot hold as JSON is shown (a legacy file read as
    stored may carry a tensor where a VGS setting belongs)."""
    if isinstance(value, torch.Tensor):
        return f"<tensor {value.dtype} {tuple(value.shape)}>"
    return repr(value)


def _sb3_model(opened: reader.CheckpointReader) -> dict[str, Any] | None:
    """What ``sb3.save`` recorded of the model (its "sb3_model" part), for display."""
    try:
        keys = opened.keys()
    except VgsCkptError:
        return None
    if "sb3_model" not in keys:
        return None
    try:
        description = opened.load(("sb3_model",))
        if not isinstance(description, dict):
            return None
        return {key: description.get(key) for key in
                ("algorithm", "policy_class", "observation_space", "action_space", "versions")}
    except VgsCkptError:
        return None


def _space(space: Any) -> str:
    if not isinstance(space, dict):
        return repr(space)
    kind = space.get("type")
    if kind == "Box":
        return f"Box({','.join(map(str, space.get('shape', [])))},) {space.get('dtype')}"
    if kind == "Discrete":
        return f"Discrete({space.get('n')})"
    if kind == "MultiDiscrete":
        return f"MultiDiscrete({space.get('nvec')})"
    if kind == "MultiBinary":
        return f"MultiBinary({space.get('n')})"
    if kind == "Dict":
        inner = ", ".join(f"{k}: {_space(v)}" for k, v in (space.get("spaces") or {}).items())
        return f"Dict({inner})"
    return str(kind)


def _inspect(args: argparse.Namespace) -> int:
    info = _describe(args.path, _options(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    head = info["header"]
    total = sum(t["bytes"] for t in info["tensors"])
    print(f"file         {_safe(info['path'])}")
    print(f"container    {info['container']}")
    print(f"format       {info['format']}")
    print(f"step         {head['step']}")
    print(f"performance  {head['performance']}")
    print(f"member       {_safe(head.get('member_id'))}")
    if info["container"] == "safetensors":
        print(f"producer     {_safe(head['producer']['name'])} "
              f"{_safe(head['producer']['version'])}")
        print(f"created      {head['created_at']}")
    else:
        print("producer     the original scheduler's torch.save (a legacy file records no "
              "producer version)")
        print(f"modified     {head['created_at']} (the file's time; a legacy file records "
              "none)")
    provenance = head.get("provenance")
    if provenance:
        steps = ", ".join(provenance.get("applied_steps") or []) or "none"
        vgs_from = provenance.get("original_vgs_version")
        print(f"history      first written as {provenance['original_format']} in a "
              f"{provenance['original_container']} file"
              + (f" with VGS {vgs_from}" if vgs_from else "")
              + f"; upgrade steps: {steps}"
              + ("; it had no VGS state" if provenance.get("vgs_state_absent") else ""))
        if provenance.get("legacy"):
            print(f"legacy       {_safe(json.dumps(provenance['legacy']))[:300]} (values the "
                  "upgrade dropped or recorded)")
    if head.get("hyperparams"):
        print(f"hyperparams  {json.dumps(head['hyperparams'])}")
    source = (head.get("lineage") or {}).get("exploited_from")
    if source:
        print(f"exploited    from member {_safe(source['member_id'])} at step {source['step']} "
              f"(performance {source['performance']})")
    vgs = head.get("vgs")
    if vgs:
        print(f"vgs          version {vgs['vgs_version']}, step_count {vgs['step_count']}, "
              f"beta {vgs['beta']}, alpha {vgs['alpha']}, warmup {vgs['warmup_steps']}, "
              f"enabled {vgs['enabled']}, per-parameter EMAs "
              f"{'yes' if vgs['param_grad_mean_ema'] else 'no'}")
    elif info["format"] == "v2_full_parameters":
        print("vgs          none")
    model = info.get("sb3_model")
    if model:
        policy = model.get("policy_class")
        policy = policy.get("$class", policy) if isinstance(policy, dict) else policy
        print(f"sb3 model: {model.get('algorithm')}, policy {policy}")
        print(f"  observation space: {_space(model.get('observation_space'))}")
        print(f"  action space: {_space(model.get('action_space'))}")
    print(f"tensors      {len(info['tensors'])}, {_human(total)}")
    print()
    rows = [[_safe(t["name"]), t["dtype"], "x".join(map(str, t["shape"])) or "()",
             _human(t["bytes"])] for t in info["tensors"]]
    print(_table(rows, ["name", "dtype", "shape", "bytes"]))
    return 0


def _verify(args: argparse.Namespace) -> int:
    ckpt = loading.load(args.path, verify=True, upgrade=False, storage_options=_options(args))
    count = len(ckpt.header.tensors)
    if ckpt.container != "safetensors":
        print(f"OK {_safe(args.path)}: a legacy {ckpt.container} file (torch.save, "
              f"{ckpt.format.value}); it has no digests, so nothing could be verified: it "
              f"was read safely (weights_only) and its {count} tensors decoded. Convert it "
              "with `vgs-ckpt upgrade` to get digests")
        return 0
    print(f"OK {_safe(args.path)}: {ckpt.format.value}, {count} tensors verified against "
          "their digests; the header was checked against the spec, but no digest covers it "
          "(an edited step or hyperparameter that stays valid is not detected: spec section 7)")
    return 0


def _safe(text: Any) -> str:
    """``text`` with control and other unprintable characters escaped (``\\n``,
    ``\\x1b``), so that a hostile name cannot rewrite the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in str(text))


class _Progress:
    """A progress bar on stderr: redrawn in place on a terminal, every 10% otherwise."""

    MIN_FILES = 5

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = -1

    def __call__(self, done: int, total: int, current: Path) -> None:
        if total < self.MIN_FILES:
            return
        width = 30
        filled = width * done // total
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {current.name}"
        if self._tty:
            end = "\n" if done == total else ""
            print(f"\r{line[:100]:<100}", end=end, file=sys.stderr, flush=True)
        elif done * 10 // total != self._last:
            self._last = done * 10 // total
            print(line, file=sys.stderr, flush=True)


def _upgrade(args: argparse.Namespace) -> int:
    results = upgrade_files(args.paths, out=args.out, in_place=args.in_place,
                            dry_run=args.dry_run, progress=_Progress(),
                            storage_options=_options(args))
    if not results:
        print("no checkpoint files found", file=sys.stderr)
        return 1
    rows = [[str(r.source), r.original, r.final, ", ".join(r.steps) or "-",
             _target(r.source, r.target, args.out) if not r.failed else "-",
             ("failed (below)" if r.failed else r.result)
             + (f" (backup {_basename(r.backup)})" if r.backup else "")]
            for r in results]
    print(_table(rows, ["file", "from", "to", "steps applied",
                        f"written to (in {args.out})" if args.out else "written to",
                        "result"]))
    _failures([(str(r.source), r.result) for r in results if r.failed])
    failed = sum(r.failed for r in results)
    print(f"\n{_count(len(results), 'file')}: {len(results) - failed} ok, {failed} failed"
          + (" (dry run: nothing written)" if args.dry_run else ""))
    return 1 if failed else 0


def _target(source: Path | str, target: Path | str | None, out: str | None) -> str:
    """Where an upgraded file went: below ``out`` (relative), in place, or nowhere."""
    if target is None:
        return "-"
    if str(target) == str(source):
        return "in place"
    if out is not None and str(target).startswith(str(out).rstrip("/") + "/"):
        return str(target)[len(str(out).rstrip("/")) + 1:]
    return str(target)


def _failures(failures: list[tuple[str, str]]) -> None:
    """Each failure's message under the table, so that one long message does not widen
    every row."""
    for name, result in failures:
        print(f"\n{_safe(name)}:\n  {_safe(result.removeprefix('failed: '))}")


def _migrate(args: argparse.Namespace) -> int:
    from vgs_ckpt.pbt.migrate import migrate_population

    items = migrate_population(args.source, args.dest, dry_run=args.dry_run,
                               progress=_Progress())
    if not items:
        print(f"{args.source} is empty: nothing to migrate", file=sys.stderr)
        return 1
    rows = [[i.source.name, i.member_id or "-", "-" if i.step is None else str(i.step),
             i.layout or ("-" if i.format is None else "vgs_ckpt"),
             ", ".join(i.steps) or "-",
             str(i.destination.relative_to(args.dest)) if i.destination else "-",
             "failed (below)" if i.failed else i.result]
            for i in items]
    print(_table(rows, ["file", "member", "step", "layout", "steps applied",
                        f"in {args.dest}", "result"]))
    for item in items:
        if item.note:
            print(f"note: {_safe(item.source.name)}: {item.note}")
    _failures([(str(i.source), i.result) for i in items if i.failed])
    done = [i for i in items if i.destination is not None]
    failed = sum(i.failed for i in items)
    skipped = sum(i.skipped for i in items)
    members = sorted({i.member_id for i in done if i.member_id})
    verb = "would migrate" if args.dry_run else "migrated"
    print(f"\n{_count(len(items), 'file')}: {len(done)} {verb} ({_count(len(members), 'member')}"
          f"), {skipped} skipped, {failed} failed"
          + (" (dry run: nothing written)" if args.dry_run else ""))
    if done and not args.dry_run:
        print(f"continue the population with PBTScheduler(PBTConfig(checkpoint_dir="
              f"{str(args.dest)!r}, resume='must', ...))")
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> int:
    from vgs_ckpt import demo

    return demo.main(args.dir, members=args.members, rounds=args.rounds,
                     interval=args.interval, seed=args.seed, compare=args.compare,
                     plot_path=args.plot, seeds=args.seeds)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _basename(path: Path | str) -> str:
    return path.name if isinstance(path, Path) else path.rstrip("/").rsplit("/", 1)[-1]


def _sweep(args: argparse.Namespace) -> int:
    storage, root = resolve(args.dir, storage_options=_options(args), function="sweep")
    if isinstance(storage, LocalStorage) and not Path(root).is_dir():
        raise UsageError(f"{root} is not a directory; pass the checkpoint directory to "
                         "sweep")
    local = isinstance(storage, LocalStorage)
    min_age = args.min_age if args.min_age is not None else (
        MIN_TEMP_AGE if local else MIN_UPLOAD_AGE)
    removed = storage.sweep(root, recursive=True, dry_run=args.dry_run, min_age=min_age)
    verb = "would remove" if args.dry_run else "removed"
    what = "temp file(s)" if local else "incomplete upload(s)"
    for key in removed:
        print(f"{verb} {_safe(key)}")
    print(f"{verb} {len(removed)} {what} of dead writers under {_safe(root)}")
    unreadable = unreadable_checkpoints(root, storage=storage)
    for path, why in unreadable:
        print(f"unreadable checkpoint (kept; the store skips it): {_safe(path)}: {_safe(why)}")
    if unreadable:
        print(f"{len(unreadable)} unreadable checkpoint file(s): move or delete them yourself")
    return 0


def _schema(args: argparse.Namespace) -> int:
    if args.check:
        missing = missing_schemas(args.out)
        if missing:
            where = (f"{args.out} does not exist" if not Path(args.out).is_dir() else
                     f"{args.out} lacks {', '.join(missing)}")
            print(f"no schema files to check: {where}; write them with `vgs-ckpt schema "
                  f"--out {args.out}` (a checkout of vgs_ckpt has them in schema/)",
                  file=sys.stderr)
            return 1
        drift = schema_drift(args.out)
        if drift:
            print(f"schema files out of date in {args.out}: {', '.join(drift)}; "
                  f"run `vgs-ckpt schema --out {args.out}`", file=sys.stderr)
            return 1
        print(f"schema files in {args.out} match the models")
        return 0
    for path in write_schemas(args.out):
        print(f"wrote {path}")
    return 0


def _storage_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="an fsspec storage option for URLs (s3://...), repeatable; "
                        "dotted keys nest: client_kwargs.endpoint_url=http://host:9000")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgs-ckpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a small PBT population with VGS and show each exploit")
    p.add_argument("--members", type=int, default=6, help="population size (default 6)")
    p.add_argument("--rounds", type=int, default=12, help="exploit rounds (default 12)")
    p.add_argument("--interval", type=int, default=25,
                   help="steps per round of the fastest member (default 25; the slowest "
                   "takes 40%% of it)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the run shown (default 0)")
    p.add_argument("--seeds", type=int, default=3,
                   help="with --compare: compare both modes over this many seeds, from "
                   "--seed (default 3)")
    p.add_argument("--dir", help="checkpoint directory (default: a new temporary one)")
    p.add_argument("--compare", action="store_true",
                   help="also run the same seeds with policy-only (v1) exploits")
    p.add_argument("--plot", metavar="FILE.png", help="draw the loss curves (needs matplotlib)")
    p.set_defaults(run=_demo)
    p = sub.add_parser("inspect", help="show format, header, VGS summary and tensors of a file")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _storage_flag(p)
    p.set_defaults(run=_inspect)
    p = sub.add_parser("verify", help="load a file, check every tensor's digest and the header "
                       "against the spec (digests cover tensor bytes only, not the header)")
    p.add_argument("path")
    _storage_flag(p)
    p.set_defaults(run=_verify)
    p = sub.add_parser("sweep", help="remove temp files that killed writers left in a "
                       "checkpoint directory (recursive); live writers' files are kept")
    p.add_argument("dir")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--min-age", type=float, default=None, metavar="SECONDS",
                   help="an unlocked temp file whose writer pid still exists is removed "
                   f"only after this long (default {MIN_TEMP_AGE:.0f}); on an object store, "
                   "an incomplete upload only when started this long ago (default "
                   f"{MIN_UPLOAD_AGE:.0f})")
    _storage_flag(p)
    p.set_defaults(run=_sweep)
    p = sub.add_parser("upgrade", help="convert legacy and older checkpoints to the latest "
                       "format")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories (recursive)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help="write upgraded files into DIR")
    where.add_argument("--in-place", action="store_true",
                       help="replace each file, keeping NAME.bak (never overwriting a backup)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    _storage_flag(p)
    p.set_defaults(run=_upgrade)
    p = sub.add_parser("migrate", help="turn the original scheduler's checkpoint_dir "
                       "(member_<id>_step_<step>.pt files) into a population store that "
                       "PBTScheduler(resume='must') continues")
    p.add_argument("source", metavar="SRC", help="the original scheduler's checkpoint_dir")
    p.add_argument("dest", metavar="DEST", help="a new directory: the population's store")
    p.add_argument("--dry-run", action="store_true",
                   help="read every file and print the plan; write nothing")
    p.set_defaults(run=_migrate)
    p = sub.add_parser("schema", help="write the JSON Schema files generated from the models")
    p.add_argument("--out", default="schema", help="directory (default: ./schema)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if the files in --out differ from the models")
    p.set_defaults(run=_schema)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    """A warning as the command line shows it: ``warning: <message>`` (vgs_ckpt's own,
    with its class), without the Python file and line that would point into vgs_ckpt."""
    prefix = f"warning ({category.__name__})" if category.__module__.startswith(
        "vgs_ckpt") else f"warning ({category.__name__}, {filename}:{lineno})"
    print(f"{prefix}: {_safe(str(message))}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = _parser().parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return _run(args)
    finally:
        warnings.showwarning = shown


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.run(args))
    except VgsCkptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `vgs-ckpt inspect FILE | head`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
