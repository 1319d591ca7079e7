"""PBT integration: a checkpoint store for a population, the exploit transfer, and a
drop-in scheduler. Every exploit carries weights, optimizer state and VGS state."""

from vgs_ckpt.pbt.scheduler import (
    HyperparamSpec,
    PBTConfig,
    PBTScheduler,
    PopulationMember,
    truncation_count,
)
from vgs_ckpt.pbt.store import CheckpointRef, CheckpointStore, check_member_id
from vgs_ckpt.pbt.transfer import (
    ExploitResult,
    apply_hyperparams,
    exploit,
    optimizer_state_paths,
    reset_optimizer_state,
)

__all__ = [
    "CheckpointRef",
    "CheckpointStore",
    "ExploitResult",
    "HyperparamSpec",
    "PBTConfig",
    "PBTScheduler",
    "PopulationMember",
    "apply_hyperparams",
    "check_member_id",
    "exploit",
    "optimizer_state_paths",
    "reset_optimizer_state",
    "truncation_count",
]
