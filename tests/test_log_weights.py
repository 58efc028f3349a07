"""kernels.log_weights and kernels.fused_iwae_bound against the float64 reference."""

import pytest
import torch

import kernels
from iwae_bench import reference
from kernels._common import SplitWorkspace, split_plan
from kernels.fused_bound import SPLIT_QUANTUM, fused_iwae_forward
from kernels.logw import PROD_GROUP

from .helpers import assert_close, make_case

CASES = [
    # B, k, D, d, options
    pytest.param(3, 1, 784, 50, {}, id="k=1-D=784-d=50"),
    pytest.param(4, 37, 20, 1, {}, id="k=37-D=20-d=1"),
    pytest.param(2, 2048, 784, 50, {}, id="k=2048-D=784-d=50"),
    pytest.param(3, 19, 33, 200, {}, id="k=19-D=33-d=200"),
    pytest.param(3, 11, 130, 9, {"binary": False}, id="continuous-x"),
    pytest.param(2, 13, 784, 5, {"logit_scale": 60.0}, id="logits-60-log_w-1e4"),
    pytest.param(3, 21, 100, 7, {"dtype": torch.float16}, id="float16-logits"),
    pytest.param(3, 21, 784, 7, {"dtype": torch.bfloat16, "logit_scale": 30.0}, id="bfloat16-logits"),
    pytest.param(3, 17, 65, 6, {"noncontiguous": True}, id="noncontiguous"),
]


@pytest.mark.parametrize("B, k, D, d, options", CASES)
def test_log_weights_match_reference(B, k, D, d, options, device):
    inputs = make_case(B, k, D, d, device=device, **options)
    got = kernels.log_weights(*inputs)
    assert got.dtype == torch.float32 and got.shape == (B, k)
    assert_close(got, reference.log_weights(*inputs), what="log_w")


@pytest.mark.parametrize("B, k, D, d, options", CASES)
def test_fused_bound_matches_reference(B, k, D, d, options, device):
    inputs = make_case(B, k, D, d, device=device, **options)
    got = kernels.fused_iwae_bound(*inputs)
    assert got.dtype == torch.float32 and got.shape == (B,)
    assert_close(got, reference.bound(*inputs), what="bound")


@pytest.mark.parametrize("splits", [2, 5])
def test_fused_split_k_reuses_one_ticket_buffer(splits, device):
    """k split over several programs, partials combined by the last ticket holder. Two
    launches on one workspace (as the autotuner reruns a launch): the tickets must be back at
    zero after each, or the second launch combines too early and returns garbage."""
    inputs = make_case(3, 1200, 40, 8, device=device)
    want = reference.bound(*inputs)
    plan = split_plan(3, 1200, torch.device(device), SPLIT_QUANTUM, splits)
    workspace = SplitWorkspace.allocate(3, plan, torch.device(device))
    for _ in range(2):
        bound, lse, log_w = fused_iwae_forward(*inputs, save_log_w=True, splits=splits,
                                               workspace=workspace)
        assert (workspace.ticket == 0).all()
        assert_close(bound, want, what="bound")
        assert_close(log_w, reference.log_weights(*inputs), what="saved log_w")
        assert_close(lse, want + torch.log(torch.tensor(1200.0, dtype=torch.float64)), what="lse")


@pytest.mark.parametrize("entry", ["log_weights", "fused_iwae_bound"])
def test_product_groups_flush_past_the_group_length(entry, device):
    """D = 40 000: under the interpreter's 256-wide tiles a lane gathers 157 factors, more than
    one group of PROD_GROUP. At logits 0 every factor is 2, so a group left unflushed would
    overflow float32 (2**157) and a partial product not reset after a flush would be counted
    twice: log p(x|h) = -D log 2 exactly."""
    D = 40_000
    assert D // 256 > 2 * PROD_GROUP
    x, logits, z, mu, logvar = make_case(1, 2, D, 3, device=device)
    zeros = torch.zeros_like(logits)
    got = getattr(kernels, entry)(x, zeros, z, mu, logvar)
    latent = reference.log_standard_normal(z) - reference.log_diag_normal(z, mu, logvar)
    want = -D * torch.log(torch.tensor(2.0, dtype=torch.float64)) + latent
    if entry == "fused_iwae_bound":
        want = reference.iwae_bound(want)
    assert_close(got, want, rtol=1e-6, what=f"{entry} at logits 0")
    assert_close(getattr(kernels, entry)(x, logits, z, mu, logvar),
                 (reference.bound if entry == "fused_iwae_bound" else reference.log_weights)(x, logits, z, mu, logvar),
                 what=f"{entry} at random logits")


def test_non_finite_inputs(device):
    """NaN in one logit spoils that sample's weight and so its row's bound; a -inf weight
    (logit -inf at an on pixel) only drops that sample; a row of such samples is -inf."""
    x, logits, z, mu, logvar = make_case(3, 5, 12, 3, device=device)
    x[:, 0] = 1.0
    logits[0, 2, 0] = float("nan")
    logits[1, 3, 0] = float("-inf")
    logits[2, :, 0] = float("-inf")
    want_w = reference.log_weights(x, logits, z, mu, logvar)
    assert torch.isnan(want_w[0, 2]) and want_w[1, 3] == float("-inf")
    assert_close(kernels.log_weights(x, logits, z, mu, logvar), want_w, what="log_w")
    got = kernels.fused_iwae_bound(x, logits, z, mu, logvar)
    assert torch.isnan(got[0]) and torch.isfinite(got[1]) and got[2] == float("-inf")
    assert_close(got, reference.iwae_bound(want_w), what="bound")


def test_fused_bound_streams_k_100000(device):
    """The standard protocol's scale and beyond: k = 100 000 samples per example stream through
    the fused kernel (split over k, partials combined) with O(B) extra memory."""
    inputs = make_case(2, 100_000, 8, 2, logit_scale=3.0, device=device)
    assert_close(kernels.fused_iwae_bound(*inputs), reference.bound(*inputs), what="bound")


def test_realistic_d784_log_weights_are_float32_accurate_in_every_lane(device):
    """At MNIST scale (D = 784: a ragged last D-tile, log-weights near -700) every log-weight
    is within 2e-3 nats of float64, absolute: about what float32 sums of 784 terms allow, where
    the relative tolerance of the other tests would let 0.02 through. Caught: padded lanes
    (logit -65504) passing through a lane's running sum after it is non-zero, which rounds that
    lane at the scale of 32752 (0.02 nats here)."""
    from iwae_bench.problems import Problem, make_inputs

    inputs = make_inputs(Problem(4, 64, 50, 784, "float32", 0, "realistic"), torch.device(device))[:5]
    want = reference.log_weights(*(t.double() for t in inputs))
    assert_close(kernels.log_weights(*inputs), want, rtol=0.0, atol=2e-3, what="log_w")
    assert_close(kernels.fused_iwae_bound(*inputs), reference.iwae_bound(want), rtol=0.0, atol=2e-3,
                 what="bound")
