"""The decoder head: the output layer l = h W^T + b and the bound, every head variant, forward
and forward + backward (the logits exist for torch, compile and triton; never for fused_linear)."""

import pytest

from iwae_bench.harness.cell import Reference, bound_call
from iwae_bench.problems import make_inputs
from iwae_bench.pytest_bench import (bench_device, bound_extra_info, group, head_problems,
                                     is_interpreted, variant_id)
from iwae_bench.variants import HEADS, reset_compiled

PROBLEMS = head_problems(bench_device())


@pytest.fixture(scope="module", params=PROBLEMS,
                ids=[f"B={p.batch}-k={p.k}-H={p.hidden}-{p.dtype}" for p in PROBLEMS])
def problem_inputs(request, bench_on):
    inputs = make_inputs(request.param, bench_on)
    return request.param, inputs, Reference(inputs)


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
