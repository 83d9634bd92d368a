"""How close each hypergradient estimator is to the exact (RMD) one on real few-shot tasks.

Run from the repository root::

    python -m studies.quality [--quick] [--tasks N] [--out DIR] [--train-steps 50 200] [--dataset auto|omniglot|digits]
                              [--root DIR] [--shots K] [--queries Q] [--device cpu|cuda] [--threads N] [--seed S]
    python -m studies.quality --variants [--shots 1 --queries 15] [--reference-tasks 4] ...   # the Greedy variants

What is measured
----------------
The model is :class:`lightning_hypergrad.FewShotClassifier` (a conv backbone of 3 blocks of width 32, the
hyperparameters; a linear head trained for T inner steps of SGD with learning rate 0.1, the inner parameters).
Tasks are 5-way 10-shot Omniglot with 10 queries per class when ``--root``, ``$OMNIGLOT_ROOT`` or
``../shared/data/omniglot`` (beside the repository) holds ``images_background.npz``; otherwise scikit-learn's 8x8
digits, 5-way 5-shot (``--dataset`` forces one; the dataset used is printed and written into the markdown).
``--shots`` and ``--queries`` change the task shape (of the meta-training and of the held-out tasks alike); the
published ``quality.*`` are the 10-shot ones, so give another ``--out`` for another shape.

``--variants`` measures instead the Greedy variants (``momentum_greedy``, ``greedy_tail``, ``auto_greedy``) and the
IFT diagnostics against T1-T2, with AutoGreedy's discount chosen on reference tasks kept apart from the evaluation
tasks, and writes ``variants_<K>shot.json/.md/.png``: see :mod:`studies.quality.variants`.

Checkpoints: the backbone as initialized (step 0) and after ``--train-steps`` outer steps of meta-training with
Greedy(0.99), T = 10, inner momentum 0.9, Adam (lr 1e-3) and 10 tasks per meta-batch (a plain loop over
``model.meta_gradient``). The backbone's state at each checkpoint is saved to ``DIR/backbone_step<N>.pt``; these
files are written again by every run (the training is part of the study) and are not kept in git (``*.pt`` is
ignored). The tasks, the model and its meta-training are those of :mod:`studies.quality.protocol`, which the
variants share.

At each checkpoint, for a fixed set of held-out meta-validation tasks (``--tasks``), for inner momentum 0.9 and
0.0 and for T in {5, 10, 20, 50}, the hypergradient with respect to the backbone's parameters (all of them,
flattened into one vector) is computed for the same bilevel problem by RMD (exact) and by ``fo``, ``t1t2`` (gamma = 0
on the plots' gamma axis) and ``greedy(gamma)`` for gamma in {0.5, 0.9, 0.99, 0.999, 1.0}. For each estimator it
records the cosine similarity to RMD's hypergradient and the norm ratio ``|estimate| / |RMD|``, task by task, and
reports their mean and standard deviation over the tasks.

Batch norm: the model stays in training mode throughout (the features use the task's batch statistics, as in
meta-training), so every estimator sees exactly the same features; the running statistics that the measurements
update are restored afterwards, and the script checks that the parameters and buffers are unchanged.

``--quick``: T in {5, 10}, 3 tasks and one checkpoint: step 0 (no training), or, when ``--train-steps`` is given
as well, the last of its steps.

Outputs (``--out DIR``, default ``studies/quality/results``):

- ``quality.json``: a list of records with the keys ``checkpoint_step``, ``momentum``, ``T``, ``estimator``
  (the spec string: ``fo``, ``t1t2``, ``greedy(0.99)``), ``gamma`` (``null`` for FO, ``0.0`` for T1-T2),
  ``cosine_mean``, ``cosine_std``, ``norm_ratio_mean``, ``norm_ratio_std`` and ``n_tasks``;
- ``quality.md``: per checkpoint and momentum, a table of cosines and one of norm ratios (rows: estimator, columns:
  T, cells: mean +- std over the tasks), and a paragraph stating what the numbers show, computed from them;
- ``cosine_vs_gamma.png`` and ``cosine_vs_T.png``, at the last checkpoint, one panel per momentum.

The markdown is printed at the end, with the machine, torch version, threads and the total wall time.

Before any work: an ``--out`` that cannot be written is refused, and a run (not ``--replot``) holds
``DIR/.quality.lock`` (``DIR/.variants.lock`` with ``--variants``) while it works (:func:`studies.common.run_alone`):
a second run on the same ``--out`` is refused while the first lives.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; --threads sets torch's own count

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import lightning_hypergrad as lh  # noqa: E402
from lightning_hypergrad.callbacks.hypergrad_quality import cosine_and_norm_ratio  # noqa: E402
from studies.common import (  # noqa: E402
    Progress,
    StudyParser,
    atomic_path,
    log,
    machine_description,
    run_alone,
    writable_folder,
    write_json,
    write_text,
)
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
    WAYS,
    DataChoice,
    build_model,
    choose_data,
    heldout_tasks,
    make_datamodule,
    restore_buffers,
    snapshot,
    train,
)
from studies.quality.variants import run_variants  # noqa: E402
from studies.stats import finite_mean, finite_std  # noqa: E402

GAMMAS = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)
"""Greedy's discounts; 0 stands for T1-T2 (the limit gamma -> 0)."""
ESTIMATORS = ("fo", *(str(lh.T1T2() if gamma == 0 else lh.Greedy(gamma)) for gamma in GAMMAS))
"""The estimators compared with RMD, as spec strings: ``fo``, ``t1t2``, ``greedy(0.5)``, ... ``greedy(1.0)``."""
DEFAULT_TASKS = 20
QUICK_TASKS = 3

