"""Part 2 of the horizon study: a CNN's per-layer learning rates and weight decays, tuned over its whole training.

The problem is :mod:`studies.horizon.cnn`. For each horizon ``T`` (``--steps``) and method, the hyperparameters
start at ``--lr-init`` and ``--wd-init`` for every layer and are stepped by Adam (``--meta-lr``) for
``--outer-steps`` outer steps. Each outer step retrains the network from the same initialization (the search
seed's) for T steps, on a new order of the mini-batches, and takes the method's hypergradient of the validation
loss of ``w_T``; the hyperparameters are then clipped to the search box (the one random search draws from). The
methods are estimator spec strings, and ``random_search``: uniform draws in log space from the box, each a plain
training judged by its validation loss, for as long as the median wall-clock of the hypergradient methods' searches
at that horizon (so it runs after them).

Along a search: the outer loss of each step; every ``--cosine-every`` outer steps, the cosine of the method's
hypergradient to the exact one (``rmd``, same hyperparameters and batches, timed apart); every ``--eval-every``
outer steps a snapshot of the hyperparameters. Once, apart from the timed search: the peak memory of one
hypergradient (``--memory``). Every snapshot and the final hyperparameters are then judged by fresh trainings
(``torch.optim.SGD``, not the bilevel code) on ``--eval-seeds`` seeds (initialization and batch order) that no search
saw, on the held-out test split.

Records: ``<out>/cnn/T<T>-knots<K>/<method>-seed<s>.json``, written atomically when a run ends, so rerunning the
same command resumes; records made with other settings are refused. ``report`` writes ``<out>/cnn.md`` (with
``--knots 1``) or ``<out>/cnn-knots<K>.md``, and the plot beside it, from the records found (every search seed on
disk); it starts no run. Its unit is the search: each search's final hyperparameters are judged by their mean over the
unseen seeds, and methods are compared pair by pair over the search seeds they share, so that the intervals hold the
search-to-search variance.
"""

from __future__ import annotations

import argparse
import glob
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lightning_hypergrad import get_estimator
from studies.common import (
    MEMORY_METHODS,
    Progress,
    atomic_path,
    estimator_spec,
    log,
    machine_description,
    memory_meter,
    omniglot_root,
    require_positive,
    write_json,
    write_text,
)
from studies.horizon.cnn import (
    LAYERS,
    CNNSettings,
    Splits,
    batch_order,
    load_splits,
    start_hyperparameters,
    synthetic_splits,
    train_and_measure,
    training_problem,
)
from studies.horizon.records import add_action, check_settings, read_record, record_path, run_or_report
from studies.stats import Comparison, compare, mean_interval

OUT = "studies/horizon/results"
RANDOM_SEARCH = "random_search"
EXACT = "rmd"
CHECKPOINTED = "rmd(checkpoint_every='sqrt')"
"""The exact method the paired differences take where ``rmd`` is not among the methods."""
LR_BOX = (1e-3, 0.5)
WD_BOX = (1e-6, 1e-1)
EVAL_SEED0 = 1000
ORDER_SEED0 = 100_000


def default_methods(steps: int) -> list[str]:
    """``t1t2``, ``truncated_rmd(K)`` for K in 10 and 100 (those below T), ``greedy(0.9)``, ``greedy(0.99)``,
    ``rmd(checkpoint_every='sqrt')``, ``rmd``, then random search."""
    return [
        "t1t2",
        *(f"truncated_rmd({k})" for k in (10, 100) if k < steps),
        "greedy(0.9)",
        "greedy(0.99)",
        "rmd(checkpoint_every='sqrt')",
        "rmd",
        RANDOM_SEARCH,
    ]


