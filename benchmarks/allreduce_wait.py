"""How long a small gloo all-reduce takes after a burst of computation: waited on (blocking) or polled.

    python benchmarks/allreduce_wait.py                  # 2 CPU processes, 19104 floats, 45 ms of work between

Two processes each compute for ``--busy`` seconds (matrix products), then all-reduce ``--numel`` floats, ``--repeats``
times; the all-reduce is either waited on (``dist.all_reduce``) or started asynchronously and polled with
``work.is_completed()`` until done. The sizes default to those of ``examples/ddp_fewshot.py --width 32`` (the
backbone's hypergradient) and the time of its tasks per step. Reported: the median all-reduce time per process and
per way, the ways alternating in rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    a = torch.randn(300, 300)
    x = torch.randn(args.numel)
    times: dict[str, list[float]] = {"blocking": [], "polled": []}
    for _ in range(args.rounds):
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
    results[rank] = {way: statistics.median(t) for way, t in times.items()}
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=19104)
    parser.add_argument("--busy", type=float, default=0.045, help="seconds of computation before each all-reduce")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=29541)
    args = parser.parse_args()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, results), nprocs=2)
        for rank in (0, 1):
            r = results[rank]
            print(f"process {rank}: blocking {r['blocking'] * 1e3:.2f} ms, polled {r['polled'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
