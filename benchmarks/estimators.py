"""Time and memory of the hypergradient estimators on two bilevel problems.

Run from the repository root::

    python benchmarks/estimators.py [--quick] [--json PATH] [--device cpu|cuda] [--threads N]
                                    [--problems fewshot whole_network] [--estimators fo greedy(0.99) ...]

What is measured
----------------
For every estimator (FO, T1-T2, Greedy(0.99), RMD, TruncatedRMD(K=5), Neumann(K=10, scale = the inner learning
rate), ConjugateGradient(K=10)) and every number of inner steps T (10, 50, 200; with ``--quick`` 10, 50), one
*outer step* is timed and its peak memory measured:

``fewshot``
    The meta-learning setup of the paper: a backbone of 3 blocks (Conv2d 3x3 with 32 channels, BatchNorm2d, ReLU,
    MaxPool2d 2) maps 32x32 RGB images to 512 features; its parameters are the hyperparameters. The inner
    parameters are a linear head 512 -> 5, reset to zero for each task and trained for T steps of SGD (lr 0.1,
    momentum 0.9) on the support set; the outer loss is the cross-entropy on the query set. Tasks are 5-way
    10-shot on random images (50 support and 50 query images). The backbone runs once per task (``features``).
    One outer step = one estimator call per task of the meta-batch (10 tasks; 4 with ``--quick``), then an Adam
    step on the backbone.
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
- CPU with ``--memory rss`` (Linux): the peak resident set size. At import, glibc is told to serve every allocation
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

The JSON file (``--json PATH``) holds one record per row with the keys ``problem``, ``estimator``, ``T``,
``seconds_per_step``, ``peak_bytes`` and ``ratio`` (the time ratio; ``null`` where its reference was not run).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from machine import AllocatorPeak, CudaPeak, PeakMemory, device_name
from torch import Tensor, nn
from torch.func import functional_call

import lightning_hypergrad as lh

MIB = 1024**2
# glibc mallopt parameters and the two settings the benchmark switches between
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MEMORY_MMAP_THRESHOLD = 64 * 1024  # measuring memory: every allocation of 64 KiB or more is its own mmap
MEMORY_TRIM_THRESHOLD = 128 * 1024  # glibc's default
TIMING_MMAP_THRESHOLD = 32 * MIB  # timing: the ceiling of glibc's own dynamic threshold on 64-bit Linux
TIMING_TRIM_THRESHOLD = 64 * MIB  # keep freed heap memory for reuse instead of returning it at every free


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _set_malloc_thresholds(libc: ctypes.CDLL | None, mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds; False where this is not glibc."""
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


# Done at import, before any large tensor exists (a threshold only affects the allocations that follow): glibc
# mmaps every allocation of 64 KiB or more, so that freeing a tensor lowers the RSS.
_LIBC = _load_libc()
_MMAP_THRESHOLD_SET = _set_malloc_thresholds(_LIBC, MEMORY_MMAP_THRESHOLD, MEMORY_TRIM_THRESHOLD)


@contextlib.contextmanager
def heap_reuse_for_timing() -> Iterator[None]:
    """glibc's usual heap reuse while timing; the memory-measuring thresholds again after.

    With an mmap, page faults and munmap for every tensor of 64 KiB or more, CPU steps run up to 2x slower.
    """
    if not _MMAP_THRESHOLD_SET:
        yield
        return
    _set_malloc_thresholds(_LIBC, TIMING_MMAP_THRESHOLD, TIMING_TRIM_THRESHOLD)
    try:
        yield
    finally:
        _set_malloc_thresholds(_LIBC, MEMORY_MMAP_THRESHOLD, MEMORY_TRIM_THRESHOLD)


OuterStep = Callable[[], None]
PROBLEMS = ("fewshot", "whole_network")
PLAIN_STEP = "plain_step"
PLAIN_STEP_REPEATS = 5  # the plain step is short: time more of them


