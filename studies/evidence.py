"""What trains best, setting by setting, from the committed records, and the rule that picks the default estimator.

A *setting* is one problem on which several methods were trained on the same seeds (or searches) and judged on data
that chose nothing: the Table 2 protocol on Omniglot (10-shot at 3, 4 and 5 ways; 1-shot at 5 and 10 ways; meta-test
accuracy), the noisy quadratic model's learning-rate schedule (expected final loss in closed form), the CNN tuned over
its whole training at T = 100 and T = 1000 (test loss; the unit is the search) and the three HPO examples (test
loss). In each, the *best* method has the best mean, and every other method is compared with it pair by pair
(:func:`studies.stats.compare`): **level** where the paired 95% interval holds 0, **worse** where it excludes 0.

A setting is *counted* where every comparison has at least two pairs of searches or seeds that carry the variance
that matters; the CNN runs with one search (a learning-rate schedule of 4 knots; 100 outer steps) are shown with
intervals over the unseen seeds of that one search, which leave out the search's own luck, and are not counted.

Where FO's hypergradient is identically 0 (the NQM, the CNN: the hyperparameters enter only the training loss), FO
ends where it starts, so its figures there are the start's.

:data:`RULE` states how the default estimator is chosen; :func:`default_rule` applies it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from studies.stats import BETTER, LEVEL, NOT_JUDGED, WORSE, Comparison, compare

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "rmd(checkpoint_every='sqrt')"
"""``BilevelModule``'s default estimator (the code's; this module only reads it from the records)."""
EXACT = "rmd"
RANDOM_SEARCH = "random_search"
BEST = "best"
RULE = (
    "The default estimator is the one that is best or level with the best in the most counted settings, by the level "
    "rule (level: the paired 95% interval of its difference to the best method holds 0); a tie goes to the one that "
    "is worse in fewer settings. The candidates are the estimators measured in every counted setting. The exact "
    f"hypergradient is one candidate: `{DEFAULT}` computes `{EXACT}`'s hypergradient (tested equal), so it is judged "
    f"by its own records where it was run and by `{EXACT}`'s elsewhere; between the two forms memory decides, not "
    "this rule."
)
"""The rule, as docs/choosing.md states it."""


@dataclass
class Setting:
    """One setting: each method's value per pair unit (seed or search), and how to read them."""

    key: str
    label: str
    measure: str
    higher_is_better: bool
    unit: str
    values: dict[str, dict[int, float]]
    counted: bool = True
    digits: int = 2
    scale: float = 1.0
    """Numbers are shown times ``scale`` (accuracy fractions in points)."""
    notes: dict[str, str] = field(default_factory=dict)
    why_not_counted: str = ""

    def average(self, method: str) -> float:
        return statistics.fmean(self.values[method].values())

    def show(self, value: float, digits: int | None = None) -> str:
        return f"{self.scale * value:.{self.digits if digits is None else digits}f}"


@dataclass
class Judgement:
    """A method in a setting: its mean, units, verdict against the best (:data:`BEST` for the best itself) and the
    comparison behind it."""

    method: str
    mean: float
    n: int
    verdict: str
    comparison: Comparison | None


def best_method(setting: Setting) -> str:
    """The method with the best mean (the first of equals, in the records' order), among those with two units or
    more where there are such (a method with one seed or search so far cannot be judged, so it cannot be the best)."""
    pick = max if setting.higher_is_better else min
    finite = [m for m in setting.values if math.isfinite(setting.average(m))]
    judged = [m for m in finite if len(setting.values[m]) >= 2]
    return pick(judged or finite, key=setting.average)


def judge(setting: Setting) -> dict[str, Judgement]:
    """Every method of ``setting`` against the best, paired over the units both have, best first then by mean."""
    best = best_method(setting)
    reference = setting.values[best]
    order = sorted(setting.values, key=setting.average, reverse=setting.higher_is_better)
    found = {}
    for method in [best, *(m for m in order if m != best)]:
        values = setting.values[method]
        if method == best:
            found[method] = Judgement(method, setting.average(method), len(values), BEST, None)
            continue
        common = sorted(set(values) & set(reference))
        better = setting.higher_is_better
        comparison = (
            compare([values[k] for k in common], [reference[k] for k in common], higher_is_better=better)
            if common
            else None
        )
        verdict = NOT_JUDGED if comparison is None else comparison.verdict
        found[method] = Judgement(method, setting.average(method), len(values), verdict, comparison)
    return found


