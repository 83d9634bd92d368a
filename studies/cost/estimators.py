"""Time and memory of the hypergradient estimators on two bilevel problems.

Run from the repository root::

    python -m studies.cost.estimators [--quick] [--json PATH] [--device cpu|cuda] [--threads N]
                                      [--problems fewshot whole_network] [--estimators fo "greedy(0.99)" ...]

(``python -m studies.cost`` runs this and then :mod:`studies.cost.plot` on its records.)

What is measured
----------------
For every estimator, named by its spec string (:func:`lightning_hypergrad.get_estimator`; by default ``fo``,
``t1t2``, ``greedy(0.99)``, ``rmd``, ``truncated_rmd(5)``, ``neumann(10, scale='lr')`` (its scale is the inner
learning rate) and ``cg(10)``) and every number of inner steps T (10, 50, 200; with ``--quick`` 10, 50), one
*outer step* is timed and its peak memory measured:

``fewshot``
    The meta-learning setup of the paper: the backbone of :class:`lightning_hypergrad.FewShotClassifier`
    (:class:`lightning_hypergrad.fewshot.ConvBackbone`: 3 blocks of Conv2d 3x3 with 32 channels and no bias,
    BatchNorm2d, ReLU, MaxPool2d 2) maps 32x32 RGB images to 512 features; its parameters are the hyperparameters.
    The inner parameters are a linear head 512 -> 5, reset to zero for each task and trained for T steps of SGD
    (lr 0.1, momentum 0.9) on the support set; the outer loss is the cross-entropy on the query set. Tasks are 5-way
    10-shot on random images (50 support and 50 query images). The backbone runs once per task (``features``).
    One outer step = one estimator call per task of the meta-batch (10 tasks; 4 with ``--quick``), then an Adam
    step on the backbone.
``fewshot_batched``
    The same outer step through :meth:`lightning_hypergrad.FewShotClassifier.meta_gradient`, whose default
    ``batch_tasks=True`` runs the meta-batch's inner loops as one stacked problem (one set of kernels per inner
    step for all tasks; the backbone still runs once per task). Estimators whose result is not a sum over the
    tasks (``cg``, ``neumann`` with its automatic scale) run one by one there, as in ``fewshot``.
``whole_network``
    Hyperparameter optimization of a whole small conv net on random 28x28 images: every weight of the net is an
    inner parameter, and the hyperparameters are a log weight decay per parameter entry. The inner loss is the
    cross-entropy of a train batch (64) plus ``0.5 * sum(exp(lwd) * w**2)``, minimized by T steps of SGD (lr 0.05,
    momentum 0.9); the outer loss is the cross-entropy of a validation batch (64). One outer step = one estimator
    call and an Adam step on the log weight decays. As a reference, one *plain training step* of the same net is
    measured too (forward, backward and a ``torch.optim.SGD`` step with the same learning rate, momentum and a
    weight decay of 1e-3, on the same train batch); it is the ``plain_step`` row, with T = 1.

FMD is left out of both: it carries one tangent per hyperparameter entry, and both problems have thousands.

Timing: each configuration is built afresh from fixed seeds and warmed up with one outer step; then the
configurations of one problem and one T are timed in interleaved rounds (7 rounds; 2 with ``--quick``; the plain
step at least 5), one outer step of each per round, with ``time.perf_counter`` (after ``torch.cuda.synchronize``
on CUDA), so that a busy phase of a shared machine hits them alike; the table shows the median.

Peak memory (``peak_bytes``) is measured in a separate pass that comes before all the timing passes: each
configuration is built afresh again, warmed up with one outer step, and the peak memory of one more outer step
above what was in use before it is measured:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``, minus the bytes
  allocated before the step.
- CPU (the default, ``--memory allocator``): the peak of live tensor bytes during the step, from the
  allocation and free events that ``torch.profiler`` records with ``profile_memory=True``. It counts every tensor
  (saved for backward or not) and is not blurred by how the C library's heap is fragmented.
- CPU with ``--memory rss`` (Linux): the peak resident set size. At the start, glibc is told to serve every allocation
  of 64 KiB or more with its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), so that freed tensors go back to the OS
  and the resident size follows the live tensors. Before the step ``malloc_trim(0)`` returns the free heap, writing
  "5" to ``/proc/self/clear_refs`` resets the high-water mark and ``VmRSS`` is read; after it, ``VmHWM``. The peak
  is ``VmHWM - VmRSS(before)``, to within a few pages and the small allocations the heap keeps. The timing passes
  run with glibc's usual thresholds instead (mmap above 32 MiB, freed memory kept in the heap for reuse), as an
  mmap, page faults and munmap for every tensor of 64 KiB or more slow CPU steps by up to 2x; that is why they come
  after every memory pass (a heap grown by them would serve later allocations without raising the RSS).
- With ``--memory saved``: the peak bytes of tensors that autograd
  holds for the backward pass, counted with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once).
  This leaves out the tensors that are not saved for backward, so it underestimates the true peak.

The method used is printed above the tables.

How to read the ratios
----------------------
``fewshot``: ``ratio`` is the time of the outer step divided by FO's at the same T, and ``peak ratio`` the same
for the peak memory. FO runs the inner loop without any graph, so the ratios say what each estimator adds to the
cheapest one (the backbone's forward and backward are common to all and dominate at small T).

``whole_network``: ``ratio`` is ``seconds_per_step / (T * plain_step_seconds)``: the cost of one inner step
(with everything the estimator adds, spread over the T steps) in plain training steps. ``peak ratio`` is the
peak memory of the outer step divided by that of one plain training step. An estimator whose memory does not
grow with T (FO, T1-T2, Greedy, Neumann, CG) keeps its peak ratio flat in T; RMD's grows linearly in T and
TruncatedRMD's with its K.

The JSON file (``--json PATH``) holds one record per row with the keys ``problem``, ``estimator`` (the spec string,
or ``plain_step``), ``T``, ``seconds_per_step``, ``peak_bytes`` and ``ratio`` (the time ratio; ``null`` where its
reference was not run).

The published records (``studies/cost/results/``) were measured before the backbone lost its convolution biases
(batch norm cancels them); they differ from this backbone by those 96 parameters.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import lightning_hypergrad as lh
from lightning_hypergrad.fewshot import ConvBackbone
from studies.common import (
    MEMORY_METHODS,
    PeakMemory,
    Progress,
    arm_rss_measurement,
    estimator_spec,
    heap_reuse_for_timing,
    machine_description,
    memory_meter,
    write_json,
)

MIB = 1024**2
OuterStep = Callable[[], None]
PROBLEMS = ("fewshot", "fewshot_batched", "whole_network")
FEWSHOT_PROBLEMS = ("fewshot", "fewshot_batched")
PLAIN_STEP = "plain_step"
PLAIN_STEP_REPEATS = 5  # the plain step is short: time more of them


# --------------------------------------------------------------------------------------------------- estimators

DEFAULT_ESTIMATORS = ("fo", "t1t2", "greedy(0.99)", "rmd", "truncated_rmd(5)", "neumann(10, scale='lr')", "cg(10)")
"""The estimators measured by default, as spec strings (``scale='lr'``: Neumann's scale is the inner SGD's rate)."""


def select_estimators(specs: Sequence[str] | None) -> list[str]:
    """``specs``, canonical spec strings as ``--estimators`` gives them (default :data:`DEFAULT_ESTIMATORS`), without
    repeats."""
    return list(dict.fromkeys(specs or DEFAULT_ESTIMATORS))


# ------------------------------------------------------------------------------------------------------ problems

FEWSHOT_WAYS = 5
FEWSHOT_SHOTS = 10
FEWSHOT_QUERIES = 10
FEWSHOT_INNER_LR = 0.1
WHOLE_NET_INNER_LR = 0.05
WHOLE_NET_BATCH = 64
WHOLE_NET_INIT_WEIGHT_DECAY = 1e-3
INNER_MOMENTUM = 0.9
OUTER_LR = 1e-3


def fewshot_backbone() -> ConvBackbone:
    """FewShotClassifier's backbone, 3 blocks of width 32: 3x32x32 images -> 512 features."""
    return ConvBackbone(image_shape=(3, 32, 32), depth=3, width=32)


