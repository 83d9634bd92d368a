"""Seconds per training step with Lightning's DDP on 2 CPU processes against 1 process, over the same meta-batch.

    python benchmarks/ddp_scaling.py                     # meta-batch 20, 5 rounds, one torch thread per process
    python benchmarks/ddp_scaling.py --rounds 3 --width 64 --json results/ddp/scaling.json

Each round runs ``examples/ddp_fewshot.py`` once with ``--devices 1`` and once with ``--devices 2`` (the order
alternates between rounds, so that a busy phase of a shared machine hits both alike) and takes the median step
time of each run (the first step, which warms up, excluded). The ratio of the two is reported per round, with the
median over the rounds; 0.5 is the ideal on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ddp_fewshot.py"


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
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    match = re.search(r"median seconds per step: ([0-9.]+)", out)
    if match is None:
        raise RuntimeError(f"no step time in the output of {' '.join(command)}:\n{out}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta-batch", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=32, help="channels of the backbone's blocks")
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--broadcast-buffers", action="store_true", help="DDP's buffer broadcast on (default off)")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    rounds = []
    for r in range(args.rounds):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        times = {devices: step_seconds(devices, args) for devices in order}
        rounds.append({"one": times[1], "two": times[2], "ratio": times[2] / times[1]})
        print(f"round {r}: 1 process {times[1]:.4f} s, 2 processes {times[2]:.4f} s, ratio {times[2] / times[1]:.3f}")
    ratios = [x["ratio"] for x in rounds]
    print(f"median ratio over {len(ratios)} rounds: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f})")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
