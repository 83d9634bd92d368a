"""Table 2 of the paper: few-shot classification with FO, T1-T2, IFT (Neumann) and generalized greedy hypergradients.

``lightning-hypergrad-bench table2 run`` trains a :class:`~lightning_hypergrad.FewShotClassifier` for every setting
(``ways`` in 3, 4, 5; 10 shots, 10 queries), every method and every seed with the paper's hyperparameters (inner SGD
lr 0.1 momentum 0.9, T = 10; outer Adam lr 1e-3; 200 outer steps; meta-batch 10; a 3 x 32 conv backbone with batch
norm), then evaluates it on held-out meta-validation and meta-test tasks. Each finished run is written at once to its
own JSON record, ``<out>/runs/<dataset>-<ways>way-<method>-seed<k>.json``; a later ``run`` with the same arguments
skips the runs that have a record, so an interrupted run resumes where it stopped.

``lightning-hypergrad-bench table2 report`` (also called at the end of ``run``) reads the records and writes
``<out>/table2.md``, ``<out>/table2.csv`` and ``<out>/table2.png`` with two protocols:

- (a) the paper's: Greedy's gamma is chosen per setting by the best mean meta-validation accuracy over seeds, and
  every method's accuracy is reported on those same meta-validation tasks;
- (b) the clean one: gamma chosen the same way on meta-validation, accuracies reported on meta-test tasks.

Cells are ``mean +- 1.96 * std / sqrt(n)`` in percent over the ``n`` seeds (sample standard deviation).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import json
import logging
import math
import multiprocessing
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_hypergrad.callbacks import StepTimer
from lightning_hypergrad.data.fewshot import FewShotDataModule
from lightning_hypergrad.data.sources import ClassSplit
from lightning_hypergrad.estimators import FO, T1T2, Greedy, HypergradEstimator, Neumann
from lightning_hypergrad.fewshot import FewShotClassifier
from lightning_hypergrad.optim import SGD

# ---------------------------------------------------------------------------------------------------------------------
# the paper's protocol
# ---------------------------------------------------------------------------------------------------------------------

PAPER_WAYS = (3, 4, 5)
"""The settings (N-way) of the paper's Table 2; the report always shows these columns."""
INNER_STEPS = 10
INNER_LR = 0.1
INNER_MOMENTUM = 0.9
OUTER_LR = 1e-3
DEPTH = 3
WIDTH = 32
NEUMANN_ITERATIONS = 10
NEUMANN_SCALE = 0.1
DEFAULT_METHODS = ("fo", "t1t2", "neumann", "greedy0.9", "greedy0.99", "greedy0.999")
DATASETS = ("omniglot", "cifar100", "digits")

PAPER_RESULTS: dict[str, tuple[str, int, dict[int, tuple[float, float]]]] = {
    "fo": ("FO", 0, {3: (43.48, 1.64), 4: (34.15, 1.28), 5: (28.59, 1.0)}),
    "t1t2": ("T1-T2", 1, {3: (42.96, 1.89), 4: (33.95, 1.53), 5: (27.59, 0.99)}),
    "neumann": ("IFT (Neumann)", 11, {3: (40.14, 2.26), 4: (33.23, 0.99), 5: (27.20, 1.12)}),
    "greedy0.99": ("Greedy (γ=0.99)", 10, {3: (46.10, 1.95), 4: (36.94, 2.55), 5: (29.79, 1.33)}),
}
"""The paper's Table 2 (CIFAR-100, 10-shot, accuracy in percent +- 95% CI): label, JVPs, ``{ways: (mean, ci95)}``."""

PROTOCOLS = {
    "paper": ("val_acc", "(a) the paper's protocol: γ chosen on meta-validation, accuracy on the same meta-validation"),
    "clean": ("test_acc", "(b) clean protocol: γ chosen on meta-validation, accuracy on meta-test"),
}
"""Protocol name -> (the record field reported, title). Both choose Greedy's gamma by mean ``val_acc``."""

CHOSEN = "greedy-chosen"
"""The method name of the report's row "Greedy (gamma chosen on meta-validation)"."""

COMPARED_SETTINGS = ("shots", "queries", "steps", "meta_batch", "eval_tasks")
"""Settings that a record must share with the requested run to count as done."""