@dataclass
class Task:
    """One few-shot task: support and query images with their labels."""

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor


def random_task(generator: torch.Generator, device: torch.device) -> Task:
    """A 5-way 10-shot task of random images, labels shuffled within each set."""

    def labels() -> Tensor:
        y = torch.arange(FEWSHOT_WAYS).repeat_interleave(FEWSHOT_SHOTS)
        return y[torch.randperm(len(y), generator=generator)]

    n_support, n_query = FEWSHOT_WAYS * FEWSHOT_SHOTS, FEWSHOT_WAYS * FEWSHOT_QUERIES
    x_support = torch.randn(n_support, 3, 32, 32, generator=generator)
    x_query = torch.randn(n_query, 3, 32, 32, generator=generator)
    return Task(x_support.to(device), labels().to(device), x_query.to(device), labels().to(device))


def head_logits(w: Sequence[Tensor], features: Tensor) -> Tensor:
    return F.linear(features, w[0], w[1])


# How the backbone sees a task. One pass over support and query together is what FewShotClassifier does (batch
# norm normalizes them jointly); with separate passes (--separate-passes) FO skips the backward pass through the
# support images entirely, since its hypergradient depends on the query features only.
SEPARATE_PASSES = False


def task_features(backbone: nn.Module, task: Task) -> list[Tensor]:
    if SEPARATE_PASSES:
        return [backbone(task.x_support), backbone(task.x_query)]
    out = backbone(torch.cat([task.x_support, task.x_query]))
    n_support = task.x_support.shape[0]
    return [out[:n_support], out[n_support:]]


