"""What the benchmark scripts print about the machine they ran on, and how they measure peak memory."""

from __future__ import annotations

import gc
import platform
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch


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


class PeakMemory(ABC):
    """Measures the peak memory that a call adds to what was in use before it."""

    description: str = ""

    @abstractmethod
    def measure(self, fn: Callable[[], None]) -> int:
        """Run ``fn`` once and return its peak memory in bytes above the starting point."""


class CudaPeak(PeakMemory):
    description = "CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus allocated before"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, fn: Callable[[], None]) -> int:
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

    def measure(self, fn: Callable[[], None]) -> int:
        from torch.profiler import ProfilerActivity, profile

        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak
