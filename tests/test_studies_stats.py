"""``studies/stats.py``, the one home of the studies' means and 95% intervals: its intervals against independent
computations, and two checks over ``studies/``: no module computes an interval of its own again, and no module imports
one that imports it back."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from studies.stats import (
    T975,
    Z975,
    finite_mean,
    finite_std,
    mean_ci95,
    mean_interval,
    median_interval,
    paired_differences,
    standard_error,
    t975,
)

STUDIES = Path(__file__).resolve().parents[1] / "studies"
STATS = STUDIES / "stats.py"


def sample_sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------------------------------------------------------------
# the helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_a_small_case_by_hand():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]  # mean 3, sample variance 10 / 4 = 2.5, t(0.975, 4) = 2.776
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    mean, t_half = mean_ci95(values, t=True)
    assert mean == 3.0 and t_half == pytest.approx(half, rel=1e-15)
    low, high = mean_interval(values)
    assert (low, high) == (pytest.approx(3.0 - half, rel=1e-15), pytest.approx(3.0 + half, rel=1e-15))
    mean, z_half = mean_ci95([1.0, 2.0, 4.0])  # the normal quantile by default (Table 2's cells)
    assert mean == pytest.approx(7 / 3) and z_half == pytest.approx(1.96 * sample_sd([1.0, 2.0, 4.0]) / math.sqrt(3))
    assert mean_ci95([]) == (None, None) and mean_ci95([3.0]) == (3.0, None) and mean_ci95([3.0], t=True) == (3.0, None)
    assert mean_interval([]) is None and mean_interval([1.0]) is None
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_the_t_quantiles_are_scipys_to_the_published_three_decimals():
    stats = pytest.importorskip("scipy.stats")
    for df, value in T975.items():
        assert value == round(float(stats.t.ppf(0.975, df)), 3), df
    assert Z975 == round(float(stats.norm.ppf(0.975)), 2)
    for df in range(1, 200):
        exact = float(stats.t.ppf(0.975, df))
        if df <= max(T975):  # between the table's rows, the next lower row's: never narrower than the exact quantile
            assert t975(df) >= round(exact, 3), df
        else:
            assert t975(df) == Z975, df
        assert t975(df) == pytest.approx(exact, abs=0.04), df  # the widest gap: 1.96 against 1.9996 at 61
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_the_paired_interval_is_scipys_paired_t_interval_with_the_tables_quantile():
    stats = pytest.importorskip("scipy.stats")
    learned = [0.61, 0.58, 0.66, 0.70, 0.52, 0.63, 0.59, 0.64]
    reference = [0.57, 0.59, 0.60, 0.62, 0.50, 0.61, 0.55, 0.60]
    diffs = paired_differences(learned, reference)
    assert diffs == [a - b for a, b in zip(learned, reference)]
    low, high = mean_interval(diffs)
    exact = stats.ttest_rel(learned, reference).confidence_interval(0.95)
    df = len(diffs) - 1
    scale = t975(df) / float(stats.t.ppf(0.975, df))  # the table's quantile against the exact one
    centre = sum(diffs) / len(diffs)
    assert (low + high) / 2 == pytest.approx(centre, rel=1e-12)
    assert (high - low) / 2 == pytest.approx(scale * (exact.high - exact.low) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="pairs"):
        paired_differences([1.0, 2.0], [1.0])


def test_the_median_interval_covers_as_the_sign_test_says():
    stats = pytest.importorskip("scipy.stats")
    values = [0.5, -0.1, 0.3, 0.9, -0.4, 0.2, 0.0, 0.7, -0.2, 0.1]
    low, high, coverage = median_interval(values)
    assert (low, high) == (-0.2, 0.7)  # the 2nd and the 9th of the 10 sorted values
    assert coverage == pytest.approx(1 - 2 * float(stats.binom.cdf(1, 10, 0.5)))
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # [min, max] of 5 covers 1 - 2/32 < 0.95


def test_the_finite_summaries_leave_out_what_diverged():
    values = [1.0, math.nan, 3.0, math.inf]
    assert finite_mean(values) == 2.0 and finite_std(values) == pytest.approx(math.sqrt(2.0))
    assert standard_error(values) == pytest.approx(math.sqrt(2.0) / math.sqrt(2.0))
    assert finite_std([4.0]) == 0.0 and standard_error([4.0]) == 0.0
    assert all(math.isnan(f([math.nan])) for f in (finite_mean, finite_std, standard_error))


# ---------------------------------------------------------------------------------------------------------------------
# over studies/
# ---------------------------------------------------------------------------------------------------------------------

HELPERS = {"mean_ci95", "t975", "mean_interval", "median_interval", "finite_mean", "finite_std", "standard_error"}
"""The names of studies.stats's helpers; no other studies module defines one (nor the ``mean``/``std`` they were)."""
QUANTILES = {1.96, 12.706, 4.303, 3.182, 2.776, 2.571, 2.262}
"""Numbers that only an interval's quantile would be (the normal one, the t table's first rows and df = 9)."""


def study_modules() -> list[Path]:
    return sorted(path for path in STUDIES.rglob("*.py") if path != STATS)


def _is_sqrt_of_len(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "sqrt"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Call)
        and isinstance(node.args[0].func, ast.Name)
        and node.args[0].func.id == "len"
    )


def own_statistics(path: Path) -> list[str]:
    """What in ``path`` computes a mean's interval itself, as ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in HELPERS | {"mean", "std"}:
            found.append(f"{node.lineno}: def {node.name}")
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and "975" in node.id:
            found.append(f"{node.lineno}: a quantile table {node.id}")
        elif isinstance(node, ast.Constant) and type(node.value) is float and node.value in QUANTILES:
            found.append(f"{node.lineno}: the quantile {node.value}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _is_sqrt_of_len(node.right):
            found.append(f"{node.lineno}: a standard error (... / sqrt(len(...)))")
    return found


def test_no_study_computes_a_mean_or_an_interval_of_its_own():
    offenders = {str(p.relative_to(STUDIES.parent)): own for p in study_modules() if (own := own_statistics(p))}
    assert not offenders, f"use studies/stats.py instead: {offenders}"


def test_the_check_finds_a_copy(tmp_path):
    copy = tmp_path / "copy.py"
    source = "import math\nT_975 = (12.706,)\ndef t975(df):\n    return 1.96\nhalf = 2.0 / math.sqrt(len([1]))\n"
    copy.write_text(source)
    assert sorted(line.partition(": ")[2] for line in own_statistics(copy)) == [
        "a quantile table T_975",
        "a standard error (... / sqrt(len(...)))",
        "def t975",
        "the quantile 1.96",
        "the quantile 12.706",
    ]


def module_name(path: Path) -> str:
    parts = path.relative_to(STUDIES.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The studies modules that ``path`` imports, at its top or inside a function (a deferred import closes a cycle
    as well): ``from studies.a import b`` is ``studies.a.b`` where that is a module, else ``studies.a``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(STUDIES.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the list of its modules (the first one repeated at the end), ``None`` without one."""
    state: dict[str, int] = {}  # 1: on the path being explored, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_no_studies_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert graph["studies.quality.quality"] >= {"studies.quality.variants", "studies.quality.protocol"}
    assert "studies.stats" in graph["studies.table2.summary"]  # the graph sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