def fewshot_problem(backbone: nn.Module, task: Task, head_init: Sequence[Tensor], steps: int) -> lh.BilevelProblem:
    """The bilevel problem of one task: T SGD steps of the head on the support features."""
    return lh.BilevelProblem(
        inner_loss=lambda w, h: F.cross_entropy(head_logits(w, h[0]), task.y_support),
        outer_loss=lambda w, h: F.cross_entropy(head_logits(w, h[1]), task.y_query),
        hyperparameters=list(backbone.parameters()),
        init_params=list(head_init),
        optimizer=lh.SGD(lr=FEWSHOT_INNER_LR, momentum=INNER_MOMENTUM),
        steps=steps,
        features=lambda: task_features(backbone, task),
    )


def make_fewshot_step(spec: str, steps: int, meta_batch: int, device: torch.device, seed: int = 0) -> OuterStep:
    """One outer step of few-shot meta-learning: the estimator on each task, then Adam on the backbone."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    backbone = fewshot_backbone().to(device).train()
    n_features = backbone.out_features
    head_init = [torch.zeros(FEWSHOT_WAYS, n_features, device=device), torch.zeros(FEWSHOT_WAYS, device=device)]
    tasks = [random_task(generator, device) for _ in range(meta_batch)]
    outer_opt = torch.optim.Adam(backbone.parameters(), lr=OUTER_LR)
    estimator = lh.get_estimator(spec)

    def outer_step() -> None:
        for task in tasks:
            estimator(fewshot_problem(backbone, task, head_init, steps), accumulate=True, check=False)
        outer_opt.step()
        outer_opt.zero_grad(set_to_none=True)

    return outer_step


def make_fewshot_batched_step(
    spec: str, steps: int, meta_batch: int, device: torch.device, seed: int = 0, batch_backbone: bool | None = None
) -> OuterStep:
    """The ``fewshot`` outer step through :meth:`FewShotClassifier.meta_gradient` with the tasks batched.

    Same backbone, tasks, inner optimizer and Adam step as :func:`make_fewshot_step`; the meta-batch's inner loops
    run as one stacked problem (``batch_tasks=True``).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    model = lh.FewShotClassifier(
        ways=FEWSHOT_WAYS,
        image_shape=(3, 32, 32),
        estimator=spec,
        inner_optimizer=lh.SGD(lr=FEWSHOT_INNER_LR, momentum=INNER_MOMENTUM),
        inner_steps=steps,
        batch_tasks=True,
        batch_backbone=batch_backbone,
    ).to(device)
    tasks = [random_task(generator, device) for _ in range(meta_batch)]
    tasks = [
        {"support_x": t.x_support, "support_y": t.y_support, "query_x": t.x_query, "query_y": t.y_query} for t in tasks
    ]
    outer_opt = torch.optim.Adam(model.parameters(), lr=OUTER_LR)

    def outer_step() -> None:
        for parameter, grad in zip(model.hyperparameters(), model.meta_gradient(tasks).hypergrads):
            parameter.grad = grad
        outer_opt.step()
        outer_opt.zero_grad(set_to_none=True)

    return outer_step