# --------------------------------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator of the benchmark: its short name and how to build it given the inner learning rate."""

    name: str
    build: Callable[[float], lh.HypergradEstimator]


ESTIMATOR_SPECS: tuple[EstimatorSpec, ...] = (
    EstimatorSpec("fo", lambda lr: lh.FO()),
    EstimatorSpec("t1t2", lambda lr: lh.T1T2()),
    EstimatorSpec("greedy(0.99)", lambda lr: lh.Greedy(gamma=0.99)),
    EstimatorSpec("rmd", lambda lr: lh.RMD()),
    EstimatorSpec("truncated_rmd(5)", lambda lr: lh.TruncatedRMD(truncate=5)),
    EstimatorSpec("neumann(10)", lambda lr: lh.Neumann(iterations=10, scale=lr)),
    EstimatorSpec("cg(10)", lambda lr: lh.ConjugateGradient(iterations=10)),
)


def select_estimators(names: Sequence[str] | None) -> list[EstimatorSpec]:
    """The specs named in ``names`` (a full short name such as ``greedy(0.99)``, or its part before ``(``)."""
    if not names:
        return list(ESTIMATOR_SPECS)
    wanted = {n.lower() for n in names}
    chosen = [s for s in ESTIMATOR_SPECS if s.name in wanted or s.name.split("(")[0] in wanted]
    known = {s.name for s in ESTIMATOR_SPECS} | {s.name.split("(")[0] for s in ESTIMATOR_SPECS}
    unknown = sorted(wanted - known)
    if unknown:
        raise SystemExit(f"unknown estimator(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return chosen


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


def fewshot_backbone() -> nn.Sequential:
    """3 blocks of (Conv2d 3x3, 32 channels, BatchNorm2d, ReLU, MaxPool2d 2): 3x32x32 images -> 512 features."""
    blocks: list[nn.Module] = []
    channels = 3
    for _ in range(3):
        blocks += [nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2)]
        channels = 32
    return nn.Sequential(*blocks, nn.Flatten())


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
        hparams=list(backbone.parameters()),
        init_params=list(head_init),
        optimizer=lh.SGD(lr=FEWSHOT_INNER_LR, momentum=INNER_MOMENTUM),
        steps=steps,
        features=lambda: task_features(backbone, task),
    )


