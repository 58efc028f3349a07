"""kernels.logsumexp and kernels.iwae_bound against float64 torch.logsumexp."""

import math

import pytest
import torch

import kernels
from iwae_bench import reference

from .helpers import assert_close


@pytest.mark.parametrize("shape", [(7, 1), (5, 37), (3, 2500), (2, 3, 129), (1000, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).removeprefix("torch."))
def test_logsumexp_matches_reference(shape, dtype, device):
    t = (torch.randn(shape) * 20 - 150).to(dtype).to(device)
    got = kernels.logsumexp(t)
    assert got.dtype == torch.float32 and got.shape == shape[:-1]
    assert_close(got, torch.logsumexp(t.double(), dim=-1))


@pytest.mark.parametrize("k", [1, 7, 5000])
def test_iwae_bound_matches_reference(k, device):
    log_w = torch.randn(6, k, device=device) * 40 - 1e4  # log-weights near -1e4
    got = kernels.iwae_bound(log_w)
    assert_close(got, reference.iwae_bound(log_w))


def test_strided_views_read_in_place_and_copied(device):
    base = torch.randn(4, 6, 90, device=device) * 10
    over_k = base[:, 1, ::3]            # strided over k
    transposed = base.transpose(0, 1)   # leading dims that no single stride covers
    assert_close(kernels.iwae_bound(over_k), reference.iwae_bound(over_k))
    assert_close(kernels.logsumexp(transposed), torch.logsumexp(transposed.double(), -1))


def test_special_values_follow_torch(device):
    inf, nan = float("inf"), float("nan")
    t = torch.tensor([
        [-inf, -inf, -inf],      # all -inf -> -inf, never NaN
        [-inf, 0.0, -inf],       # -inf entries weigh nothing
        [1.0, inf, 2.0],         # +inf -> +inf
        [-inf, inf, -inf],
        [nan, 1.0, 2.0],         # NaN propagates
        [inf, nan, -inf],
        [-1e4, -1e4 - 1, -inf],  # far below zero, still finite
    ], device=device)
    assert_close(kernels.logsumexp(t), torch.logsumexp(t.double(), -1))
    assert_close(kernels.iwae_bound(t), torch.logsumexp(t.double(), -1) - math.log(3))


def test_empty_rows_give_minus_inf_like_torch(device):
    t = torch.empty(3, 0, device=device)
    assert torch.equal(kernels.logsumexp(t), torch.full((3,), float("-inf"), device=device))


@pytest.mark.parametrize("splits", [2, 7])
def test_split_k_reuses_one_ticket_buffer(splits, device):
    """Long rows split over several programs; the last ticket holder combines the partials.
    Two launches on one workspace: the tickets must be back at zero after each. Special-value
    rows go through the split too."""
    from kernels._common import SplitWorkspace, split_plan
    from kernels.lse import SPLIT_QUANTUM, logsumexp_forward

    t = torch.randn(5, 3000, device=device) * 30 - 1e3
    t[1] = float("-inf")
    t[2, 2999] = float("inf")
    t[3, 10] = float("nan")
    t[4, :2000] = float("-inf")
    plan = split_plan(5, 3000, torch.device(device), SPLIT_QUANTUM, splits)
    workspace = SplitWorkspace.allocate(5, plan, torch.device(device))
    for _ in range(2):
        out, lse = logsumexp_forward(t, offset=2.0, splits=splits, workspace=workspace)
        assert (workspace.ticket == 0).all()
        assert_close(lse, torch.logsumexp(t.double(), -1), what="lse")
        assert_close(out, torch.logsumexp(t.double(), -1) - 2.0, what="out")


@pytest.mark.parametrize("view", ["every-third-over-k", "transposed", "sliced-rows"])
def test_gradients_on_strided_views(view, device):
    """The backward reads t in place through its strides: gradients of views against float64."""
    base = torch.randn(6, 90, device=device) * 10 - 100
    make = {"every-third-over-k": lambda b: b[:, ::3], "transposed": lambda b: b.t(),
            "sliced-rows": lambda b: b[1::2, 5:70]}[view]
    leaf = base.clone().requires_grad_()
    weights = torch.randn(make(base).shape[0], device=device)
    (kernels.iwae_bound(make(leaf)) * weights).sum().backward()
    ref = base.double().requires_grad_()
    (reference.iwae_bound(make(ref)) * weights.double()).sum().backward()
    assert_close(leaf.grad, ref.grad, rtol=1e-4, atol=1e-6, what=f"d/dt through {view}")


def test_autotuning_keeps_only_configs_cuda_can_launch(monkeypatch):
    """An H200 failed the reduction's backward at B = 8, k = 100 000 with "invalid argument":
    the autotuner tried the one-column tile, 100 000 programs along the grid's second axis
    (CUDA allows 65 535). The pruning runs the launch's own grid on every config."""
    from kernels._common import GRID_LIMITS, Tunable, cdiv, fitting_configs
    from kernels.lse import _lse_backward

    grid = lambda m: (cdiv(8, m["BLOCK_R"]), cdiv(100_000, m["BLOCK_K"]))  # noqa: E731 (logsumexp_backward's)
    kept = fitting_configs(_lse_backward.tiling.configs, grid, {"R": 8, "K": 100_000})
    assert [c.kwargs["BLOCK_K"] for c in kept] == [8192, 4096, 2048, 1024, 256, 64, 16, 4]
    # the autotuner's hook: the tiling's pruning, then the limits, for the launch being tuned
    tunable = object.__new__(Tunable)
    tunable.tiling, tunable._grid = _lse_backward.tiling, grid
    assert tunable._prune(_lse_backward.tiling.configs, {"R": 8, "K": 100_000}) == kept
    with pytest.raises(ValueError, match="no tile launches this problem within CUDA's grid limits"):
        fitting_configs(_lse_backward.tiling.configs, lambda m: (1, GRID_LIMITS[1] + 1), {})
    # without autotuning the chosen tile is checked before the launch
    monkeypatch.setattr(Tunable, "meta", lambda self, sizes: {"BLOCK_R": 1, "BLOCK_K": 1})
    with pytest.raises(ValueError, match=r"_logsumexp_backward_kernel launch .* needs grid \(8, 100000\)"):
        _lse_backward.launch(grid, sizes={"K": 100_000})
