"""Every Python snippet of docs/models.md ("bring your own model") runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("learn2learn", reason="the few-shot snippets sample tasks with learn2learn (the few-shot extra)")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_its_snippets():
    assert len(SNIPPETS) == 5


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[index], f"{PAGE.name} snippet {index + 1}", "exec"), {"__name__": "snippet"})