_LABELS = {"fo": "FO", "t1t2": "T1-T2", "neumann": "IFT (Neumann)"}
_ALIASES = {"fo": "fo", "t1t2": "t1t2", "t1-t2": "t1t2", "neumann": "neumann", "ift": "neumann"}
_GREEDY = re.compile(r"greedy[-_:=]?(?P<gamma>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)")

METHODS_HELP = (
    "method names: fo (first order, 0 JVPs), t1t2 (T1-T2, 1 JVP), neumann (IFT with a Neumann series of "
    f"{NEUMANN_ITERATIONS} terms, scale {NEUMANN_SCALE}: {NEUMANN_ITERATIONS + 1} JVPs; alias ift), greedy<gamma> "
    f"(generalized greedy with discount gamma in (0, 1], {INNER_STEPS} JVPs; e.g. greedy0.99, also greedy-0.99)"
)


@dataclass(frozen=True)
class Method:
    """A hypergradient method of Table 2.

    Attributes:
        kind: ``fo``, ``t1t2``, ``neumann`` or ``greedy``.
        gamma: Greedy's discount (``None`` for the others).
    """

    kind: str
    gamma: float | None = None

    @property
    def name(self) -> str:
        """The canonical name, as in the record files: ``fo``, ``t1t2``, ``neumann``, ``greedy0.99``."""
        return f"greedy{self.gamma:g}" if self.kind == "greedy" else self.kind

    @property
    def label(self) -> str:
        """The row label in the tables."""
        return f"Greedy (γ={self.gamma:g})" if self.kind == "greedy" else _LABELS[self.kind]

    @property
    def jvps(self) -> int:
        """Jacobian-vector products per task, as counted by the paper."""
        return {"fo": 0, "t1t2": 1, "neumann": NEUMANN_ITERATIONS + 1, "greedy": INNER_STEPS}[self.kind]

    def estimator(self) -> HypergradEstimator:
        """A fresh estimator of this method with the paper's settings."""
        if self.kind == "fo":
            return FO()
        if self.kind == "t1t2":
            return T1T2()
        if self.kind == "neumann":
            return Neumann(iterations=NEUMANN_ITERATIONS, scale=NEUMANN_SCALE)
        return Greedy(gamma=self.gamma)


def parse_method(text: str) -> Method:
    """The :class:`Method` named ``text`` (see :data:`METHODS_HELP`).

    Raises:
        ValueError: an unknown name or a gamma outside (0, 1].
    """
    key = text.strip().lower()
    if key in _ALIASES:
        return Method(_ALIASES[key])
    match = _GREEDY.fullmatch(key)
    if match is not None:
        gamma = float(match["gamma"])
        if 0 < gamma <= 1:
            return Method("greedy", gamma)
    raise ValueError(f"unknown method {text!r}; {METHODS_HELP}")


def record_name(dataset: str, ways: int, method: str, seed: int) -> str:
    """The file name of one run's record."""
    return f"{dataset}-{ways}way-{method}-seed{seed}.json"


# ---------------------------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """Everything one run (setting x method x seed) needs; picklable, so that it can go to a worker process."""

    dataset: str
    root: str | None
    ways: int
    shots: int
    queries: int
    method: str
    seed: int
    steps: int
    meta_batch: int
    eval_tasks: int
    threads: int = 1

    @property
    def file_name(self) -> str:
        """The name of this run's record file."""
        return record_name(self.dataset, self.ways, self.method, self.seed)

    def describe(self) -> str:
        """A short description for progress lines."""
        return f"{self.dataset} {self.ways}-way {self.method} seed {self.seed}"


_SPLITS: dict[tuple[Any, ...], dict[str, ClassSplit]] = {}
"""The class splits loaded in this process, by ``(dataset, root, image_size, split_seed)``: every run of a worker
(any ways, method or seed) shares one copy of the images."""