def best_or_level(judgement: Judgement) -> bool:
    return judgement.verdict in (BEST, LEVEL, BETTER)


# ---------------------------------------------------------------------------------------------------------------------
# the settings, from the records
# ---------------------------------------------------------------------------------------------------------------------


def _table2(folder: str, shots: int) -> list[Setting]:
    from studies.table2.records import load_records
    from studies.table2.settings import canonical

    by_ways: dict[int, dict[str, dict[int, float]]] = {}
    records = sorted(load_records(ROOT / folder), key=lambda r: str(r.get("timestamp", "")))
    for record in records:  # the latest record of a seed wins, as in the Table 2 report
        by_ways.setdefault(record["ways"], {}).setdefault(canonical(record["method"]), {})[record["seed"]] = record[
            "test_acc"
        ]
    seeds = {w: max(len(v) for v in methods.values()) for w, methods in by_ways.items()}
    return [
        Setting(
            key=f"omniglot-{ways}way-{shots}shot",
            label=f"Omniglot {ways}-way {shots}-shot",
            measure="meta-test accuracy, points",
            higher_is_better=True,
            unit=f"{seeds[ways]} seeds",
            values=methods,
            scale=100.0,
        )
        for ways, methods in sorted(by_ways.items())
    ]


def _horizon_args(*argv: str):
    from studies.horizon.__main__ import parser

    args = parser().parse_args([*argv])
    args.check(args)
    args.out = str(ROOT / args.out)  # the records under the repository, whatever the working directory
    return args


def nqm() -> Setting:
    """The noisy quadratic model: each method's expected final loss per seed; FO is the start (its hypergradient is
    0: the rates enter only the training steps)."""
    from studies.horizon.nqm_study import load_records

    optimum, records = load_records(_horizon_args("nqm", "report"))
    values = {m: {r["seed"]: r["expected_loss"] for r in runs} for m, runs in records.items()}
    seeds = sorted({s for v in values.values() for s in v})
    values["fo"] = {s: optimum["start"]["expected_loss"] for s in seeds}
    return Setting(
        key="nqm",
        label="Noisy quadratic, a 1000-step learning-rate schedule",
        measure="expected final loss",
        higher_is_better=False,
        unit=f"{len(seeds)} seeds",
        values=values,
        digits=4,
        notes={"fo": "the start (FO's hypergradient is 0 here)"},
    )


CNN_RUNS = {
    "cnn-T100": ("CNN, T = 100, 40 outer steps", ("cnn", "report", "--steps", "100")),
    "cnn-T1000": ("CNN, T = 1000, 40 outer steps", ("cnn", "report", "--steps", "1000")),
    "cnn-knots4": (
        "CNN, T = 1000, 4 rate knots per layer",
        (
            "cnn", "report", "--knots", "4", "--seeds", "1", "--steps", "1000", "--methods", "t1t2", "greedy(0.99)",
            "rmd(checkpoint_every='sqrt')", "random_search",
        ),
    ),
    "cnn-long": (
        "CNN, T = 1000, 100 outer steps",
        (
            "cnn", "report", "--outer-steps", "100", "--seeds", "1", "--eval-every", "20", "--cosine-every", "10",
            "--steps", "1000", "--methods", "t1t2", "greedy(0.99)", "rmd", "random_search", "--out",
            "studies/horizon/results/long",
        ),
    ),
}  # fmt: skip
"""The CNN runs: their label and the ``python -m studies.horizon`` report command that reads their records."""


def cnn_args(key: str):
    """The parsed report command of the CNN run ``key`` (:data:`CNN_RUNS`), its ``--out`` under the repository."""
    return _horizon_args(*CNN_RUNS[key][1])


