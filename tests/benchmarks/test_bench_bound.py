"""The full bound from (x, logits, z, mu, logvar), every variant, forward and forward+backward.

    pytest tests/benchmarks --benchmark-only --benchmark-json=results/runs/bench.json
    pytest-benchmark compare results/runs/bench.json   (groups put one shape's variants side by side)
    python -m iwae_bench report --from-pytest-benchmark results/runs/bench.json results/runs/bench

Under the Triton interpreter (a CPU) the Triton variants run once, as a correctness check:
their benchmark names end in -interpreted and their groups start with "interpreted:".
"""

import pytest

from iwae_bench.harness.cell import bound_call
from iwae_bench.pytest_bench import (bench_device, bound_extra_info, bound_problems, group,
                                     is_interpreted, variant_id)
from iwae_bench.variants import VARIANTS, reset_compiled

from .conftest import problem_fixture

PROBLEMS = bound_problems(bench_device())


problem_inputs = problem_fixture(PROBLEMS)


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=variant_id)
def test_bound(benchmark, run_benchmark, problem_inputs, variant, mode, bench_on, copy_gbps):
    problem, inputs, ref = problem_inputs
    if variant.compiles:
        reset_compiled()
    call = bound_call(variant, inputs, mode)
    benchmark.group = group(variant, f"bound-{mode}-{problem.dtype}-B={problem.batch}-k={problem.k}-d={problem.latent}")
    bound, _ = run_benchmark(call, is_interpreted(variant))
    benchmark.extra_info.update(bound_extra_info(variant, problem, inputs, mode, bench_on, bound, ref,
                                                 copy_gbps))
    if variant.name not in ("naive", "blog"):  # a benchmark of wrong numbers is worth nothing
        assert benchmark.extra_info["max_abs_err"] < 1e-4 * max(1.0, abs(benchmark.extra_info["bound_mean"]))
