"""Check the built sdist and wheel: `python .ci/check_dist.py DIST_DIR`.

The wheel holds the package (with py.typed) and its metadata, and no tests; the sdist
holds everything its tests need to run from the unpacked tree. Exit 1 with every
problem listed.
"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

SDIST_NEEDS = [
    "LICENSE", "CHANGELOG.md", "README.md", "PACKAGE.md", "pyproject.toml",
    "vgs_ckpt/py.typed", "tests/conftest.py", "tests/__init__.py", "tests/legacy_files.py",
    "tests/pbt_helpers.py", "tests/spec_reader.py", "tests/spec_writer.py",
    "tests/golden/tiny_v2.safetensors", "tests/golden/make_golden.py",
    "tests/regressions/legacy_nonzip_storage_key.bin", "tests/test_golden.py",
    "tests/test_conformance.py", "conformance/manifest.json", "conformance/generate.py",
    "docs/spec.md", "schema/header.schema.json", "schema/container.schema.json",
    "examples/sb3_pbt.py", "benchmarks/codec.py",
]


def main(dist: Path) -> int:
    problems: list[str] = []
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
        return 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(wheel.read(meta_name).decode())
    if "vgs_ckpt/py.typed" not in names:
        problems.append("wheel: no vgs_ckpt/py.typed")
    strays = [n for n in names if not n.startswith(("vgs_ckpt/", "vgs_ckpt-"))]
    if strays:
        problems.append(f"wheel: files outside the package: {strays[:5]}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append("wheel: LICENSE missing from the metadata")
    for field in ("Author", "Project-URL", "Classifier", "License-Expression"):
        if not metadata.get_all(field) and not (field == "Author"
                                                and metadata.get("Author-email")):
            problems.append(f"wheel metadata: no {field}")
    if metadata.get("Description-Content-Type") != "text/markdown":
        problems.append("wheel metadata: the long description is not markdown")
    description = metadata.get_payload() or ""
    for target in re.findall(r"\]\(([^)]+)\)", description):
        if not target.startswith(("https://", "http://")):
            problems.append(f"long description: relative link {target!r}")
    for developer_text in ("<!-- ci:test -->", "this project's machines"):
        if developer_text in description:
            problems.append(f"long description: developer text {developer_text!r}")
    with tarfile.open(sdists[0]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    for needed in SDIST_NEEDS:
        if needed not in members:
            problems.append(f"sdist: {needed} missing")
    if any("__pycache__" in m for m in members):
        problems.append("sdist: __pycache__ shipped")
    for problem in problems:
        print(problem)
    print(f"{wheels[0].name}: {len(names)} files; {sdists[0].name}: {len(members)} files; "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "dist")))
