"""How close the Greedy variants (MomentumGreedy, GreedyTail) are to the exact hypergradient, next to FO, T1-T2, Greedy.

Run from the repository root::

    python -m studies.quality.greedy_variants [--tasks 10] [--steps 10 50] [--lr 0.1] [--out FILE]

The problem: multinomial logistic regression on scikit-learn's 8x8 digits (64 standardized features, 10 classes),
float64. Each task draws 100 training and 100 validation images and a per-feature log weight decay (64
hyperparameters, around log 0.05) from its seed; the inner loop is T steps of SGD (learning rate ``--lr``) from a
small random initialization, with momentum 0 and 0.9. For every estimator the script prints the cosine similarity
of its hypergradient to RMD's (mean and standard deviation over the tasks) and how often it beats T1-T2 and
Greedy(0.99) task by task. The hyperparameters are in the inner loss only, so FO's hypergradient is zero (its
cosine is reported as 0). The record (every task's cosine) goes to ``--out`` with the suffix ``.json``, the table
(:func:`table`) to ``--out`` (default ``studies/quality/results/greedy_variants.md``) and to the screen; an
``--out`` whose folder cannot be written is refused before any work, and a run holds ``.<name of --out>.lock`` beside
it while it works (:func:`studies.common.run_alone`), so that a second run on the same ``--out`` is refused while the
first lives.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import lightning_hypergrad as lh  # noqa: E402
from lightning_hypergrad.callbacks.hypergrad_quality import cosine_and_norm_ratio  # noqa: E402
from studies.common import (  # noqa: E402
    Progress,
    StudyParser,
    machine_description,
    run_alone,
    writable_file,
    write_json,
    write_text,
)

ESTIMATORS = (
    "fo",
    "t1t2",
    "greedy(0.5)",
    "greedy(0.9)",
    "greedy(0.99)",
    "momentum_greedy(0.5)",
    "momentum_greedy(0.9)",
    "momentum_greedy(0.99)",
    "greedy_tail(0.9, 2)",
    "greedy_tail(0.9, 5)",
    "greedy_tail(0.99, 5)",
    "truncated_rmd(5)",
)
MOMENTA = (0.0, 0.9)
TIE = 1e-12
"""Cosines closer than this are a tie, not a win (float64 rounding of one estimator computed two ways)."""


def digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    std = x.std(0)
    x = (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return x, torch.tensor(data.target)


def task_problem(x: Tensor, y: Tensor, seed: int, steps: int, lr: float, momentum: float) -> lh.BilevelProblem:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    train, val = order[:100], order[100:200]
    xt, yt, xv, yv = x[train], y[train], x[val], y[val]
    w0 = [0.01 * torch.randn(10, 64, generator=g, dtype=torch.float64), torch.zeros(10, dtype=torch.float64)]
    log_wd = (-3.0 + 0.5 * torch.randn(64, generator=g, dtype=torch.float64)).requires_grad_()

    def inner_loss(w, h):
        ce = torch.nn.functional.cross_entropy(xt @ w[0].T + w[1], yt)
        return ce + 0.5 * (h[0].exp() * w[0] ** 2).sum()

    def outer_loss(w, h):
        return torch.nn.functional.cross_entropy(xv @ w[0].T + w[1], yv)

    return lh.BilevelProblem(inner_loss, outer_loss, [log_wd], w0, lh.SGD(lr=lr, momentum=momentum), steps)


def main(argv: list[str] | None = None) -> None:
    parser = StudyParser(prog="python -m studies.quality.greedy_variants", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--out",
        type=writable_file,
        default=str(Path(__file__).parent / "results" / "greedy_variants.md"),
        help="the table's file (default studies/quality/results/greedy_variants.md); checked before any work",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    with run_alone(out.parent, f".{out.name}.lock"):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Every estimator's cosine to RMD on every task, momentum and T; writes the record (``--out`` with ``.json``)
    and the table (``--out``), and prints the table."""
    torch.set_num_threads(1)
    x, y = digits()
    columns = [(mu, steps) for mu in MOMENTA for steps in args.steps]
    cosines: dict[str, list[dict]] = {spec: [] for spec in ESTIMATORS}
    progress = Progress(len(columns), work=args.tasks * sum(steps for _, steps in columns))
    for mu, steps in columns:
        found: dict[str, list[float]] = {spec: [] for spec in ESTIMATORS}
        for seed in range(args.tasks):
            reference = lh.RMD()(task_problem(x, y, seed, steps, args.lr, mu)).hypergrads
            for spec in ESTIMATORS:
                estimate = lh.get_estimator(spec)(task_problem(x, y, seed, steps, args.lr, mu)).hypergrads
                found[spec].append(cosine_and_norm_ratio(estimate, reference)[0])
        for spec in ESTIMATORS:
            cosines[spec].append({"momentum": mu, "T": steps, "cosines": found[spec]})
        progress.step(f"mu={mu:g}, T={steps}: {args.tasks} tasks", args.tasks * steps)
    record = {
        "study": "greedy_variants",
        "command": "python -m studies.quality.greedy_variants " + " ".join(argv_of(args)),
        "tasks": args.tasks,
        "lr": args.lr,
        "steps": list(args.steps),
        "momenta": list(MOMENTA),
        "cosines_to_rmd": cosines,
        "machine": machine_description("cpu"),
    }
    out = Path(args.out)
    write_json(out.with_suffix(".json"), record)
    text = table(record)
    print(text)
    write_text(
        out,
        f"Written by `python -m studies.quality.greedy_variants` (record: {out.with_suffix('.json').name}).\n\n{text}",
    )


def argv_of(args: argparse.Namespace) -> list[str]:
    """The options that set the numbers (``--out`` left out)."""
    return ["--tasks", str(args.tasks), "--steps", *map(str, args.steps), "--lr", str(args.lr)]


def table(record: dict) -> str:
    """The table of a record: each estimator's cosine to RMD, mean +- standard deviation over the tasks per momentum
    and T, and in brackets the tasks on which it is closer than T1-T2 and than Greedy(0.99)."""
    tasks = record["tasks"]
    by = {
        spec: {(c["momentum"], c["T"]): c["cosines"] for c in cells} for spec, cells in record["cosines_to_rmd"].items()
    }
    columns = [(c["momentum"], c["T"]) for c in next(iter(record["cosines_to_rmd"].values()))]

    def beats(spec: str, other: str, column: tuple[float, int]) -> str:
        # a win is closer by more than rounding: with momentum 0, momentum_greedy(g) is greedy(g) (ties, not wins)
        return f"{sum(a > b + TIE for a, b in zip(by[spec][column], by[other][column]))}/{tasks}"

    header = " | ".join(f"mu={mu:g}, T={steps}" for mu, steps in columns)
    lines = [
        f"cosine to RMD, mean +- std over {tasks} tasks (lr {record['lr']}); [wins vs t1t2, vs greedy(0.99)]",
        "",
        f"| estimator | {header} |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for spec, values_by in by.items():
        cells = []
        for column in columns:
            values = values_by[column]
            cell = f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"
            if spec not in ("fo", "t1t2", "greedy(0.99)"):
                cell += f" [{beats(spec, 't1t2', column)}, {beats(spec, 'greedy(0.99)', column)}]"
            cells.append(cell)
        lines.append(f"| {spec} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
