"""The Greedy variants against T1-T2 on held-out few-shot tasks: cosine to the exact (RMD) hypergradient.

Run from the repository root::

    python -m studies.quality --variants                               # Omniglot 5-way 10-shot, 10 queries
    python -m studies.quality --variants --shots 1 --queries 15        # Omniglot 5-way 1-shot, 15 queries
    python -m studies.quality --variants --replot [--shots 1]          # rewrite the outputs from the JSON's tasks

The model, the meta-training (Greedy(0.99), T = 10, inner momentum 0.9, Adam 1e-3, 10 tasks per meta-batch, on tasks
of the chosen shape), the checkpoints (steps 0, 50 and 200), the held-out tasks and the settings (inner momentum 0.9
and 0, T in {5, 10, 20, 50}) are those of :mod:`studies.quality.protocol`. At every (checkpoint, momentum, T) setting:

- the first ``--reference-tasks`` held-out tasks (default 4) only choose AutoGreedy's discount, as
  :class:`~lightning_hypergrad.HypergradCallback` does on a reference step: ``start_grid()``, the estimator run on each
  reference task, ``finish_grid()`` (the mean over those tasks of each grid discount's hypergradient), and the
  discount whose mean hypergradient has the largest cosine to the mean exact (RMD) hypergradient of the same tasks;
- the other tasks (default 20 of 24) evaluate every estimator: ``fo``, ``t1t2``, ``greedy(0.5)``, ``greedy(0.9)``,
  ``greedy(0.99)``, ``momentum_greedy(0.9)``, ``greedy_tail(0.9, 5)`` (with ``min(5, T)`` exact steps; at T = 5 it is
  RMD itself), ``auto_greedy`` (Greedy with the discount chosen on the reference tasks of the same setting), and, as
  IFT diagnostics, ``neumann(10)`` (self-scaling) and ``neumann(10, scale=0.1)`` (the paper's). The tasks used to
  choose the discount are never used to evaluate it, and every estimator is evaluated on the same tasks, so that
  the comparisons with T1-T2 are paired.

For every estimator and setting: the cosine to RMD and the norm ratio ``|estimate| / |RMD|`` task by task, their mean
and standard deviation, and the paired win rate against T1-T2 (the fraction of the evaluation tasks where the
estimator's cosine is strictly greater than T1-T2's). Over all settings: the mean of the per-setting mean cosines,
the number of settings whose mean cosine is at least T1-T2's, and the overall paired win rate. The target for a
default estimator: mean cosine at least T1-T2's in every setting, and an overall paired win rate of at least 60%.

Outputs, in ``--out`` (default ``studies/quality/results``), ``<K>`` the shots:

- ``variants_<K>shot.json``: ``meta`` (data, checkpoints, T, tasks, machine, wall time), ``settings`` (per setting: the
  chosen discount with the grid's cosines, and per estimator the per-task cosines and norm ratios with their summary)
  and ``overall`` (per estimator: mean cosine, settings at least T1-T2, paired wins, win rate, target met);
- ``variants_<K>shot.md``: the overall table, the verdict on the target and, per checkpoint and momentum, the mean
  cosine and win rate of every estimator against T;
- ``variants_<K>shot.png``: mean cosine minus T1-T2's per setting and estimator (a heatmap), beside each
  estimator's overall win rate against T1-T2 with the 60% line;
- ``variants_<K>shot_backbone_step<N>.pt``: the backbone at each checkpoint (not kept in git).

``--replot`` measures nothing: it recomputes the summaries of ``variants_<K>shot.json`` from its per-task records and
writes the JSON, the markdown and the plot again (the ``meta`` is kept, with the command and wall time of the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from torch import Tensor  # noqa: E402

import lightning_hypergrad as lh  # noqa: E402
from lightning_hypergrad.callbacks.hypergrad_quality import cosine_and_norm_ratio  # noqa: E402
from studies.common import Progress, atomic_path, log, machine_description, write_json, write_text  # noqa: E402
from studies.quality.protocol import (  # noqa: E402
    DEFAULT_TRAIN_STEPS,
    INNER_LR,
    META_BATCH,
    MOMENTA,
    OUTER_LR,
    QUICK_T_VALUES,
    T_VALUES,
    TRAIN_GAMMA,
    TRAIN_MOMENTUM,
    TRAIN_T,
    DataChoice,
    build_model,
    choose_data,
    heldout_tasks,
    make_datamodule,
    restore_buffers,
    snapshot,
    train,
)
from studies.stats import finite_mean, finite_std, standard_error  # noqa: E402

BASELINE = "t1t2"
AUTO = "auto_greedy"
TAIL = "greedy_tail(0.9, 5)"
IFT = ("neumann(10)", "neumann(10, scale=0.1)")
"""IFT estimators, measured as diagnostics (they assume the inner loop at a minimum, which T steps do not reach)."""
VARIANTS = (
    "fo",
    BASELINE,
    "greedy(0.5)",
    "greedy(0.9)",
    "greedy(0.99)",
    "momentum_greedy(0.9)",
    TAIL,
    AUTO,
    *IFT,
)
"""The estimators evaluated, as spec strings; ``auto_greedy`` stands for Greedy with the discount chosen per setting."""
AUTO_GRID = (0.5, 0.9, 0.99, 0.999)
TARGET_WIN_RATE = 0.6
DEFAULT_TASKS = 24
QUICK_TASKS = 3
DEFAULT_REFERENCE_TASKS = 4
QUICK_REFERENCE_TASKS = 1

Setting = tuple[int, float, int]
"""``(checkpoint_step, momentum, T)``."""


def stem(shots: int) -> str:
    """The outputs' file name stem: ``variants_<shots>shot``."""
    return f"variants_{shots}shot"