GREEDY_FOCUS = str(lh.Greedy(0.99))  # the gamma the paper recommends, compared with T1-T2 in the summary
PLOT_T_LINES = ("fo", "t1t2", "greedy(0.9)", "greedy(0.99)", "greedy(1.0)")


# ------------------------------------------------------------------------------------------------- estimators


def gamma_axis_position(estimator: str) -> float | None:
    """The position of ``estimator`` on the gamma axis: Greedy's gamma, 0 for T1-T2, ``None`` for FO."""
    built = lh.get_estimator(estimator)
    if isinstance(built, lh.Greedy):
        return built.gamma
    return 0.0 if isinstance(built, lh.T1T2) else None


# ----------------------------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    """Per-task cosines and norm ratios of one estimator in one setting."""

    checkpoint_step: int
    momentum: float
    T: int
    estimator: str
    cosines: list[float] = dataclasses.field(default_factory=list)
    norm_ratios: list[float] = dataclasses.field(default_factory=list)

    @property
    def gamma(self) -> float | None:
        """Greedy's gamma, 0 for T1-T2, ``None`` for FO (:func:`gamma_axis_position`)."""
        return gamma_axis_position(self.estimator)

    @property
    def key(self) -> tuple[int, float, int, str]:
        """``(checkpoint_step, momentum, T, estimator)``."""
        return (self.checkpoint_step, self.momentum, self.T, self.estimator)

    def record(self) -> dict[str, Any]:
        """The JSON record: means and standard deviations over the tasks (``null`` where undefined)."""
        return {
            "checkpoint_step": self.checkpoint_step,
            "momentum": self.momentum,
            "T": self.T,
            "estimator": self.estimator,
            "gamma": self.gamma,
            "cosine_mean": _json_number(finite_mean(self.cosines)),
            "cosine_std": _json_number(finite_std(self.cosines)),
            "norm_ratio_mean": _json_number(finite_mean(self.norm_ratios)),
            "norm_ratio_std": _json_number(finite_std(self.norm_ratios)),
            "n_tasks": len(self.cosines),
        }


def _json_number(value: float) -> float | None:
    """``value``, or ``None`` where it is not finite (JSON has no NaN)."""
    return value if math.isfinite(value) else None


