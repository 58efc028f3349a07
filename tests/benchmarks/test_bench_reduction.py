"""The reduction alone: iwae_bound on [B, k] log-weights, k from 1 to 10**6 (on CUDA)."""

import pytest

import kernels
from iwae_bench.pytest_bench import (REDUCTION_SHAPES, add_speed, bench_device,
                                     reduction_extra_info)
from iwae_bench.sweep import reduction_log_weights
from iwae_bench.variants import REDUCTIONS, reset_compiled

SHAPES = REDUCTION_SHAPES[bench_device().type]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B={b}-k={k}" for b, k in SHAPES])
@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_reduction(benchmark, run_benchmark, name, shape, bench_on, copy_gbps):
    batch, k = shape
    log_w = reduction_log_weights(batch, k, bench_on)  # realistic: about -150 nats
    if name == "compile":
        reset_compiled()
    reduce = REDUCTIONS[name]
    interpreted = name == "triton" and kernels.interpreted()
    benchmark.group = f"reduction-float32-B={batch}-k={k}"
    bound, median = run_benchmark(lambda: reduce(log_w), interpreted)
    benchmark.extra_info.update(reduction_extra_info(name, log_w, bench_on, bound, interpreted, copy_gbps))
    add_speed(benchmark.extra_info, median)
    if name != "naive":
        assert benchmark.extra_info["max_abs_err"] < 1e-3
