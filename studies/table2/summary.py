"""The Table 2 report's numbers: every cell of both protocols' tables, and the paired differences per seed.

Two protocols:

- (a) the paper's: Greedy's gamma is chosen per setting by the best mean meta-validation accuracy over seeds, and
  every method's accuracy is reported on those same meta-validation tasks;
- (b) the clean one: gamma chosen the same way on meta-validation, accuracies reported on meta-test tasks.

Cells are ``mean +- 1.96 * std / sqrt(n)`` in percent over the ``n`` seeds (sample standard deviation); the paired
differences' intervals use Student's t (:mod:`studies.stats`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_hypergrad.estimators import get_estimator
from studies.stats import BETTER, WORSE, mean_ci95, verdict
from studies.table2.records import is_number
from studies.table2.settings import (
    CHOSEN,
    CHOSEN_LABEL,
    PAPER_WAYS,
    PROTOCOLS,
    baseline_methods,
    canonical,
    greedy_gamma,
    jvps,
)


@dataclass
class Entry:
    """One cell of a report table (a row of ``table2.csv``); accuracies in percent."""

    dataset: str
    protocol: str
    reported_on: str
    method: str
    label: str
    gamma: float | None
    jvps: int | None
    ways: int
    mean: float | None
    ci95: float | None
    n: int
    seconds_per_step: float | None
    step_times: tuple[float, ...] = ()
    """Each run's median training step time (the cell's ``seconds_per_step`` is their median); not in the CSV."""

    def text(self) -> str:
        """The markdown cell: ``mean ± ci95 (n=...)``, ``mean (n=1)`` or ``n/a``."""
        if self.n == 0 or self.mean is None:
            return "n/a"
        value = f"{self.mean:.2f}" if self.ci95 is None else f"{self.mean:.2f} ± {self.ci95:.2f}"
        value += f" (n={self.n})"
        return f"{value}, γ={self.gamma:g}" if self.method == CHOSEN else value


def _group(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    """Records by ``(dataset, ways, method)``, one per seed (the latest when a seed appears twice).

    Methods are canonical specs: a record's ``greedy(0.990)`` is ``greedy(0.99)``.
    """
    by_seed: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: str(r.get("timestamp", ""))):
        by_seed[(record["dataset"], record["ways"], canonical(str(record["method"])), record["seed"])] = record
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for (dataset, ways, method, _), record in sorted(by_seed.items()):
        groups.setdefault((dataset, ways, method), []).append(record)
    return groups


def _greedy_methods(groups: dict[tuple[str, int, str], list[dict[str, Any]]], dataset: str) -> dict[float, str]:
    """Greedy's methods among ``dataset``'s records: gamma -> spec, by increasing gamma."""
    found = {greedy_gamma(name): name for d, _, name in groups if d == dataset}
    return {gamma: found[gamma] for gamma in sorted(g for g in found if g is not None)}


def choose_gammas(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Greedy's gamma per ``(dataset, ways)``: the best mean meta-validation accuracy over seeds (ties: smallest)."""
    groups = _group(records)
    chosen: dict[tuple[str, int], float] = {}
    for dataset in sorted({d for d, _, _ in groups}):
        greedy = _greedy_methods(groups, dataset)
        for ways in sorted({w for d, w, _ in groups if d == dataset}):
            scores = [
                (statistics.fmean(r["val_acc"] for r in groups[(dataset, ways, name)]), gamma)
                for gamma, name in greedy.items()
                if (dataset, ways, name) in groups
            ]
            if scores:
                best = max(score for score, _ in scores)
                chosen[(dataset, ways)] = min(gamma for score, gamma in scores if score == best)
    return chosen


def run_step_time(record: dict[str, Any]) -> float | None:
    """A run's training step time: the median over its steps (robust to a pause), else the recorded mean."""
    median = record.get("seconds_per_step_median")
    return median if is_number(median) else record.get("seconds_per_step")


def _step_times(runs: Sequence[dict[str, Any]]) -> tuple[float, ...]:
    return tuple(t for t in (run_step_time(r) for r in runs) if t is not None)


def _row_jvps(method: str, runs: Sequence[dict[str, Any]]) -> int | None:
    """The JVPs of ``method``'s row: from its records, else from its spec and the records' inner steps."""
    recorded = [r["jvps"] for r in runs if r.get("method") is not None and canonical(str(r["method"])) == method]
    if recorded:
        return recorded[0]
    inner_steps = [r["inner_steps"] for r in runs if r.get("inner_steps") is not None]
    return jvps(get_estimator(method), inner_steps[0] if inner_steps else None)


