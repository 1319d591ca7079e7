"""The README's module map is true: every module is on it, every listed module
exists, imports point down the layers, and private modules are imported only by
the users the map names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vgs_ckpt"
LAYERS = ["format", "storage", "codec", "loading", "algorithm", "application"]
TOP = {"__init__", "__main__"}  # the package's own entry points may import anything


def _module_map() -> list[tuple[str, list[str], list[str]]]:
    """(layer, modules, users) for every row of the README's module map."""
    text = (ROOT / "README.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in LAYERS:
            modules = re.findall(r"`([^`]+)`", cells[1])
            users = re.findall(r"`([^`]+)`", cells[3])
            rows.append((cells[0], modules, users))
    return rows


MAP = _module_map()


def _modules() -> dict[str, Path]:
    """Every module of the package by its map name (``readers/base``, ``pbt/store``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).with_suffix("").as_posix()
        found[name] = path
    return found


MODULES = _modules()


def _row(name: str) -> tuple[str, list[str]] | None:
    """The layer and users of a module: its own row, or its package's (``pbt/``)."""
    for layer, modules, users in MAP:
        if name in modules:
            return layer, users
    for layer, modules, users in MAP:
        if any(m.endswith("/") and name.startswith(m) for m in modules):
            return layer, users
    return None


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (anywhere in it), by map name."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for dotted in names:
            if dotted != "vgs_ckpt" and not dotted.startswith("vgs_ckpt."):
                continue
            name = dotted.removeprefix("vgs_ckpt").lstrip(".").replace(".", "/")
            if name in MODULES:
                found.add(name)
            elif f"{name}/__init__" in MODULES:
                found.add(f"{name}/__init__")
    return found


def _layer(name: str, seen: frozenset[str] = frozenset()) -> int:
    """A module's layer; a package's ``__init__`` sits as high as what it imports."""
    if name.endswith("/__init__"):
        package = name.removesuffix("__init__")
        row = _row(package)
        if row is not None:
            return LAYERS.index(row[0])
        inner = [m for m in _imports(MODULES[name]) if m != name and m not in seen]
        return max((_layer(m, seen | {name}) for m in inner), default=0)
    row = _row(name)
    assert row is not None, f"vgs_ckpt/{name}.py is not on the README's module map"
    return LAYERS.index(row[0])


def test_every_module_is_on_the_map_and_every_listed_module_exists() -> None:
    listed = [m for _, modules, _ in MAP for m in modules]
    assert listed, "the README has no module map"
    for module in listed:
        assert (module.rstrip("/") + "/__init__" in MODULES if module.endswith("/")
                else module in MODULES), f"the map lists {module}, which does not exist"
    for name in MODULES:
        if name in TOP or name.endswith("/__init__"):
            continue
        assert _row(name) is not None, f"vgs_ckpt/{name}.py is not on the module map"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n not in TOP))
def test_imports_point_down_the_layers(name: str) -> None:
    mine = _layer(name)
    for imported in _imports(MODULES[name]):
        if imported in TOP:
            pytest.fail(f"{name} imports the package root; import the module instead")
        assert _layer(imported) <= mine, (
            f"{name} ({LAYERS[mine]}) imports {imported} ({LAYERS[_layer(imported)]}), "
            "a layer above it")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_private_modules_are_imported_only_by_their_documented_users(name: str) -> None:
    for imported in _imports(MODULES[name]):
        last = imported.rsplit("/", 1)[-1]
        if not last.startswith("_") or last in TOP:
            continue
        package = imported.rsplit("/", 1)[0] + "/" if "/" in imported else ""
        if package and name.startswith(package):
            continue  # a package's private module, used inside the package
        row = _row(imported)
        assert row is not None
        users = row[1]
        assert name in users, (f"{name} imports the private module {imported}, whose "
                               f"documented users are {users}")


def test_the_format_layer_imports_nothing_above_it() -> None:
    format_modules = [n for n in MODULES if n not in TOP and _layer(n) == 0]
    assert {"errors", "models", "_container", "_tree", "_dtypes"} <= set(format_modules)
    for name in format_modules:
        above = [m for m in _imports(MODULES[name]) if _layer(m) > 0]
        assert not above, f"{name} (format layer) imports {above}"
