"""Timing and peak memory of one call, with the well-kept tools, and how noisy a timing is.

CUDA: ``triton.testing.do_bench`` (warm-up, L2 flushed before each run, device events), every
sample kept. CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` at the current torch
thread count, topped up to at least ``MIN_SAMPLES`` blocks when the calls are slow.

A timing reports its median and its 20th/80th percentiles over the samples; their ratio
``spread`` = p80 / p20 is the noise measure. On a quiet machine it stays near 1; another
process on the same cores stretches some samples and not others, and the ratio shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MIN_SAMPLES = 5      # samples (CPU: blocks of calls) a timing takes at least
NOISE_LIMIT = 1.5    # p80 / p20 above this is a noisy timing


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int

    @property
    def spread(self) -> float:
        """p80 / p20: 1 for perfectly repeatable samples."""
        return self.p80_ms / self.p20_ms if self.p20_ms > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.spread > NOISE_LIMIT

    @classmethod
    def from_samples(cls, samples_ms) -> "Timing":
        import numpy as np

        times = np.asarray(samples_ms, dtype=float)
        return cls(float(np.median(times)), float(np.percentile(times, 20)),
                   float(np.percentile(times, 80)), int(times.size))


def time_call(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.2) -> Timing:
    if device.type == "cuda":
        import triton.testing

        return Timing.from_samples(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="all"))
    import torch.utils.benchmark as benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(measurement.times)  # seconds per call, one per block
    while len(times) < MIN_SAMPLES:  # slow calls: a single block would hide any noise
        times += timer.timeit(measurement.number_per_run).times
    return Timing.from_samples([t * 1e3 for t in times])


def peak_extra_memory(fn: Callable[[], object], device: torch.device, compiled: bool = False) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before it.

    CUDA: the caching allocator's counters. CPU, where torch keeps no allocator statistics:
    the tensors torch ops create, counted by ``memory.AllocationTracker``; None for compiled
    code, whose allocations it cannot see.
    """
    if device.type != "cuda":
        if compiled:
            return None
        from .memory import cpu_peak_extra_memory

        return cpu_peak_extra_memory(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)