class CachedFewShotDataModule(FewShotDataModule):
    """A :class:`FewShotDataModule` that loads each dataset once per process (see :data:`_SPLITS`)."""

    def _load(self) -> dict[str, ClassSplit]:
        key = (self.dataset, str(self._root), self.image_size, self.split_seed)
        if key not in _SPLITS:
            _SPLITS[key] = super()._load()
        return _SPLITS[key]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences Lightning's informational logs and its hints for large-scale training while a run lasts."""
    names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
            warnings.filterwarnings("ignore", ".*GPU available but not used.*")
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _trainer(**kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: Any) -> None:
    """Writes ``data`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def run_one(config: RunConfig, runs_dir: str | Path) -> dict[str, Any]:
    """Trains and evaluates one (setting, method, seed), writes its record to ``runs_dir`` and returns it.

    The seed sets :func:`lightning.seed_everything` (the backbone's initialization) and the data module's ``seed``
    (the training, meta-validation and meta-test tasks); the class split stays fixed (``split_seed=0``).
    """
    torch.set_num_threads(config.threads)
    method = parse_method(config.method)
    start = time.perf_counter()
    with _quiet():
        L.seed_everything(config.seed, verbose=False)
        data = CachedFewShotDataModule(
            dataset=config.dataset,
            root=config.root,
            ways=config.ways,
            shots=config.shots,
            queries=config.queries,
            meta_batch_size=config.meta_batch,
            train_batches=config.steps,
            val_tasks=config.eval_tasks,
            test_tasks=config.eval_tasks,
            split_seed=0,
            seed=config.seed,
        )
        model = FewShotClassifier(
            ways=config.ways,
            image_shape=data.image_shape,
            depth=DEPTH,
            width=WIDTH,
            estimator=method.estimator(),
            inner_optimizer=SGD(lr=INNER_LR, momentum=INNER_MOMENTUM),
            inner_steps=INNER_STEPS,
            meta_batch_size=config.meta_batch,
            outer_lr=OUTER_LR,
        )
        timer = StepTimer()
        fit = _trainer(
            max_epochs=1, max_steps=config.steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer]
        )
        fit_start = time.perf_counter()
        fit.fit(model, datamodule=data)
        train_seconds = time.perf_counter() - fit_start
        evaluate = _trainer()
        eval_start = time.perf_counter()
        val = evaluate.validate(model, datamodule=data, verbose=False)[0]
        test = evaluate.test(model, datamodule=data, verbose=False)[0]
        eval_seconds = time.perf_counter() - eval_start
    durations = timer.durations
    record = {
        "dataset": config.dataset,
        "root": config.root,
        "ways": config.ways,
        "shots": config.shots,
        "queries": config.queries,
        "method": method.name,
        "gamma": method.gamma,
        "jvps": method.jvps,
        "seed": config.seed,
        "val_acc": float(val["val/acc"]),
        "val_ci95": float(val["val/acc_ci95"]),
        "test_acc": float(test["test/acc"]),
        "test_ci95": float(test["test/acc_ci95"]),
        "seconds_per_step": statistics.fmean(durations) if durations else None,
        "seconds_per_step_median": statistics.median(durations) if durations else None,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - start,
        "steps": config.steps,
        "steps_run": len(durations),
        "skipped_steps": model.skipped_steps,
        "meta_batch": config.meta_batch,
        "eval_tasks": config.eval_tasks,
        "inner_steps": INNER_STEPS,
        "inner_lr": INNER_LR,
        "inner_momentum": INNER_MOMENTUM,
        "outer_lr": OUTER_LR,
        "backbone": f"{DEPTH}x{WIDTH}",
        "split_seed": 0,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timestamp": _now(),
    }
    write_json(Path(runs_dir) / config.file_name, record)
    return record


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------------
# many runs
# ---------------------------------------------------------------------------------------------------------------------


def plan_jobs(
    dataset: str,
    root: str | None,
    ways: Sequence[int],
    methods: Sequence[Method],
    seeds: int,
    shots: int,
    queries: int,
    steps: int,
    meta_batch: int,
    eval_tasks: int,
    threads: int = 1,
) -> list[RunConfig]:
    """Every run, seed-major: all settings and methods of seed 0, then of seed 1, ..."""
    return [
        RunConfig(dataset, root, w, shots, queries, m.name, seed, steps, meta_batch, eval_tasks, threads)
        for seed in range(seeds)
        for w in ways
        for m in methods
    ]


def read_record(path: Path) -> dict[str, Any] | None:
    """The record in ``path``, or ``None`` when it is absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_records(out: Path) -> list[dict[str, Any]]:
    """All readable records under ``out/runs`` (unreadable files are reported on stderr and skipped)."""
    records = []
    for path in sorted((out / "runs").glob("*.json")):
        record = read_record(path)
        if record is None or not {"dataset", "ways", "method", "seed", "val_acc", "test_acc"} <= record.keys():
            print(f"warning: skipping unreadable record {path}", file=sys.stderr)
            continue
        records.append(record)
    return records


def _format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _progress_line(index: int, total: int, config: RunConfig, record: dict[str, Any]) -> str:
    sps = record["seconds_per_step"]
    return (
        f"[{index}/{total}] {config.describe()}: val {100 * record['val_acc']:.2f} ± {100 * record['val_ci95']:.2f}%, "
        f"test {100 * record['test_acc']:.2f} ± {100 * record['test_ci95']:.2f}%, "
        f"{'n/a' if sps is None else f'{sps:.3f}'} s/step, {record['wall_seconds']:.1f} s"
    )


def execute(jobs: Sequence[RunConfig], runs_dir: Path, workers: int) -> tuple[int, int]:
    """Runs ``jobs`` (in this process when ``workers == 1``), printing one line per finished run.

    Returns:
        The numbers of finished and failed runs.
    """
    finished = failed = 0
    total = len(jobs)
    if workers == 1:
        for config in jobs:
            try:
                record = run_one(config, runs_dir)
            except Exception as error:  # one failed run must not stop the others
                failed += 1
                print(f"[{finished + failed}/{total}] {config.describe()}: FAILED: {error!r}", flush=True)
            else:
                finished += 1
                print(_progress_line(finished + failed, total, config, record), flush=True)
        return finished, failed
    context = multiprocessing.get_context("spawn")
    threads = jobs[0].threads if jobs else 1
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(run_one, config, runs_dir): config for config in jobs}  # queued in seed-major order
        try:
            for future in concurrent.futures.as_completed(futures):
                config = futures[future]
                try:
                    record = future.result()
                except Exception as error:
                    failed += 1
                    print(f"[{finished + failed}/{total}] {config.describe()}: FAILED: {error!r}", flush=True)
                else:
                    finished += 1
                    print(_progress_line(finished + failed, total, config, record), flush=True)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return finished, failed


