"""Table 2 of the paper: few-shot classification with FO, T1-T2, IFT (Neumann) and generalized greedy hypergradients.

``python -m studies.table2 run`` trains a :class:`~lightning_hypergrad.FewShotClassifier` for every setting (``ways``
in 3, 4, 5), every method (an estimator spec string, see :func:`lightning_hypergrad.get_estimator`) and every seed,
then evaluates it on held-out meta-validation and meta-test tasks. The paper's settings (backbone, inner optimizer,
T, outer learning rate, meta-batch, outer steps, shots, queries, evaluation tasks, data folder) are read from the
same config as the command line's, ``configs/paper/<dataset>.yaml`` (``--config``), and the baselines' settings from
``configs/estimators/{fo,t1t2,neumann}.yaml``; the command-line flags override them. Each finished run is written at
once to its own JSON record, ``<out>/runs/<dataset>-<ways>way-<method>-seed<k>.json`` (the method's spec without
spaces, e.g. ``greedy(0.99)``, and ``/`` written ``%2F``); a later ``run`` with the same arguments skips the runs that
have a record, so an interrupted run resumes where it stopped. Ctrl-C (or SIGTERM) stops ``run`` within seconds,
with ``--workers`` too: the runs under way are abandoned without a record, and no worker process is left behind;
workers whose runner is killed (even with ``SIGKILL``) exit by themselves. One runner at a time writes into an
``--out`` (:func:`runner_lock`). A record of a planned run that cannot be used (not JSON, ``{}``, an accuracy
``null`` ...) is named with what is wrong: ``run`` refuses to start until it is deleted (the run is then redone);
``report`` skips a malformed file, planned or not, with a warning.

``python -m studies.table2 report`` (also called at the end of ``run``) reads the records and writes
``<out>/table2.md``, ``<out>/table2.csv`` and ``<out>/table2.png`` with two protocols:

- (a) the paper's: Greedy's gamma is chosen per setting by the best mean meta-validation accuracy over seeds, and
  every method's accuracy is reported on those same meta-validation tasks;
- (b) the clean one: gamma chosen the same way on meta-validation, accuracies reported on meta-test tasks.

Cells are ``mean +- 1.96 * std / sqrt(n)`` in percent over the ``n`` seeds (sample standard deviation).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import importlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from lightning_hypergrad.callbacks import StepTimer
from lightning_hypergrad.data.fewshot import FewShotDataModule
from lightning_hypergrad.data.sources import ClassSplit
from lightning_hypergrad.estimators import (
    FO,
    RMD,
    T1T2,
    ConjugateGradient,
    Greedy,
    GreedyTail,
    HypergradEstimator,
    MomentumGreedy,
    Neumann,
    TruncatedRMD,
    get_estimator,
)
from lightning_hypergrad.fewshot import FewShotClassifier
from lightning_hypergrad.optim import DifferentiableOptimizer
from studies.common import (
    REPOSITORY,
    Progress,
    atomic_path,
    estimator_spec,
    format_duration,
    omniglot_root,
    quiet,
    quiet_trainer,
    write_json,
    write_text,
)

# ---------------------------------------------------------------------------------------------------------------------
# the paper's protocol
# ---------------------------------------------------------------------------------------------------------------------

PAPER_WAYS = (3, 4, 5)
"""The settings (N-way) of the paper's Table 2; the report always shows these columns."""
DATASETS = ("omniglot", "cifar100", "digits")
PAPER_CONFIGS = {"omniglot": "configs/paper/omniglot.yaml", "cifar100": "configs/paper/cifar100.yaml"}
"""The config of each dataset (relative to the repository root); ``digits``, a quick stand-in, uses Omniglot's."""
BASELINE_CONFIGS = ("configs/estimators/fo.yaml", "configs/estimators/t1t2.yaml", "configs/estimators/neumann.yaml")
"""The configs of the baselines that the report always shows (FO, T1-T2 and the paper's IFT, a Neumann series)."""
GREEDY_GAMMAS = (0.9, 0.99, 0.999)
"""The discounts of Greedy run by default; the report chooses one per setting on meta-validation."""

PAPER_RESULTS: dict[str, tuple[int, dict[int, tuple[float, float]]]] = {
    "fo": (0, {3: (43.48, 1.64), 4: (34.15, 1.28), 5: (28.59, 1.0)}),
    "t1t2": (1, {3: (42.96, 1.89), 4: (33.95, 1.53), 5: (27.59, 0.99)}),
    "neumann(10, scale=0.1)": (11, {3: (40.14, 2.26), 4: (33.23, 0.99), 5: (27.20, 1.12)}),
    "greedy(0.99)": (10, {3: (46.10, 1.95), 4: (36.94, 2.55), 5: (29.79, 1.33)}),
}
"""The paper's Table 2 (CIFAR-100, 10-shot, accuracy in percent +- 95% CI): spec -> (JVPs, ``{ways: (mean, ci95)}``)."""

PROTOCOLS = {
    "paper": ("val_acc", "(a) the paper's protocol: γ chosen on meta-validation, accuracy on the same meta-validation"),
    "clean": ("test_acc", "(b) clean protocol: γ chosen on meta-validation, accuracy on meta-test"),
}
"""Protocol name -> (the record field reported, title). Both choose Greedy's gamma by mean ``val_acc``."""

CHOSEN = "greedy-chosen"
"""The method name of the report's row "Greedy (gamma chosen on meta-validation)"."""
CHOSEN_LABEL = "greedy (γ chosen on meta-val)"

COMPARED_SETTINGS = ("shots", "queries", "steps", "meta_batch", "eval_tasks")
"""Settings that a record must share with the requested run to count as done."""

