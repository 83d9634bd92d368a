"""The documentation site: the docstrings' examples run as doctests, and the site builds with warnings as errors.

The doctests run in-process, so the default test run covers them. The build of the site needs the docs tools
(``docs/requirements.txt``) and is skipped without them; ``bash scripts/docs.sh`` builds the HTML to read.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_hypergrad"
DOCS = ROOT / "docs"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _example_blocks() -> list[tuple[Path, int, str]]:
    """Every ``Example::`` block of the package: its file, its line and the first line of its body."""
    blocks = []
    for path in SOURCES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == "Example::":
                body = next((rest.strip() for rest in lines[i + 1 :] if rest.strip()), "")
                blocks.append((path, i + 1, body))
    return blocks


EXAMPLES = _example_blocks()
MODULES = sorted({_module_name(path) for path, _, _ in EXAMPLES})


def test_every_example_block_is_a_doctest():
    """A block without ``>>>`` prompts would be shown on the site and never run."""
    assert EXAMPLES, "no Example:: block found in the package"
    plain = [f"{path.relative_to(ROOT)}:{line}" for path, line, body in EXAMPLES if not body.startswith(">>>")]
    assert not plain, f"Example:: blocks without >>> prompts (they would not run as doctests): {plain}"


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_of_the_docstrings_run(name):
    module = importlib.import_module(name)
    tests = [test for test in doctest.DocTestFinder().find(module, name) if test.examples]
    blocks = sum(1 for path, _, _ in EXAMPLES if _module_name(path) == name)
    assert len(tests) >= blocks, f"{name}: {blocks} Example:: blocks, {len(tests)} doctests found"
    runner = doctest.DocTestRunner()
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    assert attempted > 0
    assert failed == 0, "".join(report)


def test_the_top_level_page_lists_every_export():
    import lightning_hypergrad

    page = (DOCS / "api" / "lightning_hypergrad.rst").read_text()
    listed = set(re.findall(r":\w+:`~?(?:lightning_hypergrad\.)?(\w+)`", page))
    assert sorted(set(lightning_hypergrad.__all__) - listed) == []


def test_every_page_is_in_a_table_of_contents():
    def entries(index: Path) -> set[str]:
        return set(re.findall(r"^\s*([\w/]+)\s*$", index.read_text(), flags=re.M))

    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    assert sorted(pages - entries(DOCS / "index.md")) == []
    api = {p.stem for p in (DOCS / "api").glob("*.rst")} - {"index"}
    assert sorted(api - entries(DOCS / "api" / "index.rst")) == []


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_parser") is None,
    reason="the docs tools are not installed (pip install -r docs/requirements.txt)",
)
def test_the_site_builds_without_a_warning(tmp_path):
    """Every page and every cross-reference of the docstrings resolves; the dummy builder resolves the references
    as the HTML builder does, without writing the pages."""
    command = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "dummy"]
    command += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "site")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-8000:]
