"""Codec benchmark: vgs_ckpt vs safetensors vs torch.save, side by side in one run.

A realistic PBT member: an MLP policy, its Adam state (exp_avg, exp_avg_sq, step)
and a VGS 3.2 state, at the given numbers of float32 policy parameters.

    python benchmarks/codec.py                 # 16M and 128M parameters
    python benchmarks/codec.py --sizes 4M      # quick

Every time is a median of --repeat runs, and every result is reported as a ratio
to safetensors measured in the same run. Peak RSS is measured in a fresh child
process per operation (ru_maxrss is a high-water mark per process).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import xxhash

import vgs_ckpt

torch.set_num_threads(1)


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def member(num_params: int) -> dict[str, Any]:
    """~num_params float32 policy parameters in 8 square layers, plus Adam and VGS state."""
    layers = 8
    side = int((num_params / layers) ** 0.5)
    gen = torch.Generator().manual_seed(0)
    policy = OrderedDict()
    for i in range(layers):
        policy[f"mlp.{i}.weight"] = torch.randn(side, side, generator=gen)
        policy[f"mlp.{i}.bias"] = torch.randn(side, generator=gen)
    state = {i: {"step": torch.tensor(150.0), "exp_avg": torch.randn_like(t),
                 "exp_avg_sq": torch.rand_like(t)} for i, t in enumerate(policy.values())}
    n = len(policy)
    return {
        "policy": policy,
        "policy.optimizer": {"state": state, "param_groups": [{
            "lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
            "amsgrad": False, "params": list(range(n))}]},
        "vgs_state": {"enabled": True, "beta": 0.99, "alpha": 0.1, "eps": 1e-8,
                      "warmup_steps": 100, "step_count": 150, "min_scaling_factor": 0.1,
                      "variance_cap": 50.0, "param_grad_mean_ema": torch.randn(n),
                      "param_grad_sq_ema": torch.rand(n), "param_numel": torch.ones(n),
                      "grad_mean_ema": None, "grad_var_ema": None, "grad_norm_ema": None,
                      "grad_max_ema": None, "vgs_version": "3.2"},
        "kl_penalty_state": {"kl_beta": 0.5},
    }


def flat(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The same tensors as a flat dict, for safetensors.save_file."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            out.update(flat(v, f"{prefix}/{i}"))
    return out


def touch(tree: Any) -> int:
    """Read one byte of every page of every tensor, so mmap-backed loaders pay their I/O."""
    return sum(int(t.reshape(-1).view(torch.uint8)[::4096].sum(dtype=torch.int64))
               for t in flat(tree).values() if t.numel())


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


OPS: dict[str, Callable[[dict[str, Any], Path], Any]] = {
    "save vgs_ckpt": lambda m, d: vgs_ckpt.save(d / "v.safetensors", m, step=150),
    "save vgs_ckpt durable=False": lambda m, d: vgs_ckpt.save(d / "v.safetensors", m, step=150,
                                                             durable=False),
    "save safetensors": lambda m, d: safetensors.torch.save_file(flat(m), str(d / "s.st")),
    "save safetensors+fsync": lambda m, d: (safetensors.torch.save_file(flat(m), str(d / "s.st")),
                                            fsync_file(d / "s.st")),
    "save torch.save": lambda m, d: torch.save(m, d / "t.pt"),
    "load vgs_ckpt verify": lambda m, d: touch(vgs_ckpt.load(d / "v.safetensors").parameters),
    "load vgs_ckpt no-verify": lambda m, d: touch(
        vgs_ckpt.load(d / "v.safetensors", verify=False).parameters),
    "load vgs_ckpt verify mmap=True": lambda m, d: touch(
        vgs_ckpt.load(d / "v.safetensors", mmap=True).parameters),
    "load safetensors": lambda m, d: touch(safetensors.torch.load_file(str(d / "s.st"))),
    "load torch.load": lambda m, d: touch(torch.load(d / "t.pt", weights_only=True)),
}


OUTPUT = {"save vgs_ckpt": "v.", "save vgs_ckpt durable=False": "v.",
          "save safetensors": "s.", "save safetensors+fsync": "s.", "save torch.save": "t."}


LOAD_FILES = {"load vgs_ckpt verify": "v.safetensors", "load vgs_ckpt no-verify": "v.safetensors",
              "load vgs_ckpt verify mmap=True": "v.safetensors",
              "load safetensors": "s.st", "load torch.load": "t.pt"}


def evict(path: Path) -> None:
    """Drop a file's pages from the page cache (no root needed), for cold-cache loads."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(op: str, size: int, directory: Path) -> None:
    """Run one op in this fresh process; print peak RSS above the baseline, in bytes."""
    tree = member(size) if op.startswith("save") else None
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _status_kib("VmRSS")
    result = {**OPS, **ASYNC_RSS}[op](tree if tree is not None else {}, directory)
    peak = _status_kib("VmHWM")
    del result
    print(json.dumps({"peak_above_baseline": (peak - base) * 1024}))


