"""The reduction alone: iwae_bound on [B, k] log-weights, k from 1 to 10**6 (on CUDA)."""

import pytest

from iwae_bench.harness.cell import reduction_log_weights
from iwae_bench.pytest_bench import (REDUCTION_SHAPES, bench_device, group, is_interpreted,
                                     reduction_extra_info, variant_id)
from iwae_bench.variants import REDUCTIONS, reset_compiled

SHAPES = REDUCTION_SHAPES[bench_device().type]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"B={b}-k={k}" for b, k in SHAPES])
@pytest.mark.parametrize("variant", list(REDUCTIONS.values()), ids=variant_id)
def test_reduction(benchmark, run_benchmark, variant, shape, bench_on, copy_gbps):
    batch, k = shape
    log_w = reduction_log_weights(batch, k, bench_on)  # realistic: about -150 nats
    if variant.compiles:
        reset_compiled()
    benchmark.group = group(variant, f"reduction-float32-B={batch}-k={k}")
    bound = run_benchmark(lambda: variant(log_w), is_interpreted(variant))
    benchmark.extra_info.update(reduction_extra_info(variant, log_w, bench_on, bound, copy_gbps))
    if variant.name != "naive":
        assert benchmark.extra_info["max_abs_err"] < 1e-3