def _method(text: str) -> str:
    return RANDOM_SEARCH if text == RANDOM_SEARCH else estimator_spec(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_action(parser)
    parser.add_argument("--out", default=OUT, help=f"results folder (default {OUT}): records in <out>/cnn/")
    parser.add_argument(
        "--root", default=None, help="Omniglot's folder (default $OMNIGLOT_ROOT, else ../shared/data/omniglot)"
    )
    parser.add_argument(
        "--data",
        choices=("omniglot", "synthetic"),
        default="omniglot",
        help="omniglot (default), or generated images of the same shapes (for tests)",
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1000], help="horizons T (default 100 1000)")
    parser.add_argument("--knots", type=int, default=1, help="knots of each layer's log-rate schedule (default 1)")
    parser.add_argument("--characters", type=int, default=50, help="characters, i.e. classes (default 50)")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    parser.add_argument("--width", type=int, default=8, help="channels of the first convolution (default 8)")
    parser.add_argument("--batch", type=int, default=32, help="mini-batch size (default 32)")
    parser.add_argument("--momentum", type=float, default=0.9, help="inner SGD momentum (default 0.9)")
    parser.add_argument("--lr-init", type=float, default=0.03, help="starting learning rate (default 0.03)")
    parser.add_argument("--wd-init", type=float, default=1e-4, help="starting weight decay (default 1e-4)")
    parser.add_argument("--outer-steps", type=int, default=40, help="Adam steps per search (default 40)")
    parser.add_argument("--meta-lr", type=float, default=0.1, help="Adam's learning rate (default 0.1)")
    parser.add_argument("--cosine-every", type=int, default=5, help="cosine to exact RMD every N steps (5)")
    parser.add_argument("--eval-every", type=int, default=10, help="hyperparameter snapshot every N steps (10)")
    parser.add_argument("--seeds", type=int, default=2, help="search seeds per method (default 2)")
    parser.add_argument("--eval-seeds", type=int, default=5, help="unseen seeds of the fresh trainings (default 5)")
    parser.add_argument(
        "--memory",
        choices=MEMORY_METHODS,
        default="allocator",
        help="peak-memory meter of one hypergradient (default allocator)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        type=_method,
        default=None,
        help=f"estimator spec strings and {RANDOM_SEARCH} (default: see default_methods)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    require_positive(parser, args, "knots", "characters", "width", "batch", "outer_steps", "seeds", "threads")
    require_positive(parser, args, "cosine_every", "eval_every", "eval_seeds")
    if any(t < 2 for t in args.steps) or len(set(args.steps)) != len(args.steps):
        parser.error(f"--steps must be distinct horizons of at least 2 steps, got {args.steps}")
    if args.knots > min(args.steps):
        parser.error(f"--knots ({args.knots}) must not exceed the shortest horizon ({min(args.steps)})")
    if args.size < 7:
        parser.error(f"--size must be at least 7 pixels (two stride-2 convolutions), got {args.size}")
    if not 0 <= args.momentum < 1 or args.meta_lr <= 0:
        parser.error("--momentum must be in [0, 1) and --meta-lr > 0")
    if not LR_BOX[0] <= args.lr_init <= LR_BOX[1] or not WD_BOX[0] <= args.wd_init <= WD_BOX[1]:
        parser.error(f"--lr-init must be in {list(LR_BOX)} and --wd-init in {list(WD_BOX)} (the search box)")
    if args.methods is None:
        args.methods = default_methods(max(args.steps))
    if len(set(args.methods)) != len(args.methods):
        parser.error("--methods names a method twice")
    if args.methods[-1:] != [RANDOM_SEARCH] and RANDOM_SEARCH in args.methods:
        parser.error(f"--methods: {RANDOM_SEARCH} must come last (its budget is the other methods' time)")
    if args.methods == [RANDOM_SEARCH]:
        parser.error(f"--methods: {RANDOM_SEARCH} needs at least one hypergradient method (its budget)")
    tiny = CNNSettings(characters=2, size=7, width=1, steps=max(args.steps), batch=1, knots=args.knots)
    probe = training_problem(synthetic_splits(tiny), tiny, 0, batch_order(24, tiny, 0), list(_start(tiny, args)))
    for method in args.methods:
        if method == RANDOM_SEARCH:
            continue
        try:
            get_estimator(method).validate(probe)
        except ValueError as error:
            parser.error(f"--methods {method}: {error}")


def _settings_of(args: argparse.Namespace, steps: int) -> CNNSettings:
    return CNNSettings(args.characters, args.size, args.width, steps, args.batch, args.momentum, args.knots)


def _start(settings: CNNSettings, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    return start_hyperparameters(settings, args.lr_init, args.wd_init)


def settings(args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """What a record depends on besides its method and seed (a record made with others is refused)."""
    return {
        **_settings_of(args, steps).as_dict(),
        "data": args.data,
        "lr_init": args.lr_init,
        "wd_init": args.wd_init,
        "outer_steps": args.outer_steps,
        "meta_lr": args.meta_lr,
        "cosine_every": args.cosine_every,
        "eval_every": args.eval_every,
        "eval_seeds": args.eval_seeds,
        "memory": args.memory,
        "lr_box": list(LR_BOX),
        "wd_box": list(WD_BOX),
    }


def folder_of(args: argparse.Namespace, steps: int) -> Path:
    return Path(args.out) / "cnn" / f"T{steps}-knots{args.knots}"


def _clip(log_lr: torch.Tensor, log_wd: torch.Tensor) -> None:
    with torch.no_grad():
        log_lr.clamp_(math.log(LR_BOX[0]), math.log(LR_BOX[1]))
        log_wd.clamp_(math.log(WD_BOX[0]), math.log(WD_BOX[1]))


def _snapshot(log_lr: torch.Tensor, log_wd: torch.Tensor) -> dict[str, Any]:
    return {"log_lr": log_lr.detach().tolist(), "log_wd": log_wd.detach().tolist()}


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = _flat(a).double(), _flat(b).double()
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-300))


def search(args: argparse.Namespace, splits: Splits, steps: int, method: str, seed: int) -> dict[str, Any]:
    """The search of ``method`` from the start, on the search seed ``seed``; the record without its evaluation."""
    cnn = _settings_of(args, steps)
    estimator, exact = get_estimator(method), get_estimator(EXACT)
    log_lr, log_wd = _start(cnn, args)
    optimizer = torch.optim.Adam([log_lr, log_wd], lr=args.meta_lr)
    train_size = len(splits.train[1])
    outer_losses, cosines, snapshots = [], [], [[0, 0.0, _snapshot(log_lr, log_wd)]]
    seconds, skipped = 0.0, 0
    for step in range(1, args.outer_steps + 1):
        order = batch_order(train_size, cnn, ORDER_SEED0 + 1000 * seed + step)
        problem = training_problem(splits, cnn, seed, order, [log_lr, log_wd])
        started = time.perf_counter()
        optimizer.zero_grad()
        result = estimator(problem, accumulate=True, check=step == 1)
        finite = log_lr.grad is not None and log_wd.grad is not None  # a non-finite hypergradient is not accumulated
        seconds += time.perf_counter() - started
        if finite and not method.startswith("rmd") and (step == 1 or step % args.cosine_every == 0):  # timed apart
            here = [log_lr.detach().clone().requires_grad_(), log_wd.detach().clone().requires_grad_()]
            reference = exact(training_problem(splits, cnn, seed, order, here))
            cosines.append([step, _cosine([log_lr.grad, log_wd.grad], list(reference.hypergrads))])
        started = time.perf_counter()
        if finite:
            optimizer.step()
            _clip(log_lr, log_wd)
        else:
            skipped += 1
        seconds += time.perf_counter() - started
        outer_losses.append(float(result.loss))
        if step % args.eval_every == 0 or step == args.outer_steps:
            snapshots.append([step, seconds, _snapshot(log_lr, log_wd)])
    return {
        "outer_losses": outer_losses,
        "cosines": cosines,
        "snapshots": snapshots,
        "search_seconds": seconds,
        "skipped_steps": skipped,
        "final": _snapshot(log_lr, log_wd),
    }


def random_search(args: argparse.Namespace, splits: Splits, steps: int, seed: int, budget: float) -> dict[str, Any]:
    """Uniform draws in log space from the box, each a plain training on a new batch order, for ``budget`` seconds."""
    cnn = _settings_of(args, steps)
    generator = torch.Generator().manual_seed(ORDER_SEED0 + 1000 * seed + 999)
    start_lr, start_wd = (x.detach() for x in _start(cnn, args))
    best, best_loss = _snapshot(start_lr, start_wd), math.inf
    train_size = len(splits.train[1])
    snapshots, losses, seconds, trial = [[0, 0.0, best]], [], 0.0, 0
    next_snapshot = budget / 5
    while seconds < budget:
        trial += 1
        started = time.perf_counter()
        low, high = math.log(LR_BOX[0]), math.log(LR_BOX[1])
        log_lr = low + (high - low) * torch.rand(len(LAYERS), cnn.knots, generator=generator)
        low, high = math.log(WD_BOX[0]), math.log(WD_BOX[1])
        log_wd = low + (high - low) * torch.rand(len(LAYERS), generator=generator)
        order = batch_order(train_size, cnn, ORDER_SEED0 + 1000 * seed + trial)
        loss = train_and_measure(splits, cnn, seed, order, log_lr, log_wd, measured=("val",))["val_loss"]
        seconds += time.perf_counter() - started
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = _snapshot(log_lr, log_wd), loss
        if seconds >= next_snapshot or seconds >= budget:
            snapshots.append([trial, seconds, best])
            next_snapshot += budget / 5
    return {
        "outer_losses": losses,
        "cosines": [],
        "snapshots": snapshots,
        "search_seconds": seconds,
        "skipped_steps": 0,
        "trials": trial,
        "budget_seconds": budget,
        "final": best,
    }


def peak_memory(args: argparse.Namespace, splits: Splits, steps: int, method: str, seed: int) -> int | None:
    """The peak memory of one hypergradient of ``method`` at the start (``None`` for random search: a training)."""
    cnn = _settings_of(args, steps)
    order = batch_order(len(splits.train[1]), cnn, ORDER_SEED0 + 1000 * seed)
    log_lr, log_wd = _start(cnn, args)
    meter = memory_meter(torch.device("cpu"), args.memory)
    if method == RANDOM_SEARCH:
        return meter.measure(lambda: train_and_measure(splits, cnn, seed, order, log_lr, log_wd, measured=("val",)))
    estimator = get_estimator(method)
    return meter.measure(lambda: estimator(training_problem(splits, cnn, seed, order, [log_lr, log_wd])))


def evaluate(args: argparse.Namespace, splits: Splits, steps: int, snapshot: dict[str, Any]) -> list[dict[str, float]]:
    """Fresh trainings with these hyperparameters on the unseen seeds: their metrics, one dict per seed."""
    cnn = _settings_of(args, steps)
    log_lr, log_wd = torch.tensor(snapshot["log_lr"]), torch.tensor(snapshot["log_wd"])
    out = []
    for k in range(args.eval_seeds):
        seed = EVAL_SEED0 + k
        order = batch_order(len(splits.train[1]), cnn, seed)
        out.append({"seed": seed, **train_and_measure(splits, cnn, seed, order, log_lr, log_wd)})
    return out


def run_one(
    args: argparse.Namespace, splits: Splits, steps: int, method: str, seed: int, budget: float | None
) -> dict[str, Any]:
    """The record of one search: the search, its peak memory, and the fresh trainings of its snapshots."""
    if method == RANDOM_SEARCH:
        assert budget is not None
        found = random_search(args, splits, steps, seed, budget)
    else:
        found = search(args, splits, steps, method, seed)
    found["peak_bytes"] = peak_memory(args, splits, steps, method, seed)
    for snap in found["snapshots"]:
        snap.append(evaluate(args, splits, steps, snap[2]))
    found["evaluation"] = (
        found["snapshots"][-1][3]
        if found["snapshots"][-1][2] == found["final"]
        else evaluate(args, splits, steps, found["final"])
    )
    return {
        "method": method,
        "seed": seed,
        "settings": settings(args, steps),
        **found,
        "machine": machine_description("cpu"),
    }


def _runs(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """``(T, method, seed)`` in the order they run: by horizon, random search after the other methods."""
    return [
        (steps, method, seed)
        for steps in args.steps
        for method in args.methods
        for seed in range(args.seeds)
        if not (method.startswith("truncated_rmd(") and int(method[len("truncated_rmd(") : -1]) >= steps)
    ]


def _splits(args: argparse.Namespace) -> Splits:
    cnn = _settings_of(args, min(args.steps))
    if args.data == "synthetic":
        return synthetic_splits(cnn)
    return load_splits(omniglot_root(args.root), cnn)


def _budget(args: argparse.Namespace, steps: int, seed: int) -> float:
    """The median search wall-clock of the hypergradient methods' records at this horizon and seed."""
    folder = folder_of(args, steps)
    times = [
        read_record(record_path(folder, m, seed))["search_seconds"]
        for m in args.methods
        if m != RANDOM_SEARCH and record_path(folder, m, seed).exists()
    ]
    if not times:
        raise SystemExit(f"error: random search at T={steps} needs a hypergradient method's record first (its budget)")
    return statistics.median(times)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    runs = _runs(args)
    for steps, method, seed in runs:  # refuse before any work
        path = record_path(folder_of(args, steps), method, seed)
        if path.exists():
            check_settings(path, read_record(path), settings(args, steps))
    todo = [r for r in runs if not record_path(folder_of(args, r[0]), r[1], r[2]).exists()]
    if todo:
        splits = _splits(args)
        progress = Progress(len(todo), work=sum(steps for steps, _, _ in todo))
        log(f"cnn: {len(runs) - len(todo)} of {len(runs)} runs found; {len(todo)} to do")
        for steps, method, seed in todo:
            budget = _budget(args, steps, seed) if method == RANDOM_SEARCH else None
            record = run_one(args, splits, steps, method, seed, budget)
            write_json(record_path(folder_of(args, steps), method, seed), record)
            test = statistics.fmean(e["test_loss"] for e in record["evaluation"])
            progress.step(
                f"cnn T={steps} {method} seed {seed}: test loss {test:.4f} after {record['search_seconds']:.0f} s",
                work=steps,
            )
    return report(args)


# ---------------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------------

SEARCHES = "searches"
UNSEEN = "unseen seeds"
"""The unit of a comparison: the searches (each search's mean over the unseen seeds, paired by search seed), or,
where two methods share only one search, the unseen seeds of that search, which leave out the search's own luck."""
ONE_SEARCH_NOTE = (
    "†: one search in common, so the interval is over the unseen seeds of that search only and leaves out the "
    "search-to-search variance; such a comparison is shown, not counted as a setting in the docs."
)


def record_seeds(folder: Path, method: str) -> list[int]:
    """The search seeds of ``method`` that have a record in ``folder``, whatever ``--seeds`` says."""
    prefix = record_path(folder, method, 0).name.removesuffix("0.json")
    seeds = (path.name[len(prefix) : -len(".json")] for path in folder.glob(f"{glob.escape(prefix)}*.json"))
    return sorted(int(seed) for seed in seeds if seed.isdigit())


def load_records(args: argparse.Namespace, steps: int) -> dict[str, list[dict[str, Any]]]:
    """The records of ``args.methods`` at horizon ``steps``, by method, one per search seed found, by seed, then those
    of any other method found in the folder (run with ``--methods``, e.g. at one horizon only), before random search:
    a report reads whatever searches exist (one method may have more than another); records of other settings are
    refused."""
    folder, expected = folder_of(args, steps), settings(args, steps)
    found = sorted({re.sub(r"-seed\d+\.json$", "", p.name) for p in folder.glob("*-seed*.json")})
    methods = [m for m in args.methods if m != RANDOM_SEARCH] + [m for m in found if m not in args.methods]
    methods += [RANDOM_SEARCH] if RANDOM_SEARCH in args.methods else []
    records: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        for seed in record_seeds(folder, method):
            path = record_path(folder, method, seed)
            data = read_record(path)
            check_settings(path, data, expected)
            records.setdefault(method, []).append(data)
    return records


def final_values(runs: list[dict[str, Any]], key: str = "test_loss") -> dict[int, list[float]]:
    """Per search seed: ``key`` of the fresh trainings with the search's final hyperparameters, one per unseen seed."""
    return {r["seed"]: [e[key] for e in r["evaluation"]] for r in runs}


def start_values(records: dict[str, list[dict[str, Any]]], key: str = "test_loss") -> list[float]:
    """``key`` of the fresh trainings with the starting hyperparameters, per unseen seed: the same for every search,
    and what ``fo`` ends with (the hyperparameters enter only the training loss, so its hypergradient is 0)."""
    return [e[key] for e in next(iter(records.values()))[0]["snapshots"][0][3]]


def start_searches(records: dict[str, list[dict[str, Any]]], key: str = "test_loss") -> dict[int, list[float]]:
    """:func:`start_values` for every search seed found (no search changes the start), to pair with a method's."""
    values = start_values(records, key)
    return {r["seed"]: values for runs in records.values() for r in runs}


def summary(values: dict[int, list[float]]) -> tuple[float, tuple[float, float] | None, str]:
    """The mean over the searches of each search's mean over the unseen seeds, its 95% t interval and its unit: across
    the searches where there are two or more; for one search, over its unseen seeds (:data:`UNSEEN`)."""
    means = [statistics.fmean(v) for v in values.values()]
    if len(means) >= 2:
        return statistics.fmean(means), mean_interval(means), SEARCHES
    only = next(iter(values.values()))
    return statistics.fmean(only), mean_interval(only), UNSEEN


def compare_searches(
    values: dict[int, list[float]], reference: dict[int, list[float]] | None, *, higher_is_better: bool = False
) -> tuple[Comparison, str] | None:
    """``values`` minus ``reference``, paired by search seed over the searches both have (each search's mean over the
    unseen seeds), with its :func:`studies.stats.verdict`; with one search in common, paired by unseen seed within it
    (the unit :data:`UNSEEN`). ``None`` without a reference or a common search."""
    common = sorted(set(values) & set(reference or {}))
    if reference is None or not common:
        return None
    if len(common) >= 2:
        mine = [statistics.fmean(values[s]) for s in common]
        theirs = [statistics.fmean(reference[s]) for s in common]
        return compare(mine, theirs, higher_is_better=higher_is_better), SEARCHES
    return compare(values[common[0]], reference[common[0]], higher_is_better=higher_is_better), UNSEEN


def comparison_text(found: tuple[Comparison, str] | None, digits: int = 2) -> str:
    """A table cell: the difference, its interval and the verdict, marked ``†`` where the unit is the unseen seeds."""
    if found is None:
        return "-"
    comparison, unit = found
    return comparison.text(digits, with_verdict=True) + (" †" if unit == UNSEEN else "")


def _summary_text(values: dict[int, list[float]], digits: int = 3) -> str:
    mean, interval, unit = summary(values)
    if not math.isfinite(mean):
        return "diverged"
    shown = f"{mean:.{digits}f}"
    if interval is not None:
        shown += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return shown + (" †" if unit == UNSEEN else "")


def each_search(values: dict[int, list[float]], digits: int = 3) -> str:
    """Each search's mean over the unseen seeds, by search seed."""
    return ", ".join(f"{statistics.fmean(v):.{digits}f}" for _, v in sorted(values.items()))


def _rates(snapshot: dict[str, Any]) -> str:
    """Per layer: the learning rate (geometric mean over the knots) and the weight decay."""
    lrs = [math.exp(statistics.fmean(row)) for row in snapshot["log_lr"]]
    wds = [math.exp(x) for x in snapshot["log_wd"]]
    return " / ".join(f"{lr:.3g}" for lr in lrs) + " | " + " / ".join(f"{wd:.2g}" for wd in wds)


def exact_method(records: dict[str, list[dict[str, Any]]]) -> str | None:
    """The exact method the paired differences take: ``rmd``, else its checkpointed form; ``None`` without either."""
    return next((m for m in (EXACT, CHECKPOINTED) if m in records), None)


def report_name(args: argparse.Namespace) -> str:
    return "cnn" if args.knots == 1 else f"cnn-knots{args.knots}"


def horizon_table(args: argparse.Namespace, records: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One horizon's table: per method its searches, test loss and accuracy, the paired differences to random search
    and to exact RMD (by search), cost, memory, cosines and the first search's final rates."""
    exact = exact_method(records)
    losses = {m: final_values(runs) for m, runs in records.items()}
    ref_rs, ref_exact = losses.get(RANDOM_SEARCH), losses.get(exact or "")
    start = start_searches(records)
    lines = [
        f"| method | searches | test loss | each search | vs random search | vs exact `{exact or EXACT}` | "
        "test accuracy | search s | s / outer step | peak MiB | cosine to exact | lr conv0 / conv1 / fc | "
        "weight decay conv0 / conv1 / fc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| start (`fo` ends here) | - | {statistics.fmean(start_values(records)):.3f} | - | "
        f"{comparison_text(compare_searches(start, ref_rs))} | {comparison_text(compare_searches(start, ref_exact))} | "
        f"{statistics.fmean(start_values(records, 'test_acc')):.3f} | - | - | - | - | "
        f"{_rates(next(iter(records.values()))[0]['snapshots'][0][2])} |",
    ]
    for method, runs in records.items():
        secs = statistics.fmean(r["search_seconds"] for r in runs)
        per_step = (
            f"{secs / args.outer_steps:.2f}"
            if method != RANDOM_SEARCH
            else f"{secs / statistics.fmean(r['trials'] for r in runs):.2f} / trial "
            f"({', '.join(str(r['trials']) for r in runs)} trials)"
        )
        peak = statistics.fmean(r["peak_bytes"] for r in runs) / 2**20
        cos = [c for r in runs for _, c in r["cosines"]]
        cos_text = (
            f"{statistics.median(cos):.3f} [{min(cos):.3f}, {max(cos):.3f}]"
            if cos
            else ("1 (is exact)" if method.startswith("rmd") else "-")
        )
        vs_rs = "0" if method == RANDOM_SEARCH else comparison_text(compare_searches(losses[method], ref_rs))
        vs_exact = "0" if method == exact else comparison_text(compare_searches(losses[method], ref_exact))
        lines.append(
            f"| `{method}` | {len(runs)} | {_summary_text(losses[method])} | {each_search(losses[method])} | {vs_rs} | "
            f"{vs_exact} | {_summary_text(final_values(runs, 'test_acc'))} | {secs:.0f} | {per_step} | {peak:.1f} | "
            f"{cos_text} | {_rates(runs[0]['final'])} |"
        )
    return lines


def report(args: argparse.Namespace) -> int:
    """Writes ``<out>/<report_name>.md`` and its plot from the records found (every search seed on disk, whatever
    ``--seeds`` says); prints the tables. Starts no run."""
    cnn = _settings_of(args, min(args.steps))
    variant = (
        "one learning rate per layer"
        if args.knots == 1
        else f"a log-linear learning-rate schedule of {args.knots} knots per layer"
    )
    lines = [
        f"# A CNN tuned over its whole training: per-layer learning rates and weight decays ({variant})",
        "",
        f"Omniglot ({args.data}): {cnn.characters} background characters, drawings 0-11 train, 12-15 validation, "
        f"16-19 test; {cnn.size}x{cnn.size} images; CNN conv0 ({cnn.width} ch) - conv1 ({2 * cnn.width} ch) - fc, "
        f"SGD momentum {cnn.momentum:g}, mini-batches of {cnn.batch}. Every method starts at lr {args.lr_init:g} and "
        f"weight decay {args.wd_init:g} in every layer and takes {args.outer_steps} Adam steps (learning rate "
        f"{args.meta_lr:g}) on its hypergradient of the validation loss, each on a full retraining from the same "
        f"initialization with a new batch order; random search draws log-uniformly from lr {list(LR_BOX)}, weight "
        f"decay {list(WD_BOX)} (the box every method is clipped to) for the median search time of the others on the "
        "same search seed. Each search (search seed) is an independent run of the method; the table counts the "
        "searches found for each method.",
        "",
        f"Each search's final hyperparameters are judged by fresh trainings on {args.eval_seeds} seeds no search saw "
        f"(initialization and batch order {EVAL_SEED0}-{EVAL_SEED0 + args.eval_seeds - 1}), on the held-out test "
        "split. The unit is the search: a search's figure is its mean over the unseen seeds; *test loss* and *test "
        "accuracy* are the mean over the searches [95% t interval across the searches], so that the interval holds "
        "the search-to-search variance; *each search* lists them by search seed. The paired differences (negative: "
        "lower loss than the reference) pair the searches by search seed, over the seeds both methods have: an "
        "interval that holds 0 is *level*, one that excludes 0 *better* or *worse*. The start is the same for every "
        "search (and is where `fo` ends: its hypergradient is 0 here). "
        + ONE_SEARCH_NOTE
        + f" Search seconds, peak memory and cosines are means or pooled over the searches; cosine: of the method's "
        f"hypergradient to exact RMD's, every {args.cosine_every} outer steps (median [min, max] along the searches); "
        "peak memory: one hypergradient, "
        f"{memory_meter(torch.device('cpu'), args.memory).description}; the rates are the first search's.",
    ]
    all_records = {}
    for steps in args.steps:
        records = load_records(args, steps)
        all_records[steps] = records
        lines += ["", f"## T = {steps}", ""]
        if not records:
            lines.append("No records yet.")
            continue
        lines += horizon_table(args, records)
        skipped = {m: sum(r["skipped_steps"] for r in runs) for m, runs in records.items()}
        if any(skipped.values()):
            lines += [
                "",
                "Outer steps skipped for a non-finite hypergradient: "
                + ", ".join(f"`{m}` {n}" for m, n in skipped.items() if n),
            ]
    found = {(s, m, r["seed"]) for s, recs in all_records.items() for m, runs in recs.items() for r in runs}
    missing = [f"T={s} `{m}` seed {k}" for s, m, k in _runs(args) if (s, m, k) not in found]
    if missing:
        lines += ["", f"Not found for `--seeds {args.seeds}` ({len(missing)}): " + ", ".join(missing)]
    machine = next(
        (r["machine"] for recs in all_records.values() for runs in recs.values() for r in runs),
        machine_description("cpu"),
    )
    name = report_name(args)
    lines += ["", f"Machine: {machine}.", "", f"![test loss against compute]({name}.png)", ""]
    text = "\n".join(lines)
    write_text(Path(args.out) / f"{name}.md", text)
    plot(Path(args.out) / f"{name}.png", all_records)
    print(text)
    return 0


def snapshot_losses(runs: list[dict[str, Any]], key: str = "test_loss") -> list[tuple[int, float, float]]:
    """Along the searches: ``(outer step or trial, mean search seconds, mean key)`` of each snapshot's fresh trainings,
    averaged over the searches (as far as every search has snapshots)."""
    count = min(len(r["snapshots"]) for r in runs)
    return [
        (
            runs[0]["snapshots"][k][0],
            statistics.fmean(r["snapshots"][k][1] for r in runs),
            statistics.fmean(e[key] for r in runs for e in r["snapshots"][k][3]),
        )
        for k in range(count)
    ]


def plot(path: Path, all_records: dict[int, dict[str, list[dict[str, Any]]]]) -> None:
    """One panel per horizon: mean test loss of the fresh trainings of each snapshot against the search seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizons = [s for s, recs in all_records.items() if recs]
    if not horizons:
        return
    fig, axes = plt.subplots(1, len(horizons), figsize=(6.5 * len(horizons), 4.8), squeeze=False)
    methods = sorted({m for recs in all_records.values() for m in recs}, key=str)
    colors = plt.get_cmap("tab10")
    for ax, steps in zip(axes[0], horizons):
        for method, runs in all_records[steps].items():
            points = snapshot_losses(runs)
            style = "--" if method == RANDOM_SEARCH else "-"
            ax.plot(
                [x for _, x, _ in points],
                [y for _, _, y in points],
                style,
                marker="o",
                ms=3,
                color=colors(methods.index(method) % 10),
                label=f"{method} ({len(runs)} search{'es' if len(runs) > 1 else ''})",
            )
        ax.set(xlabel="search wall-clock (s, 1 CPU thread)", ylabel="test loss (fresh trainings, unseen seeds)")
        ax.set_title(f"T = {steps} inner steps (mean over the searches)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """``cnn run`` (the default) or ``cnn report``; Ctrl-C stops a run, keeping the records written so far."""
    return run_or_report(args, run, report)
