"""Test setup: the Triton interpreter on machines without a GPU, seeded inputs, the device.

TRITON_INTERPRET must be set before triton is imported (it is read when a kernel is
decorated), so it is set here, at collection, before any test module imports ``kernels``.
On a CUDA machine it is left alone and the kernels are compiled for real.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> str:
    from kernels._common import interpreted

    return "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """The plain test command runs every benchmark once as a smoke test, timing nothing;
    ``--benchmark-only`` (or ``--benchmark-enable``) times them for real."""
    option = config.option
    if not getattr(option, "benchmark_only", False) and not getattr(option, "benchmark_enable", False):
        option.benchmark_disable = True