def whole_network() -> nn.Sequential:
    """A small conv net for 1x28x28 images and 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


@dataclass
class WholeNetData:
    """The net, its parameter names and a fixed train and validation batch."""

    net: nn.Module
    names: list[str]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


def whole_net_data(device: torch.device, seed: int = 0) -> WholeNetData:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    net = whole_network().to(device)
    names = [name for name, _ in net.named_parameters()]

    def batch() -> tuple[Tensor, Tensor]:
        x = torch.randn(WHOLE_NET_BATCH, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (WHOLE_NET_BATCH,), generator=generator)
        return x.to(device), y.to(device)

    x_train, y_train = batch()
    x_val, y_val = batch()
    return WholeNetData(net, names, x_train, y_train, x_val, y_val)


def make_whole_network_step(spec: str, steps: int, device: torch.device, seed: int = 0) -> OuterStep:
    """One outer step of weight-decay tuning: the estimator on the whole net, then Adam on the log decays."""
    data = whole_net_data(device, seed)
    init = [p.detach().clone() for p in data.net.parameters()]
    log_wd = [torch.full_like(p, math.log(WHOLE_NET_INIT_WEIGHT_DECAY)).requires_grad_() for p in init]

    def logits(w: Sequence[Tensor], x: Tensor) -> Tensor:
        return functional_call(data.net, dict(zip(data.names, w)), (x,))

    def inner_loss(w: Sequence[Tensor], h: Sequence[Tensor]) -> Tensor:
        penalty = sum((lwd.exp() * p.square()).sum() for p, lwd in zip(w, h))
        return F.cross_entropy(logits(w, data.x_train), data.y_train) + 0.5 * penalty

    def outer_loss(w: Sequence[Tensor], h: Sequence[Tensor]) -> Tensor:
        return F.cross_entropy(logits(w, data.x_val), data.y_val)

    problem = lh.BilevelProblem(
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        hyperparameters=log_wd,
        init_params=init,
        optimizer=lh.SGD(lr=WHOLE_NET_INNER_LR, momentum=INNER_MOMENTUM),
        steps=steps,
    )
    outer_opt = torch.optim.Adam(log_wd, lr=OUTER_LR)
    estimator = lh.get_estimator(spec)

    def outer_step() -> None:
        estimator(problem, accumulate=True, check=False)
        outer_opt.step()
        outer_opt.zero_grad(set_to_none=True)

    return outer_step


def make_plain_step(device: torch.device, seed: int = 0) -> OuterStep:
    """One ordinary training step of the whole-network net on its train batch (the reference of the ratios)."""
    data = whole_net_data(device, seed)
    opt = torch.optim.SGD(
        data.net.parameters(),
        lr=WHOLE_NET_INNER_LR,
        momentum=INNER_MOMENTUM,
        weight_decay=WHOLE_NET_INIT_WEIGHT_DECAY,
    )

    def plain_step() -> None:
        loss = F.cross_entropy(data.net(data.x_train), data.y_train)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return plain_step


# ------------------------------------------------------------------------------------------------- measurement


@dataclass
class Record:
    """One row: the keys of the JSON file, plus the peak ratio shown in the table."""

    problem: str
    estimator: str
    T: int
    seconds_per_step: float
    peak_bytes: int
    ratio: float | None = None
    peak_ratio: float | None = None

    @property
    def peak_mib(self) -> float:
        """The peak memory in MiB."""
        return self.peak_bytes / MIB

    def to_json(self) -> dict[str, object]:
        record = asdict(self)
        del record["peak_ratio"]
        return record


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Job:
    """One row to measure: ``make_step`` builds the configuration afresh and returns its outer step."""

    problem: str
    estimator: str
    T: int
    make_step: Callable[[], OuterStep]
    repeats: int


def fewshot_jobs(
    specs: Sequence[str],
    steps_list: Sequence[int],
    meta_batch: int,
    repeats: int,
    device: torch.device,
    problem: str = "fewshot",
) -> list[Job]:
    make = make_fewshot_batched_step if problem == "fewshot_batched" else make_fewshot_step
    return [
        Job(problem, spec, steps, partial(make, spec, steps, meta_batch, device), repeats)
        for steps in steps_list
        for spec in specs
    ]


def whole_network_jobs(
    specs: Sequence[str], steps_list: Sequence[int], repeats: int, device: torch.device
) -> list[Job]:
    plain = Job("whole_network", PLAIN_STEP, 1, partial(make_plain_step, device), max(repeats, PLAIN_STEP_REPEATS))
    return [plain] + [
        Job("whole_network", spec, steps, partial(make_whole_network_step, spec, steps, device), repeats)
        for steps in steps_list
        for spec in specs
    ]


def peak_bytes(job: Job, device: torch.device, meter: PeakMemory) -> int:
    """The peak memory of one outer step after a warm-up one."""
    step = job.make_step()
    step()
    synchronize(device)
    return meter.measure(step)


def interleaved_seconds_per_step(jobs: Sequence[Job], device: torch.device) -> list[float]:
    """The median seconds per outer step of each job, timed in interleaved rounds after one warm-up step each.

    Round ``r`` times one step of every job in turn, so that a slow phase of a shared machine hits all of them
    alike instead of inflating the one that happened to run then.
    """
    steps = []
    for job in jobs:
        step = job.make_step()
        step()
        synchronize(device)
        steps.append(step)
    seconds: list[list[float]] = [[] for _ in jobs]
    for round_index in range(max(job.repeats for job in jobs)):
        for job, step, times in zip(jobs, steps, seconds):
            if round_index >= job.repeats:
                continue
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in seconds]


def run_jobs(jobs: Sequence[Job], device: torch.device, meter: PeakMemory) -> list[Record]:
    """Peak memory of every job first, then the timings, then the ratios.

    The memory passes all come first because the timing passes let glibc keep freed memory in its heap, which
    later allocations would reuse without raising the RSS.
    """
    # the work of a job's pass: its outer steps (a warm-up and the measured ones) times its inner steps
    progress = Progress(2 * len(jobs), work=sum((3 + job.repeats) * max(job.T, 1) for job in jobs))
    peaks = []
    for job in jobs:
        peaks.append(peak_bytes(job, device, meter))
        progress.step(f"memory {job.problem} {job.estimator} T={job.T}: {peaks[-1] / MIB:.1f} MiB", 2 * max(job.T, 1))
        gc.collect()
    records = []
    with heap_reuse_for_timing():
        groups: dict[tuple[str, int], list[int]] = {}
        for index, job in enumerate(jobs):  # estimators compared side by side at one T are timed together
            groups.setdefault((job.problem, job.T), []).append(index)
        seconds_of: dict[int, float] = {}
        for indices in groups.values():
            for index, seconds in zip(indices, interleaved_seconds_per_step([jobs[i] for i in indices], device)):
                seconds_of[index] = seconds
                job = jobs[index]
                progress.step(
                    f"time {job.problem} {job.estimator} T={job.T}: {seconds:.4f} s/step",
                    (1 + job.repeats) * max(job.T, 1),
                )
            gc.collect()
        for index, (job, peak) in enumerate(zip(jobs, peaks)):
            records.append(Record(job.problem, job.estimator, job.T, seconds_of[index], peak))
    add_ratios(records)
    return records


def add_ratios(records: Sequence[Record]) -> None:
    """fewshot: to FO at the same T; whole_network: time per inner step and peak, to the plain training step."""
    by_key = {(r.problem, r.estimator, r.T): r for r in records}
    for r in records:
        if r.problem in FEWSHOT_PROBLEMS:
            reference, inner_steps = by_key.get((r.problem, "fo", r.T)), 1
        else:
            reference, inner_steps = by_key.get(("whole_network", PLAIN_STEP, 1)), r.T
        if reference is None:
            continue
        r.ratio = r.seconds_per_step / (inner_steps * reference.seconds_per_step)
        r.peak_ratio = r.peak_bytes / reference.peak_bytes if reference.peak_bytes else None


# ------------------------------------------------------------------------------------------------------- output


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(records: Sequence[Record]) -> str:
    lines = [
        "| estimator | T | s/step | ratio | peak MiB | peak ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r.estimator} | {r.T} | {r.seconds_per_step:.4f} | {_ratio(r.ratio)} | "
            f"{r.peak_bytes / MIB:.1f} | {_ratio(r.peak_ratio)} |"
        )
    return "\n".join(lines)


PROBLEM_NOTES = {
    "fewshot": "ratio = s/step / FO's s/step at the same T; peak ratio = peak / FO's peak at the same T.",
    "fewshot_batched": (
        "ratio = s/step / FO's s/step (batched too) at the same T; peak ratio = peak / FO's peak at the same T."
    ),
    "whole_network": (
        "ratio = s/step / (T * plain_step s/step), the cost per inner step in plain training steps; "
        "peak ratio = peak / plain_step's peak."
    ),
}
FMD_NOTE = (
    "FMD is excluded: it carries one tangent per hyperparameter entry, and this problem has thousands "
    "({entries} entries)."
)


def hparam_entries(problem: str) -> int:
    if problem in FEWSHOT_PROBLEMS:
        return sum(p.numel() for p in fewshot_backbone().parameters())
    return sum(p.numel() for p in whole_network().parameters())


# --------------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="T in {10, 50}, meta-batch 4, 2 timed steps (else 7)")
    parser.add_argument("--json", metavar="PATH", help="write the records to this JSON file")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N)")
    parser.add_argument(
        "--separate-passes",
        action="store_true",
        help="fewshot: run the backbone on support and query separately (default: one pass, as FewShotClassifier)",
    )
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=["fewshot", "whole_network"])
    parser.add_argument(
        "--estimators",
        nargs="+",
        type=estimator_spec,
        metavar="SPEC",
        help=f"estimator spec strings (default: {' '.join(DEFAULT_ESTIMATORS)}); quote those with parentheses",
    )
    parser.add_argument(
        "--memory",
        choices=MEMORY_METHODS,
        default="auto",
        help="peak-memory method (auto: cuda on CUDA, else allocator: live tensor bytes from torch.profiler; "
        "rss: peak resident memory; saved: bytes saved for backward)",
    )
    parser.add_argument("--inner-steps", type=int, nargs="+", metavar="T", help="the values of T (overrides --quick)")
    parser.add_argument("--meta-batch", type=int, metavar="N", help="fewshot tasks per outer step (overrides --quick)")
    parser.add_argument("--repeats", type=int, metavar="N", help="timed outer steps per row (overrides --quick)")
    args = parser.parse_args(argv)
    for name in ("threads", "meta_batch", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.inner_steps is not None and min(args.inner_steps) < 1:
        parser.error(f"--inner-steps must all be >= 1, got {args.inner_steps}")
    return args


def main(argv: Sequence[str] | None = None) -> list[Record]:
    """Measure, print the tables, write the JSON records (``--json``) and return the records."""
    wall_start = time.perf_counter()
    args = parse_args(argv)
    # Before any tensor of the study exists (a threshold only affects the allocations that follow): glibc mmaps every
    # allocation of 64 KiB or more, so that freeing a tensor lowers the RSS (for --memory rss). It lasts for the
    # process: run the study in a process of its own (python -m studies.cost).
    arm_rss_measurement()
    global SEPARATE_PASSES
    SEPARATE_PASSES = args.separate_passes
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")
    device = torch.device(device_type)
    specs = select_estimators(args.estimators)
    try:
        meter = memory_meter(device, args.memory)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    steps_list = args.inner_steps or ((10, 50) if args.quick else (10, 50, 200))
    meta_batch = args.meta_batch or (4 if args.quick else 10)
    repeats = args.repeats or (2 if args.quick else 7)

    print(machine_description(device))
    print(
        f"timing: median of {repeats} outer steps (plain_step: {max(repeats, PLAIN_STEP_REPEATS)}) after 1 warm-up; "
        f"peak memory: {meter.description}\n"
    )
    jobs: list[Job] = []
    for problem in FEWSHOT_PROBLEMS:
        if problem in args.problems:
            jobs += fewshot_jobs(specs, steps_list, meta_batch, repeats, device, problem)
    if "whole_network" in args.problems:
        jobs += whole_network_jobs(specs, steps_list, repeats, device)
    records = run_jobs(jobs, device, meter)

    titles = {
        "fewshot": f"fewshot (5-way 10-shot, meta-batch {meta_batch}, backbone = hyperparameters, "
        f"{'separate support/query passes' if SEPARATE_PASSES else 'one backbone pass per task'})",
        "fewshot_batched": f"fewshot_batched (as fewshot, through FewShotClassifier.meta_gradient with the "
        f"{meta_batch} tasks' inner loops batched)",
        "whole_network": "whole_network (all weights inner, per-entry log weight decay = hyperparameters)",
    }
    for problem in dict.fromkeys(args.problems):
        print(f"## {titles[problem]}\n")
        print(markdown_table([r for r in records if r.problem == problem]))
        print()
        print(PROBLEM_NOTES[problem])
        print(FMD_NOTE.format(entries=hparam_entries(problem)))
        print()

    if args.json:
        write_json(args.json, [r.to_json() for r in records])
        print(f"wrote {len(records)} records to {args.json}")
    print(f"total wall time: {time.perf_counter() - wall_start:.1f} s")
    return records


if __name__ == "__main__":
    main()