def make_fewshot_step(
    spec: EstimatorSpec, steps: int, meta_batch: int, device: torch.device, seed: int = 0
) -> OuterStep:
    """One outer step of few-shot meta-learning: the estimator on each task, then Adam on the backbone."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    backbone = fewshot_backbone().to(device).train()
    n_features = 32 * 4 * 4
    head_init = [torch.zeros(FEWSHOT_WAYS, n_features, device=device), torch.zeros(FEWSHOT_WAYS, device=device)]
    tasks = [random_task(generator, device) for _ in range(meta_batch)]
    outer_opt = torch.optim.Adam(backbone.parameters(), lr=OUTER_LR)
    estimator = spec.build(FEWSHOT_INNER_LR)

    def outer_step() -> None:
        for task in tasks:
            estimator(fewshot_problem(backbone, task, head_init, steps), accumulate=True, check=False)
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


def make_whole_network_step(spec: EstimatorSpec, steps: int, device: torch.device, seed: int = 0) -> OuterStep:
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
        hparams=log_wd,
        init_params=init,
        optimizer=lh.SGD(lr=WHOLE_NET_INNER_LR, momentum=INNER_MOMENTUM),
        steps=steps,
    )
    outer_opt = torch.optim.Adam(log_wd, lr=OUTER_LR)
    estimator = spec.build(WHOLE_NET_INNER_LR)

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


# -------------------------------------------------------------------------------------------------- peak memory


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
    raise KeyError(key)


class RssPeak(PeakMemory):
    description = (
        "CPU: peak RSS (VmHWM after the step - VmRSS before, with glibc mmap threshold 64 KiB, malloc_trim(0) and "
        "/proc/self/clear_refs=5 before the step)"
    )

    def __init__(self, libc: ctypes.CDLL) -> None:
        self.libc = libc

    @staticmethod
    def available(libc: ctypes.CDLL | None) -> bool:
        """Whether the mmap threshold was set and the high-water mark can be reset and read."""
        if libc is None or not _MMAP_THRESHOLD_SET or not hasattr(libc, "malloc_trim"):
            return False
        try:
            RssPeak._reset_high_water_mark()
            _proc_status_bytes("VmRSS")
            _proc_status_bytes("VmHWM")
        except (OSError, KeyError, ValueError, AssertionError):
            return False
        return True

    @staticmethod
    def _reset_high_water_mark() -> None:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def measure(self, fn: Callable[[], None]) -> int:
        gc.collect()
        self.libc.malloc_trim(0)
        self._reset_high_water_mark()
        before = _proc_status_bytes("VmRSS")
        fn()
        return max(0, _proc_status_bytes("VmHWM") - before)


class _SavedStorageCounter:
    """Live bytes of the storages that autograd holds for backward, each storage counted once."""

    def __init__(self) -> None:
        self.refs: dict[int, tuple[int, int]] = {}  # storage address -> (references, bytes)
        self.live = 0
        self.peak = 0

    def add(self, key: int, nbytes: int) -> None:
        count, _ = self.refs.get(key, (0, nbytes))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] = (count + 1, nbytes)

    def remove(self, key: int) -> None:
        count, nbytes = self.refs[key]
        if count == 1:
            del self.refs[key]
            self.live -= nbytes
        else:
            self.refs[key] = (count - 1, nbytes)


class _SavedHandle:
    """What the pack hook returns in place of a saved tensor; releases its count when autograd drops it."""

    __slots__ = ("counter", "key", "tensor")

    def __init__(self, counter: _SavedStorageCounter, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        # Detached: holding a saved output itself would tie it to its own graph node in a reference cycle that
        # never frees; autograd restores the graph links of what the unpack hook returns.
        self.counter, self.key, self.tensor = counter, storage.data_ptr(), tensor.detach()
        counter.add(self.key, storage.nbytes())

    def __del__(self) -> None:
        self.counter.remove(self.key)


class SavedTensorsPeak(PeakMemory):
    description = (
        "fallback: peak bytes of tensors saved for backward (torch.autograd.graph.saved_tensors_hooks, each "
        "storage once); leaves out everything not saved for backward"
    )

    def measure(self, fn: Callable[[], None]) -> int:
        counter = _SavedStorageCounter()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _SavedHandle(counter, t), lambda h: h.tensor):
            fn()
        gc.collect()
        return counter.peak


def choose_memory_meter(device: torch.device, method: str) -> PeakMemory:
    if device.type == "cuda" and method in ("auto", "cuda"):
        return CudaPeak(device)
    if method == "cuda":
        raise SystemExit("--memory cuda needs --device cuda")
    if method in ("auto", "allocator"):
        return AllocatorPeak()
    if method == "rss" and RssPeak.available(_LIBC):
        assert _LIBC is not None
        return RssPeak(_LIBC)
    if method == "rss":
        raise SystemExit("--memory rss is unavailable here (needs Linux glibc and /proc/self/clear_refs)")
    return SavedTensorsPeak()


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
    specs: Sequence[EstimatorSpec], steps_list: Sequence[int], meta_batch: int, repeats: int, device: torch.device
) -> list[Job]:
    return [
        Job("fewshot", spec.name, steps, partial(make_fewshot_step, spec, steps, meta_batch, device), repeats)
        for steps in steps_list
        for spec in specs
    ]


def whole_network_jobs(
    specs: Sequence[EstimatorSpec], steps_list: Sequence[int], repeats: int, device: torch.device
) -> list[Job]:
    plain = Job("whole_network", PLAIN_STEP, 1, partial(make_plain_step, device), max(repeats, PLAIN_STEP_REPEATS))
    return [plain] + [
        Job("whole_network", spec.name, steps, partial(make_whole_network_step, spec, steps, device), repeats)
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
    peaks = []
    for job in jobs:
        peaks.append(peak_bytes(job, device, meter))
        log(f"memory {job.problem} {job.estimator} T={job.T}: {peaks[-1] / MIB:.1f} MiB")
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
                log(f"time {job.problem} {job.estimator} T={job.T}: {seconds:.4f} s/step")
            gc.collect()
        for index, (job, peak) in enumerate(zip(jobs, peaks)):
            records.append(Record(job.problem, job.estimator, job.T, seconds_of[index], peak))
    add_ratios(records)
    return records


def add_ratios(records: Sequence[Record]) -> None:
    """fewshot: to FO at the same T; whole_network: time per inner step and peak, to the plain training step."""
    by_key = {(r.problem, r.estimator, r.T): r for r in records}
    for r in records:
        if r.problem == "fewshot":
            reference, inner_steps = by_key.get(("fewshot", "fo", r.T)), 1
        else:
            reference, inner_steps = by_key.get(("whole_network", PLAIN_STEP, 1)), r.T
        if reference is None:
            continue
        r.ratio = r.seconds_per_step / (inner_steps * reference.seconds_per_step)
        r.peak_ratio = r.peak_bytes / reference.peak_bytes if reference.peak_bytes else None


# ------------------------------------------------------------------------------------------------------- output


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    if problem == "fewshot":
        return sum(p.numel() for p in fewshot_backbone().parameters())
    return sum(p.numel() for p in whole_network().parameters())


def machine_description(device: torch.device) -> str:
    return (
        f"device: {device.type} ({device_name(device)}); torch {torch.__version__}; "
        f"threads: {torch.get_num_threads()}; python {platform.python_version()}"
    )


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
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument(
        "--estimators",
        nargs="+",
        metavar="NAME",
        help=f"subset of: {', '.join(s.name for s in ESTIMATOR_SPECS)} (or the name before the parenthesis)",
    )
    parser.add_argument(
        "--memory",
        choices=("auto", "cuda", "allocator", "rss", "saved"),
        default="auto",
        help="peak-memory method (auto: cuda on CUDA, else allocator: live tensor bytes from torch.profiler; "
        "rss: peak resident memory; saved: bytes saved for backward)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    wall_start = time.perf_counter()
    args = parse_args(argv)
    global SEPARATE_PASSES
    SEPARATE_PASSES = args.separate_passes
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")
    device = torch.device(device_name)
    specs = select_estimators(args.estimators)
    meter = choose_memory_meter(device, args.memory)
    steps_list = (10, 50) if args.quick else (10, 50, 200)
    meta_batch = 4 if args.quick else 10
    repeats = 2 if args.quick else 7

    print(machine_description(device))
    print(
        f"timing: median of {repeats} outer steps (plain_step: {max(repeats, PLAIN_STEP_REPEATS)}) after 1 warm-up; "
        f"peak memory: {meter.description}\n"
    )
    jobs: list[Job] = []
    if "fewshot" in args.problems:
        jobs += fewshot_jobs(specs, steps_list, meta_batch, repeats, device)
    if "whole_network" in args.problems:
        jobs += whole_network_jobs(specs, steps_list, repeats, device)
    records = run_jobs(jobs, device, meter)

    titles = {
        "fewshot": f"fewshot (5-way 10-shot, meta-batch {meta_batch}, backbone = hyperparameters, "
        f"{'separate support/query passes' if SEPARATE_PASSES else 'one backbone pass per task'})",
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
        with open(args.json, "w") as out:
            json.dump([r.to_json() for r in records], out, indent=2)
        print(f"wrote {len(records)} records to {args.json}")
    print(f"total wall time: {time.perf_counter() - wall_start:.1f} s")


if __name__ == "__main__":
    main()
