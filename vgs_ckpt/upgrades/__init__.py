"""Upgrading checkpoints to the latest format: everything about it lives here.

- :mod:`~vgs_ckpt.upgrades.steps`: the named migration steps (format versions,
  VGS state versions) and :func:`upgrade_tree`, the driver that applies them;
- :mod:`~vgs_ckpt.upgrades.checkpoint`: :func:`upgrade`, a loaded checkpoint
  upgraded in memory (what ``vgs_ckpt.load`` does by default);
- :mod:`~vgs_ckpt.upgrades.files`: converting files on disk, the
  ``vgs-ckpt upgrade`` command.
"""

from vgs_ckpt.upgrades.checkpoint import upgrade
from vgs_ckpt.upgrades.steps import (
    FORMAT_STEPS,
    VGS_STEPS,
    MigrationStep,
    Upgrading,
    upgrade_tree,
    upgrade_vgs_state,
)

__all__ = ["FORMAT_STEPS", "VGS_STEPS", "MigrationStep", "Upgrading", "upgrade", "upgrade_tree",
           "upgrade_vgs_state"]
