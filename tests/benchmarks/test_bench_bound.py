"""The full bound from (x, logits, z, mu, logvar), every variant, forward and forward+backward.

    pytest tests/benchmarks --benchmark-only --benchmark-json=out.json
    pytest-benchmark compare            (groups put the variants of one shape side by side)
    python -m iwae_bench report --from-pytest-benchmark out.json DIR
"""

import pytest
import torch

import kernels
from iwae_bench.problems import make_inputs
from iwae_bench.pytest_bench import add_speed, bench_device, bound_extra_info, bound_problems
from iwae_bench.sweep import Reference
from iwae_bench.variants import VARIANTS, get, reset_compiled

PROBLEMS = bound_problems(bench_device())


@pytest.fixture(scope="module", params=PROBLEMS,
                ids=[f"B={p.batch}-k={p.k}-d={p.latent}-{p.dtype}" for p in PROBLEMS])
def problem_inputs(request, bench_on):
    inputs = make_inputs(request.param, bench_on)
    return request.param, inputs, Reference(inputs)


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_bound(benchmark, run_benchmark, problem_inputs, name, mode, bench_on, copy_gbps):
    problem, inputs, ref = problem_inputs
    variant = get(name)
    if name == "compile":
        reset_compiled()
    if mode == "forward":
        def fn():
            return variant(*inputs)
    else:
        x, *rest = inputs
        leaves = [t.detach().requires_grad_() for t in rest]

        def fn():
            bound = variant(x, *leaves)
            torch.autograd.grad(bound.sum(), leaves)
            return bound

    interpreted = variant.uses_triton and kernels.interpreted()
    benchmark.group = f"bound-{mode}-{problem.dtype}-B={problem.batch}-k={problem.k}-d={problem.latent}"
    bound, median = run_benchmark(fn, interpreted)
    benchmark.extra_info.update(bound_extra_info(name, problem, inputs, mode, bench_on, bound, ref,
                                                 interpreted, copy_gbps))
    add_speed(benchmark.extra_info, median)
    if name != "naive":  # a benchmark of wrong numbers is worth nothing
        assert benchmark.extra_info["max_abs_err"] < 1e-4 * max(1.0, abs(benchmark.extra_info["bound_mean"]))
