"""What every study shares: one quiet Lightning trainer, one atomic JSON writer, one peak-memory meter, the machine.

- :func:`quiet_trainer` (and :data:`QUIET_TRAINER`, :func:`quiet_trainer_args` for a config run through
  :func:`lightning_hypergrad.cli.cli`), with :func:`quiet` for Lightning's informational logs;
- :func:`write_json` and :func:`atomic_path`: a file appears whole or not at all (a temporary file in the same
  folder, then ``os.replace``), so that an interrupted study never leaves a half-written record;
- :class:`PeakMemory` and :func:`memory_meter`: the peak memory that a call adds, on CUDA, from the allocator's
  events, from the resident set size, or from the tensors saved for backward;
- :func:`device_name` and :func:`machine_description`: what a report says about the machine it ran on;
- :func:`estimator_spec` and :func:`require_positive`: the command lines' checks of estimator specs and counts;
- :class:`Progress` and :func:`format_duration`: one line per unit of work of a study, with the time left;
- :class:`StudyParser`: a command line whose errors are one line; :func:`unwritable`, :func:`writable_folder` and
  :func:`writable_file`: an ``--out`` that cannot be written is refused before any work;
- :func:`folder_lock` and :func:`run_alone`: one run at a time in a records folder, where two would do the same work
  twice.

Lightning (and the package) is imported on first use, so that importing this module (e.g. from
``tests/test_memory.py``) is cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import fcntl
import gc
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import Tensor

if TYPE_CHECKING:
    import lightning as L

REPOSITORY = Path(__file__).resolve().parents[1]
"""The repository root: where ``configs/`` and ``examples/`` are read from (never written into records)."""
OMNIGLOT_ROOT = "../shared/data/omniglot"
"""Where the studies look for Omniglot when neither ``--root`` nor ``$OMNIGLOT_ROOT`` is given, relative to the
repository root (the studies run from there); the paper configs hold the same path."""


def log(message: str) -> None:
    """Progress on stderr (stdout gets the report)."""
    print(message, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """``1h02m03s``, ``2m03s`` or ``0m03s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """The progress of a study's loop: one line per finished unit of work, with the time so far and the time left.

    ``[3/12] memory fewshot rmd T=50: 12.0 MiB (0m41s elapsed, about 2m03s left)``; the last line ends in ``done``.
    The time left is the time so far per unit of work times the work left, where each unit weighs ``work`` (its
    number of inner steps, say: units that cost more count more); one per unit by default.

    Args:
        total: the number of units.
        work: the work of all the units together (default ``total``: every unit weighs 1).
        clock: the time in seconds (``time.perf_counter``; tests give another).
    """

    def __init__(self, total: int, work: float | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = total
        self.work = float(total if work is None else work)
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.work_done = 0.0

    def line(self, message: str, work: float = 1.0) -> str:
        """Counts one more unit done (of weight ``work``) and returns its line."""
        self.done += 1
        self.work_done += work
        elapsed = self.clock() - self.start
        if self.done >= self.total:
            left = "done"
        elif self.work_done <= 0:
            left = "time left unknown"
        else:
            left = f"about {format_duration(elapsed / self.work_done * max(0.0, self.work - self.work_done))} left"
        return f"[{self.done}/{self.total}] {message} ({format_duration(elapsed)} elapsed, {left})"

    def step(self, message: str, work: float = 1.0) -> None:
        """:meth:`line`, written on stderr (:func:`log`)."""
        log(self.line(message, work))


def omniglot_root(given: str | None = None) -> str:
    """The Omniglot folder as the user gave it: ``given``, else ``$OMNIGLOT_ROOT``, else :data:`OMNIGLOT_ROOT`.

    It is returned as written (relative paths stay relative), so that records never hold this machine's layout.
    """
    return given or os.environ.get("OMNIGLOT_ROOT") or OMNIGLOT_ROOT


# ---------------------------------------------------------------------------------------------------------------------
# the quiet trainer
# ---------------------------------------------------------------------------------------------------------------------

QUIET_TRAINER: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""The trainer settings of every study: no logger, checkpoints, progress bar or model summary."""


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A Lightning trainer with :data:`QUIET_TRAINER`, one CPU device unless ``kwargs`` say otherwise."""
    import lightning as L

    return L.Trainer(**({"accelerator": "cpu", "devices": 1} | QUIET_TRAINER | kwargs))


def quiet_trainer_args() -> list[str]:
    """:data:`QUIET_TRAINER` as command-line overrides of a config (``--trainer.logger false`` ...)."""
    return [arg for key, value in QUIET_TRAINER.items() for arg in (f"--trainer.{key}", json.dumps(value))]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences Lightning's informational logs and its hints for large-scale training while a study runs."""
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
            # a study builds its runs with lightning_hypergrad.cli.cli(args) while sys.argv holds its own options
            warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended to run from within Python.*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ---------------------------------------------------------------------------------------------------------------------
# atomic files
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` (``os.replace``) when the block succeeds.

    The folder is created if needed; on an error (or an interrupt) the temporary file is removed and ``path`` is
    left as it was. The temporary name keeps the suffix, so that writers that pick a format by it (matplotlib)
    work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def report_from_record(path: Path, markdown: Callable[[dict[str, Any]], str], run_command: str) -> int:
    """A study's ``report``: the page ``markdown(record)`` of the JSON record at ``path``, written beside it (``.md``)
    and printed; 0, or 2 with one line naming ``run_command`` where the record cannot be read."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log(f"error: cannot read the record {path} ({type(error).__name__}: {error}); run `{run_command}` first")
        return 2
    text = markdown(record)
    write_text(path.with_suffix(".md"), text)
    print(text)
    return 0


def write_json(path: str | Path, data: Any, indent: int = 2) -> None:
    """Writes ``data`` as JSON to ``path`` atomically: a temporary file in the same folder, then ``os.replace``."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


class StudyParser(argparse.ArgumentParser):
    """A study's argument parser, whose errors are one line (``prog: error: message``) instead of the usage block
    and the line (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be written into ``folder`` (made with its parents where missing), in a few words; ``None``
    when they can. Nothing is created: the folder, or the nearest of its parents that exists, is checked."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def writable_folder(value: str) -> str:
    """The ``type`` of a study's ``--out`` (argparse checks the default too): ``value``, or
    ``argparse.ArgumentTypeError`` (exit 2, naming the option) where the study could not write its results there,
    so that it stops before any work instead of after it."""
    reason = unwritable(value)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"cannot write the results into {value}: {reason}; give another --out")
    return value


def writable_file(value: str) -> str:
    """The ``type`` of an option naming the one file that a study writes (an ``--out`` or a ``--json`` that is a
    file): ``value``, or ``argparse.ArgumentTypeError`` (exit 2, naming the option) where its folder cannot be
    written or ``value`` is a folder, so that the study stops before any work instead of after it."""
    path = Path(value)
    reason = f"{path} is a folder, not a file" if path.is_dir() else unwritable(path.parent)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"cannot write the results into {value}: {reason}; give another path")
    return value


class FolderBusy(RuntimeError):
    """Another living process holds the lock of a records folder (:func:`folder_lock`)."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str = ".lock") -> Iterator[None]:
    """Holds ``folder/name`` for the block: one run of a study at a time writes into ``folder``, where a second would
    do the same work and write the same records.

    The lock file holds the process id of the run that holds it, and is locked (``flock``) while it does, so that a
    lock left by a run that is gone (killed with ``SIGKILL``) is taken over at once. Removed when the block ends.

    Raises:
        FolderBusy: another living process holds it; the message names it, the folder and what to do.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderBusy(
                f"another run (pid {owner}) is writing into {folder} (it holds {path}): wait for it to end, or give "
                "another --out"
            ) from None
        try:
            ours = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            ours = False
        if ours:
            break
        os.close(fd)  # the run that held it removed it meanwhile: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


@contextlib.contextmanager
def run_alone(folder: str | Path, name: str = ".lock") -> Iterator[None]:
    """:func:`folder_lock` for a study's command line: where another living run holds ``folder/name``, the study
    ends before any work with the line ``error: ...`` on stderr and exit status 2 (``SystemExit(2)``).

    A study whose commands write different records into one folder gives each its own ``name`` (the records' name),
    so that only a run that would do the same work as a living one is refused.
    """
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(folder, name))
        except FolderBusy as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        yield


# ---------------------------------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo where there is one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return name


def machine_description(device: torch.device | str = "cpu") -> str:
    """The device, torch and Python versions and torch's thread count, in one line."""
    device = torch.device(device)
    return (
        f"device: {device.type} ({device_name(device)}); torch {torch.__version__}; "
        f"threads: {torch.get_num_threads()}; python {platform.python_version()}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------------------------------


class PeakMemory(ABC):
    """Measures the peak memory that a call adds to what was in use before it."""

    description: str = ""

    @abstractmethod
    def measure(self, fn: Callable[[], object]) -> int:
        """Run ``fn`` once and return its peak memory in bytes above the starting point."""


class CudaPeak(PeakMemory):
    description = "CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus allocated before"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, fn: Callable[[], object]) -> int:
        gc.collect()
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - before


class AllocatorPeak(PeakMemory):
    """The peak of live tensor bytes during the call, from the allocation and free events of ``torch.profiler``.

    Counts every tensor the call allocates (autograd's saved tensors, gradients, temporaries) and nothing else, so
    it does not depend on how the C library's heap happens to be fragmented.
    """

    description = "CPU: peak of live tensor bytes allocated during the step (torch.profiler memory events)"

    def measure(self, fn: Callable[[], object]) -> int:
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        with without_profiler_noise(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak


class LiveTensorPeak(PeakMemory):
    """The peak of live tensor bytes during the call, counted as it runs: every tensor storage that an operation
    creates (not a view or an in-place result of its inputs) is added when it appears and taken off when it is freed.

    Unlike :class:`AllocatorPeak` it keeps no log of events, so its own memory does not grow with the length of the
    call (the profiler's log of a 3,000-step hypergradient took 19 GB); it costs a Python call per operation. It sees
    the tensors the operations return, not the scratch buffers a kernel allocates and frees inside itself, so it can
    read a little below :class:`AllocatorPeak`.
    """

    description = "CPU: peak of live tensor bytes created during the step (counted operation by operation, no log)"

    def measure(self, fn: Callable[[], object]) -> int:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        live = [0, 0]  # bytes alive now, the most so far
        tracked: dict[int, Any] = {}  # id of each counted storage -> a weak reference whose callback uncounts it

        def freed(key: int, nbytes: int) -> None:
            live[0] -= nbytes
            tracked.pop(key, None)

        class Counting(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                out = func(*args, **(kwargs or {}))
                inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
                for t in tree_leaves(out):
                    if not isinstance(t, Tensor) or t.device.type == "meta" or t._is_zerotensor():
                        continue  # (forward mode's zero tangents have no memory behind them)
                    storage = t.untyped_storage()
                    key = id(storage)
                    if key in inputs or key in tracked:
                        continue
                    nbytes = storage.nbytes()
                    tracked[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: freed(key, nbytes))
                    live[0] += nbytes
                    live[1] = max(live[1], live[0])
                return out

        gc.collect()
        with Counting():
            fn()
        return live[1]


PROFILER_NOISE = re.compile(
    r"(USDT:.*\] profiler_(start|stop)|ERROR:.*DeviceProperties\.cpp:\d+\] gpuGetDeviceCount failed with code \d+)\s*"
)
"""The lines that torch.profiler's C++ library (Kineto) writes on stderr at each CPU-only profile: a probe at its
start and stop, and, once per process on a machine without a usable GPU, the failure of its query of the GPUs'
properties (for the trace's metadata, made whatever the profiled activities; no option of torch skips it)."""


@contextlib.contextmanager
def without_profiler_noise() -> Iterator[None]:
    """Writes what the process writes on stderr (file descriptor 2) during the block, less :data:`PROFILER_NOISE`.

    The C++ library writes to the descriptor, not to ``sys.stderr``, so the block's output is captured there (in a
    temporary file) and written out when it ends, in order, every other line kept.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not PROFILER_NOISE.fullmatch(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


# glibc's mallopt parameters and the two settings that the RSS measurement switches between
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MEMORY_MMAP_THRESHOLD = 64 * 1024  # measuring memory: every allocation of 64 KiB or more is its own mmap
MEMORY_TRIM_THRESHOLD = 128 * 1024  # glibc's default
TIMING_MMAP_THRESHOLD = 32 * 1024**2  # timing: the ceiling of glibc's own dynamic threshold on 64-bit Linux
TIMING_TRIM_THRESHOLD = 64 * 1024**2  # keep freed heap memory for reuse instead of returning it at every free


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _load_libc()
_rss_armed = False


def _set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds; False where this is not glibc."""
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        _LIBC.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )


def arm_rss_measurement() -> bool:
    """Tell glibc to serve every allocation of 64 KiB or more with its own ``mmap``, for :class:`RssPeak`.

    Freed tensors then go back to the OS and the resident size follows the live tensors. Call it before any large
    tensor exists (a threshold only affects the allocations that follow); time with :func:`heap_reuse_for_timing`.
    Returns whether it took effect (False where this is not glibc).
    """
    global _rss_armed
    _rss_armed = _set_malloc_thresholds(MEMORY_MMAP_THRESHOLD, MEMORY_TRIM_THRESHOLD)
    return _rss_armed


@contextlib.contextmanager
def heap_reuse_for_timing() -> Iterator[None]:
    """glibc's usual heap reuse while timing; the memory-measuring thresholds of :func:`arm_rss_measurement` after.

    With an mmap, page faults and munmap for every tensor of 64 KiB or more, CPU steps run up to 2x slower.
    """
    if not _rss_armed:
        yield
        return
    _set_malloc_thresholds(TIMING_MMAP_THRESHOLD, TIMING_TRIM_THRESHOLD)
    try:
        yield
    finally:
        _set_malloc_thresholds(MEMORY_MMAP_THRESHOLD, MEMORY_TRIM_THRESHOLD)


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

    @staticmethod
    def available() -> bool:
        """Whether :func:`arm_rss_measurement` took effect and the high-water mark can be reset and read."""
        if _LIBC is None or not _rss_armed or not hasattr(_LIBC, "malloc_trim"):
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

    def measure(self, fn: Callable[[], object]) -> int:
        assert _LIBC is not None
        gc.collect()
        _LIBC.malloc_trim(0)
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
    """The peak bytes of the tensors that autograd holds for backward at any one time, each storage once.

    Deterministic (it counts tensors, not the allocator or the heap), so tests can compare it across settings;
    it leaves out everything not saved for backward, so it underestimates the true peak.
    """

    description = (
        "saved for backward: peak bytes of tensors saved for backward (torch.autograd.graph.saved_tensors_hooks, "
        "each storage once); leaves out everything not saved for backward"
    )

    def measure(self, fn: Callable[[], object]) -> int:
        counter = _SavedStorageCounter()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _SavedHandle(counter, t), lambda h: h.tensor):
            fn()
        gc.collect()
        return counter.peak


MEMORY_METHODS = ("auto", "cuda", "allocator", "live", "rss", "saved")
"""The ``--memory`` choices of :func:`memory_meter`."""


def memory_meter(device: torch.device, method: str = "auto") -> PeakMemory:
    """The peak-memory meter of ``method`` on ``device`` (``auto``: CUDA's on a GPU, else the allocator's).

    Raises:
        ValueError: an unknown method, ``cuda`` without a CUDA device, or ``rss`` where it is unavailable.
    """
    if method not in MEMORY_METHODS:
        raise ValueError(f"unknown memory method {method!r}; choose one of {', '.join(MEMORY_METHODS)}")
    if device.type == "cuda" and method in ("auto", "cuda"):
        return CudaPeak(device)
    if method == "cuda":
        raise ValueError("--memory cuda needs --device cuda")
    if method in ("auto", "allocator"):
        return AllocatorPeak()
    if method == "live":
        return LiveTensorPeak()
    if method == "rss":
        if not RssPeak.available():
            raise ValueError(
                "--memory rss is unavailable here (needs Linux glibc, /proc/self/clear_refs and arm_rss_measurement() "
                "before any large tensor); use --memory allocator"
            )
        return RssPeak()
    return SavedTensorsPeak()


def estimator_spec(text: str) -> str:
    """The canonical spec string of ``text`` (``Greedy(0.90)`` -> ``greedy(0.9)``), as an argparse ``type``.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not an estimator spec (the message lists the known names), so that
            the parser stops with exit 2 naming the option before any work starts.
    """
    from lightning_hypergrad import get_estimator

    try:
        return str(get_estimator(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def require_positive(parser: Any, args: Any, *names: str) -> None:
    """``parser.error`` (exit 2, naming the option) unless each option in ``names`` (a number or a list) is >= 1."""
    for name in names:
        value = getattr(args, name)
        smallest = min(value) if isinstance(value, (list, tuple)) else value
        if smallest is not None and smallest < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {smallest}")


def tasks_label(batched: bool) -> str:
    """How a meta-batch's tasks ran, as the step-time tables and logs name it."""
    return "batched" if batched else "one by one"
