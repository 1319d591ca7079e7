"""Integrations with other frameworks; each is an optional extra."""

from __future__ import annotations

import importlib.util

from vgs_ckpt.errors import MissingDependencyError

__all__ = ["exit_without_extra", "require_extra"]


def require_extra(extra: str, *modules: str, what: str = "this") -> None:
    """Raise :class:`MissingDependencyError` naming the install command when one of
    ``modules`` cannot be imported (for the examples and other entry points that need
    an extra before they import anything of it)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"{what} needs {', '.join(missing)}, which is not installed: pip install "
            f"'vgs-ckpt[{extra}]'")


def exit_without_extra(extra: str, *modules: str, what: str) -> None:
    """:func:`require_extra` for scripts: print the error and the install command on
    stderr and exit with status 2, instead of a traceback."""
    try:
        require_extra(extra, *modules, what=what)
    except MissingDependencyError as exc:
        raise SystemExit(f"error: {exc}") from None
