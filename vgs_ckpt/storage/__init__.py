"""Where checkpoints live: the :class:`Storage` protocol and its backends.

- :mod:`~vgs_ckpt.storage.base`: the protocol (:class:`Storage`,
  :class:`Capabilities`, :class:`ObjectInfo`; what :meth:`Storage.open` returns is a
  :class:`~vgs_ckpt._container.Source`).
- :mod:`~vgs_ckpt.storage.local`: :class:`LocalStorage`, files on a POSIX file
  system (the only module that renames, links, locks or syncs files).

Every function that takes a checkpoint path also takes ``storage=`` (default:
:data:`LOCAL`); :func:`resolve` turns the pair into a backend and a key.
"""

from __future__ import annotations

import os

from vgs_ckpt.errors import UsageError
from vgs_ckpt.storage.base import Capabilities, ObjectInfo, Storage
from vgs_ckpt.storage.local import LOCAL, LocalStorage

__all__ = ["LOCAL", "Capabilities", "LocalStorage", "ObjectInfo", "Storage", "resolve"]


def resolve(path: str | os.PathLike[str], storage: Storage | None = None,
            *, function: str = "load") -> tuple[Storage, str]:
    """The backend (``storage``, default :data:`LOCAL`) and the key of ``path``.

    Raises:
        UsageError: ``path`` is not a str or os.PathLike (bytes would open as a name,
            an int as a file descriptor), or ``storage`` is not a Storage.
    """
    if not isinstance(path, str | os.PathLike):
        raise UsageError(f"{function}(): invalid checkpoint path {path!r:.80}: expected a "
                         f"str or os.PathLike, got {type(path).__qualname__} (use "
                         "load_bytes/save_bytes for bytes)")
    key = os.fspath(path)
    if not isinstance(key, str):
        raise UsageError(f"{function}(): invalid checkpoint path {path!r:.80}: a bytes path; "
                         "pass a str or os.PathLike of str")
    if storage is None:
        return LOCAL, key
    if not isinstance(storage, Storage):
        raise UsageError(f"{function}(): storage must implement vgs_ckpt.storage.Storage, got "
                         f"{type(storage).__qualname__}")
    return storage, key
