"""Smoke tests of the benchmarks that are not timed tests themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.sb3
def test_pbt_efficiency_quick_runs(tmp_path: Path) -> None:
    pytest.importorskip("stable_baselines3")
    out = tmp_path / "runs.json"
    table = tmp_path / "table.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pbt_efficiency.py"), "--quick",
                    "--out", str(out), "--markdown", str(table)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    # 5 arms x 2 schedules x 2 seeds on each of the two tasks.
    assert len(result["runs"]) == 40
    assert {r["arm"] for r in result["runs"]} == {"full", "policy_only", "no_vgs_state",
                                                  "optimizer_reset", "no_vgs"}
    assert any(r["exploits"] for r in result["runs"])
    for run in result["runs"]:
        for exploit in run["exploits"]:
            fmt = "v1_policy_only" if run["arm"] == "policy_only" else "v2_full_parameters"
            assert exploit["format"] == fmt
            if run["arm"] in ("full", "optimizer_reset"):
                assert exploit["vgs_step_after"] == exploit["donor_vgs_step"]
            if run["arm"] in ("policy_only", "no_vgs_state"):
                assert exploit["vgs_step_after"] == exploit["vgs_step_before"]
    assert "| full |" in table.read_text()


@pytest.mark.sb3
def test_pbt_efficiency_part_ii_quick_runs(tmp_path: Path) -> None:
    """Part II (issue #22): PPO+VecNormalize on Pendulum and the three VGS settings, with
    the post-exploit transient and the normalized-variance probe."""
    pytest.importorskip("stable_baselines3")
    out = tmp_path / "runs.json"
    table = tmp_path / "table.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pbt_efficiency.py"), "--quick",
                    "--tasks", "part2", "--schedules", "async", "--seeds", "1",
                    "--out", str(out), "--markdown", str(table)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    arms = {(r["task"], r["arm"]) for r in result["runs"]}
    assert {a for t, a in arms if t == "pendulum_vecnorm"} == {"full", "no_vecnorm_state",
                                                               "policy_only"}
    for task in ("cartpole_warmup", "cartpole_uncapped", "cartpole_sgd"):
        assert {a for t, a in arms if t == task} == {"full", "no_vgs_state", "policy_only"}
    assert result["tasks"]["cartpole_uncapped"]["variance_cap"] is None
    assert result["tasks"]["cartpole_sgd"]["optimizer"] == "sgd"
    assert any(r["exploits"] for r in result["runs"])
    for run in result["runs"]:
        assert run["vgs_probe"]  # the normalized variance, every round
        for exploit in run["exploits"]:
            fmt = "v1_policy_only" if run["arm"] == "policy_only" else "v2_full_parameters"
            assert exploit["format"] == fmt
            assert len(exploit["transient"]) == 3
    text = table.read_text()
    assert "Post-exploit transient" in text and "| no_vecnorm_state |" in text


@pytest.mark.sb3
def test_preemption_benchmark_quick_runs() -> None:
    pytest.importorskip("stable_baselines3")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preemption.py"),
                          "--quick"], check=True, capture_output=True, text=True,
                         timeout=300).stdout
    row = next(line for line in out.splitlines() if line.startswith("| tiny"))
    assert float(row.split("|")[3].split(",")[0]) > 0


def test_bootstrap_interval_covers_the_mean() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import pbt_efficiency
    finally:
        sys.path.pop(0)
    mean, lo, hi = pbt_efficiency.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and lo < mean < hi and lo >= 1.0 and hi <= 5.0
    assert pbt_efficiency.bootstrap_ci([2.0])[0] == 2.0
    run = {"curve": [(100, [1.0, 5.0]), (200, [3.0, 9.0])],
           "exploits": [{"return_after": 4.0, "donor_performance": 5.0,
                         "vgs_step_before": 1, "donor_vgs_step": 2}]}
    metrics = pbt_efficiency.run_metrics(run, threshold=8.0)
    assert metrics["auc_best"] == 7.0  # 5 over [0, 100], 9 over [100, 200]
    assert metrics["auc_mean"] == 4.5
    assert metrics["steps_to_threshold"] == 200
    assert metrics["dip"] == -1.0 and metrics["mismatched_exploits"] == 1.0


def _codec_rows(tmp_path: Path, section: str) -> dict[str, list[str]]:
    """Run one section of benchmarks/codec.py on a tiny member; its table rows by name."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codec.py"), "--sizes",
                          "200K", "--repeat", "1", "--only", section, "--dir", str(tmp_path)],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    return {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines()
            if line.startswith("| ") and "---" not in line}


def test_codec_benchmark_reading_section_runs(tmp_path: Path) -> None:
    rows = _codec_rows(tmp_path, "reading")
    lazy = rows["open + policy only (lazy, verify)"]
    assert 0.2 < float(lazy[1]) < 0.5  # about a third of the bytes: the policy
    assert float(lazy[2]) == 1.0  # each byte read is hashed once
    assert float(rows["load torch.save file with vgs_ckpt"][2]) == 0.0  # legacy: none


def test_codec_benchmark_async_section_runs(tmp_path: Path) -> None:
    rows = _codec_rows(tmp_path, "async")
    assert {"save vgs_ckpt", "save_async", "dcp async_save",
            "checkout + load (verify) + set_parameters"} <= set(rows)
    assert float(rows["save vgs_ckpt"][0].strip().rstrip("x")) == 1.0
    assert float(rows["save_async"][2]) > 0.5  # the snapshot holds the tensor bytes


def test_codec_benchmark_creates_a_missing_dir(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codec.py"), "--sizes",
                           "50K", "--repeat", "1", "--only", "writer", "--dir", str(target)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert target.is_dir()


def test_codec_benchmark_writer_section_runs(tmp_path: Path) -> None:
    rows = _codec_rows(tmp_path, "writer")
    assert set(rows) >= {"seekable (LocalStorage)", "one pass (seekable_writes=False)",
                         "one pass durable", "seekable durable"}
    assert rows["seekable (LocalStorage)"][0].strip() == "1.00x"


@pytest.mark.s3
def test_s3_benchmark_quick_runs(tmp_path: Path) -> None:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    out = tmp_path / "s3.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "s3.py"), "--sizes", "1M",
                    "--repeat", "1", "--json", str(out)], check=True, timeout=300,
                   capture_output=True)
    row = json.loads(out.read_text())["rows"][0]
    assert row["lazy_policy_requests"] <= 3 and row["lazy_policy_bytes_ratio"] <= 1.05
    assert row["exploit_server_side_copies"] >= 1
    assert row["exploit_client_bytes"] < row["file_bytes"] / 10
    assert row["save_ratio"] > 0 and row["load_ratio"] > 0