def summarize(records: Sequence[dict[str, Any]]) -> list[Entry]:
    """Every cell of both protocols' tables, for every dataset in ``records`` and every setting shown.

    Rows: the baselines (:func:`baseline_methods`, then any other non-Greedy method found), Greedy with gamma chosen
    per setting on meta-validation, and each Greedy gamma found in the records. Columns: the paper's 3, 4, 5 ways
    and any other ways found. Every row is labelled by its estimator's spec string.
    """
    groups = _group(records)
    chosen = choose_gammas(records)
    entries = []
    for dataset in sorted({d for d, _, _ in groups}):
        mine = [r for r in records if r["dataset"] == dataset]
        ways_shown = sorted(set(PAPER_WAYS) | {w for d, w, _ in groups if d == dataset})
        greedy = _greedy_methods(groups, dataset)
        others = [name for d, _, name in groups if d == dataset and greedy_gamma(name) is None]
        rows: list[tuple[str, str, int | None, float | None]] = [
            (name, name, _row_jvps(name, mine), None) for name in dict.fromkeys([*baseline_methods(), *others])
        ]
        greedy_runs = [r for r in mine if greedy_gamma(str(r["method"])) is not None]
        rows.append((CHOSEN, CHOSEN_LABEL, greedy_runs[0]["jvps"] if greedy_runs else None, None))
        rows += [(name, name, _row_jvps(name, mine), gamma) for gamma, name in greedy.items()]
        for protocol, (field, _) in PROTOCOLS.items():
            for name, label, row_jvps, gamma in rows:
                for ways in ways_shown:
                    row_gamma = gamma
                    key = (dataset, ways, name)
                    if name == CHOSEN:
                        row_gamma = chosen.get((dataset, ways))
                        key = (dataset, ways, greedy[row_gamma]) if row_gamma is not None else key
                    runs = groups.get(key, []) if key[2] != CHOSEN else []
                    mean, ci95 = mean_ci95([100 * r[field] for r in runs])
                    times = _step_times(runs)
                    entries.append(
                        Entry(
                            dataset=dataset,
                            protocol=protocol,
                            reported_on=field.split("_")[0],
                            method=name,
                            label=label,
                            gamma=row_gamma,
                            jvps=row_jvps,
                            ways=ways,
                            mean=mean,
                            ci95=ci95,
                            n=len(runs),
                            seconds_per_step=statistics.median(times) if times else None,
                            step_times=times,
                        )
                    )
    return entries


@dataclass
class PairedDifference:
    """A method's meta-test accuracy minus a reference method's, seed by seed (the seeds share their tasks).

    ``mean`` and the 95% interval ``[low, high]`` (Student's t, ``n - 1`` degrees of freedom) are in points of
    percent; ``n`` is the number of seeds both methods have. ``low > 0``: the method is better beyond the
    interval; ``high < 0``: worse.
    """

    dataset: str
    ways: int
    reference: str
    method: str
    label: str
    gamma: float | None
    n: int
    mean: float | None
    low: float | None
    high: float | None

    @property
    def verdict(self) -> str:
        """better, worse or level by :func:`studies.stats.verdict` (not judged without an interval)."""
        interval = None if self.low is None or self.high is None else (self.low, self.high)
        return verdict(interval, higher_is_better=True)

    def text(self) -> str:
        if self.mean is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.mean:+.2f} (n={self.n})"
        mark = {BETTER: " **↑**", WORSE: " **↓**"}.get(self.verdict, "")
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n}){mark}"


def paired_differences(
    records: Sequence[dict[str, Any]], reference: str = "fo", field: str = "test_acc"
) -> list[PairedDifference]:
    """Every method's paired difference to ``reference`` per dataset and setting (Greedy's chosen gamma included)."""
    groups = _group(records)
    chosen = choose_gammas(records)
    reference = canonical(reference)
    found = []
    for dataset in sorted({d for d, _, _ in groups}):
        greedy = _greedy_methods(groups, dataset)
        others = [n for d, _, n in groups if d == dataset and greedy_gamma(n) is None and n != reference]
        rows = [(n, n, None) for n in dict.fromkeys([*[b for b in baseline_methods() if b != reference], *others])]
        rows.append((CHOSEN, CHOSEN_LABEL, None))
        rows += [(name, name, gamma) for gamma, name in greedy.items()]
        for ways in sorted({w for d, w, _ in groups if d == dataset}):
            base = {r["seed"]: r[field] for r in groups.get((dataset, ways, reference), [])}
            for name, label, gamma in rows:
                key_name = name
                if name == CHOSEN:
                    gamma = chosen.get((dataset, ways))
                    if gamma is None:
                        continue
                    key_name = greedy[gamma]
                runs = groups.get((dataset, ways, key_name), [])
                diffs = [100 * (r[field] - base[r["seed"]]) for r in runs if r["seed"] in base]
                if not runs:
                    continue
                mean, half = mean_ci95(diffs, t=True)
                low, high = (None, None) if mean is None or half is None else (mean - half, mean + half)
                found.append(
                    PairedDifference(dataset, ways, reference, name, label, gamma, len(diffs), mean, low, high)
                )
    return found
