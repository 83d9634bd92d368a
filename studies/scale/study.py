"""Memory against T: how far each exact method scales, on the horizon study's CNN.

    python -m studies.scale run       # the missing records, then the report (default)
    python -m studies.scale report    # <out>/scale.md from the records found; starts no run

The problem is the one of ``python -m studies.horizon cnn`` with its defaults (:mod:`studies.horizon.cnn`): the CNN
of initialization seed 0 trained from scratch for T steps of SGD with heavy-ball momentum 0.9 on mini-batches of 32
Omniglot drawings (50 characters, 28 x 28; the batch order of the horizon study's search seed 0), the per-layer log
learning rates and log weight decays at the horizon study's start (0.03 and 1e-4) the hyperparameters, the
validation cross-entropy of ``w_T`` the outer loss. One hypergradient is measured, from building the problem to the
hyperparameters' gradients, in float32 on one thread (``--threads``), for each exact method:

- ours: ``rmd``, ``rmd(checkpoint_every='sqrt')``, ``rmd(checkpoint_every='auto')``, ``mixed_rmd``,
  ``mixed_rmd(checkpoint_every='sqrt')`` and ``mixed_rmd(checkpoint_every='sqrt', product='double_backward')``;
- ``higher``: ``innerloop_ctx(track_higher_grads=True)`` around ``torch.optim.SGD`` with one parameter group per
  layer, its ``lr`` and ``weight_decay`` overridden by the hyperparameters' tensors; the T steps unrolled, then the
  outer loss differentiated;
- ``torchopt``: TorchOpt's functional API as its examples use it (a ``torchopt.sgd`` per layer with the layer's rate
  as a tensor, ``update(..., inplace=False)``, ``torchopt.apply_updates``); the weight decay, which TorchOpt takes as a
  number only, enters as the L2 term ``0.5 wd |w|^2`` of the step loss (the same gradient ``g + wd w``).

The peers come from ``--peers-dir`` (``bash scripts/install_peers.sh``); one that does not import is left out, said
so. Before any measurement every method's hypergradient is compared with ``rmd``'s on the same problem at
``--check-steps`` (10) in float64; the study stops where one differs by more than 1e-10 of the largest entry
(``agreement.json``, and the report's first table).

Per ``(method, T)``: the peak memory of the hypergradient (:func:`studies.common.memory_meter`: on CPU the peak of
live tensor bytes from ``torch.profiler``'s allocation events, on CUDA the allocator's peak), then its seconds, wall
and CPU (``time.process_time``), the median of timed runs after that first, metered one (up to ``--repeats``, fewer
once they add up to 10 CPU seconds), and ``/proc/loadavg`` before and after. Every method runs at ``--steps``
(10 100 1000); the checkpointed forms, whose memory grows sublinearly, also at ``--sublinear-steps`` (30 300 3000
10000: more points for their fit, and the long horizons). A run is skipped, said so, where it is predicted (the
method's metered CPU seconds at its largest T done, times the ratio of the horizons) to take more than
``--max-seconds`` CPU seconds (120), or to grow the process by more than half of the memory available (the CPU meter
keeps every allocation event of the call, which for the mixed-mode sweep at T = 3000 came to 19 GB);
``<out>/skipped.json`` says which and why. ``--device cuda`` runs the same on a GPU (part 5 of
``scripts/gpu_check.sh``, into ``studies/scale/results_cuda``).

Records: ``<out>/records/<method>-T<T>.json``, written atomically when each measurement ends, so that rerunning the
same command resumes; records (and ``agreement.json``) made with other settings are refused. The report fits each
method's peaks with ``a + b T`` and ``a + b sqrt(T)`` (:mod:`studies.scale.growth`), keeps the better by residual,
and gives the largest T within 16 GiB from it (extrapolated, unless a run reached it).

Before any work: an ``--out`` that cannot be written is refused, and ``run`` holds ``<out>/.lock`` while it works
(:func:`studies.common.run_alone`): a second run on the same ``--out`` is refused while the first lives.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from studies.common import (
    MEMORY_METHODS,
    Progress,
    StudyParser,
    log,
    machine_description,
    memory_meter,
    omniglot_root,
    require_positive,
    run_alone,
    writable_folder,
    write_json,
    write_text,
)
from studies.horizon.cnn import (
    LAYERS,
    CNNSettings,
    Splits,
    batch_order,
    load_splits,
    network,
    start_hyperparameters,
    synthetic_splits,
    training_problem,
)
from studies.horizon.records import check_settings, read_record
from studies.scale.growth import Fit, best_fit, largest_steps

PROG = "python -m studies.scale"
OUT = "studies/scale/results"
OURS = (
    "rmd",
    "rmd(checkpoint_every='sqrt')",
    "rmd(checkpoint_every='auto')",
    "mixed_rmd",
    "mixed_rmd(checkpoint_every='sqrt')",
    "mixed_rmd(checkpoint_every='sqrt', product='double_backward')",
)
SUBLINEAR = (
    "rmd(checkpoint_every='sqrt')",
    "rmd(checkpoint_every='auto')",
    "mixed_rmd(checkpoint_every='sqrt')",
    "mixed_rmd(checkpoint_every='sqrt', product='double_backward')",
)
"""The forms whose memory grows with sqrt(T): the ones run at ``--sublinear-steps`` too."""
PEERS = {"higher": "higher innerloop_ctx", "torchopt": "TorchOpt sgd (functional)"}
METHODS = (*OURS, *PEERS)
REFERENCE = "rmd"
TOLERANCE = 1e-10
"""The largest relative difference to ``rmd`` allowed in float64 before any measurement."""
BUDGET_BYTES = 16 * 2**30
MIB = 2**20
SEED = 0
ORDER_SEED = 100_000  # the horizon study's batch order of search seed 0 (its ORDER_SEED0 + 1000 * seed)
MIN_TIMED_CPU = 10.0
"""Timed runs stop once their CPU seconds add up to this (at least one run)."""


# ---------------------------------------------------------------------------------------------------------------------
# the hypergradients
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every hypergradient of a study shares: the data (on the device), the network's settings, the start."""

    splits: Splits
    cnn: CNNSettings
    lr_init: float
    wd_init: float
    device: torch.device
    peers: dict[str, Any]


