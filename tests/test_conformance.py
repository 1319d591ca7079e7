"""The conformance vectors, their manifest and the library agree (spec appendix B).

The vectors are generated (conformance/generate.py); these tests regenerate them and
check that the committed ones are what the generator writes, that the library reads
every one as the manifest says, that the schema verdicts are true, and that every gap
of issue #20 has a vector or a test of its own.
"""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import vgs_ckpt
from vgs_ckpt import conformance

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "conformance"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
ENTRIES = {e["file"]: e for e in MANIFEST["vectors"]}


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("conformance_generate",
                                                  VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAME_TORCH = torch.__version__.split("+")[0] == MANIFEST["generated_with"]["torch"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("conformance")
    assert _generator().main(["generate.py", str(out)]) == 0
    return out


@pytest.mark.skipif(not SAME_TORCH, reason="torch.save's bytes belong to the torch version "
                    "that generated the vectors")
def test_committed_vectors_are_what_the_generator_writes(regenerated: Path) -> None:
    assert (regenerated / "manifest.json").read_text() == (VECTORS / "manifest.json").read_text(), \
        "run `python conformance/generate.py`"
    made = sorted(p.name for p in (regenerated / "vectors").iterdir())
    assert made == sorted(p.name for p in (VECTORS / "vectors").iterdir())
    generator = _generator()
    for name in made:
        # torch's non-zip files name storages by address: compared by what they hold
        assert generator._same_pickle((VECTORS / "vectors" / name).read_bytes(),
                                      (regenerated / "vectors" / name).read_bytes()), name


def test_every_manifest_file_exists_and_every_file_is_in_the_manifest() -> None:
    files = {f"vectors/{p.name}" for p in (VECTORS / "vectors").iterdir()}
    assert files == set(ENTRIES)


@pytest.mark.parametrize("file", sorted(ENTRIES))
def test_the_library_agrees_with_the_vector(file: str) -> None:
    disagreements = conformance.check_vector(VECTORS, ENTRIES[file])
    assert not disagreements, "\n".join(
        f"{d.read}: expected {conformance.canonical(d.expected)[:400]}\n"
        f"found {conformance.canonical(d.found)[:400]}\n{d.message}" for d in disagreements)


def test_the_worked_example_is_the_golden_file() -> None:
    assert (VECTORS / "vectors" / "ok_golden.safetensors").read_bytes() == \
        (ROOT / "tests" / "golden" / "tiny_v2.safetensors").read_bytes()


def test_the_runner_passes_and_fails(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "vgs_ckpt.conformance", str(VECTORS)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(ENTRIES)} vectors: {len(ENTRIES)} agree, 0 disagree" in run.stdout
    # A manifest that expects the wrong outcome is a disagreement, named.
    broken = json.loads((VECTORS / "manifest.json").read_text())
    broken["vectors"] = [dict(e) for e in broken["vectors"][:3]]
    broken["vectors"][1]["stored"] = {"result": "IntegrityError"}
    (tmp_path / "vectors").symlink_to(VECTORS / "vectors")
    (tmp_path / "manifest.json").write_text(json.dumps(broken))
    run = subprocess.run([sys.executable, "-m", "vgs_ckpt.conformance", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1
    assert f"FAIL {broken['vectors'][1]['file']} (stored)" in run.stdout
    assert "3 vectors: 2 agree, 1 disagree" in run.stdout
    missing = subprocess.run([sys.executable, "-m", "vgs_ckpt.conformance",
                              str(tmp_path / "nowhere")], capture_output=True, text=True,
                             check=False)
    assert missing.returncode == 2 and "manifest.json not found" in missing.stderr


def test_schema_verdicts_are_true_and_valid_files_validate() -> None:
    generator = _generator()
    for file, entry in ENTRIES.items():
        data = (VECTORS / file).read_bytes()
        assert generator.schema_verdicts(data) == entry["schema"], file
        stored = entry["stored"]
        if stored["result"] == "ok" and file.endswith(".safetensors") \
                and "InvalidVGSStateWarning" not in stored.get("warnings", []):
            assert entry["schema"] == {"container": "valid", "header": "valid"}, file
        if "invalid" in entry["schema"].values():
            # What the schema refuses, a reader refuses (or salvages, with a warning).
            assert stored["result"] != "ok" or stored.get("warnings"), file


def test_the_schema_alone_catches_what_json_schema_can_state() -> None:
    """Strict types and ranges are in schema/: the vectors for them are schema-invalid."""
    for name in ("bad_step_float", "bad_step_string", "bad_step_bool", "bad_performance_true",
                 "bad_performance_string", "bad_created_at_int", "bad_created_at_space",
                 "bad_created_at_leap_second", "bad_created_at_no_zone",
                 "bad_provenance_flag_int", "bad_has_optimizer_state_string",
                 "bad_vgs_summary_stat_nan_lower", "bad_vgs_summary_stat_string",
                 "bad_vgs_summary_stat_bool", "bad_tree_two_tags",
                 "bad_tree_float_upper_nan", "bad_tree_flag_false", "bad_member_id_empty"):
        assert ENTRIES[f"vectors/{name}.safetensors"]["schema"]["header"] == "invalid", name
    for name in ("bad_format_np", "bad_format_missing", "bad_entry_extra_member",
                 "bad_entry_unknown_dtype", "bad_entry_negative_dim", "bad_entry_65_dims",
                 "bad_metadata_not_strings"):
        assert ENTRIES[f"vectors/{name}.safetensors"]["schema"]["container"] == "invalid", \
            name


def test_every_legacy_layout_and_container_has_vectors() -> None:
    names = " ".join(ENTRIES)
    for layout in ("L0", "L1", "L1_flag", "L2_vgs_1.0", "L2_vgs_2.0", "L2_vgs_3.0",
                   "L2_vgs_3.1", "L2_vgs_3.2"):
        for kind in ("zip", "pickle"):
            assert f"legacy_{layout}_{kind}.pt" in names


# Gaps of issue #20 whose rule is about writers or documents, tested elsewhere.
TESTED_ELSEWHERE = {
    5: "tests/test_spec_gaps.py::test_gap_05_writers_refuse_integers_readers_cannot_parse",
    13: "tests/test_spec_gaps.py::test_gap_13_writers_refuse_non_numbers",
    19: "tests/test_spec_gaps.py::test_gap_19_writers_refuse_vgs_scalars_that_are_not_plain",
    23: "tests/test_spec_gaps.py::test_gap_23_schema_uses_json_schema_keywords_only",
    24: "tests/test_spec_gaps.py::test_gap_24_writers_refuse_bool_bytes_other_than_0_and_1",
    28: "tests/test_spec_gaps.py::test_gap_28_an_independent_writer_makes_the_same_bytes",
}


def test_every_gap_of_issue_20_has_a_vector_or_a_test() -> None:
    covered = {g for e in ENTRIES.values() for g in e.get("issue_20_gaps", [])}
    assert covered | set(TESTED_ELSEWHERE) == set(range(1, 30))


@pytest.mark.parametrize("file", sorted(f for f in ENTRIES if f.endswith(".safetensors")))
def test_an_independent_reader_agrees_with_the_vector(file: str) -> None:
    """tests/spec_reader.py, written from docs/spec.md alone (no vgs_ckpt, no torch),
    reads every safetensors vector as the manifest says."""
    from . import spec_reader

    found = spec_reader.read((VECTORS / file).read_bytes())
    assert conformance.canonical(found) == conformance.canonical(ENTRIES[file]["stored"])


def _mutate(value: Any, rng: random.Random) -> Any:
    """``value`` (parsed JSON) with one random node replaced, a member dropped or
    duplicated under another name."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.1:
            del value[key]
        elif roll < 0.15:
            value[key + "x"] = value[key]
        else:
            value[key] = _mutate(value[key], rng)
        return value
    if isinstance(value, list) and value and rng.random() < 0.7:
        index = rng.randrange(len(value))
        value[index] = _mutate(value[index], rng)
        return value
    return rng.choice([None, True, False, 0, -1, 1.0, 1.5, 2**63, "", "x", "nan", "NaN", [],
                       {}, {"float": "inf"}, {"tensor": "policy/w"}, 1e-300,
                       "2026-01-01T00:00:00Z", {"list": []}, [0, 8]])


def test_the_independent_reader_agrees_on_mutated_files() -> None:
    """Differential check: the library and tests/spec_reader.py, on 1000 files made by
    mutating the valid vectors' headers and container headers, reach the same outcome,
    header and tree."""
    from . import spec_reader

    rng = random.Random(20)
    valid = sorted(f for f in ENTRIES if f.startswith("vectors/ok_"))
    outcomes: dict[str, int] = {}
    for _ in range(1000):
        data = (VECTORS / rng.choice(valid)).read_bytes()
        (n,) = struct.unpack_from("<Q", data)
        container = json.loads(data[8:8 + n])
        header = json.loads(container["__metadata__"]["vgs_ckpt.header"])
        if rng.random() < 0.8:
            header = _mutate(header, rng)
        else:
            container = _mutate(container, rng)
        if isinstance(container, dict) and isinstance(container.get("__metadata__"), dict):
            container["__metadata__"]["vgs_ckpt.header"] = json.dumps(header)
        raw = json.dumps(container, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % 8)
        mutated = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
        ours = conformance.outcome(lambda m=mutated: vgs_ckpt.load_bytes(m, upgrade=False))
        theirs = spec_reader.read(mutated)
        assert conformance.canonical(ours.record()) == conformance.canonical(theirs), \
            (ours.message, json.dumps(header)[:300])
        outcomes[ours.result] = outcomes.get(ours.result, 0) + 1
    assert outcomes.get("ok", 0) > 50 and outcomes.get("FormatError", 0) > 500