METHODS_HELP = (
    "methods are estimator spec strings (lightning_hypergrad.get_estimator): fo (first order, 0 JVPs), t1t2 (T1-T2, "
    "1 JVP), neumann(10, scale=0.1) (the paper's IFT, a Neumann series of 10 terms: 11 JVPs), greedy(0.99) "
    "(generalized greedy with discount gamma in (0, 1], T JVPs); also rmd, truncated_rmd(5), cg(10), fmd"
)


def _instantiate(spec: dict[str, Any], where: str) -> Any:
    """The object that a config's ``{class_path, init_args}`` describes."""
    try:
        module_name, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
        return cls(**(spec.get("init_args") or {}))
    except (KeyError, AttributeError, ImportError, TypeError, ValueError) as error:
        raise ValueError(f"{where}: cannot build {spec!r} ({error}); give a class_path and its init_args") from None


def _config_value(config: dict[str, Any], key: str, path: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"{path} has no {key}; the Table 2 runner reads the paper's settings from it")
        node = node[part]
    return node


def _meta_batch_key(config: dict[str, Any]) -> str:
    """Where the config sets the meta-batch: the data module's ``meta_batch_size``, else the model's."""
    model = (config.get("model") or {}).get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    if data.get("meta_batch_size") is None and model.get("meta_batch_size") is not None:
        return "model.init_args.meta_batch_size"
    return "data.init_args.meta_batch_size"


