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
