"""A multi-node Ray Tune PBT run with its storage on S3 (moto on 127.0.0.1, started
here): ``examples/ray_cluster_pbt.py`` starts a head and two worker nodes
(``ray.cluster_utils.Cluster``), removes a worker mid-run, SIGKILLs the driver and
``Tuner.restore``s the experiment. This test then reads every trial's events from
S3 itself and checks what was promised. About two minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray.tune")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

from .s3server import S3Server

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.s3]
ROOT = Path(__file__).resolve().parent.parent
ITERATIONS = 12


def _events(server: S3Server, bucket: str) -> list[dict[str, Any]]:
    fs = server.filesystem()
    return sorted((json.loads(fs.cat(path)) for path in fs.find(f"{bucket}/events")),
                  key=lambda e: e["time"])


def test_pbt_on_a_three_node_cluster_survives_a_node_and_a_driver(tmp_path: Path) -> None:
    with S3Server() as server:
        bucket = server.bucket()
        summary = tmp_path / "summary.json"
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "ray_cluster_pbt.py"),
             "--endpoint", server.endpoint, "--bucket", bucket, "--samples", "4",
             "--iterations", str(ITERATIONS), "--kill-node-at", "3", "--kill-driver-at", "6",
             "--summary", str(summary)],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
            env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outcome = json.loads(summary.read_text())
        events = _events(server, bucket)
        checkpoints = server.filesystem().find(f"{bucket}/ray")
    assert outcome["killed_node"] and outcome["killed_driver"], outcome
    assert outcome["done"] == {"trials": 4, "errors": []}

    reports = [e for e in events if e["kind"] == "report"]
    restores = [e for e in events if e["kind"] == "restore"]
    trials = {e["trial"] for e in reports}
    assert len(trials) == 4
    # Trials ran on different nodes (the two workers, and the replacement of the one
    # that was removed).
    assert len({e["node"] for e in reports}) >= 2
    # Every trial finished; the checkpoints Ray kept are on S3.
    for trial in trials:
        assert max(e["iteration"] for e in reports if e["trial"] == trial) == ITERATIONS
    assert any(path.endswith("vgs_ckpt.safetensors") for path in checkpoints)

    saved: dict[tuple[str, int], set[str]] = {}
    for e in reports:
        saved.setdefault((e["trial"], e["iteration"]), set()).add(e["digest"])
    exploits = [r for r in restores if r["cloned"]]
    restarts = [r for r in restores if not r["cloned"]]
    assert exploits, "PBT never exploited"
    assert restarts, "neither the node death nor the driver restore restarted a trial"
    for r in restores:
        # Exactly a state the source trial saved: no torn, stale or mixed checkpoint.
        assert r["digest"] in saved[(r["source"], r["source_iteration"])], r
        # A restart is never an exploit: its own checkpoint, or a cloned one it had
        # already restored (marked); an exploit is another trial's, the first time.
        assert r["cloned"] == (r["source"] != r["trial"] and not r["restarted"]), r
        before = [e["iteration"] for e in reports
                  if e["trial"] == r["trial"] and e["time"] < r["time"]]
        if (not r["cloned"] and r["source"] == r["trial"] and before
                and r["time"] < outcome["times"]["driver_killed"]):
            # Nothing lost when a node dies: at most the iteration in flight is redone.
            # (After Tuner.restore, a trial resumes from the checkpoint Ray's last
            # uploaded experiment state names, which may be a few iterations older.)
            assert r["source_iteration"] >= max(before) - 1, (r, max(before))
    # Exploits of one checkpoint by one trial differ in their explored config; the
    # same checkpoint and config again would be a restart counted as an exploit.
    keys = [(r["trial"], r["file"], json.dumps(r["config"], sort_keys=True))
            for r in exploits]
    assert len(keys) == len(set(keys)), "a restart was counted as another exploit"
