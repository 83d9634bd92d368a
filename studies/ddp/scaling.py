"""Seconds per training step with Lightning's DDP on 2 CPU processes against 1 process, over the same meta-batch.

    python -m studies.ddp --only scaling                 # meta-batch 20, 5 rounds, one torch thread per process
    python -m studies.ddp --only scaling --rounds 3 --width 64

Each round runs ``examples/ddp_fewshot.py`` once with ``--devices 1`` and once with ``--devices 2`` (the order
alternates between rounds, so that a busy phase of a shared machine hits both alike) and takes the median step
time of each run (the first step, which warms up, excluded). The ratio of the two is reported per round, with the
median over the rounds; 0.5 is the ideal on 2 cores. The record (``OUT/scaling_width<W>[_broadcast].json``, or
``--json PATH``) holds the settings and every round.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from studies.common import REPOSITORY, Progress, writable_file, write_json

EXAMPLE = REPOSITORY / "examples" / "ddp_fewshot.py"
SETTINGS = ("meta_batch", "steps", "rounds", "width", "inner_steps", "broadcast_buffers")
"""The options that the record's ``settings`` holds (with ``json``, the record's path as given)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the scaling measurement."""
    group = parser.add_argument_group("scaling (examples/ddp_fewshot.py on 1 and 2 processes)")
    group.add_argument("--meta-batch", type=int, default=20)
    group.add_argument("--steps", type=int, default=30, help="training steps per run")
    group.add_argument("--rounds", type=int, default=5)
    group.add_argument("--width", type=int, default=32, help="channels of the backbone's blocks")
    group.add_argument("--inner-steps", type=int, default=10)
    group.add_argument("--broadcast-buffers", action="store_true", help="DDP's buffer broadcast on (default off)")
    group.add_argument(
        "--json", type=writable_file, default=None, help="the record (default: OUT/scaling_width<W>[_broadcast].json)"
    )


def step_seconds(devices: int, args: argparse.Namespace) -> float:
    command = [
        sys.executable,
        str(EXAMPLE),
        "--devices", str(devices),
        "--meta-batch", str(args.meta_batch),
        "--steps", str(args.steps),
        "--width", str(args.width),
        "--inner-steps", str(args.inner_steps),
        "--threads", "1",
    ]  # fmt: skip
    if args.broadcast_buffers:
        command.append("--broadcast-buffers")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    out = done.stdout
    match = re.search(r"median seconds per step: ([0-9.]+)", out)
    if match is None:
        raise RuntimeError(f"no step time in the output of {' '.join(command)}:\n{out}")
    return float(match.group(1))


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measures ``args.rounds`` rounds, prints them and writes the record; returns it."""
    rounds = []
    progress = Progress(args.rounds)
    for r in range(args.rounds):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        times = {devices: step_seconds(devices, args) for devices in order}
        rounds.append({"one": times[1], "two": times[2], "ratio": times[2] / times[1]})
        text = f"round {r}: 1 process {times[1]:.4f} s, 2 processes {times[2]:.4f} s, ratio {times[2] / times[1]:.3f}"
        print(progress.line(text), flush=True)
    ratios = [x["ratio"] for x in rounds]
    print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f})")  # fmt: skip
    suffix = "_broadcast" if args.broadcast_buffers else ""
    path = args.json or str(out / f"scaling_width{args.width}{suffix}.json")
    record = {"settings": {name: getattr(args, name) for name in SETTINGS} | {"json": path}, "rounds": rounds}
    write_json(path, record, indent=1)
    print(f"wrote {path}")
    return record