def peak_rss(op: str, size: int, directory: Path) -> int:
    proc = subprocess.run([sys.executable, __file__, "--child", op, str(size), str(directory)],
                          capture_output=True, text=True, check=True)
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_above_baseline"])


def run(size: int, repeat: int, directory: Path) -> dict[str, Any]:
    tree = member(size)
    nbytes = sum(t.numel() * t.element_size() for t in flat(tree).values())
    times: dict[str, list[float]] = {op: [] for op in OPS}
    for _ in range(repeat):  # interleaved, so drift on the machine hits every op alike
        for op, fn in OPS.items():
            if op.startswith("save"):
                # Every writer creates a new file: freeing the pages of a file being
                # overwritten would be timed for one writer and not the other.
                for old in directory.iterdir():
                    if old.name.startswith(OUTPUT[op]):
                        old.unlink()
            times[op].append(timed(lambda fn=fn, tree=tree: fn(tree, directory)))
    for _ in range(repeat):
        for op, name in LOAD_FILES.items():
            evict(directory / name)
            times.setdefault(f"{op} (cold)", []).append(
                timed(lambda op=op: OPS[op]({}, directory)))
    median = {op: statistics.median(ts) for op, ts in times.items()}
    header_times = [timed(lambda: vgs_ckpt.read_header(directory / "v.safetensors"))
                    for _ in range(max(repeat, 5))]
    del tree
    gc.collect()
    rss = {op: peak_rss(op, size, directory) for op in
           ("save vgs_ckpt", "save safetensors", "save torch.save", "load vgs_ckpt verify",
            "load safetensors", "load torch.load")}
    return {"params": size, "tensor_bytes": nbytes, "median_s": median,
            "read_header_ms": 1000 * statistics.median(header_times), "peak_rss": rss,
            "file_bytes": (directory / "v.safetensors").stat().st_size}


class HashedBytes:
    """Counts the bytes vgs_ckpt hashes, by wrapping the xxhash function it calls."""

    def __init__(self) -> None:
        self.bytes = 0
        self._real = xxhash.xxh3_128_hexdigest

    def __enter__(self) -> HashedBytes:
        def counting(data: Any) -> str:
            self.bytes += memoryview(data).nbytes
            return self._real(data)
        xxhash.xxh3_128_hexdigest = counting
        return self

    def __exit__(self, *exc: object) -> None:
        xxhash.xxh3_128_hexdigest = self._real


def lazy_policy(path: Path) -> tuple[int, int]:
    """Open a file and read (verify, touch) only the policy; (bytes read, bytes hashed)."""
    with HashedBytes() as hashed, vgs_ckpt.open(path) as reader:
        touch(reader["policy"])
        return reader.bytes_read, hashed.bytes


def legacy_load(path: Path) -> int:
    """Load a torch.save file through vgs_ckpt (upgraded); the bytes hashed."""
    with HashedBytes() as hashed, warnings.catch_warnings():
        warnings.simplefilter("ignore", vgs_ckpt.LegacyFormatWarning)
        touch(vgs_ckpt.load(path).parameters)
    return hashed.bytes


READS: dict[str, Callable[[Path], Any]] = {
    "load vgs_ckpt verify": lambda d: touch(vgs_ckpt.load(d / "v.safetensors").parameters),
    "open + policy only (lazy, verify)": lambda d: lazy_policy(d / "v.safetensors"),
    "load torch.save file with vgs_ckpt": lambda d: legacy_load(d / "t.pt"),
    "load torch.save file with torch.load": lambda d: touch(
        torch.load(d / "t.pt", weights_only=True)),
    "load torch.save file with torch.load mmap=True": lambda d: touch(
        torch.load(d / "t.pt", weights_only=True, mmap=True)),
}