def _resolve_root(dataset: str, root: str | None) -> str | None:
    if root is None:
        if dataset == "omniglot":
            root = os.environ.get("OMNIGLOT_ROOT") or "../shared/data/omniglot"
        else:
            return None
    return str(Path(root).expanduser().resolve())


def command_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``table2 run``: plans the runs, skips those with a record, runs the rest and writes the report."""
    if args.dataset == "cifar100" and args.root is None:
        parser.error("--root is required for cifar100: the folder that holds cifar-100-python/")
    for name in ("seeds", "steps", "meta_batch", "eval_tasks", "shots", "workers", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.queries is not None and args.queries < 1:
        parser.error(f"--queries must be >= 1, got {args.queries}")
    if any(w < 2 for w in args.ways):
        parser.error(f"--ways must all be >= 2, got {args.ways}")
    root = _resolve_root(args.dataset, args.root)
    queries = args.shots if args.queries is None else args.queries
    ways = list(dict.fromkeys(args.ways))
    methods = list({m.name: m for m in args.methods}.values())
    for w in ways:  # check the data and the settings here, before any worker starts
        try:
            FewShotDataModule(
                dataset=args.dataset,
                root=root,
                ways=w,
                shots=args.shots,
                queries=queries,
                meta_batch_size=args.meta_batch,
                train_batches=args.steps,
                val_tasks=args.eval_tasks,
                test_tasks=args.eval_tasks,
            )
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    out = Path(args.out if args.out is not None else f"results/table2/{args.dataset}")
    runs_dir = out / "runs"
    jobs = plan_jobs(
        dataset=args.dataset,
        root=root,
        ways=ways,
        methods=methods,
        seeds=args.seeds,
        shots=args.shots,
        queries=queries,
        steps=args.steps,
        meta_batch=args.meta_batch,
        eval_tasks=args.eval_tasks,
        threads=args.threads,
    )
    todo, conflicts = [], []
    for config in jobs:
        record = read_record(runs_dir / config.file_name)
        if record is None:
            todo.append(config)
        elif any(record.get(name) != getattr(config, name) for name in COMPARED_SETTINGS):
            conflicts.append(config.file_name)
    if conflicts:
        wanted = ", ".join(f"{name}={getattr(jobs[0], name)}" for name in COMPARED_SETTINGS)
        print(
            f"error: {len(conflicts)} records in {runs_dir} were made with other settings than {wanted} (e.g. "
            f"{conflicts[0]}); use another --out or delete them",
            file=sys.stderr,
        )
        return 2
    print(
        f"plan: {len(jobs)} runs ({args.seeds} seeds x {len(ways)} settings x {len(methods)} methods) on "
        f"{args.dataset}, {args.shots}-shot, {queries} queries, {args.steps} steps, meta-batch {args.meta_batch}, "
        f"{args.eval_tasks} eval tasks; {len(jobs) - len(todo)} done, {len(todo)} remaining; "
        f"{args.workers} worker(s) x {args.threads} thread(s); records in {runs_dir}",
        flush=True,
    )
    start = time.perf_counter()
    try:
        finished, failed = execute(todo, runs_dir, args.workers)
    except KeyboardInterrupt:
        print(f"interrupted after {_format_duration(time.perf_counter() - start)}; rerun the same command to resume")
        return 130
    print(
        f"total wall time {_format_duration(time.perf_counter() - start)}: {finished} runs finished, {failed} failed",
        flush=True,
    )
    code = report(out)
    return 1 if failed else code


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One cell of a report table (a row of ``table2.csv``); accuracies in percent."""

    dataset: str
    protocol: str
    reported_on: str
    method: str
    label: str
    gamma: float | None
    jvps: int
    ways: int
    mean: float | None
    ci95: float | None
    n: int
    seconds_per_step: float | None

    def text(self) -> str:
        """The markdown cell: ``mean ± ci95 (n=...)``, ``mean (n=1)`` or ``n/a``."""
        if self.n == 0 or self.mean is None:
            return "n/a"
        value = f"{self.mean:.2f}" if self.ci95 is None else f"{self.mean:.2f} ± {self.ci95:.2f}"
        value += f" (n={self.n})"
        return f"{value}, γ={self.gamma:g}" if self.method == CHOSEN else value


