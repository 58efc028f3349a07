"""The decoder head: the output layer l = h W^T + b and the bound, every head variant, forward
and forward + backward (the logits exist for torch, compile and triton; never for fused_linear)."""

import pytest

from iwae_bench.harness.cell import bound_call
from iwae_bench.pytest_bench import (bench_device, bound_extra_info, group, head_problems,
                                     is_interpreted, variant_id)
from iwae_bench.variants import HEADS, reset_compiled

from .conftest import problem_fixture

PROBLEMS = head_problems(bench_device())


problem_inputs = problem_fixture(PROBLEMS)


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("variant", list(HEADS.values()), ids=variant_id)
def test_head(benchmark, run_benchmark, problem_inputs, variant, mode, bench_on, copy_gbps):
    problem, inputs, ref = problem_inputs
    if variant.compiles:
        reset_compiled()
    benchmark.group = group(variant, f"head-{mode}-{problem.dtype}-B={problem.batch}-k={problem.k}-H={problem.hidden}")
    bound, _ = run_benchmark(bound_call(variant, inputs, mode), is_interpreted(variant))
    benchmark.extra_info.update(bound_extra_info(variant, problem, inputs, mode, bench_on, bound, ref,
                                                 copy_gbps))
    assert benchmark.extra_info["max_abs_err"] < 1e-4 * max(1.0, abs(benchmark.extra_info["bound_mean"]))