def reading(size: int, repeat: int, directory: Path) -> dict[str, Any]:
    """The read paths of issue #12: a lazy policy read, and a legacy file's load, with
    the bytes each one hashes."""
    tree = member(size)
    nbytes = sum(t.numel() * t.element_size() for t in flat(tree).values())
    policy_bytes = sum(t.numel() * t.element_size() for t in flat(tree["policy"]).values())
    vgs_ckpt.save(directory / "v.safetensors", tree, step=150)
    torch.save(tree, directory / "t.pt")
    del tree
    times: dict[str, list[float]] = {op: [] for op in READS}
    for _ in range(repeat):
        for op, fn in READS.items():
            times[op].append(timed(lambda fn=fn: fn(directory)))
    with HashedBytes() as full:
        vgs_ckpt.load(directory / "v.safetensors")
    read, lazy_hashed = lazy_policy(directory / "v.safetensors")
    return {"params": size, "tensor_bytes": nbytes, "policy_bytes": policy_bytes,
            "median_s": {op: statistics.median(ts) for op, ts in times.items()},
            "hashed": {"load vgs_ckpt verify": full.bytes,
                       "open + policy only (lazy, verify)": lazy_hashed,
                       "load torch.save file with vgs_ckpt": legacy_load(directory / "t.pt")},
            "lazy_bytes_read": read}


def report_reading(result: dict[str, Any]) -> str:
    m, nbytes = result["median_s"], result["tensor_bytes"]
    full, legacy = m["load vgs_ckpt verify"], m["load torch.save file with torch.load"]
    lines = [f"### Reading, {result['params'] / 1e6:.0f}M policy parameters "
             f"({nbytes / 2**20:.0f} MiB of tensors)", "",
             "| operation | time ratio | tensor bytes read / all | bytes hashed / bytes read |",
             "| --- | --- | --- | --- |"]
    for op, seconds in m.items():
        ref, label = (legacy, "torch.load") if "torch.save file" in op else (full, "full load")
        read = result["lazy_bytes_read"] if op.startswith("open") else nbytes
        hashed = result["hashed"].get(op)
        lines.append(f"| {op} | {seconds / ref:.2f}x {label} | {read / nbytes:.2f} | "
                     f"{'-' if hashed is None else f'{hashed / read:.2f}'} |")
    lines += ["", f"- the policy is {result['policy_bytes'] / nbytes:.2f} of the tensor bytes"]
    return "\n".join(lines)


def dcp_async(tree: dict[str, Any], target: Path) -> Any:
    """torch.distributed.checkpoint.async_save of the same tensors, in one process."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        return dcp.async_save(flat(tree), checkpoint_id=str(target))


def _twice(save: Callable[[dict[str, Any], Path, int], Any]) -> Callable[..., Any]:
    """Two saves one after the other (the second reuses the first's buffers)."""
    def run(tree: dict[str, Any], directory: Path) -> None:
        for i in range(2):
            save(tree, directory, i)
    return run


ASYNC_RSS: dict[str, Callable[[dict[str, Any], Path], Any]] = {
    "save vgs_ckpt (x2)": _twice(lambda m, d, i: vgs_ckpt.save(d / f"r{i}.safetensors", m,
                                                                step=i)),
    "save_async (x2)": _twice(lambda m, d, i: vgs_ckpt.save_async(
        d / f"r{i}.safetensors", m, step=i).result()),
    "dcp async_save (x2)": _twice(lambda m, d, i: dcp_async(m, d / f"dcp{i}").result()),
}


def _learner(size: int, seed: int) -> Any:
    """A TorchLearner with ~size policy parameters, Adam state and a VGS state."""
    from vgs_ckpt.pbt.learner import TorchLearner
    from vgs_ckpt.vgs import VarianceGradientScaler

    layers = 8
    side = int((size / layers) ** 0.5)
    torch.manual_seed(seed)
    policy = torch.nn.Sequential(*[torch.nn.Linear(side, side) for _ in range(layers)])
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-4)
    for param in policy.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    vgs = VarianceGradientScaler(policy.parameters())
    vgs.update()
    return TorchLearner(policy, optimizer, vgs)