def mean_ci95(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean and ``1.96 * std / sqrt(n)`` (sample std, ``n - 1``) of ``values``; no interval for one value."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


def _group(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    """Records by ``(dataset, ways, method)``, one per seed (the latest when a seed appears twice)."""
    by_seed: dict[tuple[str, int, str, int], dict[str, Any]] = {}
    for record in sorted(records, key=lambda r: str(r.get("timestamp", ""))):
        try:
            method = parse_method(str(record["method"])).name  # canonical: greedy0.990 is greedy0.99
        except ValueError:
            method = str(record["method"])
        by_seed[(record["dataset"], record["ways"], method, record["seed"])] = record
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for (dataset, ways, method, _), record in sorted(by_seed.items()):
        groups.setdefault((dataset, ways, method), []).append(record)
    return groups


def _greedy_methods(groups: dict[tuple[str, int, str], list[dict[str, Any]]], dataset: str) -> list[Method]:
    found = set()
    for d, _, name in groups:
        if d == dataset:
            with contextlib.suppress(ValueError):
                method = parse_method(name)
                if method.kind == "greedy":
                    found.add(method)
    return sorted(found, key=lambda m: m.gamma)


def choose_gammas(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Greedy's gamma per ``(dataset, ways)``: the best mean meta-validation accuracy over seeds (ties: smallest)."""
    groups = _group(records)
    chosen: dict[tuple[str, int], float] = {}
    for dataset in sorted({d for d, _, _ in groups}):
        greedy = _greedy_methods(groups, dataset)
        for ways in sorted({w for d, w, _ in groups if d == dataset}):
            scores = [
                (statistics.fmean(r["val_acc"] for r in groups[(dataset, ways, m.name)]), m.gamma)
                for m in greedy
                if (dataset, ways, m.name) in groups
            ]
            if scores:
                best = max(score for score, _ in scores)
                chosen[(dataset, ways)] = min(gamma for score, gamma in scores if score == best)
    return chosen


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summarize(records: Sequence[dict[str, Any]]) -> list[Entry]:
    """Every cell of both protocols' tables, for every dataset in ``records`` and every setting shown.

    Rows: FO, T1-T2, IFT (Neumann), Greedy with gamma chosen per setting on meta-validation, and each Greedy gamma
    found in the records. Columns: the paper's 3, 4, 5 ways and any other ways found.
    """
    groups = _group(records)
    chosen = choose_gammas(records)
    entries = []
    for dataset in sorted({d for d, _, _ in groups}):
        ways_shown = sorted(set(PAPER_WAYS) | {w for d, w, _ in groups if d == dataset})
        rows: list[tuple[str, str, int, float | None]] = [
            (m.name, m.label, m.jvps, None) for m in (Method("fo"), Method("t1t2"), Method("neumann"))
        ]
        rows.append((CHOSEN, "Greedy (γ chosen on meta-val)", INNER_STEPS, None))
        rows += [(m.name, m.label, m.jvps, m.gamma) for m in _greedy_methods(groups, dataset)]
        for protocol, (field, _) in PROTOCOLS.items():
            for name, label, jvps, gamma in rows:
                for ways in ways_shown:
                    row_gamma = gamma
                    key = (dataset, ways, name)
                    if name == CHOSEN:
                        row_gamma = chosen.get((dataset, ways))
                        key = (dataset, ways, f"greedy{row_gamma:g}") if row_gamma is not None else key
                    runs = groups.get(key, []) if key[2] != CHOSEN else []
                    mean, ci95 = mean_ci95([100 * r[field] for r in runs])
                    entries.append(
                        Entry(
                            dataset=dataset,
                            protocol=protocol,
                            reported_on=field.split("_")[0],
                            method=name,
                            label=label,
                            gamma=row_gamma,
                            jvps=jvps,
                            ways=ways,
                            mean=mean,
                            ci95=ci95,
                            n=len(runs),
                            seconds_per_step=_mean_or_none([r.get("seconds_per_step") for r in runs]),
                        )
                    )
    return entries


def _markdown_table(entries: Sequence[Entry], ways_shown: Sequence[int], rows: Sequence[str]) -> list[str]:
    lines = [
        "| method | JVPs | s/step | " + " | ".join(f"{w}-way" for w in ways_shown) + " |",
        "|---|---:|---:|" + "---:|" * len(ways_shown),
    ]
    for name in rows:
        cells = {e.ways: e for e in entries if e.method == name}
        first = next(iter(cells.values()))
        timed = [e for e in cells.values() if e.seconds_per_step is not None and e.n]
        runs = sum(e.n for e in timed)
        sps = f"{sum(e.seconds_per_step * e.n for e in timed) / runs:.3f}" if runs else "n/a"
        texts = [cells[w].text() if w in cells else "n/a" for w in ways_shown]
        lines.append(f"| {first.label} | {first.jvps} | {sps} | " + " | ".join(texts) + " |")
    return lines


def _paper_table() -> list[str]:
    lines = [
        "| method | JVPs | " + " | ".join(f"{w}-way" for w in PAPER_WAYS) + " |",
        "|---|---:|" + "---:|" * len(PAPER_WAYS),
    ]
    for label, jvps, cells in PAPER_RESULTS.values():
        lines.append(
            f"| {label} | {jvps} | " + " | ".join(f"{cells[w][0]:.2f} ± {cells[w][1]:.2f}" for w in PAPER_WAYS) + " |"
        )
    return lines


def _settings_text(records: Sequence[dict[str, Any]]) -> list[str]:
    combos = sorted({tuple(r.get(name) for name in COMPARED_SETTINGS) for r in records}, key=str)
    texts = [
        f"{shots}-shot, {queries} queries per class, {steps} outer steps, meta-batch {mb}, {tasks} meta-validation "
        f"and {tasks} meta-test tasks per run"
        for shots, queries, steps, mb, tasks in combos
    ]
    if len(texts) == 1:
        return [f"Settings: {texts[0]}."]
    return ["**Warning: the records mix settings:**"] + [f"- {t}" for t in texts]


def render_markdown(records: Sequence[dict[str, Any]], entries: Sequence[Entry]) -> str:
    """``table2.md``: per dataset, both protocols' tables; then the paper's table and the compute time."""
    lines = ["# Table 2 reproduction: few-shot classification", ""]
    chosen = choose_gammas(records)
    for dataset in sorted({e.dataset for e in entries}):
        mine = [r for r in records if r["dataset"] == dataset]
        ways_shown = sorted({e.ways for e in entries if e.dataset == dataset})
        rows = list(dict.fromkeys(e.method for e in entries if e.dataset == dataset))
        seeds = sorted({r["seed"] for r in mine})
        compute = sum(r.get("wall_seconds") or 0.0 for r in mine)
        lines += [
            f"## {dataset}",
            "",
            *_settings_text(mine),
            f"Inner SGD lr {INNER_LR} momentum {INNER_MOMENTUM}, T = {INNER_STEPS}; outer Adam lr {OUTER_LR}; "
            f"backbone {DEPTH} x {WIDTH} with batch norm. {len(mine)} runs, seeds {seeds}.",
            "",
            "Cells: accuracy in percent, mean ± 1.96 · std / √n over n seeds (sample std; one seed: no interval). "
            "s/step: mean training step time over the row's runs. γ is chosen per setting by the best mean "
            "meta-validation accuracy over seeds.",
            "",
            "γ chosen: "
            + (", ".join(f"{w}-way {chosen[(dataset, w)]:g}" for w in ways_shown if (dataset, w) in chosen) or "n/a"),
            "",
        ]
        for protocol, (_, title) in PROTOCOLS.items():
            cells = [e for e in entries if e.dataset == dataset and e.protocol == protocol]
            lines += [f"### {title}", "", *_markdown_table(cells, ways_shown, rows), ""]
        lines += [f"Total compute: {_format_duration(compute)} ({compute / 3600:.2f} h), runs' wall time summed.", ""]
    lines += [
        "## The paper's Table 2 (CIFAR-100, not this dataset)",
        "",
        "Accuracy in percent, mean ± 95% CI, as published (10-shot; the paper's Greedy row is γ = 0.99).",
        "",
        *_paper_table(),
        "",
    ]
    total = sum(r.get("wall_seconds") or 0.0 for r in records)
    lines += [f"Total compute, all records: {_format_duration(total)} ({total / 3600:.2f} h), {len(records)} runs.", ""]
    return "\n".join(lines)


def write_csv(path: Path, entries: Sequence[Entry]) -> None:
    """``table2.csv``: one row per dataset x protocol x method x setting."""
    fields = list(Entry.__dataclass_fields__)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for entry in entries:
            row = asdict(entry)
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, path)


def plot(path: Path, entries: Sequence[Entry]) -> None:
    """``table2.png``: per dataset, grouped bars (setting x method) with 95% CIs, clean protocol then the paper's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted({e.dataset for e in entries})
    figure = Figure(figsize=(14, 4.8 * len(datasets)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(datasets), 2, squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, protocol in enumerate(("clean", "paper")):
            ax = axes[row][col]
            cells = [e for e in entries if e.dataset == dataset and e.protocol == protocol]
            ways_shown = sorted({e.ways for e in cells})
            methods = list(dict.fromkeys(e.method for e in cells))
            width = 0.8 / max(len(methods), 1)
            for i, name in enumerate(methods):
                by_ways = {e.ways: e for e in cells if e.method == name}
                heights = [by_ways[w].mean if by_ways[w].mean is not None else math.nan for w in ways_shown]
                errors = [by_ways[w].ci95 or 0.0 for w in ways_shown]
                greedy_gamma_row = name.startswith("greedy") and name != CHOSEN
                ax.bar(
                    [x - 0.4 + width * (i + 0.5) for x in range(len(ways_shown))],
                    heights,
                    width,
                    yerr=errors,
                    capsize=2,
                    label=by_ways[ways_shown[0]].label,
                    alpha=0.5 if greedy_gamma_row else 0.95,
                    hatch="//" if greedy_gamma_row else None,
                )
            for x, w in enumerate(ways_shown):
                chance = "chance" if x == 0 else None
                ax.hlines(100 / w, x - 0.45, x + 0.45, colors="gray", linestyles=":", label=chance)
            ax.set_xticks(range(len(ways_shown)), [f"{w}-way" for w in ways_shown])
            ax.set_ylabel(f"meta-{'test' if protocol == 'clean' else 'validation'} accuracy (%)")
            ax.set_title(f"{dataset}: {PROTOCOLS[protocol][1]}", fontsize=9)
            tops = [(e.mean or 0.0) + (e.ci95 or 0.0) for e in cells] + [100 / w for w in ways_shown]
            ax.set_ylim(0, min(100.0, 1.35 * max(tops)) if max(tops) < 100 else 105)
            ax.legend(fontsize=7, ncol=3, loc="upper right")
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def report(out: Path) -> int:
    """Writes ``table2.md``, ``table2.csv`` and ``table2.png`` in ``out`` from the records in ``out/runs``."""
    records = load_records(out)
    if not records:
        print(f"report: no records in {out / 'runs'}", file=sys.stderr)
        return 1
    entries = summarize(records)
    markdown = render_markdown(records, entries)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "table2.md"
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(markdown, encoding="utf-8")
    os.replace(tmp, md_path)
    write_csv(out / "table2.csv", entries)
    plot(out / "table2.png", entries)
    print(markdown)
    print(f"report: wrote {md_path}, {out / 'table2.csv'} and {out / 'table2.png'} from {len(records)} records")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------


def _method_arg(text: str) -> Method:
    try:
        return parse_method(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-hypergrad-bench table2`` parser with its ``run`` and ``report`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="lightning-hypergrad-bench table2",
        description="Reproduce Table 2 of the paper (few-shot classification with FO, T1-T2, IFT and Greedy).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,report}")
    run = commands.add_parser(
        "run",
        help="train and evaluate every setting x method x seed (resumable), then write the report",
        description=(
            "Train a FewShotClassifier per (ways, method, seed) with the paper's hyperparameters (inner SGD lr 0.1 "
            "momentum 0.9, T=10; outer Adam lr 1e-3; 3x32 conv backbone) and evaluate it on --eval-tasks "
            "meta-validation and meta-test tasks. Each finished run is written at once to "
            "OUT/runs/<dataset>-<ways>way-<method>-seed<k>.json; runs with a record are skipped, so rerunning the "
            "same command resumes an interrupted run. Runs are ordered seed-major. " + METHODS_HELP + "."
        ),
    )
    run.add_argument("--dataset", choices=DATASETS, default="omniglot", help="the dataset (default: omniglot)")
    run.add_argument(
        "--root",
        default=None,
        help="data folder; omniglot default: $OMNIGLOT_ROOT, else ../shared/data/omniglot; required for cifar100",
    )
    run.add_argument("--seeds", type=int, default=5, help="run seeds 0 .. N-1 (default: 5)")
    run.add_argument("--ways", type=int, nargs="+", default=list(PAPER_WAYS), help="settings (default: 3 4 5)")
    run.add_argument(
        "--methods",
        type=_method_arg,
        nargs="+",
        default=[parse_method(m) for m in DEFAULT_METHODS],
        metavar="METHOD",
        help=f"methods (default: {' '.join(DEFAULT_METHODS)}); fo, t1t2, neumann, greedy<gamma>",
    )
    run.add_argument("--shots", type=int, default=10, help="support examples per class (default: 10)")
    run.add_argument("--queries", type=int, default=None, help="query examples per class (default: = --shots)")
    run.add_argument("--steps", type=int, default=200, help="outer steps (default: 200)")
    run.add_argument("--meta-batch", type=int, default=10, help="tasks per outer step (default: 10)")
    run.add_argument(
        "--eval-tasks", type=int, default=500, help="meta-validation and meta-test tasks each (default: 500)"
    )
    run.add_argument(
        "--workers", type=int, default=1, help="parallel worker processes (default: 1, which runs in this process)"
    )
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    run.add_argument("--out", default=None, help="output folder (default: results/table2/<dataset>)")
    rep = commands.add_parser(
        "report",
        help="write OUT/table2.md, table2.csv and table2.png from the records in OUT/runs",
        description=(
            "Summarize the records of OUT/runs: Greedy's gamma is chosen per setting by the best mean "
            "meta-validation accuracy; (a) the paper's protocol reports meta-validation accuracy, (b) the clean "
            "protocol meta-test accuracy. Cells are mean ± 1.96·std/√n over seeds."
        ),
    )
    rep.add_argument("--out", required=True, help="the folder given to `run --out` (e.g. results/table2/omniglot)")
    run.set_defaults(func=command_run)
    rep.set_defaults(func=lambda args, _parser: report(Path(args.out)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-hypergrad-bench [table2] {run,report} ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "table2":
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