@functools.cache
def _read_yaml(path: str) -> dict[str, Any]:
    file = Path(path) if Path(path).is_file() else REPOSITORY / path
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(
            f"cannot read the config {path}: {error.strerror}; give an existing file to --config"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a config (a YAML mapping)")
    return data


@dataclass(frozen=True)
class PaperSettings:
    """The paper's protocol as a config holds it (the fields of a :class:`RunConfig` that do not vary per run)."""

    config: str
    dataset: str
    root: str | None
    depth: int
    width: int
    inner_optimizer: tuple[str, tuple[tuple[str, Any], ...]]
    inner_steps: int
    outer_lr: float
    meta_batch: int
    steps: int
    shots: int
    queries: int
    eval_tasks: int

    @classmethod
    def from_config(cls, path: str) -> PaperSettings:
        """Reads the model, data and trainer settings of the config at ``path`` (a ``lightning-hypergrad`` config).

        Raises:
            ValueError: the file is missing or lacks a setting, or its meta-validation and meta-test task counts
                differ (the runner evaluates both on ``eval_tasks``).
        """
        config = _read_yaml(path)
        data = _config_value(config, "data.init_args", path)
        optimizer = _config_value(config, "model.init_args.inner_optimizer", path)
        _instantiate(optimizer, f"{path}: model.init_args.inner_optimizer")
        val_tasks, test_tasks = (
            _config_value(config, f"data.init_args.{k}", path) for k in ("val_tasks", "test_tasks")
        )
        if val_tasks != test_tasks:
            raise ValueError(
                f"{path}: data.init_args.val_tasks ({val_tasks}) and test_tasks ({test_tasks}) differ; the Table 2 "
                "runner evaluates on as many meta-test as meta-validation tasks: set both to the same number"
            )
        return cls(
            config=path,
            dataset=_config_value(config, "data.init_args.dataset", path),
            root=data.get("root"),
            depth=_config_value(config, "model.init_args.depth", path),
            width=_config_value(config, "model.init_args.width", path),
            inner_optimizer=(optimizer["class_path"], tuple(sorted((optimizer.get("init_args") or {}).items()))),
            inner_steps=_config_value(config, "model.init_args.inner_steps", path),
            outer_lr=_config_value(config, "model.init_args.outer_lr", path),
            meta_batch=_config_value(config, _meta_batch_key(config), path),
            steps=_config_value(config, "trainer.max_steps", path),
            shots=_config_value(config, "data.init_args.shots", path),
            queries=_config_value(config, "data.init_args.queries", path),
            eval_tasks=val_tasks,
        )

    def optimizer(self) -> Any:
        """A fresh inner optimizer."""
        class_path, args = self.inner_optimizer
        return _instantiate({"class_path": class_path, "init_args": dict(args)}, self.config)

    def optimizer_setting(self, name: str) -> Any:
        """One of the inner optimizer's arguments (``lr``, ``momentum``), ``None`` when the config does not set it."""
        return dict(self.inner_optimizer[1]).get(name)


def default_config(dataset: str) -> str:
    """The config of ``dataset``'s protocol: ``configs/paper/<dataset>.yaml`` (digits: Omniglot's)."""
    return PAPER_CONFIGS.get(dataset, PAPER_CONFIGS["omniglot"])


@functools.cache
def baseline_methods() -> tuple[str, ...]:
    """The specs of the baselines in :data:`BASELINE_CONFIGS` (``fo``, ``t1t2``, ``neumann(10, scale=0.1)``)."""
    specs = []
    for path in BASELINE_CONFIGS:
        spec = _config_value(_read_yaml(path), "model.init_args.estimator", path)
        specs.append(str(_instantiate(spec, f"{path}: model.init_args.estimator")))
    return tuple(specs)


def default_methods() -> list[str]:
    """The methods run by default: the baselines, then Greedy with every gamma of :data:`GREEDY_GAMMAS`."""
    return [*baseline_methods(), *(str(Greedy(gamma)) for gamma in GREEDY_GAMMAS)]


def canonical(method: str) -> str:
    """The canonical spec of ``method`` (``greedy(0.990)`` -> ``greedy(0.99)``).

    Raises:
        ValueError: ``method`` is not an estimator spec (the message lists the known names).
    """
    return str(get_estimator(method))


def jvps(estimator: HypergradEstimator, inner_steps: int | None) -> int | None:
    """Jacobian- (or Hessian-) vector products per task, as the paper counts them.

    ``None`` for forward mode (one product per hyperparameter entry) and, when ``inner_steps`` is ``None``, for the
    estimators whose count is the number of inner steps.
    """
    if isinstance(estimator, FO):
        return 0
    if isinstance(estimator, T1T2):
        return 1
    if isinstance(estimator, (Greedy, RMD, MomentumGreedy, GreedyTail)):  # one product per inner step
        return inner_steps
    if isinstance(estimator, TruncatedRMD):
        return estimator.truncate if inner_steps is None else min(estimator.truncate, inner_steps)
    if isinstance(estimator, (Neumann, ConjugateGradient)):
        return estimator.jvps  # with Neumann's own scale, its power iterations count too
    return None


def gamma_of(method: str) -> float | None:
    """Greedy's discount in ``method``, ``None`` for any other estimator."""
    estimator = get_estimator(method)
    return estimator.gamma if isinstance(estimator, Greedy) else None


def file_stem(method: str) -> str:
    """The method's spec as it appears in file names: without spaces (``neumann(10,scale=0.1)``), and with ``/``
    (``damping='1/lr'``), which would name a folder, as ``%2F``."""
    return method.replace(" ", "").replace("/", "%2F")


def record_name(dataset: str, ways: int, method: str, seed: int) -> str:
    """The file name of one run's record."""
    return f"{dataset}-{ways}way-{file_stem(method)}-seed{seed}.json"


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
    paper: PaperSettings
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_data(
    dataset: str,
    root: str | None,
    *,
    ways: int,
    shots: int,
    queries: int,
    meta_batch: int,
    steps: int,
    eval_tasks: int,
    seed: int = 0,
) -> CachedFewShotDataModule:
    """The data of one run: ``steps`` training meta-batches and ``eval_tasks`` meta-validation and meta-test tasks
    drawn with ``seed`` from a fixed class split (``split_seed=0``). Building it checks the settings and the data
    folder (``ValueError``, ``FileNotFoundError``); the images load at ``setup``."""
    return CachedFewShotDataModule(
        dataset=dataset,
        root=root,
        ways=ways,
        shots=shots,
        queries=queries,
        meta_batch_size=meta_batch,
        train_batches=steps,
        val_tasks=eval_tasks,
        test_tasks=eval_tasks,
        split_seed=0,
        seed=seed,
    )


def paper_model(
    paper: PaperSettings,
    data: FewShotDataModule,
    *,
    ways: int,
    meta_batch: int,
    estimator: HypergradEstimator,
    inner_optimizer: DifferentiableOptimizer | None = None,
    **kwargs: Any,
) -> FewShotClassifier:
    """The paper's few-shot model for ``data``'s images (its backbone, inner steps and outer lr; the inner optimizer
    is the paper's unless one is given); ``kwargs`` go to :class:`FewShotClassifier`."""
    return FewShotClassifier(
        ways=ways,
        image_shape=data.image_shape,
        depth=paper.depth,
        width=paper.width,
        estimator=estimator,
        inner_optimizer=inner_optimizer if inner_optimizer is not None else paper.optimizer(),
        inner_steps=paper.inner_steps,
        meta_batch_size=meta_batch,
        outer_lr=paper.outer_lr,
        **kwargs,
    )


def run_one(config: RunConfig, runs_dir: str | Path) -> dict[str, Any]:
    """Trains and evaluates one (setting, method, seed), writes its record to ``runs_dir`` and returns it.

    The seed sets :func:`lightning.seed_everything` (the backbone's initialization) and the data module's ``seed``
    (the training, meta-validation and meta-test tasks); the class split stays fixed (``split_seed=0``).
    """
    torch.set_num_threads(config.threads)
    paper = config.paper
    estimator = get_estimator(config.method)
    start = time.perf_counter()
    with quiet():
        L.seed_everything(config.seed, verbose=False)  # the backbone's initialization; the tasks follow the data's seed
        data = run_data(
            config.dataset,
            config.root,
            ways=config.ways,
            shots=config.shots,
            queries=config.queries,
            meta_batch=config.meta_batch,
            steps=config.steps,
            eval_tasks=config.eval_tasks,
            seed=config.seed,
        )
        model = paper_model(paper, data, ways=config.ways, meta_batch=config.meta_batch, estimator=estimator)
        timer = StepTimer()
        fit = quiet_trainer(
            max_epochs=1, max_steps=config.steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer]
        )
        fit_start = time.perf_counter()
        fit.fit(model, datamodule=data)
        train_seconds = time.perf_counter() - fit_start
        evaluate = quiet_trainer()
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
        "method": str(estimator),
        "gamma": gamma_of(config.method),
        "jvps": jvps(estimator, paper.inner_steps),
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
        "config": paper.config,
        "inner_optimizer": paper.inner_optimizer[0].rpartition(".")[2],
        "inner_steps": paper.inner_steps,
        "inner_lr": paper.optimizer_setting("lr"),
        "inner_momentum": paper.optimizer_setting("momentum"),
        "outer_lr": paper.outer_lr,
        "backbone": f"{paper.depth}x{paper.width}",
        "split_seed": 0,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "timestamp": _now(),
    }
    write_json(Path(runs_dir) / config.file_name, record)
    return record


# ---------------------------------------------------------------------------------------------------------------------
# worker processes (--workers > 1)
# ---------------------------------------------------------------------------------------------------------------------

