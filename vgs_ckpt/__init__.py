"""vgs_ckpt: a versioned, pickle-free checkpoint format for PBT with VGS state."""

from vgs_ckpt._version import __version__
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.codec import load, load_bytes, read_header, save, save_bytes
from vgs_ckpt.detect import Detection, detect_format
from vgs_ckpt.errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    MissingDependencyError,
    SchemaError,
    TreeError,
    UnsafeCheckpointError,
    UnsupportedTypeError,
    UnsupportedVersionError,
    UsageError,
    VgsCkptError,
)
from vgs_ckpt.migrations import LegacyFormatWarning
from vgs_ckpt.models import (
    CheckpointFormat,
    CheckpointV1,
    CheckpointV2,
    ExploitSource,
    Lineage,
    Provenance,
    TensorInfo,
    VGSState,
)
from vgs_ckpt.upgrade import upgrade

__all__ = [
    "Checkpoint",
    "CheckpointFormat",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "CheckpointV1",
    "CheckpointV2",
    "Detection",
    "ExploitSource",
    "FormatError",
    "IntegrityError",
    "LegacyFormatWarning",
    "Lineage",
    "MissingDependencyError",
    "Provenance",
    "SchemaError",
    "TensorInfo",
    "TreeError",
    "UnsafeCheckpointError",
    "UnsupportedTypeError",
    "UnsupportedVersionError",
    "UsageError",
    "VGSState",
    "VgsCkptError",
    "__version__",
    "detect_format",
    "load",
    "load_bytes",
    "read_header",
    "save",
    "save_bytes",
    "upgrade",
]