def asynchronous(size: int, repeat: int, directory: Path) -> dict[str, Any]:
    """Issue #11: what a save blocks, what it costs to commit, its extra memory, and
    the exploit a user waits for."""
    from vgs_ckpt.pbt import CheckpointStore

    tree = member(size)
    nbytes = sum(t.numel() * t.element_size() for t in flat(tree).values())
    blocked: dict[str, list[float]] = {"save vgs_ckpt": [], "save_async": [],
                                       "dcp async_save": []}
    commit: dict[str, list[float]] = {k: [] for k in blocked}
    for _ in range(repeat):
        for op, blocked_times in blocked.items():
            for old in directory.iterdir():
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            gc.collect()
            start = time.perf_counter()
            if op == "save vgs_ckpt":
                vgs_ckpt.save(directory / "a.safetensors", tree, step=1)
                blocked_times.append(time.perf_counter() - start)
            elif op == "save_async":
                handle = vgs_ckpt.save_async(directory / "a.safetensors", tree, step=1)
                blocked_times.append(time.perf_counter() - start)
                handle.result()
            else:
                future = dcp_async(tree, directory / "dcp")
                blocked_times.append(time.perf_counter() - start)
                future.result()
            commit[op].append(time.perf_counter() - start)
    del tree
    gc.collect()
    rss = {op: peak_rss(op, size, directory) for op in ASYNC_RSS}
    # Exploit end to end: a recipient takes a donor's full state.
    donor, recipient = _learner(size, 0), _learner(size, 1)
    store = CheckpointStore(directory / "store", keep_last=1, keep_best=0)
    store.save("donor", donor.get_parameters(), step=1, performance=1.0)
    torch.save(donor.get_parameters(), directory / "donor.pt")
    del donor
    gc.collect()

    def vgs_exploit() -> None:
        ref = store.checkout("donor", "recipient")
        recipient.set_parameters(vgs_ckpt.load(ref.path).parameters)

    def torch_exploit() -> None:
        recipient.set_parameters(torch.load(directory / "donor.pt", weights_only=True))

    exploit: dict[str, list[float]] = {"vgs_ckpt": [], "torch": []}
    for _ in range(repeat):
        exploit["vgs_ckpt"].append(timed(vgs_exploit))
        exploit["torch"].append(timed(torch_exploit))
    median = statistics.median
    return {"params": size, "tensor_bytes": nbytes,
            "blocked_s": {k: median(v) for k, v in blocked.items()},
            "commit_s": {k: median(v) for k, v in commit.items()}, "peak_rss": rss,
            "exploit_s": {k: median(v) for k, v in exploit.items()}}


def report_async(result: dict[str, Any]) -> str:
    nbytes = result["tensor_bytes"]
    blocked, commit = result["blocked_s"], result["commit_s"]
    ref = blocked["save vgs_ckpt"]
    lines = [f"### Non-blocking saves and the exploit, {result['params'] / 1e6:.0f}M policy "
             f"parameters ({nbytes / 2**20:.0f} MiB of tensors)", "",
             "| operation | training blocked / durable save | time to commit / durable save "
             "| extra peak RSS / tensor bytes (two saves) |", "| --- | --- | --- | --- |"]
    for op, rss_op in (("save vgs_ckpt", "save vgs_ckpt (x2)"), ("save_async", "save_async (x2)"),
                       ("dcp async_save", "dcp async_save (x2)")):
        lines.append(f"| {op} | {blocked[op] / ref:.2f}x | {commit[op] / ref:.2f}x | "
                     f"{result['peak_rss'][rss_op] / nbytes:.2f} |")
    ratio = result["exploit_s"]["vgs_ckpt"] / result["exploit_s"]["torch"]
    lines += ["", "| exploit end to end | time / torch.load + load_state_dict |",
              "| --- | --- |",
              f"| checkout + load (verify) + set_parameters | {ratio:.2f}x |",
              "| torch.load(weights_only=True) + set_parameters | 1.00x |"]
    return "\n".join(lines)