def build(spec: str, steps: int) -> lh.HypergradEstimator:
    """The estimator of ``spec`` for ``steps`` inner steps: GreedyTail's tail is cut to ``min(K, steps)``."""
    estimator = lh.get_estimator(spec)
    if isinstance(estimator, lh.GreedyTail) and estimator.tail > steps:
        estimator = lh.GreedyTail(estimator.gamma, steps)
    return estimator


# ----------------------------------------------------------------------------------------------- measurement


@dataclass
class SettingResult:
    """Per-task cosines and norm ratios of every estimator on the evaluation tasks of one setting."""

    checkpoint_step: int
    momentum: float
    T: int
    auto_gamma: float
    grid_cosines: dict[float, float]
    tail: int
    reference_tasks: int
    cosines: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    norm_ratios: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @property
    def setting(self) -> Setting:
        return (self.checkpoint_step, self.momentum, self.T)

    def mean_cosine(self, spec: str) -> float:
        return finite_mean(self.cosines[spec])

    def wins(self, spec: str, other: str = BASELINE) -> tuple[int, int]:
        """Tasks where ``spec``'s cosine is strictly greater than ``other``'s, and the number of tasks."""
        pairs = list(zip(self.cosines[spec], self.cosines[other]))
        return sum(a > b for a, b in pairs), len(pairs)

    def difference(self, spec: str, other: str = BASELINE) -> tuple[float, float]:
        """The mean over the tasks of ``spec``'s cosine minus ``other``'s, and its standard error (paired)."""
        pairs = zip(self.cosines[spec], self.cosines[other])
        diffs = [a - b for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
        if not diffs:
            return math.nan, math.nan
        return finite_mean(diffs), standard_error(diffs)

    def record(self) -> dict[str, Any]:
        estimators = {}
        for spec in self.cosines:
            wins, n = self.wins(spec)
            difference, error = self.difference(spec)
            estimators[spec] = {
                "cosine_mean": _number(finite_mean(self.cosines[spec])),
                "cosine_std": _number(finite_std(self.cosines[spec])),
                "norm_ratio_mean": _number(finite_mean(self.norm_ratios[spec])),
                "norm_ratio_std": _number(finite_std(self.norm_ratios[spec])),
                "minus_t1t2_mean": _number(difference),
                "minus_t1t2_se": _number(error),
                "wins_vs_t1t2": wins,
                "win_rate_vs_t1t2": wins / n if n else None,
                "n_tasks": n,
                "nonfinite": sum(not math.isfinite(c) for c in self.cosines[spec]),
                "cosines": [_number(c) for c in self.cosines[spec]],
                "norm_ratios": [_number(r) for r in self.norm_ratios[spec]],
            }
        return {
            "checkpoint_step": self.checkpoint_step,
            "momentum": self.momentum,
            "T": self.T,
            "auto_gamma": self.auto_gamma,
            "auto_grid_cosines": {f"{g:g}": _number(c) for g, c in self.grid_cosines.items()},
            "greedy_tail_K": self.tail,
            "reference_tasks": self.reference_tasks,
            "estimators": estimators,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SettingResult:
        def floats(values: Sequence[float | None]) -> list[float]:
            return [math.nan if v is None else float(v) for v in values]

        return cls(
            checkpoint_step=record["checkpoint_step"],
            momentum=record["momentum"],
            T=record["T"],
            auto_gamma=record["auto_gamma"],
            grid_cosines={float(g): math.nan if c is None else c for g, c in record["auto_grid_cosines"].items()},
            tail=record["greedy_tail_K"],
            reference_tasks=record["reference_tasks"],
            cosines={spec: floats(e["cosines"]) for spec, e in record["estimators"].items()},
            norm_ratios={spec: floats(e["norm_ratios"]) for spec, e in record["estimators"].items()},
        )


def _number(value: float) -> float | None:
    """``value``, or ``None`` where it is not finite (JSON has no NaN)."""
    return float(value) if math.isfinite(value) else None


def _run(estimator: lh.HypergradEstimator, problem: lh.BilevelProblem) -> list[Tensor]:
    """The estimator's hypergradient, unchecked (non-finite values are kept and counted, not warned about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the paper's Neumann scale diverges here, which the cosines show
        return estimator(problem, check=False, check_finite=False).hypergrads


def choose_gamma(
    model: lh.FewShotClassifier, tasks: Sequence[dict[str, Any]], optimizer: lh.SGD, steps: int
) -> tuple[float, dict[float, float]]:
    """AutoGreedy's discount for one setting, chosen on ``tasks`` as HypergradCallback chooses it on a reference
    step: the grid discount whose mean hypergradient over the tasks has the largest cosine to RMD's mean."""
    estimator = lh.AutoGreedy(0.99, grid=AUTO_GRID)
    exact = lh.RMD()
    reference: list[Tensor] | None = None
    estimator.start_grid()
    for task in tasks:
        problem = dataclasses.replace(model.make_problem(task), optimizer=optimizer, steps=steps)
        _run(estimator, problem)
        hypergrads = _run(exact, problem)
        reference = hypergrads if reference is None else [r + g for r, g in zip(reference, hypergrads)]
    grid = estimator.finish_grid()
    if grid is None or reference is None:
        raise RuntimeError("AutoGreedy recorded no reference task")
    reference = [r / len(tasks) for r in reference]
    cosines = [cosine_and_norm_ratio(g, reference)[0] for g in grid]
    best = max(range(len(cosines)), key=lambda i: cosines[i] if math.isfinite(cosines[i]) else -math.inf)
    return estimator.grid[best], dict(zip(estimator.grid, cosines))


def measure_setting(
    model: lh.FewShotClassifier,
    step: int,
    tasks: Sequence[dict[str, Any]],
    n_reference: int,
    momentum: float,
    steps: int,
) -> SettingResult:
    """AutoGreedy's discount from the first ``n_reference`` tasks; every estimator on the others."""
    optimizer = lh.SGD(lr=INNER_LR, momentum=momentum)
    gamma, grid_cosines = choose_gamma(model, tasks[:n_reference], optimizer, steps)
    built = {spec: lh.Greedy(gamma) if spec == AUTO else build(spec, steps) for spec in VARIANTS}
    tail = built[TAIL].tail
    result = SettingResult(step, momentum, steps, gamma, grid_cosines, tail, n_reference)
    for spec in VARIANTS:
        result.cosines[spec], result.norm_ratios[spec] = [], []
    exact = lh.RMD()
    for task in tasks[n_reference:]:
        problem = dataclasses.replace(model.make_problem(task), optimizer=optimizer, steps=steps)
        reference = _run(exact, problem)
        for spec, estimator in built.items():
            cosine, ratio = cosine_and_norm_ratio(_run(estimator, problem), reference)
            result.cosines[spec].append(cosine)
            result.norm_ratios[spec].append(ratio)
    return result


def measure_checkpoint(
    model: lh.FewShotClassifier, step: int, tasks: Sequence[dict[str, Any]], t_values: Sequence[int], n_reference: int
) -> list[SettingResult]:
    """Every (momentum, T) setting of one checkpoint; the model is left exactly as it was (checked)."""
    model.train()  # batch statistics of the task, as in meta-training (see studies.quality.quality)
    before = snapshot(model)
    results = []
    try:
        for momentum in MOMENTA:
            for steps in t_values:
                tick = time.perf_counter()
                results.append(measure_setting(model, step, tasks, n_reference, momentum, steps))
                r = results[-1]
                log(
                    f"  step {step}, momentum {momentum:g}, T={steps}: auto γ={r.auto_gamma:g}, cosines "
                    + ", ".join(f"{spec} {r.mean_cosine(spec):.3f}" for spec in (BASELINE, "greedy(0.99)", AUTO))
                    + f" ({time.perf_counter() - tick:.0f} s)"
                )
    finally:
        restore_buffers(model, before)
    return results


# ------------------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Overall:
    """One estimator over all settings."""

    spec: str
    mean_cosine: float
    margin: float
    settings_at_least: int
    n_settings: int
    failed_settings: tuple[Setting, ...]
    failed_differences: tuple[tuple[float, float], ...]
    """Per failed setting: the paired difference to T1-T2 (mean over the tasks) and its standard error."""
    paired_wins: int
    paired_total: int

    @property
    def clearly_below(self) -> int:
        """Failed settings whose paired difference is more than two standard errors below zero."""
        return sum(d < -2 * e for d, e in self.failed_differences)

    @property
    def win_rate(self) -> float:
        return self.paired_wins / self.paired_total if self.paired_total else math.nan

    @property
    def meets_target(self) -> bool:
        return self.settings_at_least == self.n_settings and self.win_rate >= TARGET_WIN_RATE

    def record(self) -> dict[str, Any]:
        return {
            "mean_cosine": _number(self.mean_cosine),
            "mean_cosine_minus_t1t2": _number(self.margin),
            "settings_at_least_t1t2": self.settings_at_least,
            "n_settings": self.n_settings,
            "settings_below_t1t2": [
                {"setting": list(s), "minus_t1t2_mean": _number(d), "minus_t1t2_se": _number(e)}
                for s, (d, e) in zip(self.failed_settings, self.failed_differences)
            ],
            "settings_below_t1t2_by_more_than_2se": self.clearly_below,
            "paired_wins": self.paired_wins,
            "paired_total": self.paired_total,
            "win_rate_vs_t1t2": _number(self.win_rate),
            "meets_target": self.meets_target,
        }


def overall(results: Sequence[SettingResult], spec: str, keep=lambda r: True) -> Overall:
    """``spec`` over the settings of ``results`` that ``keep`` accepts."""
    chosen = [r for r in results if keep(r)]
    means = [r.mean_cosine(spec) for r in chosen]
    baseline = [r.mean_cosine(BASELINE) for r in chosen]
    failed = [r for r, m, b in zip(chosen, means, baseline) if not m >= b]
    wins = [r.wins(spec) for r in chosen]
    return Overall(
        spec=spec,
        mean_cosine=finite_mean(means),
        margin=finite_mean([m - b for m, b in zip(means, baseline)]),
        settings_at_least=len(chosen) - len(failed),
        n_settings=len(chosen),
        failed_settings=tuple(r.setting for r in failed),
        failed_differences=tuple(r.difference(spec) for r in failed),
        paired_wins=sum(w for w, _ in wins),
        paired_total=sum(n for _, n in wins),
    )


def _setting_text(setting: Setting) -> str:
    step, momentum, steps = setting
    return f"step {step}/μ {momentum:g}/T {steps}"


def verdict(summaries: Sequence[Overall]) -> str:
    """Which estimators meet the target and why the others do not, as markdown (a sentence and a list)."""
    candidates = [o for o in summaries if o.spec != BASELINE]
    met = [o.spec for o in candidates if o.meets_target]
    greedy = [o for o in candidates if o.spec not in (*IFT, "fo")]
    lines = [
        f"Target: mean cosine to RMD at least {BASELINE}'s in every (checkpoint, momentum, T) setting, and "
        f"an overall paired win rate against {BASELINE} of at least {TARGET_WIN_RATE:.0%}. "
        + (f"Met by: {', '.join(met)}." if met else "Met by none.")
        + ("" if any(o.meets_target for o in greedy) else " No Greedy-type estimator meets the target.")
    ]
    if len(met) < len(candidates):
        lines += ["", "Not met (a setting: its paired difference to t1t2, mean ± standard error over the tasks):", ""]
    for o in candidates:
        if o.meets_target:
            continue
        why = []
        if o.settings_at_least < o.n_settings:
            worst = sorted(zip(o.failed_settings, o.failed_differences), key=lambda f: f[1][0])
            shown = "; ".join(f"{_setting_text(s)} {d:+.3f} ± {e:.3f}" for s, (d, e) in worst[:8])
            more = f"; {len(worst) - 8} more" if len(worst) > 8 else ""
            why.append(
                f"below {BASELINE} in {len(worst)} of {o.n_settings} settings, {o.clearly_below} of them by more than "
                f"2 standard errors ({shown}{more})"
            )
        if not o.win_rate >= TARGET_WIN_RATE:
            why.append(f"win rate {o.win_rate:.0%} < {TARGET_WIN_RATE:.0%}")
        lines.append(f"- {o.spec}: {'; '.join(why)}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- report


def markdown_report(results: Sequence[SettingResult], meta: dict[str, Any]) -> str:
    """The whole of ``variants_<K>shot.md``."""
    summaries = [overall(results, spec) for spec in VARIANTS]
    checkpoints = sorted({r.checkpoint_step for r in results})
    t_values = sorted({r.T for r in results})
    n_eval = meta["evaluation_tasks"]
    lines = [
        f"# Greedy variants against T1-T2: cosine to the exact (RMD) hypergradient, {meta['shots']}-shot",
        "",
        f"Data: {meta['data']}. Held-out meta-validation tasks: {meta['tasks']}, the same at every checkpoint; in "
        f"every (checkpoint, momentum, T) setting the first {meta['reference_tasks']} only choose auto_greedy's γ "
        f"(grid {', '.join(f'{g:g}' for g in AUTO_GRID)}, by the cosine of the grid's mean hypergradient to RMD's, as "
        f"HypergradCallback does) and the other {n_eval} evaluate every estimator (paired). Checkpoints: the backbone "
        f"after {', '.join(str(c) for c in checkpoints)} outer steps of meta-training with Greedy(γ={TRAIN_GAMMA:g}), "
        f"T={TRAIN_T}, momentum {TRAIN_MOMENTUM:g}, Adam {OUTER_LR:g}, {META_BATCH} tasks per meta-batch. Inner "
        f"loop: SGD, lr {INNER_LR:g}, head from zero. {TAIL} uses min(5, T) exact steps: at T=5 it is RMD itself. "
        f"{', '.join(IFT)} are IFT diagnostics. {meta['machine']}; wall time {meta['wall_time_s']:.0f} s.",
        "",
        "Command: `" + meta["command"] + "`",
        "",
        "## Over all settings",
        "",
        f"Mean cosine: the mean over the {len(results)} settings of the mean over the tasks. Settings ≥ t1t2: those "
        f"whose mean cosine is at least t1t2's. Win rate: the paired tasks (all settings) where the cosine is "
        f"strictly above t1t2's. < t1t2 by > 2 SE: the settings where the paired difference to t1t2 is more than two "
        f"standard errors below zero (the other shortfalls are within two standard errors).",
        "",
        "| estimator | mean cosine | − t1t2 | settings ≥ t1t2 | < t1t2 by > 2 SE | paired wins vs t1t2 | win rate "
        "| target |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for o in summaries:
        target = "–" if o.spec == BASELINE else ("yes" if o.meets_target else "no")
        lines.append(
            f"| {o.spec} | {o.mean_cosine:.3f} | {o.margin:+.3f} | {o.settings_at_least}/{o.n_settings} | "
            f"{o.clearly_below} | "
            f"{o.paired_wins}/{o.paired_total} | {o.win_rate:.0%} | {target} |"
        )
    tail = overall(results, TAIL, keep=lambda r: r.T > r.tail)
    if tail.n_settings:
        lines += [
            "",
            f"{TAIL} without the settings where it is exact (T=5): mean cosine {tail.mean_cosine:.3f}, ≥ t1t2 in "
            f"{tail.settings_at_least}/{tail.n_settings} settings, win rate {tail.paired_wins}/{tail.paired_total} "
            f"({tail.win_rate:.0%}).",
        ]
    lines += ["", verdict(summaries), ""]
    chosen = {}
    for r in results:
        chosen[r.auto_gamma] = chosen.get(r.auto_gamma, 0) + 1
    lines += [
        "auto_greedy's γ, chosen per setting: "
        + ", ".join(f"{g:g} in {n}" for g, n in sorted(chosen.items()))
        + f" of the {len(results)} settings.",
        "",
    ]
    for step in checkpoints:
        for momentum in MOMENTA:
            subset = {r.T: r for r in results if r.checkpoint_step == step and r.momentum == momentum}
            if not subset:
                continue
            lines += [
                f"## Checkpoint step {step}, inner momentum {momentum:g}",
                "",
                f"Mean cosine to RMD over the {n_eval} evaluation tasks (± std) and, in brackets, the paired win rate "
                "against t1t2.",
                "",
                "| estimator | " + " | ".join(f"T={t}" for t in t_values) + " |",
                "|---|" + "---:|" * len(t_values),
            ]
            for spec in VARIANTS:
                cells = []
                for t in t_values:
                    r = subset.get(t)
                    if r is None:
                        cells.append("–")
                        continue
                    m, s = finite_mean(r.cosines[spec]), finite_std(r.cosines[spec])
                    cell = "–" if not math.isfinite(m) else f"{m:.3f} ± {s:.3f}"
                    if spec != BASELINE:
                        wins, n = r.wins(spec)
                        cell += f" [{wins / n:.0%}]" if n else ""
                    bad = sum(not math.isfinite(c) for c in r.cosines[spec])
                    cell += f" ({bad} non-finite)" if bad else ""
                    cells.append(cell)
                lines.append(f"| {spec} | " + " | ".join(cells) + " |")
            lines.append(
                "| auto_greedy's γ | "
                + " | ".join(f"{subset[t].auto_gamma:g}" if t in subset else "–" for t in t_values)
                + " |"
            )
            lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plot


def plot(results: Sequence[SettingResult], title: str, path: Path) -> None:
    """Heatmap of mean cosine minus t1t2's (estimators × settings) beside the overall win rates against t1t2."""
    rows = [spec for spec in VARIANTS if spec != BASELINE]
    settings = [r.setting for r in results]
    by_setting = {r.setting: r for r in results}
    diff = np.array(
        [[by_setting[s].mean_cosine(spec) - by_setting[s].mean_cosine(BASELINE) for s in settings] for spec in rows]
    )
    finite = np.abs(diff[np.isfinite(diff)])
    limit = float(min(max(finite.max(initial=0.0), 0.02), 0.5))
    fig, (ax, bars) = plt.subplots(
        1, 2, figsize=(max(8.0, 0.55 * len(settings) + 5.5), 0.5 * len(rows) + 2.6),
        gridspec_kw={"width_ratios": [max(len(settings), 4), 5]},
    )  # fmt: skip
    image = ax.imshow(
        np.clip(np.nan_to_num(diff, nan=-limit), -limit, limit),
        cmap="RdBu",
        norm=TwoSlopeNorm(0.0, -limit, limit),
        aspect="auto",
    )
    for i in range(len(rows)):
        for j in range(len(settings)):
            value = diff[i, j]
            text = "nan" if not math.isfinite(value) else f"{value:+.2f}".replace("+0.", "+.").replace("-0.", "−.")
            ax.text(j, i, text, ha="center", va="center", fontsize=6,
                    color="white" if math.isfinite(value) and abs(value) > 0.6 * limit else "black")  # fmt: skip
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(settings)), [f"{t}" for _, _, t in settings], fontsize=7)
    ax.set_xlabel("T, grouped by (checkpoint step, inner momentum)")
    groups: list[tuple[int, int, tuple[int, float]]] = []
    for j, (step, momentum, _) in enumerate(settings):
        if groups and groups[-1][2] == (step, momentum):
            groups[-1] = (groups[-1][0], j, groups[-1][2])
        else:
            groups.append((j, j, (step, momentum)))
    for first, last, (step, momentum) in groups:
        ax.text((first + last) / 2, -0.7, f"step {step}\nμ={momentum:g}", ha="center", va="bottom", fontsize=7)
        if first:
            ax.axvline(first - 0.5, color="black", linewidth=0.8)
    ax.set_title(f"mean cosine to RMD minus {BASELINE}'s (blue: better than {BASELINE})", pad=28, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)

    summaries = [overall(results, spec) for spec in rows]
    rates = [100 * o.win_rate for o in summaries]
    colors = ["tab:green" if o.meets_target else ("tab:gray" if o.spec in IFT else "tab:blue") for o in summaries]
    bars.barh(range(len(rows)), rates, color=colors)
    bars.axvline(100 * TARGET_WIN_RATE, color="black", linestyle="--", linewidth=1)
    bars.axvline(50, color="gray", linestyle=":", linewidth=0.8)
    bars.set_xlim(0, 100)
    bars.set_ylim(len(rows) - 0.5, -0.5)
    bars.set_yticks(range(len(rows)), [f"{o.settings_at_least}/{o.n_settings}" for o in summaries], fontsize=7)
    bars.set_ylabel("settings with mean cosine ≥ t1t2", fontsize=8)
    for i, rate in enumerate(rates):
        bars.text(min(rate + 1, 85), i, f"{rate:.0f}%", va="center", fontsize=7)
    bars.set_xlabel(f"paired win rate vs {BASELINE} (%), all settings")
    bars.set_title(f"green: meets the target (dashed: {TARGET_WIN_RATE:.0%})", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- main


def command_line(args: argparse.Namespace) -> str:
    """The command that regenerates the outputs (the options that were given)."""
    parts = ["python -m studies.quality --variants"]
    for name in ("quick",):
        if getattr(args, name):
            parts.append(f"--{name}")
    for name in ("shots", "queries", "tasks", "reference_tasks", "dataset", "seed", "threads", "out"):
        value = getattr(args, name)
        default = {"dataset": "auto", "seed": 0, "threads": 1, "out": "studies/quality/results"}.get(name)
        if value is not None and value != default:
            parts.append(f"--{name.replace('_', '-')} {value}")
    if args.train_steps is not None:
        parts.append("--train-steps " + " ".join(str(s) for s in args.train_steps))
    return " ".join(parts)


def run_variants(args: argparse.Namespace, start: float) -> None:
    """``python -m studies.quality --variants``: train, measure every checkpoint, write the JSON, markdown, plot."""
    device = torch.device(args.device)
    out = Path(args.out)
    data: DataChoice = choose_data(args.dataset, args.root, args.shots, args.queries)
    name = stem(data.shots)
    if args.replot:
        try:
            saved = json.loads((out / f"{name}.json").read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--replot: cannot read {out / f'{name}.json'} ({error}); run the study first") from None
        results = [SettingResult.from_record(r) for r in saved["settings"]]
        write_outputs(results, saved["meta"], out / name)
        print(f"rewrote {out / name}.json (summaries), .md and .png from the per-task records of {out / name}.json")
        return
    out.mkdir(parents=True, exist_ok=True)
    t_values = QUICK_T_VALUES if args.quick else T_VALUES
    n_tasks = args.tasks or (QUICK_TASKS if args.quick else DEFAULT_TASKS)
    n_reference = args.reference_tasks or (QUICK_REFERENCE_TASKS if args.quick else DEFAULT_REFERENCE_TASKS)
    if n_reference >= n_tasks:
        raise SystemExit(f"--tasks ({n_tasks}) must exceed --reference-tasks ({n_reference}): no task left to evaluate")
    if args.quick:
        checkpoints = [max(args.train_steps)] if args.train_steps else [0]
    else:
        checkpoints = [0, *sorted(set(args.train_steps if args.train_steps is not None else DEFAULT_TRAIN_STEPS))]
    log(f"data: {data.describe()}")
    log(
        f"checkpoints: {checkpoints}; T: {list(t_values)}; tasks: {n_tasks} ({n_reference} choose auto_greedy's γ, "
        f"{n_tasks - n_reference} evaluate); momenta: {list(MOMENTA)}"
    )
    datamodule = make_datamodule(data, n_tasks, max(checkpoints), args.seed)
    tasks = heldout_tasks(datamodule, n_tasks, device)
    model = build_model(datamodule.image_shape, args.seed, device)
    results: list[SettingResult] = []
    progress = Progress(len(set(checkpoints)))  # a unit: training up to a checkpoint, then its measurement
    for step, state, _ in train(model, datamodule, checkpoints, device):
        torch.save(state, out / f"{name}_backbone_step{step}.pt")
        measured = build_model(datamodule.image_shape, args.seed, device)
        measured.load_state_dict(state)
        tick = time.perf_counter()
        results += measure_checkpoint(measured, step, tasks, t_values, n_reference)
        progress.step(f"measured checkpoint {step} in {time.perf_counter() - tick:.0f} s")

    meta = {
        "data": data.describe(),
        "dataset": data.dataset,
        "shots": data.shots,
        "queries": data.queries,
        "checkpoints": checkpoints,
        "T": list(t_values),
        "momenta": list(MOMENTA),
        "tasks": len(tasks),
        "reference_tasks": n_reference,
        "evaluation_tasks": len(tasks) - n_reference,
        "auto_grid": list(AUTO_GRID),
        "estimators": list(VARIANTS),
        "target_win_rate": TARGET_WIN_RATE,
        "seed": args.seed,
        "machine": machine_description(device),
        "command": command_line(args),
        "wall_time_s": time.perf_counter() - start,
    }
    report = write_outputs(results, meta, out / name)
    print(report)
    print()
    print(f"wrote {out / f'{name}.json'}, {out / f'{name}.md'}, {out / f'{name}.png'}")
    print(f"total wall time: {time.perf_counter() - start:.1f} s")


def write_outputs(results: Sequence[SettingResult], meta: dict[str, Any], stem_path: Path) -> str:
    """``<stem>.json`` (summaries computed from the per-task records), ``<stem>.md`` and ``<stem>.png``; returns the
    markdown."""
    summaries = {spec: overall(results, spec).record() for spec in VARIANTS}
    settings = [r.record() for r in results]
    write_json(stem_path.with_suffix(".json"), {"meta": meta, "settings": settings, "overall": summaries})
    report = markdown_report(results, meta)
    write_text(stem_path.with_suffix(".md"), report + "\n")
    plot(results, _title(meta), stem_path.with_suffix(".png"))
    return report


def _title(meta: dict[str, Any]) -> str:
    return (
        f"Greedy variants vs {BASELINE}, {meta['dataset']} 5-way {meta['shots']}-shot, {meta['queries']} queries "
        f"({meta['evaluation_tasks']} evaluation tasks per setting)"
    )
