"""What every part of the SB3 integration shares: the import guard, the model check,
the algorithm's optimizers and the reserved names of the state tree."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from vgs_ckpt.errors import MissingDependencyError, UsageError
from vgs_ckpt.vgs_state import KEY as VGS_KEY

try:
    from stable_baselines3.common.base_class import BaseAlgorithm
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.save_util import recursive_getattr
    _IMPORT_ERROR: ImportError | None = None
except ImportError as _exc:  # the core package works without SB3
    _IMPORT_ERROR = _exc
    if not TYPE_CHECKING:
        BaseAlgorithm = BaseCallback = object

        def recursive_getattr(obj: Any, attr: str) -> Any:
            raise AssertionError("unreachable without stable-baselines3")

__all__ = ["INSTALL", "BaseAlgorithm", "BaseCallback", "check_model", "logger", "optimizers",
           "recursive_getattr", "require"]

logger = logging.getLogger("vgs_ckpt")
INSTALL = "pip install 'vgs-ckpt[sb3]'"

# The parts of a get_state() tree that are not SB3 state-dict names (spec section 14).
VARIABLES_KEY = "pytorch_variables"
VGS_PENDING_KEY = "vgs_pending"
VEC_NORMALIZE_KEY = "vec_normalize"
COUNTERS_KEY = "counters"
RNG_KEY = "rng"
EXPLORATION_KEY = "exploration"
REPLAY_BUFFER_KEY = "replay_buffer"
MODEL_KEY = "sb3_model"
RESERVED = (VGS_KEY, VARIABLES_KEY, VGS_PENDING_KEY, VEC_NORMALIZE_KEY, COUNTERS_KEY, RNG_KEY,
            EXPLORATION_KEY, REPLAY_BUFFER_KEY, MODEL_KEY)


def require() -> None:
    """Raise MissingDependencyError when stable-baselines3 cannot be imported."""
    if _IMPORT_ERROR is not None:
        raise MissingDependencyError(
            f"the Stable-Baselines3 integration needs stable-baselines3 and gymnasium "
            f"({_IMPORT_ERROR}): {INSTALL}")


def check_model(model: Any) -> BaseAlgorithm:
    """``model`` as an SB3 algorithm, or a UsageError."""
    require()
    if not isinstance(model, BaseAlgorithm):
        raise UsageError(f"expected a Stable-Baselines3 algorithm (PPO, SAC, ...), got "
                         f"{type(model).__qualname__}")
    return model


def optimizers(model: BaseAlgorithm) -> list[tuple[str, torch.optim.Optimizer]]:
    """The algorithm's optimizers, by SB3 name, in SB3's order, each once."""
    found: list[tuple[str, torch.optim.Optimizer]] = []
    for name in model._get_torch_save_params()[0]:
        attr = recursive_getattr(model, name)
        if isinstance(attr, torch.optim.Optimizer) and all(attr is not o for _, o in found):
            found.append((name, attr))
    return found
