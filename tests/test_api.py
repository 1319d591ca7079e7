"""The public surface is explicit and stays small."""

from __future__ import annotations

import importlib

import pytest

import vgs_ckpt


def test_all_matches_the_public_names() -> None:
    public = {n for n in dir(vgs_ckpt) if not n.startswith("_") or n == "__version__"}
    modules = {n for n in public if type(getattr(vgs_ckpt, n)).__name__ == "module"}
    assert public - modules == set(vgs_ckpt.__all__)


@pytest.mark.parametrize("module", ["writer", "reader", "errors", "legacy", "upgrades",
                                    "upgrades.steps", "upgrades.checkpoint", "upgrades.files",
                                    "models", "schema", "vgs_state", "checkpoint", "cli",
                                    "vgs", "demo", "testing", "pbt", "pbt.store",
                                    "pbt.transfer", "pbt.scheduler", "pbt.learner",
                                    "integrations.ray_tune"])
def test_every_module_has_an_explicit_all(module: str) -> None:
    mod = importlib.import_module(f"vgs_ckpt.{module}")
    assert hasattr(mod, "__all__")
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names missing {name}"


def test_checkpoint_format_is_a_str_enum() -> None:
    assert vgs_ckpt.CheckpointFormat.V1_POLICY_ONLY == "v1_policy_only"
    assert vgs_ckpt.CheckpointFormat.V2_FULL_PARAMETERS == "v2_full_parameters"
    assert str(vgs_ckpt.CheckpointFormat.V2_FULL_PARAMETERS) == "v2_full_parameters"
