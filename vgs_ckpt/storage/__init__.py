"""Where checkpoints live: the :class:`Storage` protocol and its backends.

- :mod:`~vgs_ckpt.storage.base`: the protocol (:class:`Storage`,
  :class:`Capabilities`, :class:`ObjectInfo`; what :meth:`Storage.open` returns is a
  :class:`~vgs_ckpt._container.Source`).
- :mod:`~vgs_ckpt.storage.local`: :class:`LocalStorage`, files on a POSIX file
  system (the only module that renames, links, locks or syncs files).
- :mod:`~vgs_ckpt.storage.objects`: :class:`FsspecStorage`, objects in an object
  store (S3, GCS, Azure, ``memory://``) through fsspec, for URLs.

Every function that takes a checkpoint path also takes ``storage=`` (default: the
local file system, or for a URL such as ``s3://bucket/key`` the object store it
names, opened with ``storage_options=``); :func:`resolve` turns them into a
backend and a key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from vgs_ckpt.errors import UsageError
from vgs_ckpt.storage.base import Capabilities, ObjectInfo, Storage
from vgs_ckpt.storage.local import LOCAL, LocalStorage
from vgs_ckpt.storage.objects import FsspecStorage, for_url, is_url

__all__ = ["LOCAL", "Capabilities", "FsspecStorage", "LocalStorage", "ObjectInfo", "Storage",
           "StorageOptions", "resolve"]

StorageOptions = Mapping[str, Any]  # fsspec's storage_options (credentials, endpoint, ...)


def resolve(path: str | os.PathLike[str], storage: Storage | None = None,
            *, storage_options: StorageOptions | None = None,
            function: str = "load") -> tuple[Storage, str]:
    """The backend and the key of ``path``: ``storage`` if given; for a URL
    (``s3://...``, ``memory://...``) the object store it names, opened with
    ``storage_options``; else the local file system (``file://`` URLs too).

    Raises:
        UsageError: ``path`` is not a str or os.PathLike (bytes would open as a name,
            an int as a file descriptor), ``storage`` is not a Storage, or
            ``storage_options`` are given for a local path or with ``storage``.
        MissingDependencyError: the URL's filesystem is not installed (the error
            names the extra, e.g. ``pip install 'vgs_ckpt[s3]'``).
    """
    if not isinstance(path, str | os.PathLike):
        raise UsageError(f"{function}(): invalid checkpoint path {path!r:.80}: expected a "
                         f"str or os.PathLike, got {type(path).__qualname__} (use "
                         "load_bytes/save_bytes for bytes)")
    key = os.fspath(path)
    if not isinstance(key, str):
        raise UsageError(f"{function}(): invalid checkpoint path {path!r:.80}: a bytes path; "
                         "pass a str or os.PathLike of str")
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise UsageError(f"{function}(): storage_options must be a mapping (fsspec's "
                         f"options), got {type(storage_options).__qualname__}")
    if storage is not None:
        if not isinstance(storage, Storage):
            raise UsageError(f"{function}(): storage must implement vgs_ckpt.storage.Storage, "
                             f"got {type(storage).__qualname__}")
        if storage_options:
            raise UsageError(f"{function}(): give storage= or storage_options=, not both "
                             "(storage_options open the filesystem of a URL)")
        return storage, key
    if key.startswith("file://"):
        key = key[len("file://"):]
    elif is_url(key):
        return for_url(key, storage_options), key
    if storage_options:
        raise UsageError(f"{function}(): storage_options apply to URLs (s3://..., "
                         f"memory://...), not to the local path {key!r:.80}")
    return LOCAL, key
