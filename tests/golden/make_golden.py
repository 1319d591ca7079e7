"""Regenerate the golden files: `python tests/golden/make_golden.py`.

Only do this for a deliberate format change; the golden test exists to catch
accidental ones. The producer version is pinned so a release does not change them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

GOLDEN_TIME = datetime(2026, 1, 1, tzinfo=UTC)
GOLDEN_VERSION = "0.1.0"
HERE = Path(__file__).parent


def tiny_tree() -> dict[str, Any]:
    return {"policy": {"w": torch.tensor([1.0, -2.0])}, "extra": {"k": [1, 0.5, (True, None)]}}


def tiny_bytes(*, seekable: bool = False) -> bytes:
    """The golden file's bytes, written in one forward pass (or, with ``seekable``,
    by the local-file path that rewrites the header at the end)."""
    import io

    from vgs_ckpt import _header, writer
    from vgs_ckpt.models import Producer

    header, arrays = _header.describe(
        tiny_tree(), {"step": 7, "performance": 0.5, "member_id": "m0",
                      "hyperparams": {"lr": 0.001}, "created_at": GOLDEN_TIME},
        producer=Producer(name="vgs_ckpt", version=GOLDEN_VERSION))
    buffer = io.BytesIO()
    writer.write(buffer, header, arrays, seekable=seekable)
    return buffer.getvalue()


if __name__ == "__main__":
    (HERE / "tiny_v2.safetensors").write_bytes(tiny_bytes())
    print("wrote", HERE / "tiny_v2.safetensors")
