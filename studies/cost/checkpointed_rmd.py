"""Plain RMD against checkpointed RMD (``rmd(checkpoint_every='sqrt')``): peak memory and time, side by side.

Run from the repository root::

    python -m studies.cost.checkpointed_rmd [--inner-steps 50 100 200] [--repeats N] [--threads N]
                                            [--device cpu|cuda] [--memory auto saved] [--out DIR]

The problem is the cost study's ``whole_network`` (:func:`studies.cost.estimators.make_whole_network_step`): every
weight of a small conv net is an inner parameter (5258 of them), the hyperparameters are a log weight decay per
entry, T steps of SGD with momentum 0.9, a train and a validation batch of 64 random 28x28 images; one outer step
is one estimator call and an Adam step on the log weight decays. The two estimators are ``rmd`` (memory O(P T)) and
``rmd(checkpoint_every='sqrt')`` (segments of K = ceil(sqrt(T)) steps, memory O(P (T/K + K))); they compute the
same hypergradient (``tests/test_checkpointed_rmd.py``).

Peak memory of one outer step after a warm-up one, with each meter of ``--memory``
(:func:`studies.common.memory_meter`; default ``auto``, the live tensor bytes from ``torch.profiler`` on CPU or the
CUDA allocator's peak on a GPU, and ``saved``, the bytes autograd saves for backward, which leaves out the stored
checkpoints). Time: the median of
``--repeats`` outer steps, the two estimators alternating round by round in one process after one warm-up step each,
so that a busy phase of a shared machine hits both alike. All memory passes come before the timing passes (as in
:mod:`studies.cost.estimators`).

Writes ``DIR/checkpointed_rmd.json`` (one record per estimator and T: ``estimator``, ``T``, ``K``,
``seconds_per_step``, and ``peak_bytes`` by meter: ``allocator``, ``cuda``, ``rss`` or ``saved``) and
``DIR/checkpointed_rmd.md`` (the table, with the ratios checkpointed / plain).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import lightning_hypergrad as lh
from studies.common import (
    MEMORY_METHODS,
    Progress,
    StudyParser,
    arm_rss_measurement,
    heap_reuse_for_timing,
    machine_description,
    memory_meter,
    run_alone,
    writable_folder,
    write_json,
    write_text,
)
from studies.cost.estimators import MIB, make_whole_network_step, synchronize

PLAIN = "rmd"
CHECKPOINTED = "rmd(checkpoint_every='sqrt')"
LOCK = ".checkpointed_rmd.lock"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = StudyParser(
        prog="python -m studies.cost.checkpointed_rmd", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[50, 100, 200], metavar="T")
    parser.add_argument("--repeats", type=int, default=5, metavar="N", help="timed outer steps per estimator and T")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument(
        "--memory", nargs="+", choices=MEMORY_METHODS, default=["auto", "saved"], help="peak-memory meters"
    )
    parser.add_argument(
        "--out", type=writable_folder, default="studies/cost/results", help="output folder (studies/cost/results)"
    )
    args = parser.parse_args(argv)
    if min(args.inner_steps) < 2 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--inner-steps must be >= 2, --repeats and --threads >= 1")
    return args


def resolved(method: str, device: torch.device) -> str:
    """The meter that ``--memory auto`` picks on ``device`` (see :func:`studies.common.memory_meter`)."""
    if method != "auto":
        return method
    return "cuda" if device.type == "cuda" else "allocator"


def measure_memory(spec: str, steps: int, device: torch.device, meter) -> int:
    step = make_whole_network_step(spec, steps, device)
    step()
    synchronize(device)
    peak = meter.measure(step)
    del step
    gc.collect()
    return peak


def alternating_seconds(steps: int, repeats: int, device: torch.device) -> dict[str, float]:
    """The median seconds per outer step of both estimators, timed in alternating rounds."""
    outer_steps = {spec: make_whole_network_step(spec, steps, device) for spec in (PLAIN, CHECKPOINTED)}
    for step in outer_steps.values():
        step()
        synchronize(device)
    seconds: dict[str, list[float]] = {spec: [] for spec in outer_steps}
    for round_index in range(repeats):
        order = list(outer_steps) if round_index % 2 == 0 else list(reversed(outer_steps))
        for spec in order:
            start = time.perf_counter()
            outer_steps[spec]()
            synchronize(device)
            seconds[spec].append(time.perf_counter() - start)
    return {spec: statistics.median(times) for spec, times in seconds.items()}


def markdown(records: list[dict], meters: dict[str, str], header: str) -> str:
    names = list(meters)
    lines = [
        header,
        "",
        "| T | K | plain s/step | checkpointed s/step | time ratio | "
        + " | ".join(f"plain MiB ({m}) | checkpointed MiB ({m}) | memory ratio ({m})" for m in names)
        + " |",
        "|---:|---:|---:|---:|---:|" + "---:|---:|---:|" * len(names),
    ]
    by_key = {(r["estimator"], r["T"]): r for r in records}
    for steps in sorted({r["T"] for r in records}):
        plain, ckpt = by_key[(PLAIN, steps)], by_key[(CHECKPOINTED, steps)]
        cells = [
            str(steps),
            str(ckpt["K"]),
            f"{plain['seconds_per_step']:.3f}",
            f"{ckpt['seconds_per_step']:.3f}",
            f"{ckpt['seconds_per_step'] / plain['seconds_per_step']:.2f}",
        ]
        for m in names:
            p, c = plain["peak_bytes"][m], ckpt["peak_bytes"][m]
            cells += [f"{p / MIB:.1f}", f"{c / MIB:.1f}", f"{c / p:.3f}" if p else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios: checkpointed / plain RMD at the same T. Memory meters:"]
    lines += [f"- {m}: {description}" for m, description in meters.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict]:
    wall_start = time.perf_counter()
    args = parse_args(argv)
    with run_alone(args.out, LOCK):  # a second run on the same --out would measure the same
        return measure(args, argv, wall_start)


def measure(args: argparse.Namespace, argv: Sequence[str] | None, wall_start: float) -> list[dict]:
    """Measures, prints the table and writes the record and the report; returns the records."""
    arm_rss_measurement()  # before any tensor exists; only --memory rss needs it (see studies.cost.estimators)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available")
    try:
        meters = {resolved(name, device): memory_meter(device, name) for name in args.memory}
    except ValueError as error:
        raise SystemExit(str(error)) from None
    sqrt_rmd = lh.get_estimator(CHECKPOINTED)
    records = {
        (spec, steps): {
            "problem": "whole_network",
            "estimator": spec,
            "T": steps,
            "K": steps if spec == PLAIN else sqrt_rmd.segment_length(steps),
            "peak_bytes": {},
        }
        for steps in args.inner_steps
        for spec in (PLAIN, CHECKPOINTED)
    }
    # units: each memory measurement (2 outer steps), then each T's timing of both estimators (2 x (1 + repeats)
    # outer steps); an outer step's work is its T
    memory, timing = 2, 2 * (1 + args.repeats)
    work = sum(args.inner_steps) * (2 * len(meters) * memory + timing)
    progress = Progress(len(meters) * len(records) + len(args.inner_steps), work)
    for steps in args.inner_steps:
        for name, meter in meters.items():
            for spec in (PLAIN, CHECKPOINTED):
                peak = measure_memory(spec, steps, device, meter)
                records[(spec, steps)]["peak_bytes"][name] = peak
                progress.step(f"memory ({name}) {spec} T={steps}: {peak / MIB:.1f} MiB", memory * steps)
    with heap_reuse_for_timing():
        for steps in args.inner_steps:
            timed = alternating_seconds(steps, args.repeats, device)
            for spec, seconds in timed.items():
                records[(spec, steps)]["seconds_per_step"] = seconds
            text = ", ".join(f"{spec} {seconds:.4f} s/step" for spec, seconds in timed.items())
            progress.step(f"time T={steps}: {text}", timing * steps)
            gc.collect()
    result = list(records.values())
    header = (
        "# Checkpointed RMD against plain RMD (whole_network)\n\n"
        "Command: `python -m studies.cost.checkpointed_rmd "
        + " ".join(argv if argv is not None else sys.argv[1:])
        + "`\n\n"
        + machine_description(device)
        + f"\n\ntiming: median of {args.repeats} outer steps per estimator, alternating, after 1 warm-up each; "
        f"checkpointed: `{CHECKPOINTED}` (K = ceil(sqrt(T)))"
    )
    table = markdown(result, {name: meter.description for name, meter in meters.items()}, header)
    print(table)
    out = Path(args.out)
    write_json(out / "checkpointed_rmd.json", result)
    write_text(out / "checkpointed_rmd.md", table)
    print(f"wrote {out / 'checkpointed_rmd.json'} and {out / 'checkpointed_rmd.md'}")
    print(f"total wall time: {time.perf_counter() - wall_start:.1f} s")
    return result


if __name__ == "__main__":
    main()
