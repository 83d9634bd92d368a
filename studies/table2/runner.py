"""Table 2 of the paper: few-shot classification with FO, T1-T2, IFT (Neumann) and generalized greedy hypergradients.

``python -m studies.table2 run`` trains a :class:`~lightning_hypergrad.FewShotClassifier` for every setting (``ways``
in 3, 4, 5), every method (an estimator spec string, see :func:`lightning_hypergrad.get_estimator`) and every seed,
then evaluates it on held-out meta-validation and meta-test tasks (:mod:`studies.table2.run`). The paper's settings
are read from ``configs/paper/<dataset>.yaml`` (``--config``; :mod:`studies.table2.settings`); the command-line flags
override them. Each finished run is written at once to its own JSON record,
``<out>/runs/<dataset>-<ways>way-<method>-seed<k>.json`` (the method's spec without spaces, e.g. ``greedy(0.99)``,
and ``/`` written ``%2F``); a later ``run`` with the same arguments skips the runs that have a record, so an
interrupted run resumes where it stopped. Ctrl-C (or SIGTERM) stops ``run`` within seconds, with ``--workers`` too
(:mod:`studies.table2.workers`): the runs under way are abandoned without a record, and no worker process is left
behind; workers whose runner is killed (even with ``SIGKILL``) exit by themselves. One runner at a time writes into
an ``--out`` (:func:`runner_lock`). A record of a planned run that cannot be used is named with what is wrong
(:mod:`studies.table2.records`): ``run`` refuses to start until it is deleted (the run is then redone).

``python -m studies.table2 report`` (also called at the end of ``run``) reads the records and writes
``<out>/table2.md``, ``<out>/table2.csv`` and ``<out>/table2.png`` (:mod:`studies.table2.report`).

This module plans the runs, runs the missing ones (:func:`execute`) and holds the command line's entry point
(:func:`main`; its parser is :mod:`studies.table2.cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from studies.common import FolderBusy, Progress, folder_lock, format_duration, unwritable
from studies.table2.cli import build_parser
from studies.table2.records import MalformedRecord, read_record, record_problem
from studies.table2.report import report
from studies.table2.run import RunConfig, run_data, run_one
from studies.table2.settings import (
    COMPARED_SETTINGS,
    PaperSettings,
    default_config,
    default_methods,
    resolve_root,
)
from studies.table2.workers import Worker, start_worker, stop_workers


def plan_jobs(
    dataset: str,
    root: str | None,
    ways: Sequence[int],
    methods: Sequence[str],
    seeds: int,
    shots: int,
    queries: int,
    steps: int,
    meta_batch: int,
    eval_tasks: int,
    paper: PaperSettings,
    threads: int = 1,
) -> list[RunConfig]:
    """Every run, seed-major: all settings and methods of seed 0, then of seed 1, ..."""
    return [
        RunConfig(dataset, root, w, shots, queries, m, seed, steps, meta_batch, eval_tasks, paper, threads)
        for seed in range(seeds)
        for w in ways
        for m in methods
    ]


def _run_summary(config: RunConfig, record: dict[str, Any]) -> str:
    sps = record["seconds_per_step"]
    return (
        f"{config.describe()}: val {100 * record['val_acc']:.2f} ± {100 * record['val_ci95']:.2f}%, "
        f"test {100 * record['test_acc']:.2f} ± {100 * record['test_ci95']:.2f}%, "
        f"{'n/a' if sps is None else f'{sps:.3f}'} s/step, {record['wall_seconds']:.1f} s"
    )


def execute(jobs: Sequence[RunConfig], runs_dir: Path, workers: int) -> tuple[int, int]:
    """Runs ``jobs`` (in this process when ``workers == 1``), printing one line per finished run, with the time so
    far and an estimate of the time left (:class:`studies.common.Progress`: a run's work is its number of steps).

    Returns:
        The numbers of finished and failed runs.
    """
    finished = failed = 0
    progress = Progress(len(jobs), work=sum(job.steps for job in jobs))
    if workers == 1:
        for config in jobs:
            try:
                record = run_one(config, runs_dir)
            except SystemExit:
                if _STOPS:  # Lightning ends a fit stopped by Ctrl-C with SystemExit(1)
                    raise KeyboardInterrupt from None
                raise
            except Exception as error:  # one failed run must not stop the others
                failed += 1
                print(progress.line(f"{config.describe()}: FAILED: {error!r}", config.steps), flush=True)
            else:
                finished += 1
                print(progress.line(_run_summary(config, record), config.steps), flush=True)
        return finished, failed
    context = multiprocessing.get_context("spawn")
    threads = jobs[0].threads if jobs else 1
    queue = list(reversed(jobs))  # popped from the end: seed-major order
    pool: list[Worker] = []
    interrupted = True
    try:
        for _ in range(min(workers, len(jobs))):
            pool.append(start_worker(context, threads))
        if pool:
            print(f"workers: pids {', '.join(str(w.process.pid) for w in pool)}", flush=True)
        for worker in pool:
            worker.job = queue.pop()
            worker.conn.send((worker.job, runs_dir))
        while any(w.job is not None for w in pool):
            busy = [w for w in pool if w.job is not None]
            ready = multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for index, worker in enumerate(list(pool)):
                config = worker.job
                if config is None or (worker.conn not in ready and worker.process.sentinel not in ready):
                    continue
                try:
                    ok, answer = worker.conn.recv()
                except (EOFError, OSError):  # the worker died during the run (killed, out of memory)
                    worker.process.join()
                    ok, answer = False, f"its worker process exited with code {worker.process.exitcode}"
                    worker.job = None
                    if queue:  # a new worker takes its place
                        worker.conn.close()
                        worker = pool[index] = start_worker(context, threads)
                if ok:
                    finished += 1
                    print(progress.line(_run_summary(config, answer), config.steps), flush=True)
                else:
                    failed += 1
                    print(progress.line(f"{config.describe()}: FAILED: {answer}", config.steps), flush=True)
                worker.job = queue.pop() if queue else None
                if worker.job is not None:
                    worker.conn.send((worker.job, runs_dir))
        interrupted = False
    finally:
        stop_workers(pool, runs_dir, wait=not interrupted)
    return finished, failed


RunnerBusy = FolderBusy
"""Another living runner is writing records into the same folder (:func:`runner_lock`)."""

LOCK_NAME = ".runner.lock"
"""The file, in ``<out>`` (beside ``runs/``), that holds the process id of the runner writing records there."""


def runner_lock(runs_dir: Path) -> contextlib.AbstractContextManager[None]:
    """One runner at a time per records folder: a second one would redo the same runs and overwrite their records.

    The lock is :func:`studies.common.folder_lock` on :data:`LOCK_NAME` in ``runs_dir``'s parent (``<out>``), and
    ``runs_dir`` is made. A runner killed with ``SIGKILL`` leaves the file but not its ``flock``: the next runner takes
    it over at once. Entering the block raises :data:`RunnerBusy` while another living runner holds it (the message
    names the folder, that runner's pid and what to do).
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    return folder_lock(runs_dir.parent, LOCK_NAME)


_STOPS: list[str] = []
"""The stop signals received within :func:`_stops_as_interrupt`."""


@contextlib.contextmanager
def _stops_as_interrupt() -> Iterator[None]:
    """Within the block, Ctrl-C and ``SIGTERM`` stop the runner alike (its workers stopped, the "interrupted" line):
    each raises ``KeyboardInterrupt`` and is noted in :data:`_STOPS`, so that a stop which Lightning turns into
    ``SystemExit(1)`` (its handling of ``KeyboardInterrupt`` in ``fit``, in a run of this process) is still one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        _STOPS.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    _STOPS.clear()
    previous = {stop: signal.signal(stop, interrupt) for stop in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _setting(args: argparse.Namespace, name: str, paper: PaperSettings) -> int:
    value = getattr(args, name)
    return getattr(paper, name) if value is None else value


def command_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``table2 run``: plans the runs, skips those with a record, runs the rest and writes the report."""
    out = Path(args.out if args.out is not None else f"studies/table2/results/{args.dataset}")
    if (reason := unwritable(out)) is not None:  # (a given --out is checked by the parser)
        parser.error(f"argument --out: cannot write the results into {out}: {reason}; give another --out")
    config = args.config if args.config is not None else default_config(args.dataset)
    try:
        paper = PaperSettings.from_config(config)
        methods = list(dict.fromkeys(args.methods if args.methods is not None else default_methods()))
    except ValueError as error:
        parser.error(str(error))
    if args.dataset == "digits" and args.root is not None:
        parser.error("--root does not apply to --dataset digits: its images are generated; leave --root out")
    root = resolve_root(args.dataset, args.root, paper)
    if args.dataset == "cifar100" and root is None:
        parser.error("--root is required for cifar100: the folder that holds cifar-100-python/")
    shots, steps, meta_batch, eval_tasks = (
        _setting(args, n, paper) for n in ("shots", "steps", "meta_batch", "eval_tasks")
    )
    queries = args.queries if args.queries is not None else args.shots if args.shots is not None else paper.queries
    for name, value in (("seeds", args.seeds), ("steps", steps), ("meta_batch", meta_batch),
                        ("eval_tasks", eval_tasks), ("shots", shots), ("queries", queries),
                        ("workers", args.workers), ("threads", args.threads)):  # fmt: skip
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(w < 2 for w in args.ways):
        parser.error(f"--ways must all be >= 2, got {args.ways}")
    ways = list(dict.fromkeys(args.ways))
    for w in ways:  # check the data and the settings here, before any worker starts
        try:
            run_data(
                args.dataset,
                root,
                ways=w,
                shots=shots,
                queries=queries,
                meta_batch=meta_batch,
                steps=steps,
                eval_tasks=eval_tasks,
            )
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    runs_dir = out / "runs"
    jobs = plan_jobs(
        dataset=args.dataset,
        root=root,
        ways=ways,
        methods=methods,
        seeds=args.seeds,
        shots=shots,
        queries=queries,
        steps=steps,
        meta_batch=meta_batch,
        eval_tasks=eval_tasks,
        paper=paper,
        threads=args.threads,
    )
    todo, conflicts, malformed = [], [], []
    for job in jobs:
        path = runs_dir / job.file_name
        try:
            record = read_record(path)
        except MalformedRecord as error:
            malformed.append(error)
            continue
        if record is None:
            todo.append(job)
        elif any(record.get(name) not in (None, getattr(job, name)) for name in COMPARED_SETTINGS):
            conflicts.append(job.file_name)
        elif (problem := record_problem(record, settings=True)) is not None:
            malformed.append(MalformedRecord(path, problem))
    for error in malformed:
        print(f"error: malformed record {error}", file=sys.stderr)
    if conflicts:
        wanted = ", ".join(f"{name}={getattr(jobs[0], name)}" for name in COMPARED_SETTINGS)
        print(
            f"error: {len(conflicts)} records in {runs_dir} were made with other settings than {wanted} (e.g. "
            f"{conflicts[0]}); use another --out or delete them",
            file=sys.stderr,
        )
    if conflicts or malformed:
        return 2
    print(
        f"plan: {len(jobs)} runs ({args.seeds} seeds x {len(ways)} settings x {len(methods)} methods) on "
        f"{args.dataset}, {shots}-shot, {queries} queries, {steps} steps, meta-batch {meta_batch}, "
        f"{eval_tasks} eval tasks (settings from {config}); {len(jobs) - len(todo)} done, {len(todo)} remaining; "
        f"{args.workers} worker(s) x {args.threads} thread(s); records in {runs_dir}",
        flush=True,
    )
    start = time.perf_counter()
    try:
        with runner_lock(runs_dir), _stops_as_interrupt():
            finished, failed = execute(todo, runs_dir, args.workers)
    except KeyboardInterrupt:
        print(f"interrupted after {format_duration(time.perf_counter() - start)}; rerun the same command to resume")
        return 130
    except RunnerBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"total wall time {format_duration(time.perf_counter() - start)}: {finished} runs finished, {failed} failed",
        flush=True,
    )
    code = report(out)
    return 1 if failed else code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m studies.table2 {run,report} ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return command_run(args, parser)
    return report(Path(args.out))
