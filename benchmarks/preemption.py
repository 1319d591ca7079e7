"""Time from SIGTERM to a durable checkpoint for a preempted PPO member.

Starts a member (``tests/sb3_preempt.py``) that trains with ``PBTCallback``, sends it
SIGTERM at a random moment after its first checkpoint, and reads back what it
reported: the seconds from the signal to the saved (fsynced) file, and the mean
duration of one PPO update in the same run. The ratio is what to read: the member
finishes the gradient step in progress, so the wait is about one update or less.

    python benchmarks/preemption.py [--runs 5] [--quick]
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent


def one_run(default_size: bool, rng: random.Random) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "population"
        args = [sys.executable, "-m", "tests.sb3_preempt", str(root), "member"]
        process = subprocess.Popen(args + (["default"] if default_size else []), cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not list(root.glob("*/step_*.safetensors")):
            if process.poll() is not None:
                raise SystemExit(f"the member exited early: {process.stderr.read()}")
            time.sleep(0.02)
        time.sleep(rng.uniform(0.1, 2.0))
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=600)
        exited = time.monotonic() - sent
        if process.returncode != 128 + signal.SIGTERM:
            raise SystemExit(f"exit status {process.returncode}: {err}")
        saved = float(re.search(r"checkpoints saved ([\d.]+) s after", err).group(1))
        update = float(re.search(r"update seconds ([\d.]+)", out).group(1))
        return saved, exited, update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run of a tiny member (CI)")
    args = parser.parse_args()
    rng = random.Random(0)
    sizes = [("tiny (64-step rollouts, 1 epoch)", False)] if args.quick else [
        ("tiny (64-step rollouts, 1 epoch)", False),
        ("PPO defaults (2048-step rollouts, 10 epochs, 64x64)", True)]
    runs = 1 if args.quick else args.runs
    print("| member | runs | SIGTERM -> durable file / one update (min, median, max) | "
          "SIGTERM -> exit / one update (median) |")
    print("| --- | --- | --- | --- |")
    for label, default_size in sizes:
        results = [one_run(default_size, rng) for _ in range(runs)]
        saved = [s / u for s, _, u in results]
        exited = [e / u for _, e, u in results]
        print(f"| {label} | {runs} | {min(saved):.2f}, {statistics.median(saved):.2f}, "
              f"{max(saved):.2f} | {statistics.median(exited):.2f} |")


if __name__ == "__main__":
    main()