PARENT_POLL_SECONDS = 0.2
"""How often a worker checks that the runner that started it is still alive."""
STOP_GRACE_SECONDS = 10.0
"""How long a stopped worker may take to leave (its run's temporary file removed) before it is killed."""
STOP_WATCHDOG_SECONDS = 2.0
"""How long after its stop signal a worker leaves by itself, whatever its main thread is doing."""
_stopping = False


def _stop_worker(signum: int, frame: Any) -> None:
    """A worker's ``SIGTERM`` handler: leaves the run at once through ``SystemExit``, which removes the temporary
    file of a record being written (:func:`studies.common.atomic_path`), so that no half-finished run leaves one."""
    global _stopping
    if not _stopping:  # a second signal must not interrupt the cleanup of the first
        _stopping = True
        # and should a library swallow the SystemExit (an import under way that catches BaseException), leave anyway
        threading.Thread(target=_leave_after, args=(STOP_WATCHDOG_SECONDS, 128 + signum), daemon=True).start()
        raise SystemExit(128 + signum)


def _leave_after(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)  # the runner removes what a run under way left (its temporary file)


def _watch_parent(parent: int) -> None:
    """Stops this worker when the runner that started it is gone (even killed with ``SIGKILL``): the worker is then
    re-parented, so ``os.getppid()`` changes."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)  # the main thread did not stop (stuck outside Python): leave anyway
    os._exit(1)


def _worker_process(conn: Connection, parent: int, threads: int) -> None:
    """A worker process's entry point: :func:`_worker`, then ``os._exit`` with its status. The records and the
    temporary files are settled by then; what is skipped is the interpreter's own teardown, seconds of freeing torch's
    modules that would keep a stopped worker (or the end of ``run``) waiting."""
    code = 0
    try:
        _worker(conn, parent, threads)
    except SystemExit as stop:  # raised by _stop_worker
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


def _worker(conn: Connection, parent: int, threads: int) -> None:
    """The loop of a worker process: runs the jobs that the runner sends over ``conn`` one at a time, answering each
    with ``(True, record)`` or ``(False, repr(error))``, until it receives ``None`` or the connection closes.

    ``SIGINT`` is ignored (a Ctrl-C in a terminal reaches every process of the group; the runner stops its workers
    itself), ``SIGTERM`` stops the worker, and so does the runner's death.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while the runner started this process: see _start_worker
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, _stop_worker)
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    torch.set_num_threads(threads)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        config, runs_dir = job
        try:
            answer = (True, run_one(config, runs_dir))
        except Exception as error:  # reported by the runner; the worker goes on with the next run
            answer = (False, repr(error))
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return


@dataclass
class _Worker:
    """The runner's handle on one worker process and the job it is running (``None``: idle)."""

    process: BaseProcess
    conn: Connection
    job: RunConfig | None = None


def _start_worker(context: BaseContext, threads: int) -> _Worker:
    """Starts a worker process. ``SIGINT`` is blocked in this thread meanwhile, so that the new process starts with
    it blocked (until it ignores it) and a Ctrl-C at that moment reaches the runner, late, rather than the worker."""
    conn, child = context.Pipe()
    process = context.Process(target=_worker_process, args=(child, os.getpid(), threads), name="table2-worker")
    block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if block:  # started on the first spawn otherwise, it would unblock SIGINT (multiprocessing.resource_tracker)
        resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if block else None
    try:
        process.start()
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child.close()
    return _Worker(process, conn)


