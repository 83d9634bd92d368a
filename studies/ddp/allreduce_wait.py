"""How long a small gloo all-reduce takes after a burst of computation: waited on (blocking) or polled.

    python -m studies.ddp --only allreduce              # 2 CPU processes, 19104 floats, 45 ms of work between

Two processes each compute for ``--busy`` seconds (matrix products), then all-reduce ``--numel`` floats,
``--repeats`` times; the all-reduce is either waited on (``dist.all_reduce``) or started asynchronously and polled
with ``work.is_completed()`` until done. The sizes default to those of ``examples/ddp_fewshot.py --width 32`` (the
backbone's hypergradient) and the time of its tasks per step. Reported (and written to ``OUT/allreduce_wait.txt``):
the median all-reduce time per process and per way, the ways alternating in rounds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from studies.common import Progress, write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the all-reduce measurement."""
    group = parser.add_argument_group("all-reduce wait (2 processes, gloo)")
    group.add_argument("--numel", type=int, default=19104)
    group.add_argument("--busy", type=float, default=0.045, help="seconds of computation before each all-reduce")
    group.add_argument("--repeats", type=int, default=20)
    group.add_argument("--allreduce-rounds", type=int, default=3, help="rounds of both ways (default 3)")
    group.add_argument("--port", type=int, default=0, help="the rendezvous port (default: a free one)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, args: argparse.Namespace, port: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    a = torch.randn(300, 300)
    x = torch.randn(args.numel)
    times: dict[str, list[float]] = {"blocking": [], "polled": []}
    progress = Progress(args.allreduce_rounds)
    for round_index in range(args.allreduce_rounds):
        for way in times:
            for _ in range(args.repeats):
                start = time.perf_counter()
                while time.perf_counter() - start < args.busy:
                    a @ a
                start = time.perf_counter()
                if way == "blocking":
                    dist.all_reduce(x)
                else:
                    work = dist.all_reduce(x, async_op=True)
                    while not work.is_completed():
                        pass
                    work.wait()
                times[way].append(time.perf_counter() - start)
        if rank == 0:
            progress.step(f"all-reduce round {round_index}: both ways, {args.repeats} times each (process 0)")
    results[rank] = {way: statistics.median(t) for way, t in times.items()}
    dist.destroy_process_group()


def run(args: argparse.Namespace, out: Path) -> list[str]:
    """Measures, prints one line per process and writes them to ``out/allreduce_wait.txt``; returns the lines."""
    port = args.port or free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, port, results), nprocs=2)
        lines = [
            f"process {rank}: blocking {results[rank]['blocking'] * 1e3:.2f} ms, "
            f"polled {results[rank]['polled'] * 1e3:.2f} ms"
            for rank in (0, 1)
        ]
    print("\n".join(lines))
    write_text(out / "allreduce_wait.txt", "\n".join(lines) + "\n")
    print(f"wrote {out / 'allreduce_wait.txt'}")
    return lines
