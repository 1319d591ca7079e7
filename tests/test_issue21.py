"""Issue #21: from the demo to a real population (items other than migrate, which has
tests/test_migrate.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

import vgs_ckpt
from vgs_ckpt.pbt import CheckpointStore

from .legacy_files import write_legacy

ROOT = Path(__file__).resolve().parent.parent


def test_item_02_save_takes_a_checkpoint_and_keeps_its_header(tmp_path: Path) -> None:
    legacy = write_legacy(tmp_path / "old.pt", "L2", vgs_version="3.1")
    with pytest.warns(vgs_ckpt.LegacyFormatWarning):
        upgraded = vgs_ckpt.load(legacy)
    path = tmp_path / "new.safetensors"
    vgs_ckpt.save(path, upgraded)  # no TypeError: the step is the checkpoint's
    again = vgs_ckpt.load(path)
    assert again.header.step == 150 and again.header.performance == 0.9
    assert again.header.created_at == upgraded.header.created_at
    assert again.header.provenance == upgraded.header.provenance  # not dropped
    assert again.header.provenance is not None
    assert again.header.provenance.applied_steps == ["vgs_3.1->3.2"]
    # Given fields override the carried ones.
    vgs_ckpt.save(path, again, step=151, member_id="m7")
    third = vgs_ckpt.load(path)
    assert (third.header.step, third.header.member_id) == (151, "m7")
    assert third.header.provenance == upgraded.header.provenance
    # Bytes and the background saver too.
    assert vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(third)).header.step == 151
    vgs_ckpt.save_async(tmp_path / "async.safetensors", third).result()
    assert vgs_ckpt.load(tmp_path / "async.safetensors").header.member_id == "m7"


def test_item_02_a_store_saves_a_checkpoint_as_its_member(tmp_path: Path) -> None:
    donor = vgs_ckpt.load_bytes(vgs_ckpt.save_bytes(
        {"w": torch.ones(1)}, step=5, member_id="donor", performance=1.0,
        created_at=datetime(2026, 1, 1, tzinfo=UTC)))
    store = CheckpointStore(tmp_path / "store")
    ref = store.save("recipient", donor)
    read = vgs_ckpt.load(ref.path)
    assert (read.header.member_id, read.header.step) == ("recipient", 5)


def test_item_02_the_keyword_arguments_have_one_reference_section() -> None:
    text = (Path(__file__).parent.parent / "docs" / "integration.md").read_text()
    section = text[text.index("## save's keyword arguments"):]
    for name in ("step", "performance", "member_id", "hyperparams", "lineage", "format",
                 "created_at", "provenance", "storage", "storage_options", "durable"):
        assert f"`{name}`" in section, name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vgs_ckpt.save_bytes({"x": 1}, step=0)


def test_item_15_exploit_refuses_a_mistyped_hyperparameter(tmp_path: Path) -> None:
    from vgs_ckpt.pbt import exploit

    from .conftest import make_member

    store = CheckpointStore(tmp_path / "store")
    store.save("d", make_member(), step=1, performance=1.0)
    with pytest.raises(vgs_ckpt.UsageError, match=r"'lrr' \(did you mean 'lr'\?\)"):
        exploit(store, "c", "d", {"lr": 0.07, "lrr": 3})
    with pytest.raises(vgs_ckpt.UsageError, match="'vgs_alhpa'"):
        exploit(store, "c", "d", {"vgs_alhpa": 0.2})
    done = exploit(store, "c", "d", {"lr": 0.07, "vgs_alpha": 0.2, "batch_size": 64},
                   caller_keys=["batch_size"])
    assert done.parameters["policy.optimizer"]["param_groups"][0]["lr"] == 0.07
    assert done.parameters["vgs_state"]["alpha"] == 0.2
    # A policy-only donor: the recipient keeps its optimizer; lr is still meaningful.
    store.save("v1", {"w": torch.ones(1)}, step=1, format="v1_policy_only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert exploit(store, "c", "v1", {"lr": 0.1}).format == "v1_policy_only"
        with pytest.raises(vgs_ckpt.UsageError, match="'lrr'"):
            exploit(store, "c", "v1", {"lrr": 0.1})


def _run_without(module_names: list[str], script: str,
                 *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter in which ``module_names`` cannot be imported."""
    code = (f"import runpy, sys\nfor name in {module_names!r}: sys.modules[name] = None\n"
            f"sys.argv = [{script!r}, *{list(args)!r}]\n"
            f"runpy.run_path({script!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=120)


@pytest.mark.parametrize(("blocked", "script", "extra"), [
    (["stable_baselines3"], "examples/sb3_pbt.py", "sb3"),
    (["ray"], "examples/ray_tune_pbt.py", "ray"),
    (["ray"], "examples/ray_cluster_pbt.py", "ray"),
    (["s3fs"], "examples/ray_cluster_pbt.py", "s3"),
    (["moto"], "examples/ray_cluster_pbt.py", "test"),
    (["ray"], "examples/sb3_ray_pbt.py", "ray"),
    (["stable_baselines3"], "examples/sb3_ray_pbt.py", "sb3"),
])
def test_item_09_examples_say_which_extra_is_missing(blocked: list[str], script: str,
                                                     extra: str) -> None:
    run = _run_without(blocked, script)
    assert run.returncode != 0
    assert f"pip install 'vgs-ckpt[{extra}]'" in run.stderr
    assert "Traceback" not in run.stderr


def test_item_09_the_test_strategies_say_how_to_get_hypothesis() -> None:
    code = ("import sys\nsys.modules['hypothesis'] = None\n"
            "try:\n    import vgs_ckpt.testing\nexcept ImportError as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "MissingDependencyError" in run.stdout
    assert "pip install 'vgs-ckpt[test]'" in run.stdout


def test_item_12_help_texts_are_plain_text() -> None:
    commands = ["", "demo", "inspect", "verify", "upgrade", "migrate", "sweep", "schema"]
    for command in commands:
        run = subprocess.run([sys.executable, "-m", "vgs_ckpt", *command.split(), "--help"],
                             capture_output=True, text=True, check=True)
        assert "``" not in run.stdout and ":func:" not in run.stdout, command
    for script in sorted((ROOT / "examples").glob("*.py")):
        if script.name == "make_sample.py":
            continue
        run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                             text=True, check=True, timeout=120)
        assert "``" not in run.stdout, script.name
        # The docstring keeps its paragraphs and its command lines.
        assert "\n\n" in run.stdout.split("options:")[0], script.name


def test_item_03_the_command_line_shows_warnings_as_warnings(tmp_path: Path) -> None:
    salvage = ROOT / "conformance" / "vectors" / "salvage_vgs_scalar_tensor.safetensors"
    run = subprocess.run([sys.executable, "-m", "vgs_ckpt", "verify", str(salvage)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("warning (InvalidVGSStateWarning): ")
    assert "sys.exit" not in run.stderr and ".py:" not in run.stderr
    assert "got a tensor" in run.stderr
    legacy = write_legacy(tmp_path / "l1.pt", "L1")
    run = subprocess.run([sys.executable, "-m", "vgs_ckpt", "verify", str(legacy)],
                         capture_output=True, text=True, check=True)
    assert "it has no digests, so nothing could be verified" in run.stdout
    assert "v1_policy_only" in run.stdout and "v2_full_parameters" not in run.stdout


def test_error_paths_of_the_new_inputs(tmp_path: Path) -> None:
    """Every new input refused with a VgsCkptError that names it and says how to fix."""
    from vgs_ckpt.cli import main
    from vgs_ckpt.pbt.migrate import migrate_population

    # A member id the store cannot hold is skipped, named, never guessed at.
    src = tmp_path / "src"
    src.mkdir()
    write_legacy(src / "member_a..b_step_1.pt", "L0")
    os.mkfifo(src / "member_0_step_2.pt")  # never opened: not a regular file
    items = {i.source.name: i for i in migrate_population(src, tmp_path / "out")}
    assert "member id 'a..b'" in items["member_a..b_step_1.pt"].result
    assert items["member_0_step_2.pt"].result == "skipped: not a file"
    # Header fields of the wrong kind, at save.
    for fields, named in (({"hyperparams": {1: 2}}, "has the key 1"),
                          ({"hyperparams": {"a": object()}}, "hyperparams.a holds a object"),
                          ({"created_at": 5}, "RFC 3339"),
                          ({"created_at": "2026-01-01T00:00:00+24:00"}, "offset")):
        with pytest.raises(vgs_ckpt.UsageError, match=named):
            vgs_ckpt.save_bytes({"x": 1}, step=0, **fields)
    # The demo's seed count.
    assert main(["demo", "--compare", "--seeds", "0", "--dir", str(tmp_path / "d")]) == 1


def test_inspect_json_is_json_with_non_finite_statistics(tmp_path: Path) -> None:
    path = tmp_path / "n.safetensors"
    vgs_ckpt.save(path, {"vgs_state": {"beta": 0.9, "alpha": 0.1, "eps": 1e-8,
                                       "warmup_steps": 0, "step_count": 0,
                                       "grad_mean_ema": float("nan"), "vgs_version": "3.2"}},
                  step=0)
    run = subprocess.run([sys.executable, "-m", "vgs_ckpt", "inspect", "--json", str(path)],
                         capture_output=True, text=True, check=True)

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    info = json.loads(run.stdout, parse_constant=refuse)
    assert info["header"]["vgs"]["grad_mean_ema"] == "NaN"
