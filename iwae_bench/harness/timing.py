"""Timing and peak memory of one call, with the well-kept tools.

CUDA: ``triton.testing.do_bench`` (warm-up, L2 flushed before each run, device events,
quantiles 0.5/0.2/0.8). CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` at the
current torch thread count, quantiles over its measured blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_call(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.2) -> Timing:
    if device.type == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return Timing(p50, p20, p80)
    import numpy as np
    import torch.utils.benchmark as benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times_ms = np.asarray(measurement.times) * 1e3
    return Timing(float(np.median(times_ms)), float(np.percentile(times_ms, 20)),
                  float(np.percentile(times_ms, 80)))


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before it (CUDA).

    On CPU torch keeps no allocator statistics and the process high-water mark cannot be reset,
    so nothing honest can be said: None.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)
