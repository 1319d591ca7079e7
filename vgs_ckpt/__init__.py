"""vgs_ckpt: a versioned, pickle-free checkpoint format for PBT with VGS state.

Where things live: :mod:`~vgs_ckpt.writer` (save), :mod:`~vgs_ckpt.reader` (open,
load, read_header, detect_format), :mod:`~vgs_ckpt.upgrades` (migration steps,
in-memory upgrade, the ``vgs-ckpt upgrade`` command), :mod:`~vgs_ckpt.vgs_state`
(the VGS vocabulary), :mod:`~vgs_ckpt.errors` (the error taxonomy),
:mod:`~vgs_ckpt.models` (the header schema).
"""

from vgs_ckpt._version import __version__
from vgs_ckpt.async_save import SaveHandle, save_async
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    InvalidVGSStateWarning,
    LegacyFormatWarning,
    MissingDependencyError,
    UnsafeCheckpointError,
    UnsupportedTypeError,
    UnsupportedVersionError,
    UsageError,
    VgsCkptError,
)
from vgs_ckpt.models import (
    CheckpointFormat,
    CheckpointHeader,
    CheckpointV1,
    CheckpointV2,
    ContainerKind,
    ExploitSource,
    Lineage,
    Provenance,
    TensorInfo,
    VGSState,
)
from vgs_ckpt.reader import (
    CheckpointReader,
    Detection,
    TensorSpec,
    detect_format,
    load,
    load_bytes,
    open,
    read_header,
)
from vgs_ckpt.upgrades import upgrade
from vgs_ckpt.writer import save, save_bytes

__all__ = [
    "Checkpoint",
    "CheckpointFormat",
    "CheckpointHeader",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointV1",
    "CheckpointV2",
    "ContainerKind",
    "Detection",
    "ExploitSource",
    "FormatError",
    "IntegrityError",
    "InvalidVGSStateWarning",
    "LegacyFormatWarning",
    "Lineage",
    "MissingDependencyError",
    "Provenance",
    "SaveHandle",
    "TensorInfo",
    "TensorSpec",
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
    "open",
    "read_header",
    "save",
    "save_async",
    "save_bytes",
    "upgrade",
]


def __getattr__(name: str) -> object:  # the merged SchemaError and TreeError, deprecated
    from vgs_ckpt import errors

    return errors.__getattr__(name)
