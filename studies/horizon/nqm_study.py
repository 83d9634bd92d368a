"""Part 1 of the horizon study: meta-learning an SGD schedule on the noisy quadratic model, against the exact optimum.

For each (method, seed), the schedule's log learning rates start at a constant ``--lr-init`` and are stepped by Adam
(``--meta-lr``) for ``--outer-steps`` outer steps, each on the hypergradient that the method (an estimator's spec
string) computes on one freshly sampled inner trajectory (:func:`studies.horizon.nqm.sampled_problem`; the seed
fixes the noise of every outer step, the same for every method). The schedule it ends with is judged by its
expected final loss in closed form (:func:`studies.horizon.nqm.expected_loss`), against:

- the optimal schedule (L-BFGS on the closed form), the best constant rate, the one-step greedy schedule of Wu et
  al. (each rate minimizes the expected loss right after its step) and the starting schedule.

Records: ``<out>/nqm/optimum.json`` (the references) and ``<out>/nqm/<method>-seed<k>.json`` (one per run, written
atomically when the run ends), so that rerunning the same command resumes; records made with other settings are
refused. ``report`` writes ``<out>/nqm.md`` and ``<out>/nqm.png`` from the records.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lightning_hypergrad import get_estimator
from studies.common import (
    Progress,
    atomic_path,
    estimator_spec,
    machine_description,
    require_positive,
    write_json,
    write_text,
)
from studies.horizon.nqm import (
    DTYPE,
    NQM,
    best_constant_rate,
    expected_loss,
    greedy_schedule,
    optimal_schedule,
    sampled_problem,
    schedule_rates,
)
from studies.horizon.records import add_action, check_settings, read_record, record_path, run_or_report

OUT = "studies/horizon/results"
TRUNCATIONS = (10, 100, 300)
GAMMAS = (0.99, 1.0)


def default_methods(lr_init: float, steps: int) -> list[str]:
    """``t1t2``, ``truncated_rmd(K)`` for K in 10, 100, 300 (those below T), ``greedy(gamma)`` for gamma in
    1 - lr_init (Theorem 4.6's choice), 0.99 and 1, ``rmd`` and ``rmd(checkpoint_every='sqrt')``."""
    gammas = sorted({*GAMMAS, round(1.0 - lr_init, 12)})
    return [
        "t1t2",
        *(f"truncated_rmd({k})" for k in TRUNCATIONS if k < steps),
        *(str(get_estimator(f"greedy({g})")) for g in gammas if 0 < g <= 1),
        "rmd",
        "rmd(checkpoint_every='sqrt')",
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_action(parser)
    parser.add_argument("--out", default=OUT, help=f"results folder (default {OUT}): records in <out>/nqm/")
    parser.add_argument("--dims", type=int, default=1000, help="coordinates n, curvatures 1/i (default 1000)")
    parser.add_argument("--steps", type=int, default=1000, help="inner SGD steps T (default 1000)")
    parser.add_argument("--knots", type=int, default=None, help="knots of the log learning-rate schedule (default T)")
    parser.add_argument("--noise", type=float, default=1.0, help="gradient noise covariance s H (default s = 1)")
    parser.add_argument("--momentum", type=float, default=0.0, help="fixed heavy-ball momentum (default 0)")
    parser.add_argument("--lr-init", type=float, default=0.1, help="the constant starting rate (default 0.1)")
    parser.add_argument("--outer-steps", type=int, default=200, help="Adam steps on the schedule (default 200)")
    parser.add_argument("--meta-lr", type=float, default=0.05, help="Adam's learning rate (default 0.05)")
    parser.add_argument("--eval-every", type=int, default=10, help="closed-form loss every N outer steps (10)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument(
        "--methods",
        nargs="+",
        type=estimator_spec,
        default=None,
        help="estimator spec strings (default: see default_methods)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    require_positive(parser, args, "dims", "steps", "outer_steps", "eval_every", "seeds", "threads")
    if args.knots is not None and not 2 <= args.knots <= args.steps:
        parser.error(f"--knots must be in [2, --steps={args.steps}], got {args.knots}")
    if not 0 < args.lr_init < 2 * (1 + args.momentum):
        parser.error(f"--lr-init must be in (0, {2 * (1 + args.momentum):g}) (stable SGD), got {args.lr_init}")
    if args.noise < 0 or not 0 <= args.momentum < 1 or args.meta_lr <= 0:
        parser.error("--noise must be >= 0, --momentum in [0, 1) and --meta-lr > 0")
    if args.methods is None:
        args.methods = default_methods(args.lr_init, args.steps)
    for method in args.methods:
        try:
            get_estimator(method).validate(
                sampled_problem(_model(args), _start(args), torch.zeros(args.steps, args.dims, dtype=DTYPE))
            )
        except ValueError as error:
            parser.error(f"--methods {method}: {error}")
    if len(set(args.methods)) != len(args.methods):
        parser.error("--methods names a method twice")


def _model(args: argparse.Namespace) -> NQM:
    knots = args.steps if args.knots is None else args.knots
    return NQM(dims=args.dims, steps=args.steps, noise=args.noise, momentum=args.momentum, knots=knots)


def _start(args: argparse.Namespace) -> torch.Tensor:
    knots = args.steps if args.knots is None else args.knots
    return torch.full((knots,), math.log(args.lr_init), dtype=DTYPE, requires_grad=True)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a record depends on besides its method and seed (a record made with others is refused)."""
    return {
        **_model(args).as_dict(),
        "lr_init": args.lr_init,
        "outer_steps": args.outer_steps,
        "meta_lr": args.meta_lr,
        "eval_every": args.eval_every,
    }


def _rates_summary(nqm: NQM, rates: torch.Tensor) -> dict[str, Any]:
    return {"rates": [float(r) for r in rates], "expected_loss": float(expected_loss(nqm, rates))}


def compute_optimum(nqm: NQM, lr_init: float) -> dict[str, Any]:
    """The references in closed form: the optimal schedule, the best constant rate, the greedy and the start."""
    started = time.perf_counter()
    constant = best_constant_rate(nqm)
    log_knots = optimal_schedule(nqm, constant)
    return {
        "optimum": {**_rates_summary(nqm, schedule_rates(nqm, log_knots)), "log_knots": [float(x) for x in log_knots]},
        "constant": {**_rates_summary(nqm, torch.full((nqm.steps,), constant, dtype=DTYPE)), "rate": constant},
        "greedy_schedule": _rates_summary(nqm, greedy_schedule(nqm)),
        "start": _rates_summary(nqm, torch.full((nqm.steps,), lr_init, dtype=DTYPE)),
        "seconds": time.perf_counter() - started,
    }


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    """Meta-learns the schedule with ``method`` on the noise of ``seed``; the record of the run."""
    nqm = _model(args)
    estimator = get_estimator(method)
    log_knots = _start(args)
    optimizer = torch.optim.Adam([log_knots], lr=args.meta_lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        curve = [[0, float(expected_loss(nqm, schedule_rates(nqm, log_knots)))]]
    sampled, seconds, nonfinite = [], 0.0, 0
    for step in range(1, args.outer_steps + 1):
        noise = nqm.sample_noise(generator)
        started = time.perf_counter()
        optimizer.zero_grad()
        result = estimator(sampled_problem(nqm, log_knots, noise), accumulate=True, check=step == 1)
        if log_knots.grad is None:  # a non-finite hypergradient is not accumulated: this outer step is skipped
            nonfinite += 1
        else:
            optimizer.step()
        seconds += time.perf_counter() - started
        sampled.append(float(result.loss))
        if step % args.eval_every == 0 or step == args.outer_steps:
            with torch.no_grad():
                curve.append([step, float(expected_loss(nqm, schedule_rates(nqm, log_knots)))])
    rates = schedule_rates(nqm, log_knots.detach())
    return {
        "method": method,
        "seed": seed,
        "settings": settings(args),
        "expected_loss": float(expected_loss(nqm, rates)),
        "log_knots": [float(x) for x in log_knots.detach()],
        "rates": [float(r) for r in rates],
        "curve": curve,
        "sampled_final_loss": sampled,
        "skipped_steps": nonfinite,
        "seconds_per_outer_step": seconds / args.outer_steps,
        "machine": machine_description("cpu"),
    }


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    folder = Path(args.out) / "nqm"
    expected = settings(args)
    runs = [(m, s) for m in args.methods for s in range(args.first_seed, args.first_seed + args.seeds)]
    for method, seed in runs:  # refuse before any work
        path = record_path(folder, method, seed)
        if path.exists():
            check_settings(path, read_record(path), expected)
    optimum_path = folder / "optimum.json"
    todo = [(m, s) for m, s in runs if not record_path(folder, m, s).exists()]
    progress = Progress(len(todo) + 1)
    if optimum_path.exists():
        data = read_record(optimum_path)
        check_settings(optimum_path, data, expected)
        progress.step(f"nqm optimum: found ({len(runs) - len(todo)} of {len(runs)} runs found)")
    else:
        data = {"settings": expected, **compute_optimum(_model(args), args.lr_init)}
        write_json(optimum_path, data)
        progress.step(f"nqm optimum: expected final loss {data['optimum']['expected_loss']:.4f}")
    best = data["optimum"]["expected_loss"]
    for method, seed in todo:
        record = run_one(args, method, seed)
        write_json(record_path(folder, method, seed), record)
        progress.step(
            f"nqm {method} seed {seed}: expected final loss {record['expected_loss']:.4f} (optimum {best:.4f})"
        )
    return report(args)


def _seed_range(args: argparse.Namespace) -> str:
    last = args.first_seed + args.seeds - 1
    return f"seed {last}" if args.seeds == 1 else f"seeds {args.first_seed}-{last}"


def _stats(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f} (n=1)"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f} (n={len(values)})"


def _geomean(columns: list[list[float]]) -> list[float]:
    """The geometric mean over runs of each step's rate."""
    return [math.exp(statistics.fmean(math.log(r) for r in step)) for step in zip(*columns)]


def load_records(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The references and the records of ``args.methods`` and the seeds, grouped by method (present ones only)."""
    folder = Path(args.out) / "nqm"
    expected = settings(args)
    optimum_path = folder / "optimum.json"
    if not optimum_path.exists():
        raise SystemExit(f"error: no {optimum_path}: run `python -m studies.horizon nqm` with the same settings first")
    optimum = read_record(optimum_path)
    check_settings(optimum_path, optimum, expected)
    records: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            path = record_path(folder, method, seed)
            if path.exists():
                data = read_record(path)
                check_settings(path, data, expected)
                records.setdefault(method, []).append(data)
    return optimum, records


def report(args: argparse.Namespace) -> int:
    """Writes ``<out>/nqm.md`` and ``<out>/nqm.png`` from the records; prints the table."""
    optimum, records = load_records(args)
    nqm = _model(args)
    T = nqm.steps
    marks = sorted({1, max(1, T // 10), max(1, T // 4), max(1, T // 2), max(1, 3 * T // 4), T})
    opt_rates = optimum["optimum"]["rates"]
    best = optimum["optimum"]["expected_loss"]
    head = " | ".join(f"lr at t={t}" for t in marks)
    lines = [
        "# Noisy quadratic model: meta-learned SGD schedules against the optimum",
        "",
        f"n = {nqm.dims} coordinates (curvatures 1/i), T = {T} SGD steps, gradient noise covariance {nqm.noise:g} H, "
        f"momentum {nqm.momentum:g}, {nqm.knots} log learning rates "
        + ("(one per step)" if nqm.knots == T else "(knots, interpolated linearly in log space)")
        + f"; every method starts at the constant rate {args.lr_init:g} and takes {args.outer_steps} Adam steps "
        f"(learning rate {args.meta_lr:g}) on its hypergradient of one sampled trajectory per step; "
        f"{_seed_range(args)}.",
        "",
        "Expected final loss E[L(w_T)] of each schedule, in closed form (mean ± standard deviation over seeds); "
        "'rates / optimum': the geometric mean over the steps of the schedule's rate over the optimum's, and the "
        "share of steps whose rate is below the optimum's; learning rates: the geometric mean over seeds.",
        "",
        f"| schedule | E[L(w_T)] | excess over optimum | rates / optimum | below optimum | {head} | s / outer step |",
        "|---|---|---|---|---|" + "---|" * len(marks) + "---|",
    ]

    def row(name: str, losses: list[float], rates: list[float], seconds: str) -> str:
        ratio = math.exp(statistics.fmean(math.log(r / o) for r, o in zip(rates, opt_rates)))
        below = sum(r < o for r, o in zip(rates, opt_rates)) / T
        excess = statistics.fmean(losses) / best - 1
        cells = " | ".join(f"{rates[t - 1]:.3g}" for t in marks)
        return (
            f"| {name} | {_stats(losses) if len(losses) > 1 else f'{losses[0]:.4f}'} | {100 * excess:+.1f}% | "
            f"{ratio:.2f} | {100 * below:.0f}% | {cells} | {seconds} |"
        )

    references = [
        ("optimum (closed form)", "optimum"),
        (f"best constant rate ({optimum['constant']['rate']:.3g})", "constant"),
        ("one-step greedy schedule (closed form)", "greedy_schedule"),
        (f"start (constant {args.lr_init:g})", "start"),
    ]
    for name, key in references:
        lines.append(row(name, [optimum[key]["expected_loss"]], optimum[key]["rates"], "-"))
    for method, runs in records.items():
        seconds = statistics.fmean(r["seconds_per_outer_step"] for r in runs)
        lines.append(
            row(
                f"`{method}`",
                [r["expected_loss"] for r in runs],
                _geomean([r["rates"] for r in runs]),
                f"{seconds:.3f}",
            )
        )
    skipped = {m: sum(r["skipped_steps"] for r in runs) for m, runs in records.items()}
    if any(skipped.values()):
        lines += [
            "",
            "Outer steps skipped for a non-finite hypergradient: "
            + ", ".join(f"`{m}` {n}" for m, n in skipped.items() if n),
        ]
    missing = [
        (m, s)
        for m in args.methods
        for s in range(args.first_seed, args.first_seed + args.seeds)
        if all(r["seed"] != s for r in records.get(m, []))
    ]
    if missing:
        lines += ["", f"Missing runs ({len(missing)}): " + ", ".join(f"`{m}` seed {s}" for m, s in missing)]
    machine = next((r["machine"] for runs in records.values() for r in runs), machine_description("cpu"))
    lines += ["", f"Machine: {machine}.", "", "![schedules and expected loss](nqm.png)", ""]
    text = "\n".join(lines)
    write_text(Path(args.out) / "nqm.md", text)
    plot(Path(args.out) / "nqm.png", nqm, optimum, records)
    print(text)
    return 0


def plot(path: Path, nqm: NQM, optimum: dict[str, Any], records: dict[str, list[dict[str, Any]]]) -> None:
    """Left: the learning rates of each schedule against the step; right: the expected final loss along training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    steps = range(1, nqm.steps + 1)
    left.plot(steps, optimum["optimum"]["rates"], color="black", lw=2.5, label="optimum (closed form)")
    left.plot(steps, optimum["greedy_schedule"]["rates"], color="black", ls="--", lw=1.5, label="one-step greedy")
    left.plot(steps, optimum["start"]["rates"], color="grey", ls=":", lw=1.5, label="start")
    colors = plt.get_cmap("tab10" if len(records) <= 10 else "tab20")
    for i, (method, runs) in enumerate(records.items()):
        color = colors(i % colors.N)
        left.plot(steps, _geomean([r["rates"] for r in runs]), color=color, lw=1.2, label=method)
        xs = [x for x, _ in runs[0]["curve"]]
        ys = [statistics.fmean(r["curve"][k][1] for r in runs) for k in range(len(xs))]
        right.plot(xs, ys, color=color, lw=1.2, label=method)
    for key, style, name in (("optimum", "-", "optimum"), ("greedy_schedule", "--", "one-step greedy")):
        right.axhline(optimum[key]["expected_loss"], color="black", ls=style, lw=1.5, label=name)
    left.set(yscale="log", xlabel="inner step t", ylabel="learning rate", title="schedules (geometric mean over seeds)")
    right.set(yscale="log", xlabel="outer step", ylabel="E[L(w_T)] (closed form)", title="expected final loss")
    left.legend(fontsize=7, ncol=2)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """``nqm run`` (the default) or ``nqm report``; Ctrl-C stops a run, keeping the records written so far."""
    return run_or_report(args, run, report)