def report(result: dict[str, Any]) -> str:
    m, nbytes = result["median_s"], result["tensor_bytes"]
    lines = [f"### {result['params'] / 1e6:.0f}M policy parameters "
             f"({nbytes / 2**20:.0f} MiB of tensors with Adam state)", "",
             "| operation | ratio to safetensors | throughput |", "| --- | --- | --- |"]
    for op, seconds in m.items():
        ref = (m["save safetensors"] if op.startswith("save") else
               m["load safetensors (cold)"] if op.endswith("(cold)") else m["load safetensors"])
        lines.append(f"| {op} | {seconds / ref:.2f}x | {nbytes / seconds / 2**30:.2f} GiB/s |")
    verify_cost = m["load vgs_ckpt verify"] / m["load vgs_ckpt no-verify"] - 1
    cold_cost = m["load vgs_ckpt verify (cold)"] / m["load vgs_ckpt no-verify (cold)"] - 1
    lines += ["", f"- digest verification adds {verify_cost * 100:.1f}% to a full load from the "
              f"page cache, {cold_cost * 100:.1f}% to one from disk (cold cache)",
              f"- read_header: {result['read_header_ms']:.2f} ms on a "
              f"{result['file_bytes'] / 2**30:.2f} GiB file", "",
              "| operation | peak RSS above baseline / tensor bytes |", "| --- | --- |"]
    for op, peak in result["peak_rss"].items():
        lines.append(f"| {op} | {peak / nbytes:.2f} |")
    return "\n".join(lines)


class _ForwardOnly(vgs_ckpt.LocalStorage):
    """LocalStorage whose writer may not seek: the one-pass path (digests first, then
    header and data in order), as an object store's write stream needs."""

    capabilities = dataclasses.replace(vgs_ckpt.LocalStorage.capabilities,
                                       seekable_writes=False)


def writer_paths(size: int, repeat: int, directory: Path) -> dict[str, Any]:
    """The writer's two paths side by side: a seekable local file (hashing overlaps
    writing, the header is rewritten) and one forward pass (digests first)."""
    tree = member(size)
    nbytes = sum(t.numel() * t.element_size() for t in flat(tree).values())
    target = directory / "w.safetensors"
    ops: dict[str, Callable[[], Any]] = {
        "seekable (LocalStorage)": lambda: vgs_ckpt.save(target, tree, step=1,
                                                         durable=False),
        "one pass (seekable_writes=False)": lambda: vgs_ckpt.save(
            target, tree, step=1, durable=False, storage=_ForwardOnly()),
        "one pass durable": lambda: vgs_ckpt.save(target, tree, step=1,
                                                  storage=_ForwardOnly()),
        "seekable durable": lambda: vgs_ckpt.save(target, tree, step=1),
    }
    times: dict[str, list[float]] = {op: [] for op in ops}
    for _ in range(repeat):
        for op, fn in ops.items():  # interleaved
            target.unlink(missing_ok=True)
            times[op].append(timed(fn))
    return {"params": size, "tensor_bytes": nbytes,
            "median_s": {op: statistics.median(t) for op, t in times.items()}}


def report_writer(result: dict[str, Any]) -> str:
    m = result["median_s"]
    lines = [f"### The writer's two paths, {result['params'] / 1e6:.0f}M policy parameters",
             "", "| path | time / seekable path (same durability) |", "| --- | --- |"]
    for op in m:
        ref = m["seekable durable"] if "durable" in op.split()[-1] else m[
            "seekable (LocalStorage)"]
        lines.append(f"| {op} | {m[op] / ref:.2f}x |")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, safetensors {safetensors.__version__}, "
            f"vgs_ckpt {vgs_ckpt.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["16M", "128M"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--only", choices=["codec", "reading", "async", "writer"],
                        default=None,
                        help="run one section (default: all)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]))
        return
    print(f"machine: {machine()}\n", flush=True)
    if args.dir is not None:
        Path(args.dir).mkdir(parents=True, exist_ok=True)  # a new directory is fine
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in args.sizes:
            if args.only in (None, "codec"):
                print(report(run(parse_size(size), args.repeat, Path(tmp))), "\n", flush=True)
            if args.only in (None, "reading"):
                print(report_reading(reading(parse_size(size), args.repeat, Path(tmp))), "\n",
                      flush=True)
            if args.only in (None, "writer"):
                print(report_writer(writer_paths(parse_size(size), args.repeat, Path(tmp))),
                      "\n", flush=True)
            if args.only in (None, "async"):
                print(report_async(asynchronous(parse_size(size), args.repeat, Path(tmp))),
                      "\n", flush=True)


if __name__ == "__main__":
    main()
