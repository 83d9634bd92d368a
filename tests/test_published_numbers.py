"""The numbers the README and docs/ publish are the ones their records give, and every verdict follows one rule.

``python -m studies.report`` writes each block between ``<!-- generated:NAME -->`` markers from the committed
records; here every block is written again (reading records only: nothing is trained or measured) and compared with
the page. A number changed by hand, or a record changed without running the report again, fails.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from studies import report
from studies.evidence import DEFAULT, all_settings, candidates, default_rule, judge
from studies.horizon.cnn_study import SEARCHES, UNSEEN, compare_searches
from studies.stats import BETTER, LEVEL, NOT_JUDGED, WORSE, compare, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_every_published_block_is_what_its_records_give():
    problems = report.differences()
    assert not problems, (
        "these blocks differ from what their records give (run python -m studies.report, or fix the records): "
        + "; ".join(problems)
    )


def _pages_copy(tmp_path: Path) -> Path:
    """The pages copied into ``tmp_path`` and brought up to date there (the checkout's pages stay as they are)."""
    for page in report.FILES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, tmp_path / page)
    report.write_all(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("page", "block"),
    [("README.md", "readme-advice-table"), ("docs/results.md", "cnn-T100"), ("docs/choosing.md", "choosing-rule")],
)
def test_a_number_changed_by_hand_is_caught(tmp_path, page, block):
    root = _pages_copy(tmp_path)
    text = (root / page).read_text(encoding="utf-8")
    body = report.blocks_in(text)[block]
    digit = next(i for i, c in enumerate(body) if c.isdigit() and c != "9")
    changed = body[:digit] + str(int(body[digit]) + 1) + body[digit + 1 :]
    (root / page).write_text(text.replace(body, changed, 1), encoding="utf-8")
    assert report.differences(root) == [f"{page}: {block}"]


@pytest.mark.parametrize(("block", "column"), [("trace-causes", 1), ("trace-correction", 2)])
def test_a_trace_run_changed_by_hand_is_caught(tmp_path, block, column):
    """The first trace run's meta-test accuracy (seed 0), edited on the page, no longer matches its record."""
    root = _pages_copy(tmp_path)
    page = root / "docs/results.md"
    text = page.read_text(encoding="utf-8")
    body = report.blocks_in(text)[block]
    lines = body.splitlines(keepends=True)
    cells = lines[2].split(" | ")
    cells[column] = f"{float(cells[column]) + 0.1:.1f}"
    changed = "".join(lines[:2] + [" | ".join(cells)] + lines[3:])
    page.write_text(text.replace(body, changed, 1), encoding="utf-8")
    assert report.differences(root) == [f"docs/results.md: {block}"]


def test_a_block_without_generator_or_page_is_named(tmp_path):
    root = _pages_copy(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text() + "\n<!-- generated:nothing -->\nx\n<!-- /generated:nothing -->\n")
    assert "README.md: nothing (no generator)" in report.differences(root)
    scale = root / "docs/scale.md"
    text = scale.read_text()
    body = report.blocks_in(text)["scale-fewshot-batched"]
    scale.write_text(
        text.replace(f"<!-- generated:scale-fewshot-batched -->\n{body}<!-- /generated:scale-fewshot-batched -->", "")
    )
    assert "(no page): scale-fewshot-batched" in report.differences(root)


def test_rewriting_puts_back_what_the_records_give(tmp_path):
    root = _pages_copy(tmp_path)
    page = root / "docs/choosing.md"
    original = page.read_text()
    body = report.blocks_in(original)["choosing-settings"]
    page.write_text(original.replace(body, "| stale |\n"))
    assert report.write_all(root) == ["docs/choosing.md"]
    assert page.read_text() == original


# ---------------------------------------------------------------------------------------------------------------------
# the one rule
# ---------------------------------------------------------------------------------------------------------------------


def test_level_means_the_interval_holds_zero():
    assert verdict((-0.5, 0.3), higher_is_better=True) == LEVEL
    assert verdict((0.0, 0.3), higher_is_better=True) == LEVEL  # touching 0 is holding it
    assert verdict((0.1, 0.3), higher_is_better=True) == BETTER
    assert verdict((0.1, 0.3), higher_is_better=False) == WORSE  # a higher loss
    assert verdict((-0.3, -0.1), higher_is_better=False) == BETTER
    assert verdict(None, higher_is_better=True) == NOT_JUDGED
    assert verdict((math.nan, 1.0), higher_is_better=True) == NOT_JUDGED


def test_compare_pairs_values_and_applies_the_rule():
    found = compare([1.0, 2.0, 3.0], [0.0, 1.5, 1.0], higher_is_better=True)  # differences 1, 0.5, 2
    assert found.n == 3 and found.mean == pytest.approx(7 / 6)
    low, high = found.interval
    half = 4.303 * math.sqrt(((1 - 7 / 6) ** 2 + (0.5 - 7 / 6) ** 2 + (2 - 7 / 6) ** 2) / 2) / math.sqrt(3)
    assert (low, high) == (pytest.approx(7 / 6 - half), pytest.approx(7 / 6 + half))
    assert found.verdict == LEVEL  # the interval reaches below 0
    assert compare([1.0, 1.1, 0.9], [0.0, 0.0, 0.0], higher_is_better=False).verdict == WORSE
    assert compare([1.0], [0.0], higher_is_better=True).verdict == NOT_JUDGED
    assert found.text(2, with_verdict=True).endswith(", level")


def test_searches_are_the_unit_and_one_search_falls_back_to_the_unseen_seeds():
    mine = {0: [1.0, 1.2], 1: [2.0, 2.2], 2: [1.5, 1.7]}
    theirs = {0: [1.1, 1.1], 1: [1.1, 1.1], 2: [1.1, 1.1], 3: [9.0, 9.0]}
    comparison, unit = compare_searches(mine, theirs)
    assert unit == SEARCHES and comparison.n == 3  # seed 3 has no partner
    assert comparison.mean == pytest.approx(statistics_mean([1.1, 2.1, 1.6]) - 1.1)
    comparison, unit = compare_searches({0: [1.0, 1.2]}, theirs)
    assert unit == UNSEEN and comparison.n == 2
    assert compare_searches({5: [1.0]}, theirs) is None and compare_searches(mine, None) is None


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_the_default_rule_counts_only_settings_with_the_variance_that_matters():
    settings = all_settings()
    counted = {s.key for s in settings if s.counted}
    assert "cnn-long" not in counted and "cnn-knots4" not in counted  # one search each
    assert {"cnn-T100", "cnn-T1000", "nqm", "omniglot-5way-1shot"} <= counted
    assert DEFAULT in candidates(settings) and "rmd" not in candidates(settings)  # the exact hypergradient, once
    tallies = default_rule(settings)
    for tally in tallies:
        assert len(tally.best_or_level) + len(tally.worse) + len(tally.other) == len(counted)
    assert [len(t.best_or_level) for t in tallies] == sorted((len(t.best_or_level) for t in tallies), reverse=True)
    for setting in settings:
        judged = judge(setting)
        assert next(iter(judged.values())).verdict == "best"
