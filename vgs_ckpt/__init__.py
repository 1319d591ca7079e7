"""vgs_ckpt: a versioned, pickle-free checkpoint format for PBT with VGS state.

Where things live (the README's module map has all of them):
:mod:`~vgs_ckpt.writer` (save), :mod:`~vgs_ckpt.reader` (open, read_header,
detect_format), :mod:`~vgs_ckpt.readers` (the two readers),
:mod:`~vgs_ckpt.loading` (load: read and upgrade), :mod:`~vgs_ckpt.upgrades`
(migration steps, in-memory upgrade, the ``vgs-ckpt upgrade`` command),
:mod:`~vgs_ckpt.storage` (where bytes live), :mod:`~vgs_ckpt.vgs_state` (the VGS
vocabulary), :mod:`~vgs_ckpt.errors` (the error taxonomy), :mod:`~vgs_ckpt.models`
(the header schema).
"""

from vgs_ckpt._version import __version__
from vgs_ckpt.async_save import SaveHandle, save_async
from vgs_ckpt.checkpoint import Checkpoint
from vgs_ckpt.errors import (
    ArgumentError,
    CheckpointExistsError,
    CheckpointIOError,
    CheckpointNotFoundError,
    FormatError,
    IntegrityError,
    InvalidVGSStateWarning,
    LegacyFormatWarning,
    MissingDependencyError,
    PartialStateWarning,
    UnsafeCheckpointError,
    UnsupportedTypeError,
    UnsupportedVersionError,
    UsageError,
    VgsCkptError,
)
from vgs_ckpt.loading import load, load_bytes
from vgs_ckpt.models import (
    CheckpointFormat,
    CheckpointHeader,
    CheckpointV1,
    CheckpointV2,
    ContainerKind,
    ExploitSource,
    HeaderFields,
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
    open,
    read_header,
)
from vgs_ckpt.storage import LocalStorage, Storage
from vgs_ckpt.upgrades import upgrade
from vgs_ckpt.writer import save, save_bytes

__all__ = [
    "ArgumentError",
    "Checkpoint",
    "CheckpointExistsError",
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
    "HeaderFields",
    "IntegrityError",
    "InvalidVGSStateWarning",
    "LegacyFormatWarning",
    "Lineage",
    "LocalStorage",
    "MissingDependencyError",
    "PartialStateWarning",
    "Provenance",
    "SaveHandle",
    "Storage",
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
