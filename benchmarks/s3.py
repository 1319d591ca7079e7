"""Object storage benchmark: vgs_ckpt on S3 against plain s3fs, side by side in one run.

A real S3 protocol server on 127.0.0.1 (moto's ThreadedMotoServer, recording every
request and its bytes) and the real s3fs client. The member is benchmarks/codec.py's
(an MLP policy, Adam state, VGS state; the policy is about a third of the bytes).

- save and load throughput, each as a ratio to a plain s3fs ``pipe``/``cat`` of the
  same bytes, alternating, median of --repeat runs;
- a lazy policy read (``vgs_ckpt.open(url)["policy"]``): requests, and bytes as a
  ratio to the policy's own bytes;
- an exploit (``CheckpointStore.checkout``): requests, bytes through the client, and
  whether the copy was server-side.

    python benchmarks/s3.py                 # 16M and 64M parameters
    python benchmarks/s3.py --sizes 1M --repeat 1 --json out.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.s3server
sys.path.insert(0, str(Path(__file__).resolve().parent))  # codec.member

import torch
from codec import member, parse_size

import vgs_ckpt
from tests.s3server import REGION, S3Server
from vgs_ckpt.pbt import CheckpointStore

torch.set_num_threads(1)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def tensor_bytes(tree: Any) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(tensor_bytes(v) for v in tree)
    return 0


class OutOfProcessServer:
    """moto's server in a process of its own, for the timings (in this process, its
    Python would compete with the client's for the interpreter lock)."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.2)
        self.storage_options = {"key": "testing", "secret": "testing",
                                "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{self.port}",
                                                  "region_name": REGION},
                                "use_listings_cache": False}

    def filesystem(self) -> Any:
        import s3fs
        return s3fs.S3FileSystem(**self.storage_options)

    def bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def run_size(server: S3Server, timing: OutOfProcessServer, num_params: int, repeat: int
             ) -> dict[str, Any]:
    params = member(num_params)
    data = vgs_ckpt.save_bytes(params, step=1)
    fs, options, bucket = timing.filesystem(), timing.storage_options, timing.bucket()
    ours, plain = f"s3://{bucket}/ours.safetensors", f"s3://{bucket}/plain.safetensors"
    saves, puts, loads, cats = [], [], [], []
    for _ in range(repeat):  # alternating, so drift hits both alike
        saves.append(timed(lambda: vgs_ckpt.save(ours, params, step=1,
                                                 storage_options=options)))
        puts.append(timed(lambda: fs.pipe(plain, data)))
        loads.append(timed(lambda: vgs_ckpt.load(ours, storage_options=options)))
        cats.append(timed(lambda: fs.cat(plain)))

    # Requests and bytes, counted by the recording server.
    options, bucket = server.storage_options, server.bucket()
    ours = f"s3://{bucket}/ours.safetensors"
    vgs_ckpt.save(ours, params, step=1, storage_options=options)
    vgs_ckpt.read_header(ours, storage_options=options)  # as a store's listing would
    mark = server.mark()
    with vgs_ckpt.open(ours, storage_options=options) as reader:
        reader["policy"]
    lazy = server.since(mark)
    policy_bytes = tensor_bytes(params["policy"])

    store = CheckpointStore(f"s3://{bucket}/store", storage_options=options)
    store.save("donor", params, step=10, performance=1.0)
    mark = server.mark()
    store.checkout("donor", "recipient")
    exploit = server.since(mark)

    return {
        "parameters": num_params, "file_bytes": len(data),
        "save_seconds": statistics.median(saves), "put_seconds": statistics.median(puts),
        "save_ratio": statistics.median(saves) / statistics.median(puts),
        "load_seconds": statistics.median(loads), "cat_seconds": statistics.median(cats),
        "load_ratio": statistics.median(loads) / statistics.median(cats),
        "lazy_policy_requests": len(lazy),
        "lazy_policy_bytes": sum(r.sent + r.received for r in lazy),
        "policy_bytes": policy_bytes,
        "lazy_policy_bytes_ratio": sum(r.sent + r.received for r in lazy) / policy_bytes,
        "exploit_requests": len(exploit),
        "exploit_client_bytes": sum(r.sent + r.received for r in exploit),
        "exploit_server_side_copies": sum(1 for r in exploit if r.copy_source),
        "exploit_requests_by_kind": _kinds(exploit),
    }


def _kinds(requests: list[Any]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for r in requests:
        kind = ("CopyObject" if r.copy_source else "ListObjects" if r.method == "GET"
                and ("list-type" in r.query or r.path.count("/") <= 1)
                else "GetObject (range)" if r.method == "GET" and r.range
                else f"{r.method}")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| parameters | file | save vs s3fs pipe | load vs s3fs cat | lazy policy read: "
             "requests, bytes / policy bytes | exploit: requests, client bytes, "
             "server-side copies |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['parameters'] / 1e6:.0f}M | {r['file_bytes'] / 2**20:.0f} MiB | "
            f"{r['save_ratio']:.2f}x | {r['load_ratio']:.2f}x | "
            f"{r['lazy_policy_requests']}, {r['lazy_policy_bytes_ratio']:.3f}x | "
            f"{r['exploit_requests']}, {r['exploit_client_bytes'] / 1024:.1f} KiB, "
            f"{r['exploit_server_side_copies']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16M,64M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    timing = OutOfProcessServer()
    try:
        with S3Server() as server:
            for size in args.sizes.split(","):
                print(f"{size} parameters ...", file=sys.stderr, flush=True)
                rows.append(run_size(server, timing, parse_size(size), args.repeat))
    finally:
        timing.stop()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; moto's S3 server on 127.0.0.1 (its own process for "
          f"the timings), s3fs; median of {args.repeat} alternating runs")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "id": uuid.uuid4().hex},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
