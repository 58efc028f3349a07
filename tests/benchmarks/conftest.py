"""Fixtures of the benchmarks: the device, its copy bandwidth, and a synchronizing runner."""

import pytest
import torch

from iwae_bench.harness import machine
from iwae_bench.pytest_bench import bench_device


@pytest.fixture(scope="session")
def bench_on() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def copy_gbps(bench_on, request) -> float:
    if request.config.getoption("benchmark_disable", False):
        return 0.0  # a smoke run: no speed is reported, so no yardstick is needed
    return machine.copy_bandwidth_gbps(bench_on)


@pytest.fixture
def run_benchmark(benchmark, bench_on):
    """Time ``fn`` with pytest-benchmark: warmed up once first (compiles, autotunes), every call
    synchronized on CUDA so the times are device times; interpreted Triton runs one round."""

    def run(fn, interpreted: bool):
        def call():
            out = fn()
            if bench_on.type == "cuda":
                torch.cuda.synchronize(bench_on)
            return out

        out = call()
        if interpreted:
            benchmark.pedantic(call, rounds=1, iterations=1)
        else:
            benchmark(call)
        return out

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    # the record our report prints: device, driver, torch and triton versions, commit
    machine_info["iwae_bench"] = machine.describe(bench_device())


def problem_fixture(problems):
    """A module-scoped fixture over ``problems``: (problem, inputs on the device, its float64
    reference), built once per problem for all the variants and modes that use it."""
    from iwae_bench.harness.cell import Reference
    from iwae_bench.problems import make_inputs

    def ident(p):
        return f"B={p.batch}-k={p.k}" + (f"-H={p.hidden}" if p.hidden else f"-d={p.latent}") + f"-{p.dtype}"

    @pytest.fixture(scope="module", params=problems, ids=[ident(p) for p in problems])
    def problem_inputs(request, bench_on):
        inputs = make_inputs(request.param, bench_on)
        return request.param, inputs, Reference(inputs)

    return problem_inputs