def measure_checkpoint(
    model: lh.FewShotClassifier,
    step: int,
    tasks: Sequence[dict[str, Any]],
    t_values: Sequence[int],
    estimators: Sequence[str],
) -> tuple[list[Measurement], dict[str, float]]:
    """Cosine and norm ratio of every estimator to RMD on every task, for each momentum and T.

    Returns the measurements and, averaged over the tasks, ``heldout_loss`` (the outer, query, loss after RMD's
    inner loop at T = 10, or the first T, with momentum 0.9) and ``step_curvature`` (:func:`step_curvature`).
    The model is left exactly as it was (checked).
    """
    model.train()
    before = snapshot(model)
    reference_estimator = lh.RMD()
    built = [(spec, lh.get_estimator(spec)) for spec in estimators]
    measurements = {
        (momentum, steps, spec): Measurement(step, momentum, steps, spec)
        for momentum in MOMENTA
        for steps in t_values
        for spec in estimators
    }
    loss_t = TRAIN_T if TRAIN_T in t_values else t_values[0]
    losses: list[float] = []
    try:
        curvature = finite_mean([step_curvature(model, task) for task in tasks])
        for momentum in MOMENTA:
            optimizer = lh.SGD(lr=INNER_LR, momentum=momentum)
            for steps in t_values:
                for task in tasks:
                    problem = dataclasses.replace(model.make_problem(task), optimizer=optimizer, steps=steps)
                    reference = reference_estimator(problem, check=False)
                    if momentum == TRAIN_MOMENTUM and steps == loss_t:
                        losses.append(reference.outer_loss)
                    for spec, estimator in built:
                        estimate = estimator(problem, check=False)
                        cosine, ratio = cosine_and_norm_ratio(estimate.hypergrads, reference.hypergrads)
                        entry = measurements[(momentum, steps, spec)]
                        entry.cosines.append(cosine)
                        entry.norm_ratios.append(ratio)
    finally:
        restore_buffers(model, before)
    return list(measurements.values()), {"heldout_loss": finite_mean(losses), "step_curvature": curvature}


def step_curvature(model: lh.FewShotClassifier, task: dict[str, Any]) -> float:
    """``lr * lambda_max`` of the inner loss's Hessian at the head's initialization ``w_0 = 0``.

    At ``w = 0`` the softmax is uniform over the ``K`` ways and the Hessian of the cross-entropy with respect to
    the head ``(W, b)`` is ``(I/K - 11^T/K^2) (x) E[x~ x~^T]`` with ``x~ = (features, 1)``, whose largest eigenvalue
    is ``lambda_max(E[x~ x~^T]) / K``. Plain gradient descent is locally stable for ``lr * lambda_max < 2`` and
    heavy-ball momentum ``beta`` for ``< 2 (1 + beta)``; above that the inner iterates oscillate and the Jacobians
    that RMD multiplies grow with T.
    """
    with torch.no_grad():
        support = model.features(task)[0]
        x = torch.cat([support, support.new_ones(support.shape[0], 1)], dim=1).double()
        second_moment = x.T @ x / x.shape[0]
        return INNER_LR * float(torch.linalg.eigvalsh(second_moment)[-1]) / WAYS


# ---------------------------------------------------------------------------------------------------- tables