def _stop_workers(pool: Sequence[_Worker], runs_dir: Path, wait: bool) -> None:
    """Ends every worker: idle ones are told to leave when ``wait``, the others stopped with ``SIGTERM`` (the run
    under way is abandoned without a record), then killed if they are still there after
    :data:`STOP_GRACE_SECONDS`. A second Ctrl-C meanwhile is ignored, so that no worker is left behind."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        for worker in pool:
            if wait and worker.job is None:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
            elif worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for worker in pool:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in pool:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            if worker.job is not None:  # a run abandoned: its temporary file, if it was left (see _leave_after)
                for tmp in runs_dir.glob(f".*.{worker.process.pid}.tmp.json"):  # see studies.common.atomic_path
                    with contextlib.suppress(OSError):
                        tmp.unlink()
            worker.conn.close()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------------------------------
# many runs
# ---------------------------------------------------------------------------------------------------------------------


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


RECORD_FIELDS = ("dataset", "ways", "method", "seed", "val_acc", "test_acc")
"""The fields that every record needs (the report's); ``run`` also needs :data:`COMPARED_SETTINGS`."""
OPTIONAL_NUMBERS = ("seconds_per_step", "wall_seconds", "jvps", "inner_steps")
"""Fields that the report computes with when a record has them: numbers or ``null``."""
DELETE_ADVICE = "delete the file to rerun that run (the same `run` command then redoes it)"


class MalformedRecord(ValueError):
    """A record file that cannot be used: unreadable, not JSON, not a JSON object or lacking a usable field.

    Its message names the file, what is wrong and what to do (delete it, so that ``run`` redoes that run).
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}; {DELETE_ADVICE}")
        self.path = path
        self.problem = problem


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when there is no such file.

    Raises:
        MalformedRecord: the file cannot be read, is not JSON or holds something else than a JSON object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise MalformedRecord(path, f"cannot be read ({reason})") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise MalformedRecord(path, f"is not JSON ({error})") from None
    if not isinstance(data, dict):
        raise MalformedRecord(path, f"holds {_shown(data)} ({type(data).__name__}), not a JSON object")
    return data


def _shown(value: Any) -> str:
    """``value`` as JSON writes it (``null``, ``"3"``), shortened."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(record: dict[str, Any], settings: bool = False) -> str | None:
    """What makes ``record`` unusable, ``None`` when nothing does.

    The report needs :data:`RECORD_FIELDS` (accuracies as fractions in [0, 1], the method as an estimator spec)
    and numbers or ``null`` in :data:`OPTIONAL_NUMBERS`; with ``settings``, the record must also state the
    :data:`COMPARED_SETTINGS` (``run`` compares them with the requested run's) as positive integers.
    """
    required = [*RECORD_FIELDS, *(COMPARED_SETTINGS if settings else ())]
    missing = [name for name in required if name not in record]
    if missing:
        return f"has no {', '.join(missing)}"
    for name in ("dataset", "method"):
        if not isinstance(record[name], str):
            return f"{name} is {_shown(record[name])}, not a string"
    for name, least in (("ways", 2), ("seed", 0), *((name, 1) for name in COMPARED_SETTINGS if settings)):
        if not _is_int(record[name]) or record[name] < least:
            return f"{name} is {_shown(record[name])}, not an integer >= {least}"
    try:
        canonical(record["method"])
    except ValueError:
        return f"its method {record['method']!r} is not an estimator spec string (e.g. 'greedy(0.99)')"
    for name in ("val_acc", "test_acc"):
        if not _is_number(record[name]) or not 0.0 <= record[name] <= 1.0:
            return f"{name} is {_shown(record[name])}, not an accuracy in [0, 1]"
    for name in OPTIONAL_NUMBERS:
        value = record.get(name)
        if value is not None and not _is_number(value):
            return f"{name} is {_shown(value)}, not a number"
    return None


def load_records(out: Path) -> list[dict[str, Any]]:
    """All usable records under ``out/runs``; each malformed file is reported on stderr (with what is wrong and
    what to do) and skipped."""
    records = []
    for path in sorted((out / "runs").glob("*.json")):
        try:
            record = read_record(path)
            problem = None if record is None else record_problem(record)
            if problem is not None:
                raise MalformedRecord(path, problem)
        except MalformedRecord as error:
            print(f"warning: skipping {error}", file=sys.stderr)
            continue
        if record is not None:  # None: the file went away since the listing
            records.append(record)
    return records


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
    pool: list[_Worker] = []
    interrupted = True
    try:
        for _ in range(min(workers, len(jobs))):
            pool.append(_start_worker(context, threads))
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
                        worker = pool[index] = _start_worker(context, threads)
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
        _stop_workers(pool, runs_dir, wait=not interrupted)
    return finished, failed


class RunnerBusy(RuntimeError):
    """Another runner is writing records into the same folder."""


LOCK_NAME = ".runner.lock"
"""The file, in ``<out>`` (beside ``runs/``), that holds the process id of the runner writing records there."""


@contextlib.contextmanager
def runner_lock(runs_dir: Path) -> Iterator[None]:
    """One runner at a time per records folder: a second one would redo the same runs and overwrite their records.

    The lock is a file created exclusively, holding the runner's process id; a lock whose process is gone (a runner
    killed with ``SIGKILL``) is taken over. Removed when the block ends, however it ends.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    lock = runs_dir.parent / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _alive(owner):
                raise RunnerBusy(
                    f"another runner (pid {owner}) is writing records into {runs_dir}; wait for it to end, or use "
                    "another --out (a stale lock is taken over once its process is gone)"
                ) from None
            lock.unlink(missing_ok=True)  # its runner is gone: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, ``SIGTERM`` stops the runner as Ctrl-C does (its workers stopped, the "interrupted" line)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_root(dataset: str, root: str | None, paper: PaperSettings) -> str | None:
    """The data folder as given: ``--root``, else (Omniglot) ``$OMNIGLOT_ROOT``, else the config's (same dataset).

    Never made absolute, so that the records hold the path as the command line or the config wrote it. ``digits``
    reads no files: ``None``, whatever the config says.
    """
    if dataset == "digits":
        return None
    if root is not None:
        return root
    configured = paper.root if paper.dataset == dataset else None
    if dataset == "omniglot":
        return omniglot_root(None) if configured is None or "OMNIGLOT_ROOT" in os.environ else configured
    return configured


def _setting(args: argparse.Namespace, name: str, paper: PaperSettings) -> int:
    value = getattr(args, name)
    return getattr(paper, name) if value is None else value


def command_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``table2 run``: plans the runs, skips those with a record, runs the rest and writes the report."""
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
    out = Path(args.out if args.out is not None else f"studies/table2/results/{args.dataset}")
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
        with runner_lock(runs_dir), _sigterm_as_interrupt():
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


def mean_ci95(values: Sequence[float]) -> tuple[float | None, float | None]:
    """The mean and ``1.96 * std / sqrt(n)`` (sample std, ``n - 1``) of ``values``; no interval for one value."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))


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
    found = {gamma_of(name): name for d, _, name in groups if d == dataset}
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
    return median if _is_number(median) else record.get("seconds_per_step")


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
        others = [name for d, _, name in groups if d == dataset and gamma_of(name) is None]
        rows: list[tuple[str, str, int | None, float | None]] = [
            (name, name, _row_jvps(name, mine), None) for name in dict.fromkeys([*baseline_methods(), *others])
        ]
        greedy_runs = [r for r in mine if gamma_of(str(r["method"])) is not None]
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


# Student's t quantile t_{0.975, df}: the paired intervals use it (few seeds; 1.96 would be too narrow)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000}  # fmt: skip


def t975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom (the table's next lower entry between its rows; 1.96 above 60)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > max(T975):
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


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

    def text(self) -> str:
        if self.mean is None:
            return "n/a"
        if self.low is None or self.high is None:
            return f"{self.mean:+.2f} (n={self.n})"
        mark = " **↑**" if self.low > 0 else " **↓**" if self.high < 0 else ""
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
        others = [n for d, _, n in groups if d == dataset and gamma_of(n) is None and n != reference]
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
                mean = low = high = None
                if diffs:
                    mean = statistics.fmean(diffs)
                    if len(diffs) > 1:
                        half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
                        low, high = mean - half, mean + half
                found.append(
                    PairedDifference(dataset, ways, reference, name, label, gamma, len(diffs), mean, low, high)
                )
    return found


def _paired_table(differences: Sequence[PairedDifference], ways_shown: Sequence[int]) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"{w}-way" for w in ways_shown) + " |",
        "|---|" + "---:|" * len(ways_shown),
    ]
    for name in dict.fromkeys(d.method for d in differences):
        cells = {d.ways: d for d in differences if d.method == name}
        first = next(iter(cells.values()))
        label = (
            first.label
            if name != CHOSEN
            else f"{first.label} (γ: " + ", ".join(f"{cells[w].gamma:g}" for w in ways_shown if w in cells) + ")"
        )
        lines.append(f"| {label} | " + " | ".join(cells[w].text() if w in cells else "n/a" for w in ways_shown) + " |")
    return lines


def _markdown_table(entries: Sequence[Entry], ways_shown: Sequence[int], rows: Sequence[str]) -> list[str]:
    lines = [
        "| method | JVPs | s/step | " + " | ".join(f"{w}-way" for w in ways_shown) + " |",
        "|---|---:|---:|" + "---:|" * len(ways_shown),
    ]
    for name in rows:
        cells = {e.ways: e for e in entries if e.method == name}
        first = next(iter(cells.values()))
        times = [t for e in cells.values() for t in e.step_times]
        sps = f"{statistics.median(times):.3f}" if times else "n/a"
        texts = [cells[w].text() if w in cells else "n/a" for w in ways_shown]
        count = "n/a" if first.jvps is None else first.jvps
        lines.append(f"| {first.label} | {count} | {sps} | " + " | ".join(texts) + " |")
    return lines


def _cost_table(entries: Sequence[Entry], ways_shown: Sequence[int], rows: Sequence[str]) -> list[str]:
    """Per setting: each row's median step time over its runs (n) and its ratio to FO's in the same setting."""
    lines = ["| method | " + " | ".join(f"{w}-way" for w in ways_shown) + " |", "|---|" + "---:|" * len(ways_shown)]
    fo = {e.ways: e.seconds_per_step for e in entries if e.method == "fo"}
    for name in rows:
        cells = {e.ways: e for e in entries if e.method == name}
        texts = []
        for w in ways_shown:
            cell = cells.get(w)
            if cell is None or cell.seconds_per_step is None:
                texts.append("n/a")
                continue
            ratio = f", {cell.seconds_per_step / fo[w]:.2f}x fo" if fo.get(w) else ""
            texts.append(f"{cell.seconds_per_step:.3f} (n={len(cell.step_times)}){ratio}")
        lines.append(f"| {next(iter(cells.values())).label} | " + " | ".join(texts) + " |")
    return lines


def _paper_table() -> list[str]:
    lines = [
        "| method | JVPs | " + " | ".join(f"{w}-way" for w in PAPER_WAYS) + " |",
        "|---|---:|" + "---:|" * len(PAPER_WAYS),
    ]
    for label, (count, cells) in PAPER_RESULTS.items():
        lines.append(
            f"| {label} | {count} | " + " | ".join(f"{cells[w][0]:.2f} ± {cells[w][1]:.2f}" for w in PAPER_WAYS) + " |"
        )
    return lines


MODEL_SETTINGS = ("inner_optimizer", "inner_lr", "inner_momentum", "inner_steps", "outer_lr", "backbone")
"""The records' fields that the report states under each dataset's title (from the config of the run)."""


def _combos(records: Sequence[dict[str, Any]], fields: Sequence[str]) -> list[tuple[Any, ...]]:
    # records written before the runner read its config have no inner_optimizer: they all used SGD
    defaults = {"inner_optimizer": "SGD"}
    return sorted({tuple(r.get(name, defaults.get(name)) for name in fields) for r in records}, key=str)


def _one_or_warning(texts: Sequence[str], what: str, template: str) -> list[str]:
    if len(texts) == 1:
        return [template.format(texts[0])]
    return [f"**Warning: the records mix {what}:**"] + [f"- {t}" for t in texts]


def _settings_text(records: Sequence[dict[str, Any]]) -> list[str]:
    texts = [
        f"{shots}-shot, {queries} queries per class, {steps} outer steps, meta-batch {mb}, {tasks} meta-validation "
        f"and {tasks} meta-test tasks per run"
        for shots, queries, steps, mb, tasks in _combos(records, COMPARED_SETTINGS)
    ]
    return _one_or_warning(texts, "settings", "Settings: {}.")


def _model_text(records: Sequence[dict[str, Any]]) -> list[str]:
    seeds = sorted({r["seed"] for r in records})
    texts = [
        f"Inner {opt} lr {lr} momentum {momentum}, T = {steps}; outer Adam lr {outer_lr}; "
        f"backbone {str(backbone).replace('x', ' x ')} with batch norm."
        for opt, lr, momentum, steps, outer_lr, backbone in _combos(records, MODEL_SETTINGS)
        if (lr, momentum, steps, outer_lr, backbone) != (None,) * 5  # hand-written records may not say
    ]
    runs = f"{len(records)} runs, seeds {seeds}."
    if not texts:
        return [runs]
    return _one_or_warning(texts, "model settings", "{} " + runs) + ([runs] if len(texts) > 1 else [])


def render_markdown(records: Sequence[dict[str, Any]], entries: Sequence[Entry]) -> str:
    """``table2.md``: per dataset, both protocols' tables; then the paper's table and the compute time."""
    lines = ["# Table 2 reproduction: few-shot classification", ""]
    chosen = choose_gammas(records)
    for dataset in sorted({e.dataset for e in entries}):
        mine = [r for r in records if r["dataset"] == dataset]
        ways_shown = sorted({e.ways for e in entries if e.dataset == dataset})
        rows = list(dict.fromkeys(e.method for e in entries if e.dataset == dataset))
        compute = sum(r.get("wall_seconds") or 0.0 for r in mine)
        lines += [
            f"## {dataset}",
            "",
            *_settings_text(mine),
            *_model_text(mine),
            "",
            "Cells: accuracy in percent, mean ± 1.96 · std / √n over n seeds (sample std; one seed: no interval). "
            "s/step: training step time, the median over the row's runs of each run's median step (per setting: "
            "(d) below). γ is chosen per setting by the best mean meta-validation accuracy over seeds.",
            "",
            "γ chosen: "
            + (", ".join(f"{w}-way {chosen[(dataset, w)]:g}" for w in ways_shown if (dataset, w) in chosen) or "n/a"),
            "",
        ]
        for protocol, (_, title) in PROTOCOLS.items():
            cells = [e for e in entries if e.dataset == dataset and e.protocol == protocol]
            lines += [f"### {title}", "", *_markdown_table(cells, ways_shown, rows), ""]
        for reference in ("fo", "t1t2"):
            differences = [d for d in paired_differences(mine, reference) if d.dataset == dataset]
            if not differences:
                continue
            lines += [
                f"### (c) paired difference to {reference}, meta-test (clean protocol)",
                "",
                f"Cells: the method's meta-test accuracy minus {reference}'s, seed by seed (the seeds share their task "
                "streams), in points: mean [95% interval, Student's t over the n seeds both have]. **↑** / **↓**: "
                "the interval lies above / below 0 (better / worse beyond the interval).",
                "",
                *_paired_table(differences, ways_shown),
                "",
            ]
        clean = [e for e in entries if e.dataset == dataset and e.protocol == "clean"]
        lines += [
            "### (d) cost: seconds per training step",
            "",
            "Cells: the median over the runs of each run's median step time (one outer step: the meta-batch's inner "
            "loops and hypergradients), n runs, and its ratio to fo's in the same setting. Measured in the runs "
            "above, so only as comparable as the conditions they ran under (other jobs on the cores inflate them).",
            "",
            *_cost_table(clean, ways_shown, rows),
            "",
            f"Total compute: {format_duration(compute)} ({compute / 3600:.2f} h), runs' wall time summed.",
            "",
        ]
    lines += [
        "## The paper's Table 2 (CIFAR-100, not this dataset)",
        "",
        "Accuracy in percent, mean ± 95% CI, as published (10-shot; the paper's Greedy row is γ = 0.99).",
        "",
        *_paper_table(),
        "",
    ]
    total = sum(r.get("wall_seconds") or 0.0 for r in records)
    lines += [f"Total compute, all records: {format_duration(total)} ({total / 3600:.2f} h), {len(records)} runs.", ""]
    return "\n".join(lines)


def write_csv(path: Path, entries: Sequence[Entry]) -> None:
    """``table2.csv``: one row per dataset x protocol x method x setting."""
    fields = [name for name in Entry.__dataclass_fields__ if name != "step_times"]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for entry in entries:
            row = asdict(entry)
            writer.writerow({k: "" if row[k] is None else row[k] for k in fields})


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
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)


OFF_SCALE = 10.0
"""Points of difference beyond which :func:`plot_differences` draws a method at the edge of its panel."""


def plot_differences(path: Path, records: Sequence[dict[str, Any]], reference: str = "fo") -> bool:
    """``table2_vs_<reference>.png``: each method's paired meta-test difference to ``reference`` with its 95% interval.

    One panel per dataset and setting; a dot per method, the interval as a bar, 0 as a line. False (nothing
    written) where no method has a paired difference.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    differences = [d for d in paired_differences(records, reference) if d.mean is not None]
    panels = sorted({(d.dataset, d.ways) for d in differences})
    if not panels:
        return False
    methods = list(dict.fromkeys(d.method for d in differences))
    # wide enough for the title and the method names when there is a single panel
    figure = Figure(figsize=(max(4.2 * len(panels), 7.5), 0.45 * len(methods) + 1.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (dataset, ways) in zip(axes, panels):
        mine = {d.method: d for d in differences if (d.dataset, d.ways) == (dataset, ways)}
        # the scale follows the differences within OFF_SCALE points, so that half a point stays visible; the rows
        # beyond it are drawn at the edge with their value written out
        near = [x for d in mine.values() if abs(d.mean) <= OFF_SCALE for x in (d.mean, d.low, d.high) if x is not None]
        edge = 1.15 * max([abs(x) for x in near] + [0.5])
        for y, name in enumerate(methods):
            d = mine.get(name)
            if d is None:
                continue
            better = d.low is not None and d.low > 0
            worse = d.high is not None and d.high < 0
            color = "tab:green" if better else "tab:red" if worse else "tab:gray"
            if abs(d.mean) > OFF_SCALE:
                x = math.copysign(edge, d.mean)
                ax.plot([x], [y], "<" if d.mean < 0 else ">", color=color)
                span = "" if d.low is None else f" [{d.low:+.1f}, {d.high:+.1f}]"
                ax.annotate(f"{d.mean:+.1f}{span}, off scale", (x, y), xytext=(0, 7), textcoords="offset points",
                            ha="left" if d.mean < 0 else "right", fontsize=7, color=color)  # fmt: skip
                continue
            if d.low is not None and d.high is not None:
                ax.plot([d.low, d.high], [y, y], color=color, linewidth=2.5, solid_capstyle="butt")
            ax.plot([d.mean], [y], "o", color=color)
        ax.set_xlim(-edge * 1.05, edge * 1.05)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(methods)), [next(d.label for d in differences if d.method == m) for m in methods])
        ax.invert_yaxis()
        n = sorted({d.n for d in mine.values()})
        ax.set_title(f"{dataset} {ways}-way (n = {', '.join(map(str, n))} seeds)", fontsize=9)
        ax.set_xlabel("points")
    figure.suptitle(
        f"Meta-test accuracy minus {reference}'s, paired by seed, with its 95% interval\n"
        "(green: better, red: worse beyond the interval)",
        fontsize=10,
    )
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)
    return True


