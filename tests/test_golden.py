"""Golden bytes: the format is pinned byte for byte (docs/spec.md, section 10)."""

from __future__ import annotations

from pathlib import Path

import safetensors
import torch

import vgs_ckpt
from vgs_ckpt._container import BytesSource, read_container
from vgs_ckpt.testing import assert_trees_equal

from .golden.make_golden import tiny_bytes, tiny_tree

GOLDEN = Path(__file__).parent / "golden" / "tiny_v2.safetensors"


def test_writer_output_matches_the_golden_file_byte_for_byte() -> None:
    assert tiny_bytes() == GOLDEN.read_bytes()


def test_both_write_paths_give_the_golden_bytes(tmp_path: Path) -> None:
    # One forward pass (any stream) and the local fast path (header rewritten at the
    # end) are the same format, byte for byte; so is a save to a file.
    assert tiny_bytes(seekable=True) == GOLDEN.read_bytes()
    import vgs_ckpt._header as header_module
    from vgs_ckpt.models import Producer

    from .golden.make_golden import GOLDEN_TIME, GOLDEN_VERSION
    saved = tmp_path / "tiny.safetensors"
    original = header_module.PRODUCER
    try:
        header_module.PRODUCER = Producer(name="vgs_ckpt", version=GOLDEN_VERSION)
        vgs_ckpt.save(saved, tiny_tree(), step=7, performance=0.5, member_id="m0",
                      hyperparams={"lr": 0.001}, created_at=GOLDEN_TIME)
    finally:
        header_module.PRODUCER = original
    assert saved.read_bytes() == GOLDEN.read_bytes()


def test_golden_file_reads_back_to_its_tree() -> None:
    ckpt = vgs_ckpt.load(GOLDEN)
    assert_trees_equal(ckpt.parameters, tiny_tree())
    assert (ckpt.header.step, ckpt.header.performance, ckpt.header.member_id) == (7, 0.5, "m0")


def test_golden_file_is_valid_safetensors_with_our_metadata() -> None:
    with safetensors.safe_open(str(GOLDEN), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt"
        assert meta["vgs_ckpt.format_version"] == "v2_full_parameters"
        assert torch.equal(f.get_tensor("policy/w"), torch.tensor([1.0, -2.0]))


def test_header_is_padded_so_data_is_8_byte_aligned() -> None:
    data = GOLDEN.read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert (8 + length) % 8 == 0
    assert data[8 + length - 1:8 + length] in (b"}", b" ")


def test_key_order_of_the_input_does_not_change_the_data_order() -> None:
    a = {"x": torch.ones(1), "y": torch.zeros(2, dtype=torch.float64)}
    b = {"y": a["y"], "x": a["x"]}
    da, db = vgs_ckpt.save_bytes(a, step=0), vgs_ckpt.save_bytes(b, step=0)
    order_a = list(read_container(BytesSource(da)).entries)
    order_b = list(read_container(BytesSource(db)).entries)
    assert order_a == order_b == ["y", "x"]  # larger itemsize first, then by name
    assert list(vgs_ckpt.load_bytes(db).parameters) == ["y", "x"]  # the tree keeps the order
