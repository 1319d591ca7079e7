"""The checkpoint readers, behind one protocol (:class:`CheckpointReader`):

- :mod:`~vgs_ckpt.readers.safetensors`: :class:`SafetensorsReader`, vgs_ckpt files,
  read lazily and verified per tensor;
- :mod:`~vgs_ckpt.readers.legacy`: :class:`LegacyReader`, the original scheduler's
  ``torch.save`` files, read safely (``weights_only=True``) and within bounds.

:func:`vgs_ckpt.open` picks one from the bytes.
"""

from vgs_ckpt.readers.base import CheckpointReader, TensorSpec
from vgs_ckpt.readers.legacy import LegacyReader
from vgs_ckpt.readers.safetensors import SafetensorsReader

__all__ = ["CheckpointReader", "LegacyReader", "SafetensorsReader", "TensorSpec"]
