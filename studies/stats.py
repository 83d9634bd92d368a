"""Means and 95% intervals for the studies' reports: the one implementation that every study uses.

Over ``n`` values (seeds, tasks) with mean ``m`` and sample standard deviation ``s`` (``n - 1``):

- :func:`mean_ci95`: ``m`` and the half-width ``q · s / √n`` of its 95% interval, with the normal quantile
  ``q = 1.96`` (Table 2's cells, as the paper reports its own) or, ``t=True``, Student's ``q = t_{0.975, n-1}``
  (:func:`t975`), which few values need (1.96 would be too narrow);
- :func:`mean_interval`: the t interval ``[m - h, m + h]`` itself; a paired comparison is the interval of the
  differences, pair by pair (:func:`paired_differences`);
- :func:`median_interval`: the distribution-free interval of the median (the sign test's order statistics);
- :func:`finite_mean`, :func:`finite_std`, :func:`standard_error`: over the finite values only (a diverged task's
  NaN or infinity left out);
- :func:`verdict` and :func:`compare`: the one rule by which every comparison in the docs is worded. A paired 95%
  interval that holds 0 is **level**; only an interval that excludes 0 makes a method **better** or **worse**.

The means of the intervals are :func:`statistics.mean` (correctly rounded), those over the finite values
:func:`statistics.fmean`, and the deviations :func:`statistics.stdev`: the computations the reports were first written
with, so that a report written again from the same records is the same to the bit.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Z975 = 1.96
"""The normal distribution's 97.5% quantile (as published, two decimals)."""

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000}  # fmt: skip
"""Student's t quantile ``t_{0.975, df}`` by degrees of freedom (three decimals, as the published tables)."""


def t975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (the table's next lower entry between its rows, a little wider
    than the exact value; 1.96 above 60)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > max(T975):
        return Z975
    return T975[max(k for k in T975 if k <= df)]


def mean_ci95(values: Sequence[float], *, t: bool = False) -> tuple[float | None, float | None]:
    """The mean of ``values`` and the half-width of its 95% interval, ``q · std / sqrt(n)`` (sample std, ``n - 1``):
    ``q = 1.96``, or with ``t`` Student's ``t_{0.975, n-1}``. ``(None, None)`` for no value; no half-width for one."""
    if not values:
        return None, None
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    quantile = t975(len(values) - 1) if t else Z975
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


def mean_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """The 95% t interval of the mean of ``values``, ``(low, high)``; ``None`` for fewer than 2 values."""
    mean, half = mean_ci95(values, t=True)
    if mean is None or half is None:
        return None
    return mean - half, mean + half


def paired_differences(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    """``values[i] - reference[i]``, pair by pair (the same seed or task); their :func:`mean_interval` is the
    interval of the paired comparison."""
    if len(values) != len(reference):
        raise ValueError(f"paired values come in pairs: {len(values)} values against {len(reference)}")
    return [a - b for a, b in zip(values, reference)]


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """The narrowest interval ``[x_(k), x_(n+1-k)]`` of the sorted values that covers the median with probability
    at least ``level`` whatever the distribution (the sign test: ``1 - 2 P(B <= k - 1)``, ``B ~ Binomial(n, 1/2)``),
    as ``(low, high, coverage)``; ``None`` when even ``[min, max]`` covers less (n < 6 at 95%)."""
    xs = sorted(values)
    n = len(xs)
    found = None
    for k in range(1, n // 2 + 1):
        coverage = 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2**n
        if coverage < level:
            break
        found = (xs[k - 1], xs[n - k], coverage)
    return found


def finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values (NaN when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def finite_std(values: Sequence[float]) -> float:
    """The sample standard deviation of the finite values (0 for one value, NaN for none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return statistics.stdev(finite) if len(finite) > 1 else 0.0


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean of the finite values, ``std / sqrt(n)`` (0 for one value, NaN for none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return finite_std(finite) / math.sqrt(len(finite))


LEVEL = "level"
BETTER = "better"
WORSE = "worse"
NOT_JUDGED = "not judged"
"""The four verdicts of :func:`verdict`."""


def verdict(interval: tuple[float, float] | None, *, higher_is_better: bool) -> str:
    """The verdict of a paired comparison from the 95% interval of its differences (method minus reference).

    The rule, the same everywhere: an interval that holds 0 is :data:`LEVEL`; one that lies wholly on the good side
    of 0 (above it when ``higher_is_better``, below it otherwise) is :data:`BETTER`, wholly on the other side
    :data:`WORSE`. Without an interval (fewer than two pairs, or a value that diverged) there is no verdict:
    :data:`NOT_JUDGED`."""
    if interval is None or not all(math.isfinite(x) for x in interval):
        return NOT_JUDGED
    low, high = interval
    if low <= 0.0 <= high:
        return LEVEL
    return BETTER if (low > 0.0) == higher_is_better else WORSE


@dataclass(frozen=True)
class Comparison:
    """A paired comparison: the mean difference (method minus reference), its 95% t interval, the pairs and the
    :func:`verdict`."""

    mean: float
    interval: tuple[float, float] | None
    n: int
    verdict: str

    def text(self, digits: int = 2, *, scale: float = 1.0, with_verdict: bool = False) -> str:
        """``+0.34 [-0.22, +0.89]`` (each number times ``scale``), ``+0.34 (n=1)`` without an interval; with
        ``with_verdict`` the verdict after a comma."""
        if not math.isfinite(self.mean):
            return "diverged"
        mean = f"{scale * self.mean:+.{digits}f}"
        if self.interval is None:
            shown = f"{mean} (n={self.n})"
        else:
            low, high = (scale * x for x in self.interval)
            shown = f"{mean} [{low:+.{digits}f}, {high:+.{digits}f}]"
        return f"{shown}, {self.verdict}" if with_verdict else shown


def compare(values: Sequence[float], reference: Sequence[float], *, higher_is_better: bool) -> Comparison:
    """``values`` against ``reference``, pair by pair (the same seed, task or search): the mean of the differences,
    their 95% t interval (:func:`mean_interval`) and the :func:`verdict`."""
    differences = paired_differences(values, reference)
    if not differences:
        raise ValueError("a comparison needs at least one pair")
    if not all(math.isfinite(d) for d in differences):
        return Comparison(math.nan, None, len(differences), NOT_JUDGED)
    interval = mean_interval(differences)
    return Comparison(
        statistics.mean(differences), interval, len(differences), verdict(interval, higher_is_better=higher_is_better)
    )