def cnn(key: str) -> Setting:
    """The CNN run ``key``: per search, the mean test loss over the unseen seeds of its final hyperparameters, paired
    by search seed; with one search per method, the unseen seeds of that search (not counted). FO is the start."""
    from studies.horizon.cnn_study import final_values, load_records, start_values

    args = cnn_args(key)
    records = load_records(args, args.steps[0])
    finals = {m: final_values(runs) for m, runs in records.items()}
    start = start_values(records)
    searches = min(len(v) for v in finals.values())
    if searches >= 2:
        values = {m: {s: statistics.fmean(v) for s, v in per.items()} for m, per in finals.items()}
        values["fo"] = {s: statistics.fmean(start) for s in sorted({s for v in values.values() for s in v})}
        most = max(len(v) for v in finals.values())
        unit = f"{most} searches" if searches == most else f"{searches}-{most} searches by method"
        counted, why = True, ""
    else:  # one search: the unseen seeds, averaged over the searches there are
        values = {m: dict(enumerate(statistics.fmean(col) for col in zip(*per.values()))) for m, per in finals.items()}
        values["fo"] = dict(enumerate(start))
        unit = f"1 search, {len(start)} unseen seeds"
        counted, why = False, "one search per method: the intervals leave out the search-to-search variance"
    return Setting(
        key=key,
        label=CNN_RUNS[key][0],
        measure="test loss",
        higher_is_better=False,
        unit=unit,
        values=values,
        counted=counted,
        why_not_counted=why,
        notes={"fo": "the start (FO's hypergradient is 0 here)"},
    )


HPO_LABELS = {
    "weight_decay": "HPO: a weight decay per weight matrix",
    "lr_schedule": "HPO: a learned learning rate",
    "hypercleaning": "HPO: hypercleaning (a weight per training example)",
}


def hpo() -> list[Setting]:
    """The three HPO examples with the config's settings and only the estimator changed (seeds 10-19): test loss."""
    records = json.loads((ROOT / "studies/hpo/results/comparison.json").read_text(encoding="utf-8"))
    by_example: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        if r.get("variant") is None and r.get("estimator") is not None and r.get("test"):
            by_example.setdefault(r["example"], {}).setdefault(r["estimator"], {})[r["seed"]] = r["test"]["loss"]
    return [
        Setting(
            key=f"hpo-{example}",
            label=HPO_LABELS[example],
            measure="test loss",
            higher_is_better=False,
            unit=f"{max(len(v) for v in methods.values())} seeds",
            values=methods,
            digits=4,
            notes={"fo": "the start (FO's hypergradient is 0 here)"},
        )
        for example, methods in by_example.items()
    ]


def all_settings() -> list[Setting]:
    """Every setting, counted or not, in the order the docs show them."""
    return [
        *_table2("studies/table2/results/omniglot", 10),
        *_table2("studies/table2/results/omniglot-1shot", 1),
        nqm(),
        *(cnn(key) for key in CNN_RUNS),
        *hpo(),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """A candidate's record over the counted settings."""

    method: str
    best_or_level: list[str]
    worse: list[str]
    other: list[str]


def candidate_values(setting: Setting, method: str) -> str | None:
    """The method whose records stand for ``method`` in ``setting``: itself, or ``rmd`` for the default where the
    default was not run; ``None`` where neither was."""
    if method in setting.values:
        return method
    if method == DEFAULT and EXACT in setting.values:
        return EXACT
    return None


def candidates(settings: list[Setting]) -> list[str]:
    """The estimators measured in every counted setting, the exact hypergradient once: as the default,
    ``rmd(checkpoint_every='sqrt')``, through ``rmd``'s records where it was not run itself."""
    counted = [s for s in settings if s.counted]
    names = dict.fromkeys(m for s in counted for m in [DEFAULT, *s.values] if m not in (RANDOM_SEARCH, EXACT))
    return [m for m in names if all(candidate_values(s, m) is not None for s in counted)]


def default_rule(settings: list[Setting]) -> list[Tally]:
    """:data:`RULE` applied: every candidate's tally, the chosen default first."""
    judged = {s.key: judge(s) for s in settings if s.counted}
    tallies = []
    for method in candidates(settings):
        tally = Tally(method, [], [], [])
        for setting in (s for s in settings if s.counted):
            judgement = judged[setting.key][candidate_values(setting, method) or method]
            if best_or_level(judgement):
                tally.best_or_level.append(setting.key)
            elif judgement.verdict == WORSE:
                tally.worse.append(setting.key)
            else:
                tally.other.append(setting.key)
        tallies.append(tally)
    return sorted(tallies, key=lambda t: (-len(t.best_or_level), len(t.worse)))
