"""Run by tests/test_reliability.py in 2 processes: BilevelModule's average across processes, with known inputs."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

import lightning_hypergrad as lh
from lightning_hypergrad.distributed import average_across_processes


class Probe(lh.BilevelModule):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3)
        self.register_buffer("constant", torch.arange(4, dtype=torch.float64))  # not a running statistic
        self.weight = nn.Parameter(torch.zeros(2))


def main(rank: int, port: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    module = Probe()
    trainer = SimpleNamespace(world_size=2, strategy=None)
    with torch.no_grad():
        module.norm.running_mean.fill_(1.0 + rank)  # 1 and 2: the mean is 1.5
        module.norm.running_var.fill_(2.0 + 4 * rank)  # 2 and 6: the mean is 4
        module.constant.add_(10 * rank)  # must stay different
    hypergrads = [torch.full((2,), 3.0 * (rank + 1)), torch.full((1,), -1.0 - rank, dtype=torch.float64)]
    averaged = average_across_processes(hypergrads, module, trainer)
    torch.save(
        {
            "hypergrads": averaged,
            "running_mean": module.norm.running_mean.clone(),
            "running_var": module.norm.running_var.clone(),
            "constant": module.constant.clone(),
        },
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
