"""Writing and checking the JSON Schema files generated from the models."""

from __future__ import annotations

import json
from pathlib import Path

from vgs_ckpt.models import json_schemas

__all__ = ["missing_schemas", "render_schemas", "schema_drift", "write_schemas"]


def render_schemas() -> dict[str, str]:
    """File name -> file text of every JSON Schema document."""
    return {f"{stem}.schema.json": json.dumps(doc, indent=2, sort_keys=True) + "\n"
            for stem, doc in json_schemas().items()}


def write_schemas(directory: str | Path) -> list[Path]:
    """Write the schema files into ``directory`` (created if missing); return their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def missing_schemas(directory: str | Path) -> list[str]:
    """Names of schema files that ``directory`` does not have at all."""
    out = Path(directory)
    return [name for name in render_schemas() if not (out / name).is_file()]


def schema_drift(directory: str | Path) -> list[str]:
    """Names of schema files in ``directory`` that are missing or differ from the models."""
    out = Path(directory)
    return [name for name, text in render_schemas().items()
            if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != text]