def _on(splits: Splits, device: torch.device, dtype: torch.dtype) -> Splits:
    def move(pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return pair[0].to(device, dtype), pair[1].to(device)

    return Splits(move(splits.train), move(splits.val), move(splits.test))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hypergradient(bench: Bench, method: str, steps: int) -> Callable[[], list[Tensor]]:
    """One hypergradient of ``method`` at horizon ``steps``, as a call: it builds the problem and returns the
    gradients of ``log_lr`` and ``log_wd`` (the batch order and the starting hyperparameters are made here, once)."""
    cnn = replace(bench.cnn, steps=steps)
    order = batch_order(len(bench.splits.train[1]), cnn, ORDER_SEED).to(bench.device)
    start = start_hyperparameters(cnn, bench.lr_init, bench.wd_init)
    h = [x.detach().to(bench.device).requires_grad_() for x in start]
    if method == "higher":
        return lambda: higher_hypergradient(bench, cnn, order, h)
    if method == "torchopt":
        return lambda: torchopt_hypergradient(bench, cnn, order, h)
    from lightning_hypergrad import get_estimator

    estimator = get_estimator(method)

    def ours() -> list[Tensor]:
        problem = training_problem(bench.splits, cnn, SEED, order, h)
        problem.init_params = [p.to(bench.device) for p in problem.init_params]  # the network is built on the CPU
        return list(estimator(problem, check=False).hypergrads)

    return ours


def higher_hypergradient(bench: Bench, cnn: CNNSettings, order: Tensor, h: list[Tensor]) -> list[Tensor]:
    """higher's unrolled differentiable SGD, one parameter group per layer, its settings the hyperparameters."""
    higher = bench.peers["higher"]
    log_lr, log_wd = h
    net = network(cnn, SEED).to(bench.device)
    opt = torch.optim.SGD(
        [{"params": list(getattr(net, layer).parameters())} for layer in LAYERS], lr=1.0, momentum=cnn.momentum
    )
    override = {
        "lr": [log_lr[i, 0].exp() for i in range(len(LAYERS))],
        "weight_decay": [log_wd[i].exp() for i in range(len(LAYERS))],
    }
    (x, y), (xv, yv) = bench.splits.train, bench.splits.val
    with higher.innerloop_ctx(net, opt, copy_initial_weights=True, track_higher_grads=True, override=override) as (
        fnet,
        diffopt,
    ):
        for t in range(cnn.steps):
            rows = order[t]
            diffopt.step(F.cross_entropy(fnet(x[rows]), y[rows]))
        loss = F.cross_entropy(fnet(xv), yv)
        return list(torch.autograd.grad(loss, h))


def torchopt_hypergradient(bench: Bench, cnn: CNNSettings, order: Tensor, h: list[Tensor]) -> list[Tensor]:
    """TorchOpt's functional SGD, one per layer (its rate a tensor); the weight decay as the step loss's L2 term."""
    torchopt = bench.peers["torchopt"]
    log_lr, log_wd = h
    net = network(cnn, SEED).to(bench.device)
    names = [name for name, _ in net.named_parameters()]
    layer_of = [LAYERS.index(name.split(".")[0]) for name in names]
    groups = [[k for k, layer in enumerate(layer_of) if layer == i] for i in range(len(LAYERS))]
    rates, decays = log_lr[:, 0].exp(), log_wd.exp()
    optimizers = [
        torchopt.sgd(lr=rates[i], momentum=cnn.momentum, moment_requires_grad=True) for i in range(len(LAYERS))
    ]
    params = [p.detach().requires_grad_() for p in net.parameters()]
    states = [opt.init(tuple(params[k] for k in group)) for opt, group in zip(optimizers, groups)]
    (x, y), (xv, yv) = bench.splits.train, bench.splits.val

    def call(ws: Sequence[Tensor], inputs: Tensor) -> Tensor:
        return torch.func.functional_call(net, dict(zip(names, ws)), (inputs,))

    for t in range(cnn.steps):
        rows = order[t]
        penalty = sum(0.5 * decays[layer] * p.square().sum() for p, layer in zip(params, layer_of))
        loss = F.cross_entropy(call(params, x[rows]), y[rows]) + penalty
        grads = torch.autograd.grad(loss, params, create_graph=True)
        new = list(params)
        for i, (opt, group) in enumerate(zip(optimizers, groups)):
            ps = tuple(params[k] for k in group)
            updates, states[i] = opt.update(tuple(grads[k] for k in group), states[i], params=ps, inplace=False)
            for k, p in zip(group, torchopt.apply_updates(ps, updates, inplace=False)):
                new[k] = p
        params = new
    return list(torch.autograd.grad(F.cross_entropy(call(params, xv), yv), h))


def relative_difference(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``max |a - b| / max |b|`` over all entries."""
    num = max(float((x - y).abs().max()) for x, y in zip(a, b))
    den = max(float(y.abs().max()) for y in b)
    return num / den if den > 0 else num


def agreement(bench: Bench, methods: Sequence[str], steps: int) -> list[dict[str, Any]]:
    """Each method's hypergradient against ``rmd``'s at ``steps`` in float64: its relative difference."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        bench64 = replace(bench, splits=_on(bench.splits, bench.device, torch.float64))
        reference = hypergradient(bench64, REFERENCE, steps)()
        return [
            {"method": m, "relative_difference": relative_difference(hypergradient(bench64, m, steps)(), reference)}
            for m in methods
            if m != REFERENCE
        ]
    finally:
        torch.set_default_dtype(previous)


def loadavg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (``/proc/loadavg``), where there are."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def _status_bytes(key: str) -> int | None:
    """A ``kB`` line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, where there is one."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_before() -> int | None:
    """The resident size now, after giving the heap's free memory back to the OS (glibc's ``malloc_trim``) and
    resetting the high-water mark (``None`` where Linux's ``/proc`` cannot). Without the trim, memory that an earlier
    run freed stays resident, and a later run that reuses it shows no growth: the allocator meter's event buffer of
    ``rmd(checkpoint_every='auto')`` at T = 3,000, run after the sqrt form's, read 0.6 GiB where it took 6, and the
    prediction from it let T = 10,000 run out of memory."""
    from studies.common import _LIBC

    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo``, where there is one."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def measure(bench: Bench, method: str, steps: int, meter_name: str, repeats: int) -> dict[str, Any]:
    """The record of one ``(method, T)``: its peak memory (the first run), then the seconds of timed runs; beside
    them, how much the process's resident size grew in the metered run (the meter's own event buffer included)."""
    run = hypergradient(bench, method, steps)
    meter = memory_meter(bench.device, meter_name)
    load_before = loadavg()
    resident = resident_before()
    wall, cpu = time.perf_counter(), time.process_time()
    peak = meter.measure(run)
    meter_wall, meter_cpu = time.perf_counter() - wall, time.process_time() - cpu
    high = _status_bytes("VmHWM")
    metered_resident = None if resident is None or high is None else max(0, high - resident)
    walls: list[float] = []
    cpus: list[float] = []
    while len(walls) < repeats and sum(cpus) < MIN_TIMED_CPU:
        _synchronize(bench.device)
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        _synchronize(bench.device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {
        "method": method,
        "T": steps,
        "peak_bytes": int(peak),
        "seconds": statistics.median(walls),
        "cpu_seconds": statistics.median(cpus),
        "timed_runs": len(walls),
        "metered_seconds": meter_wall,
        "metered_cpu_seconds": meter_cpu,
        "metered_resident_bytes": metered_resident,
        "loadavg": {"before": load_before, "after": loadavg()},
        "meter": meter.description,
    }


# ---------------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------------


def add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    """The CNN problem's data and shapes (the timing study shares them)."""
    parser.add_argument("--data", choices=("omniglot", "synthetic"), default="omniglot",
                        help="omniglot (default), or generated images of the same shapes (for tests)")  # fmt: skip
    parser.add_argument("--root", default=None, help="Omniglot's folder (default $OMNIGLOT_ROOT, else the usual)")
    parser.add_argument("--characters", type=int, default=50, help="classes (default 50)")
    parser.add_argument("--size", type=int, default=28, help="image side (default 28)")
    parser.add_argument("--width", type=int, default=8, help="channels of the first convolution (default 8)")
    parser.add_argument("--batch", type=int, default=32, help="mini-batch size (default 32)")


def build_parser() -> argparse.ArgumentParser:
    parser = StudyParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("run", "report"), default="run",
                        help="run: the missing records, then the report (default); report: no run")  # fmt: skip
    parser.add_argument("--out", type=writable_folder, default=OUT, help=f"results folder (default {OUT})")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000], help="T of every method (10 100 1000)")
    parser.add_argument("--sublinear-steps", type=int, nargs="*", default=[30, 300, 3000, 10000],
                        help="T of the checkpointed forms only (30 300 3000 10000)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                        help=f"of {', '.join(METHODS)} (default: all)")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="skip a run predicted to take more CPU seconds (default 120)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at most (default 3)")
    parser.add_argument("--check-steps", type=int, default=10, help="T of the float64 agreement check (default 10)")
    add_problem_arguments(parser)
    parser.add_argument("--momentum", type=float, default=0.9, help="inner SGD momentum (default 0.9)")
    parser.add_argument("--lr-init", type=float, default=0.03, help="every layer's learning rate (default 0.03)")
    parser.add_argument("--wd-init", type=float, default=1e-4, help="every layer's weight decay (default 1e-4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--memory", choices=MEMORY_METHODS, default="auto",
                        help="peak-memory meter (default auto: the allocator's on CPU, CUDA's on a GPU)")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--peers-dir", default=".peers", help="where higher and TorchOpt are (default .peers)")
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser and its checked arguments (an ``--out`` that cannot be written refused by the parser)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    require_positive(parser, args, "steps", "repeats", "check_steps", "characters", "width", "batch", "threads")
    if args.sublinear_steps:
        require_positive(parser, args, "sublinear_steps")
    if len(set(args.methods)) != len(args.methods):
        parser.error("--methods names a method twice")
    if REFERENCE not in args.methods:
        parser.error(f"--methods must include {REFERENCE} (the reference of the agreement check and of the ratios)")
    if args.size < 7:
        parser.error(f"--size must be at least 7 pixels (two stride-2 convolutions), got {args.size}")
    if not 0 <= args.momentum < 1 or args.lr_init <= 0 or args.wd_init <= 0 or args.max_seconds <= 0:
        parser.error("--momentum must be in [0, 1); --lr-init, --wd-init and --max-seconds above 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA device here")
    if args.memory == "cuda" and args.device != "cuda" or args.memory == "rss":
        parser.error(f"--memory {args.memory} is not for this study on --device {args.device}: use auto or allocator")
    return parser, args


def command(args: argparse.Namespace) -> str:
    """The ``run`` command of these arguments: the options that differ from their defaults (``--out`` too)."""
    words = [PROG, "run"]
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value != action.default:
            shown = value if isinstance(value, list) else [value]
            words += [action.option_strings[0], *(shlex.quote(str(v)) for v in shown)]
    return " ".join(words)


def meter_name(args: argparse.Namespace) -> str:
    if args.memory != "auto":
        return args.memory
    return "cuda" if args.device == "cuda" else "allocator"


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a record depends on besides its method and T (a record made with others is refused)."""
    cnn = _cnn(args)
    return {
        **{k: v for k, v in cnn.as_dict().items() if k != "steps"},
        "data": args.data,
        "lr_init": args.lr_init,
        "wd_init": args.wd_init,
        "init_seed": SEED,
        "order_seed": ORDER_SEED,
        "dtype": "float32",
        "threads": args.threads,
        "device": args.device,
        "memory": meter_name(args),
    }


def _cnn(args: argparse.Namespace) -> CNNSettings:
    return CNNSettings(args.characters, args.size, args.width, 1, args.batch, args.momentum, 1)


def record_path(out: Path, method: str, steps: int) -> Path:
    return out / "records" / f"{method.replace(' ', '')}-T{steps}.json"


def agreement_path(out: Path) -> Path:
    return out / "agreement.json"


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """``(method, T)`` in the order they run: by T, every method at ``--steps``, the checkpointed ones at
    ``--sublinear-steps`` too."""
    horizons = sorted({*args.steps, *args.sublinear_steps})
    return [
        (method, steps)
        for steps in horizons
        for method in args.methods
        if steps in args.steps or (steps in args.sublinear_steps and method in SUBLINEAR)
    ]


def load_records(args: argparse.Namespace) -> dict[tuple[str, int], dict[str, Any]]:
    """Every record in ``<out>/records/`` (whatever T), by ``(method, T)``; one of other settings is refused."""
    expected, found = settings(args), {}
    for path in sorted((Path(args.out) / "records").glob("*.json")):
        if path.name.startswith("."):  # a record being written (studies.common.atomic_path)
            continue
        data = read_record(path)
        check_settings(path, data, expected)
        found[(data["method"], data["T"])] = data
    return found


def predicted(records: dict[tuple[str, int], dict[str, Any]], method: str, steps: int, key: str) -> float | None:
    """``key`` of ``method``'s record at its largest T below ``steps`` that has it, times the ratio of the horizons."""
    below = [t for (m, t), r in records.items() if m == method and t < steps and r.get(key) is not None]
    if not below:
        return None
    done = records[(method, max(below))]
    return done[key] * steps / done["T"]


def predicted_cpu_seconds(records: dict[tuple[str, int], dict[str, Any]], method: str, steps: int) -> float | None:
    """The metered CPU seconds of ``method`` at its largest T below ``steps``, times the ratio of the horizons."""
    return predicted(records, method, steps, "metered_cpu_seconds")


def skip_reason(
    records: dict[tuple[str, int], dict[str, Any]], method: str, steps: int, max_seconds: float, available: int | None
) -> str | None:
    """Why ``(method, T)`` is not run (``None``: it is): its metered run predicted to take more than ``max_seconds``
    CPU seconds, or to grow the process by more than half of the ``available`` memory (the allocator meter keeps
    every allocation event of the call: at T = 3000 ``mixed_rmd(checkpoint_every='sqrt')``'s took 19 GB)."""
    seconds = predicted_cpu_seconds(records, method, steps)
    if seconds is not None and seconds > max_seconds:
        return f"predicted {seconds:.0f} CPU s > --max-seconds {max_seconds:g}"
    resident = predicted(records, method, steps, "metered_resident_bytes")
    if resident is not None and available is not None and resident > available / 2:
        return (
            f"its metered run predicted to grow the process by {resident / 2**30:.1f} GiB (the meter's event buffer), "
            f"more than half of the {available / 2**30:.1f} GiB available"
        )
    return None


def skipped_path(out: Path) -> Path:
    return out / "skipped.json"


def read_skipped(args: argparse.Namespace) -> dict[str, str]:
    """The runs the last ``run`` skipped, ``"<method> T=<T>"`` -> why (refused if made with other settings)."""
    path = skipped_path(Path(args.out))
    if not path.exists():
        return {}
    data = read_record(path)
    check_settings(path, data, settings(args))
    return data["runs"]


def _splits(args: argparse.Namespace) -> Splits:
    cnn = _cnn(args)
    if args.data == "synthetic":
        return synthetic_splits(cnn)
    return load_splits(omniglot_root(args.root), cnn)


def _peers(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    wanted = [m for m in args.methods if m in PEERS]
    if not wanted:
        return {}, {}
    from studies.peers.study import import_peers

    found, missing = import_peers(args.peers_dir)
    return {k: v for k, v in found.items() if k in wanted}, {k: v for k, v in missing.items() if k in wanted}


def agreement_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {**settings(args), "check_steps": args.check_steps, "dtype": "float64"}


def read_agreement(args: argparse.Namespace) -> dict[str, Any] | None:
    """``agreement.json`` (``None`` where there is none; refused if made with other settings)."""
    path = agreement_path(Path(args.out))
    if not path.exists():
        return None
    data = read_record(path)
    check_settings(path, data, agreement_settings(args))
    return data


def check_agreement(
    args: argparse.Namespace, bench: Bench, methods: Sequence[str], missing: dict[str, str]
) -> dict[str, Any]:
    """``agreement.json`` with its missing methods computed and the peers ``missing`` noted as left out;
    ``SystemExit`` where a method differs from ``rmd`` by more than :data:`TOLERANCE`."""
    path = agreement_path(Path(args.out))
    data = read_agreement(args) or {"settings": agreement_settings(args), "reference": REFERENCE,
                                    "T": args.check_steps, "rows": []}  # fmt: skip
    have = {row["method"] for row in data["rows"]}
    todo = [m for m in methods if m != REFERENCE and m not in have]
    if todo or data.get("left_out") != missing:
        if todo:
            log(f"scale: float64 agreement with {REFERENCE} at T={args.check_steps}: {', '.join(todo)}")
            data["rows"] += agreement(bench, todo, args.check_steps)
        data["left_out"] = missing
        data["machine"] = machine_description(bench.device)
        write_json(path, data)
    for row in data["rows"]:
        if row["method"] in methods and not row["relative_difference"] <= TOLERANCE:
            raise SystemExit(
                f"error: {row['method']} differs from {REFERENCE} by {row['relative_difference']:.1e} (relative, "
                f"float64, T={args.check_steps}; tolerance {TOLERANCE:.0e}): it does not compute the same hypergradient"
            )
    return data


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    records = load_records(args)  # refuse before any work
    read_agreement(args)
    skipped = read_skipped(args)
    peers, missing = _peers(args)
    for reason in missing.values():
        log(f"note: {reason}: left out")
    methods = [m for m in args.methods if m not in missing]
    device = torch.device(args.device)
    bench = Bench(_on(_splits(args), device, torch.float32), _cnn(args), args.lr_init, args.wd_init, device, peers)
    check_agreement(args, bench, methods, missing)
    todo = [(m, t) for m, t in plan(args) if m in methods and (m, t) not in records]
    log(f"scale: {len(plan(args)) - len(todo)} measurements found; {len(todo)} to do")
    progress = Progress(len(todo), work=sum(t for _, t in todo) or None)
    for method, steps in todo:
        key = f"{method} T={steps}"
        why = skip_reason(records, method, steps, args.max_seconds, available_bytes())
        if why is not None:
            skipped[key] = why
            write_json(skipped_path(out), {"settings": settings(args), "runs": skipped})
            progress.step(f"{key}: skipped, {why}", work=steps)
            continue
        record = {**measure(bench, method, steps, meter_name(args), args.repeats), "settings": settings(args),
                  "machine": machine_description(device)}  # fmt: skip
        write_json(record_path(out, method, steps), record)
        records[(method, steps)] = record
        if skipped.pop(key, None) is not None:
            write_json(skipped_path(out), {"settings": settings(args), "runs": skipped})
        progress.step(
            f"{method} T={steps}: {record['peak_bytes'] / MIB:.1f} MiB, {record['seconds']:.2f} s "
            f"({record['cpu_seconds']:.2f} CPU s)",
            work=steps,
        )
    return report(args)


# ---------------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------------


def _label(method: str) -> str:
    return PEERS.get(method, f"`{method}`")


def _fit_text(chosen: Fit | None, fits: dict[str, Fit]) -> str:
    """``4.91 + 0.815 T MiB (rms 2.2e-16; sqrt: 0.32)``: the kept fit, its rms relative residual and the other's."""
    if chosen is None:
        return "two points: either model fits them"
    other = next(f for f in fits.values() if f.model != chosen.model)
    term = "T" if chosen.model == "linear" else "sqrt(T)"
    return (
        f"{chosen.a / MIB:.3g} + {chosen.b / MIB:.3g} {term} MiB (rms {chosen.residual:.2g}; "
        f"{other.model}: {other.residual:.2g})"
    )


def mib(nbytes: float) -> str:
    """MiB with one decimal from 10 MiB, else three significant digits."""
    value = nbytes / MIB
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def count(n: int) -> str:
    """``20,047`` below a million, else ``2.1e8``."""
    if n < 10**6:
        return f"{n:,}"
    mantissa, exponent = f"{n:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _largest_text(chosen: Fit | None, rows: dict[int, dict[str, Any]]) -> str:
    top = max(rows)
    if chosen is None:
        return f"- (largest run: T = {top:,})"
    bound = largest_steps(chosen, BUDGET_BYTES)
    if bound is None:
        return "no bound (no growth fitted)"
    if bound <= top:  # the runs went past 16 GiB: the bound lies between two of them
        return f"{count(bound)} (interpolated between runs)"
    return f"{count(bound)} (extrapolated from T <= {top:,})"


def fits_of(records: dict[tuple[str, int], dict[str, Any]], method: str) -> tuple[Fit | None, dict[str, Fit]] | None:
    rows = {t: r for (m, t), r in records.items() if m == method}
    if len(rows) < 2:
        return None
    horizons = sorted(rows)
    return best_fit(horizons, [rows[t]["peak_bytes"] for t in horizons])


def peak_table(records: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """Each method's peak MiB at every T of the records (``-``: not run), its fitted growth and the largest T within
    16 GiB (docs/scale.md shows it too)."""
    horizons = sorted({t for _, t in records})
    lines = [
        "| method | " + " | ".join(f"T = {t:,}" for t in horizons) + " | growth (fit) | largest T within 16 GiB |",
        "|---|" + "---:|" * len(horizons) + "---|---|",
    ]
    for method in [m for m in METHODS if any(k[0] == m for k in records)]:
        rows = {t: r for (m, t), r in records.items() if m == method}
        cells = [mib(rows[t]["peak_bytes"]) if t in rows else "-" for t in horizons]
        fitted = fits_of(records, method)
        growth, largest = ("-", "-") if fitted is None else (_fit_text(*fitted), _largest_text(fitted[0], rows))
        lines.append(f"| {_label(method)} | " + " | ".join(cells) + f" | {growth} | {largest} |")
    return lines


def markdown(
    args: argparse.Namespace, records: dict[tuple[str, int], dict[str, Any]], agreed: dict[str, Any] | None
) -> str:
    """The report: the agreement, the peaks with their fits, the seconds, and the notes (what was not run, why)."""
    missing: dict[str, str] = agreed.get("left_out", {}) if agreed else {}
    skipped = read_skipped(args)
    horizons = sorted({t for _, t in records})
    methods = [m for m in METHODS if any(k[0] == m for k in records)]
    head = "| method | " + " | ".join(f"T = {t:,}" for t in horizons)
    rule = "|---|" + "---:|" * len(horizons)
    lines = [
        "# Memory against T: how far each exact method scales",
        "",
        "The horizon study's CNN (`python -m studies.horizon cnn`'s problem), one hypergradient of the per-layer log "
        "learning rates and weight decays, float32, "
        f"{records[next(iter(records))]['settings']['threads'] if records else args.threads} thread(s). "
        f"Command: `{command(args)}` (records: `{Path(args.out) / 'records'}`).",
        "",
    ]
    if agreed:
        lines += [
            f"## Agreement with `{REFERENCE}` (float64, T = {agreed['T']})",
            "",
            "| method | largest difference / largest entry |",
            "|---|---:|",
            *(f"| {_label(r['method'])} | {r['relative_difference']:.1e} |" for r in agreed["rows"]),
            "",
        ]
    lines += [
        "## Peak memory (MiB) against T, the fitted growth and the largest T within 16 GiB",
        "",
        *peak_table(records),
    ]
    reference = {t: r for (m, t), r in records.items() if m == REFERENCE}

    def seconds_table(key: str, title: str) -> list[str]:
        out = [title, "", head + " |", rule]
        for method in methods:
            cells = []
            for t in horizons:
                r = records.get((method, t))
                if r is None:
                    cells.append("-")
                elif t in reference and method != REFERENCE:
                    cells.append(f"{r[key]:.3g} ({r[key] / reference[t][key]:.2f}x)")
                else:
                    cells.append(f"{r[key]:.3g}")
            out.append(f"| {_label(method)} | " + " | ".join(cells) + " |")
        return out

    lines += [""] + seconds_table(
        "cpu_seconds", f"## CPU seconds of one hypergradient (ratio to `{REFERENCE}`'s at the same T)"
    )
    lines += [""] + seconds_table("seconds", f"## Wall-clock seconds (ratio to `{REFERENCE}`'s)")
    loads = [x for r in records.values() for x in (r["loadavg"]["before"], r["loadavg"]["after"]) if x]
    not_run = [(m, t) for m, t in plan(args) if m not in missing and (m, t) not in records]
    notes = ["", "## Notes", ""]
    if records:
        any_record = next(iter(records.values()))
        notes.append(
            f"- Memory: {any_record['meter']}; MiB = 2^20 bytes. The data and the batch order (T x batch indices, made "
            "before the call) are not counted; the building of the problem and the network is."
        )
        notes.append(
            "- Seconds: the median of the timed runs after the metered one (up to "
            f"{args.repeats}, fewer once they add up to {MIN_TIMED_CPU:.0f} CPU seconds); CPU seconds are the "
            "process's (`time.process_time`), less sensitive than the wall clock to other jobs on the machine."
        )
        if loads:
            low, high = min(x[0] for x in loads), max(x[0] for x in loads)
            notes.append(
                f"- /proc/loadavg (1 min) during the runs: {low:.2f} to {high:.2f} on {any_record['machine']}; the "
                "times are indicative where the load exceeds the cores."
            )
    notes.append(
        "- Growth: each method's peaks fitted by least squares on the relative residuals with a + b T and with "
        "a + b sqrt(T), the one with the smaller rms relative residual kept (the other's in the parentheses); the "
        "largest T within 16 GiB solves the kept fit for 16 GiB (extrapolated from the runs, far beyond them where b "
        "is small)."
    )
    for method, steps in not_run:
        why = skipped.get(f"{method} T={steps}")
        notes.append(f"- {_label(method)} at T = {steps:,}: not run ({f'skipped: {why}' if why else 'no record yet'}).")
    for reason in missing.values():
        notes.append(f"- Left out: {reason}.")
    return "\n".join(lines + notes) + "\n"


def report(args: argparse.Namespace) -> int:
    """``<out>/scale.md`` from the records found (and ``agreement.json``); records of other settings are refused."""
    records = load_records(args)
    agreed = read_agreement(args)
    text = markdown(args, records, agreed)
    write_text(Path(args.out) / "scale.md", text)
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    _, args = parse_args(argv)
    if args.action == "report":
        return report(args)
    try:
        with run_alone(args.out):  # a second run on the same --out would measure the same records
            return run(args)
    except KeyboardInterrupt:
        log("interrupted; the records written so far stay: rerun the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