def report(out: Path) -> int:
    """Writes ``table2.md``, ``table2.csv`` and ``table2.png`` in ``out`` from the records in ``out/runs``."""
    records = load_records(out)
    if not records:
        print(f"report: no records in {out / 'runs'}", file=sys.stderr)
        return 1
    entries = summarize(records)
    markdown = render_markdown(records, entries)
    md_path = out / "table2.md"
    write_text(md_path, markdown)
    write_csv(out / "table2.csv", entries)
    plot(out / "table2.png", entries)
    written = [md_path, out / "table2.csv", out / "table2.png"]
    for reference in ("fo", "t1t2"):
        if plot_differences(out / f"table2_vs_{reference}.png", records, reference):
            written.append(out / f"table2_vs_{reference}.png")
    print(markdown)
    print(f"report: wrote {', '.join(str(p) for p in written)} from {len(records)} records")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m studies.table2`` parser with its ``run`` and ``report`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m studies.table2",
        description="Reproduce Table 2 of the paper (few-shot classification with FO, T1-T2, IFT and Greedy).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,report}")
    run = commands.add_parser(
        "run",
        help="train and evaluate every setting x method x seed (resumable), then write the report",
        description=(
            "Train a FewShotClassifier per (ways, method, seed) with the paper's settings, read from --config "
            "(configs/paper/<dataset>.yaml: inner SGD lr 0.1 momentum 0.9, T=10; outer Adam lr 1e-3; 3x32 conv "
            "backbone; 200 outer steps, meta-batch 10, 10-shot, 10 queries, 500 evaluation tasks); the flags below "
            "override them. Each run is evaluated on --eval-tasks meta-validation and meta-test tasks and written at "
            "once to OUT/runs/<dataset>-<ways>way-<method>-seed<k>.json; runs with a record are skipped, so "
            "rerunning the same command resumes an interrupted run. Runs are ordered seed-major. " + METHODS_HELP + "."
        ),
    )
    run.add_argument("--dataset", choices=DATASETS, default="omniglot", help="the dataset (default: omniglot)")
    run.add_argument(
        "--config",
        default=None,
        help="the config holding the paper's settings (default: configs/paper/<dataset>.yaml; digits: omniglot's)",
    )
    run.add_argument(
        "--root",
        default=None,
        help="data folder, stored in the records as given (default: the config's; omniglot: $OMNIGLOT_ROOT first; "
        "digits reads none)",
    )
    run.add_argument("--seeds", type=int, default=5, help="run seeds 0 .. N-1 (default: 5)")
    run.add_argument("--ways", type=int, nargs="+", default=list(PAPER_WAYS), help="settings (default: 3 4 5)")
    run.add_argument(
        "--methods",
        type=estimator_spec,
        nargs="+",
        default=None,
        metavar="SPEC",
        help="estimator specs (default: the baselines of configs/estimators/{fo,t1t2,neumann}.yaml, then "
        + " ".join(str(Greedy(g)) for g in GREEDY_GAMMAS)
        + "); quote specs with spaces",
    )
    run.add_argument("--shots", type=int, default=None, help="support examples per class (default: the config's)")
    run.add_argument(
        "--queries",
        type=int,
        default=None,
        help="query examples per class (default: --shots if given, else the config's)",
    )
    run.add_argument("--steps", type=int, default=None, help="outer steps (default: the config's trainer.max_steps)")
    run.add_argument("--meta-batch", type=int, default=None, help="tasks per outer step (default: the config's)")
    run.add_argument(
        "--eval-tasks", type=int, default=None, help="meta-validation and meta-test tasks each (default: the config's)"
    )
    run.add_argument(
        "--workers", type=int, default=1, help="parallel worker processes (default: 1, which runs in this process)"
    )
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    run.add_argument("--out", default=None, help="output folder (default: studies/table2/results/<dataset>)")
    rep = commands.add_parser(
        "report",
        help="write OUT/table2.md, table2.csv and table2.png from the records in OUT/runs",
        description=(
            "Summarize the records of OUT/runs: Greedy's gamma is chosen per setting by the best mean "
            "meta-validation accuracy; (a) the paper's protocol reports meta-validation accuracy, (b) the clean "
            "protocol meta-test accuracy. Cells are mean ± 1.96·std/√n over seeds."
        ),
    )
    rep.add_argument(
        "--out", required=True, help="the folder given to `run --out` (e.g. studies/table2/results/omniglot)"
    )
    run.set_defaults(func=command_run)
    rep.set_defaults(func=lambda args, _parser: report(Path(args.out)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m studies.table2 {run,report} ...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)
