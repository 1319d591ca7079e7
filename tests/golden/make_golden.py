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


def tiny_bytes() -> bytes:
    import vgs_ckpt
    from vgs_ckpt import _header

    saved = _header.__version__
    _header.__version__ = GOLDEN_VERSION
    try:
        return vgs_ckpt.save_bytes(tiny_tree(), step=7, performance=0.5, member_id="m0",
                                   hyperparams={"lr": 0.001}, created_at=GOLDEN_TIME)
    finally:
        _header.__version__ = saved


if __name__ == "__main__":
    (HERE / "tiny_v2.safetensors").write_bytes(tiny_bytes())
    print("wrote", HERE / "tiny_v2.safetensors")
