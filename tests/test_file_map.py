"""docs/guide.md's map of the package's files, one line a file, is in step with the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_guide_maps_every_file_of_the_package_once_and_no_other():
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    section = guide.split("## The package's files", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- `(lightning_hypergrad/[\w/]+\.py)`: \S", section, flags=re.M)
    tree = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "lightning_hypergrad").rglob("*.py") if "__pycache__" not in p.parts
    )
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(set(tree) - set(listed)) == [], "files missing from docs/guide.md's map of the package"
    assert sorted(set(listed) - set(tree)) == [], "docs/guide.md maps files that do not exist"


def test_no_module_of_the_package_exceeds_the_layout_target():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
        for p in (ROOT / "lightning_hypergrad").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert {k: v for k, v in sizes.items() if v > 420} == {}