def _cell(values: Sequence[float], digits: int) -> str:
    """``mean ± std`` of ``values`` for a table cell."""
    m, s = finite_mean(values), finite_std(values)
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(
    measurements: Sequence[Measurement], attribute: str, t_values: Sequence[int], digits: int = 3
) -> str:
    """Rows: the estimators of :data:`ESTIMATORS`; columns: T; cells: mean ± std over the tasks of ``attribute``."""
    by_key = {(m.estimator, m.T): m for m in measurements}
    lines = ["| estimator | " + " | ".join(f"T={t}" for t in t_values) + " |"]
    lines.append("|---|" + "---:|" * len(t_values))
    for estimator in ESTIMATORS:
        cells = []
        for steps in t_values:
            m = by_key.get((estimator, steps))
            cells.append(_cell(getattr(m, attribute), digits) if m else "–")
        lines.append(f"| {estimator} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _how_many(count: int, total: int) -> str:
    """``all``, ``most``, ``half``, ``a minority`` or ``none``, as a share of ``total``."""
    if count == total:
        return "all"
    if count == 0:
        return "none"
    if 2 * count > total:
        return "most"
    return "half" if 2 * count == total else "a minority"


def summary_paragraph(
    measurements: Sequence[Measurement],
    checkpoints: Sequence[int],
    t_values: Sequence[int],
    context: dict[int, dict[str, float]],
) -> str:
    """A plain statement of what the measurements show, computed from them (and the checkpoints' ``context``)."""
    index = {m.key: m for m in measurements}
    settings = [(c, mom, t) for c in checkpoints for mom in MOMENTA for t in t_values]

    def get(setting: tuple[int, float, int], estimator: str) -> Measurement:
        """The measurement of one estimator in one (checkpoint, momentum, T) setting."""
        return index[(*setting, estimator)]

    # Greedy(0.99) against T1-T2: setting by setting (means) and task by task (paired)
    wins, margins, paired_wins, paired_total = 0, [], 0, 0
    won_settings: list[str] = []
    wins_by_momentum = {mom: [0, 0] for mom in MOMENTA}
    for setting in settings:
        greedy, t1t2 = get(setting, GREEDY_FOCUS), get(setting, "t1t2")
        margin = finite_mean(greedy.cosines) - finite_mean(t1t2.cosines)
        margins.append(margin)
        wins += margin > 0
        if margin > 0:
            won_settings.append(f"step {setting[0]}, momentum {setting[1]:g}, T={setting[2]}")
        wins_by_momentum[setting[1]][0] += margin > 0
        wins_by_momentum[setting[1]][1] += 1
        for a, b in zip(greedy.cosines, t1t2.cosines):
            paired_total += 1
            paired_wins += a > b
    n = len(settings)
    momentum_text = "; ".join(
        f"with inner momentum {mom:g} in {won} of {total}" for mom, (won, total) in wins_by_momentum.items()
    )
    text = [
        f"{GREEDY_FOCUS}'s mean cosine similarity to the exact RMD hypergradient is above t1t2's in "
        f"{_how_many(wins, n)} of the settings: in {wins} of {n} (checkpoint × momentum × T; {momentum_text}), and, "
        f"task by task on the same problems, in "
        f"{paired_wins} of {paired_total} paired comparisons ({100 * paired_wins / max(paired_total, 1):.0f}%). "
        f"The difference of the mean cosines ({GREEDY_FOCUS} − t1t2) ranges from {min(margins):+.3f} to "
        f"{max(margins):+.3f} (mean {statistics.fmean(margins):+.3f})."
        + (f" The settings where it is above: {'; '.join(won_settings)}." if 0 < wins < n else "")
    ]

    # the best estimator per setting
    best_counts: dict[str, int] = {}
    for setting in settings:
        candidates = [m for m in measurements if (m.checkpoint_step, m.momentum, m.T) == setting]
        best = max(candidates, key=lambda m: finite_mean(m.cosines))
        best_counts[best.estimator] = best_counts.get(best.estimator, 0) + 1
    ranked = sorted(best_counts.items(), key=lambda item: -item[1])
    text.append(
        "The estimator with the highest mean cosine is "
        + ", ".join(f"{key} in {count}" for key, count in ranked)
        + f" of the {n} settings."
    )

    # how the cosines move with T at the last checkpoint
    last = checkpoints[-1]
    for mom in MOMENTA:
        parts = []
        for estimator in ("fo", "t1t2", GREEDY_FOCUS):
            first = finite_mean(get((last, mom, t_values[0]), estimator).cosines)
            final = finite_mean(get((last, mom, t_values[-1]), estimator).cosines)
            parts.append(f"{estimator} {first:.3f} → {final:.3f}")
        text.append(
            f"At checkpoint step {last} with momentum {mom:g}, from T={t_values[0]} to T={t_values[-1]} the mean "
            f"cosines go: {', '.join(parts)}."
        )

    # lengths
    ratio_parts = []
    for estimator in ("fo", "t1t2", GREEDY_FOCUS, "greedy(1.0)"):
        ratios = [finite_mean(get(s, estimator).norm_ratios) for s in settings]
        ratios = [r for r in ratios if math.isfinite(r)]
        if ratios:
            ratio_parts.append(
                f"{estimator} {statistics.median(ratios):.2f} (range {min(ratios):.2f}–{max(ratios):.2f})"
            )
    text.append(
        "Norm ratios |estimate|/|RMD| (median over settings of the mean over tasks; 1 = the exact length): "
        + "; ".join(ratio_parts)
        + "."
    )

    curvatures = [(step, context[step]["step_curvature"]) for step in checkpoints if step in context]
    if curvatures:
        text.append(
            "For context, lr·λ_max of the inner loss's Hessian at the head's initialization (mean over the tasks) is "
            + ", ".join(f"{value:.2f} at step {step}" for step, value in curvatures)
            + "; on a quadratic with that curvature plain SGD is stable below 2 and heavy ball with momentum 0.9 below"
            " 3.8, so above these the first inner steps overshoot along the top directions and the step Jacobians that"
            " RMD multiplies (and Greedy replaces by γ^(T−t)) expand there until the softmax saturates."
        )
    return " ".join(text)


def markdown_report(
    measurements: Sequence[Measurement],
    checkpoints: Sequence[int],
    t_values: Sequence[int],
    n_tasks: int,
    data: DataChoice,
    context: dict[int, dict[str, float]],
    machine: str,
) -> str:
    """The whole of ``quality.md``."""
    lines = [
        "# Hypergradient quality: cosine similarity and norm ratio to the exact (RMD) hypergradient",
        "",
        f"Data: {data.describe()}; {n_tasks} held-out meta-validation tasks, the same at every checkpoint. "
        f"Hypergradient: with respect to all backbone parameters, flattened. Inner loop: SGD, lr {INNER_LR:g}, "
        f"head reset to zero per task. Checkpoints: the backbone after that many outer steps of meta-training "
        f"with Greedy(γ={TRAIN_GAMMA:g}), T={TRAIN_T}, momentum {TRAIN_MOMENTUM:g}, Adam {OUTER_LR:g}, "
        f"{META_BATCH} tasks per meta-batch. Cells: mean ± std over the tasks. {machine}.",
        "",
        "## Summary",
        "",
        summary_paragraph(measurements, checkpoints, t_values, context),
        "",
    ]
    for step in checkpoints:
        info = context.get(step, {})
        extra = (
            f"held-out query loss after T={TRAIN_T} (momentum {TRAIN_MOMENTUM:g}): {info['heldout_loss']:.3f}; "
            f"lr·λ_max of the inner Hessian at w_0: {info['step_curvature']:.2f}"
        )
        if "train_loss" in info:
            extra += f"; training meta-batches since the previous checkpoint: outer loss {info['train_loss']:.3f}"
            if "train_acc" in info:
                extra += f", query accuracy {info['train_acc']:.3f}"
        for mom in MOMENTA:
            subset = [m for m in measurements if m.checkpoint_step == step and m.momentum == mom]
            lines += [
                f"## Checkpoint step {step}, inner momentum {mom:g}",
                "",
                f"({extra})",
                "",
                "Cosine similarity to RMD:",
                "",
                markdown_table(subset, "cosines", t_values),
                "",
                "Norm ratio |estimate| / |RMD|:",
                "",
                markdown_table(subset, "norm_ratios", t_values),
                "",
            ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- plots


Records = dict[tuple[int, float, int, str], dict[str, Any]]
"""The JSON records by ``(checkpoint_step, momentum, T, estimator)``."""


def index_records(records: Sequence[dict[str, Any]]) -> Records:
    """``records`` (as in ``quality.json``) by ``(checkpoint_step, momentum, T, estimator)``."""
    return {(r["checkpoint_step"], r["momentum"], r["T"], r["estimator"]): r for r in records}


def _band(ax: Any, x: Sequence[float], cells: Sequence[dict[str, Any]], alpha: float = 0.12, **style: Any) -> None:
    """The mean cosine of each record of ``cells`` as a line over ``x``, with a band of ± one standard deviation."""
    means = [math.nan if c["cosine_mean"] is None else c["cosine_mean"] for c in cells]
    stds = [math.nan if c["cosine_std"] is None else c["cosine_std"] for c in cells]
    (line,) = ax.plot(x, means, marker="o", markersize=4, **style)
    lower = [m - s for m, s in zip(means, stds)]
    upper = [m + s for m, s in zip(means, stds)]
    ax.fill_between(x, lower, upper, color=line.get_color(), alpha=alpha, linewidth=0)


def _finish(fig: Any, axes: Any, title: str, path: Path) -> None:
    """Labels, legend and title of a figure of cosines; saves it to ``path`` and closes it."""
    axes[0][0].set_ylabel("cosine to RMD (mean ± std over tasks)")
    axes[0][-1].legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


def plot_cosine_vs_gamma(index: Records, step: int, t_values: Sequence[int], path: Path) -> None:
    """Cosine against gamma (0 = T1-T2; evenly spaced, i.e. about log(1 - gamma)), one line per T."""
    placed = (e for e in ESTIMATORS if gamma_axis_position(e) is not None)
    on_gamma_axis = sorted(placed, key=gamma_axis_position)  # t1t2 at 0
    positions = list(range(len(GAMMAS)))
    ticks = ["0\n(t1t2)" if g == 0 else f"{g:g}" for g in GAMMAS]
    fig, axes = plt.subplots(1, len(MOMENTA), figsize=(5.2 * len(MOMENTA), 4), sharey=True, squeeze=False)
    for ax, mom in zip(axes[0], MOMENTA):
        for steps in t_values:
            cells = [index[(step, mom, steps, estimator)] for estimator in on_gamma_axis]
            _band(ax, positions, cells, label=f"T={steps}")
        ax.set_xticks(positions, ticks)
        ax.set_xlabel("greedy(γ) (evenly spaced, ≈ log(1−γ))")
        ax.set_title(f"inner momentum {mom:g}")
        ax.grid(alpha=0.3)
    _finish(fig, axes, f"Greedy's cosine similarity to the exact hypergradient, checkpoint step {step}", path)


def plot_cosine_vs_t(index: Records, step: int, t_values: Sequence[int], path: Path) -> None:
    """Cosine against T for the estimators of :data:`PLOT_T_LINES`, one panel per momentum."""
    fig, axes = plt.subplots(1, len(MOMENTA), figsize=(5.2 * len(MOMENTA), 4), sharey=True, squeeze=False)
    for ax, mom in zip(axes[0], MOMENTA):
        for estimator in PLOT_T_LINES:
            cells = [index[(step, mom, steps, estimator)] for steps in t_values]
            _band(ax, t_values, cells, alpha=0.07, label=estimator)
        ax.set_xscale("log")
        ax.set_xticks(list(t_values), [str(t) for t in t_values])
        ax.minorticks_off()
        ax.set_xlabel("T (inner steps)")
        ax.set_title(f"inner momentum {mom:g}")
        ax.grid(alpha=0.3)
    _finish(fig, axes, f"Cosine similarity to the exact hypergradient against T, checkpoint step {step}", path)


def plot(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Both plots, at the last checkpoint of ``records``, into ``out``; returns their paths."""
    index = index_records(records)
    step = max(r["checkpoint_step"] for r in records)
    t_values = sorted({r["T"] for r in records})
    paths = [out / "cosine_vs_gamma.png", out / "cosine_vs_T.png"]
    plot_cosine_vs_gamma(index, step, t_values, paths[0])
    plot_cosine_vs_t(index, step, t_values, paths[1])
    return paths


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line options (see the module docstring)."""
    parser = StudyParser(prog="python -m studies.quality", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"T in {list(QUICK_T_VALUES)}, {QUICK_TASKS} tasks, one checkpoint (step 0)",
    )
    parser.add_argument("--tasks", type=int, help=f"held-out tasks (default {DEFAULT_TASKS}; {QUICK_TASKS} quick)")
    parser.add_argument(
        "--out",
        type=writable_folder,
        default="studies/quality/results",
        help="output folder (default studies/quality/results); checked before any work",
    )
    parser.add_argument(
        "--dataset",
        choices=("auto", "omniglot", "digits"),
        default="auto",
        help="auto (default): Omniglot when its files are found, else the 8x8 digits",
    )
    parser.add_argument(
        "--root", default=None, help="the Omniglot folder (default: $OMNIGLOT_ROOT, else ../shared/data/omniglot)"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        nargs="*",
        help="outer steps of training at which to measure, besides step 0 (default 50 200)",
    )
    parser.add_argument(
        "--shots", type=int, help="support examples per class (default: 10 on Omniglot, 5 on the digits)"
    )
    parser.add_argument("--queries", type=int, help="query examples per class (default 10)")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="the Greedy variants against T1-T2 instead (studies/quality/variants.py): variants_<K>shot.json/.md/.png",
    )
    parser.add_argument(
        "--reference-tasks",
        type=int,
        help="--variants: the first tasks of a setting, used only to choose auto_greedy's gamma (default 4; 1 quick)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the backbone's initialization and the tasks")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="only redraw the plots of OUT from OUT/quality.json (nothing measured); with --variants, rewrite "
        "variants_<K>shot.json/.md/.png from the per-task records of the JSON",
    )
    args = parser.parse_args(argv)
    if args.tasks is not None and args.tasks < 1:
        parser.error("--tasks must be >= 1")
    if args.train_steps is not None and any(s < 1 for s in args.train_steps):
        parser.error("--train-steps must be positive")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    for name in ("shots", "queries", "reference_tasks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.reference_tasks is not None and not args.variants:
        parser.error("--reference-tasks goes with --variants")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Train, measure every checkpoint, write the JSON, markdown and plots, and print the report."""
    start = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replot and args.variants:  # --replot rewrites from the records only: no lock
        run_variants(args, start)
    elif args.replot:
        replot(Path(args.out))
    else:
        with run_alone(args.out, ".variants.lock" if args.variants else ".quality.lock"):
            (run_variants if args.variants else measure)(args, start)


def replot(out: Path) -> None:
    """``--replot``: the plots of ``out`` again, from ``out/quality.json``."""
    try:
        records = json.loads((out / "quality.json").read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--replot: cannot read {out / 'quality.json'} ({error}); run the study first") from None
    print("wrote " + ", ".join(str(path) for path in plot(records, out)))


def measure(args: argparse.Namespace, start: float) -> None:
    """Trains, measures every checkpoint, writes the JSON, the markdown and the plots, and prints the report."""
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_values = QUICK_T_VALUES if args.quick else T_VALUES
    n_tasks = args.tasks or (QUICK_TASKS if args.quick else DEFAULT_TASKS)
    if args.quick:
        checkpoints = [max(args.train_steps)] if args.train_steps else [0]
    else:
        checkpoints = [0, *sorted(set(args.train_steps if args.train_steps is not None else DEFAULT_TRAIN_STEPS))]
    data = choose_data(args.dataset, args.root, args.shots, args.queries)
    log(f"data: {data.describe()}")
    log(f"checkpoints: {checkpoints}; T: {list(t_values)}; tasks: {n_tasks}; momenta: {list(MOMENTA)}")

    datamodule = make_datamodule(data, n_tasks, max(checkpoints), args.seed)
    tasks = heldout_tasks(datamodule, n_tasks, device)
    model = build_model(datamodule.image_shape, args.seed, device)

    measurements: list[Measurement] = []
    context: dict[int, dict[str, float]] = {}
    progress = Progress(len(set(checkpoints)))  # a unit: training up to a checkpoint, then its measurement
    for step, state, train_metrics in train(model, datamodule, checkpoints, device):
        torch.save(state, out / f"backbone_step{step}.pt")
        measured_model = build_model(datamodule.image_shape, args.seed, device)
        measured_model.load_state_dict(state)
        tick = time.perf_counter()
        found, context[step] = measure_checkpoint(measured_model, step, tasks, t_values, ESTIMATORS)
        measurements += found
        if "outer_loss" in train_metrics:
            context[step]["train_loss"] = train_metrics["outer_loss"]
        if "acc" in train_metrics:
            context[step]["train_acc"] = train_metrics["acc"]
        progress.step(f"measured checkpoint {step} in {time.perf_counter() - tick:.0f} s")

    records = [m.record() for m in measurements]
    write_json(out / "quality.json", records)
    machine = machine_description(device)
    report = markdown_report(measurements, checkpoints, t_values, len(tasks), data, context, machine)
    write_text(out / "quality.md", report + "\n")
    plot(records, out)

    print(report)
    print()
    print(machine)
    print(f"data: {data.describe()}")
    print(
        f"wrote {out / 'quality.json'}, {out / 'quality.md'}, {out / 'cosine_vs_gamma.png'}, {out / 'cosine_vs_T.png'}"
    )
    print(f"total wall time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
