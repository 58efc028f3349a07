"""The likelihood family (kernels/likelihood.py) through kernels.log_weights and the fused bound:
values and every gradient against the float64 reference, each likelihood in its own data domain
and in the regime of its numerical trap."""

import math

import pytest
import torch

import kernels
from iwae_bench import reference
from kernels import Likelihood, Reduction
from kernels.fused_bound import fused_iwae_forward

from .helpers import assert_close

SPECS = ["bernoulli", "continuous_bernoulli", "gaussian:sigma=0.3", "gaussian:pixel,floor=-3",
         "gaussian:sample,floor=-5", "discretized_logistic", "discretized_logistic:scale=0.05",
         "discretized_logistic:pixel,floor=-6"]


def levels(B, D, g):
    """Gray levels v in 0..255 with an MNIST-like background: a third of the pixels exactly 0,
    a few at 255 (the logistic's edge bins)."""
    v = torch.randint(0, 256, (B, D), generator=g).float()
    v[:, : D // 3] = 0.0
    v[:, D // 3: D // 3 + 3] = 255.0
    return v


def case(spec, B=2, k=5, D=300, d=3, seed=0, regime="realistic", device="cpu"):
    """(likelihood, inputs (x, out, z, mu, logvar), scale) in the likelihood's domain: decoder
    outputs at trained-model scales, or at the likelihood's trap (``saturated``). D = 300 is a
    full 256-column interpreter tile (the hot loop) and a ragged one."""
    lik = Likelihood.parse(spec)
    g = torch.Generator().manual_seed(seed)
    v = levels(B, D, g)
    x = {"bernoulli": (v > 100).float(), "discretized_logistic": v / 255 * 2 - 1}.get(lik.name, v / 255)
    noise = torch.randn(B, k, lik.channels * D, generator=g)
    if lik.name in ("bernoulli", "continuous_bernoulli"):
        out = 3.0 * noise
        if regime == "saturated":  # logits where the normalizer cancels, and where it is large
            out[..., ::2] = 1e-3 * noise[..., ::2]
            out[..., 1::4] = 80.0 * torch.sign(noise[..., 1::4])
    else:
        out = noise.clone()
        out[..., :D] = x[:, None, :] + 0.1 * noise[..., :D]
        if lik.channels == 2:  # log-variance near -4 / log-scale near -4.5, some under the floor
            out[..., D:] = (-4.5 if lik.name == "discretized_logistic" else -4.0) + 1.5 * noise[..., D:]
        if regime == "saturated":  # exact background pixels predicted exactly; far tails
            out[..., : D // 3] = 0.0 if lik.name == "gaussian" else -1.0
            out[:, :, D // 3 + 3: D // 2] = x[:, None, D // 3 + 3: D // 2] + 0.9
            if lik.channels == 2:
                out[..., D: D + D // 3] = -15.0 if lik.name == "gaussian" else -7.0
    z = torch.randn(B, k, d, generator=g)
    mu = 0.5 * torch.randn(B, d, generator=g)
    logvar = 0.3 * torch.randn(B, d, generator=g)
    scale = -4.0 + torch.randn(D, generator=g) if lik.needs_scale else None
    moved = tuple(t.to(device) for t in (x, out, z, mu, logvar))
    return lik, moved, (scale.to(device) if scale is not None else None)


def grads_against_reference(fn, ref_fn, inputs, scale, weight, what):
    """Value and every gradient of sum(weight * fn) against float64 autograd of ref_fn."""
    ours = [t.clone().requires_grad_() for t in inputs]
    ours_scale = scale.clone().requires_grad_() if scale is not None else None
    theirs = [t.double().requires_grad_() for t in inputs]
    theirs_scale = scale.double().requires_grad_() if scale is not None else None
    got, want = fn(*ours, ours_scale), ref_fn(*theirs, theirs_scale)
    assert_close(got, want, what=f"{what} value")
    (got * weight).sum().backward()
    (want * weight.double()).sum().backward()
    names = ["x", "out", "z", "mu", "logvar"] + (["scale"] if scale is not None else [])
    for name, a, b in zip(names, ours + [ours_scale], theirs + [theirs_scale]):
        assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * (1 + b.grad.abs().max().item()),
                     what=f"{what} d/d{name}")


@pytest.mark.parametrize("regime", ["realistic", "saturated"])
@pytest.mark.parametrize("spec", SPECS)
def test_log_weights_and_gradients(spec, regime, device):
    lik, inputs, scale = case(spec, regime=regime, device=device)
    weight = torch.randn(inputs[1].shape[:2], generator=torch.Generator().manual_seed(1)).to(device)
    grads_against_reference(
        lambda x, out, z, mu, logvar, s: kernels.log_weights(x, out, z, mu, logvar, likelihood=lik, scale=s),
        lambda x, out, z, mu, logvar, s: reference.log_weights(x, out, z, mu, logvar, lik, s),
        inputs, scale, weight, f"{spec} {regime} log_w")


@pytest.mark.parametrize("spec", SPECS[1:])
def test_fused_bound_and_gradients(spec, device):
    lik, inputs, scale = case(spec, k=6, seed=2, device=device)
    weight = torch.tensor([0.7, -1.3], device=device)
    grads_against_reference(
        lambda x, out, z, mu, logvar, s: kernels.fused_iwae_bound(x, out, z, mu, logvar, likelihood=lik, scale=s),
        lambda x, out, z, mu, logvar, s: reference.bound(x, out, z, mu, logvar, lik, s),
        inputs, scale, weight, f"{spec} bound")


@pytest.mark.parametrize("spec", ["gaussian:sample", "discretized_logistic", "continuous_bernoulli"])
def test_fused_split_k_and_family(spec, device):
    """The split path (partials combined by the last split) and a grouped, mixed reduction."""
    lik, inputs, scale = case(spec, B=1, k=12, seed=3, device=device)
    log_w = reference.log_weights(*inputs, lik, scale)
    bound, _, _ = fused_iwae_forward(*inputs, splits=3, likelihood=lik, scale=scale)
    assert_close(bound, reference.iwae_bound(log_w), what=f"{spec} split bound")
    family = Reduction(scale=0.5, groups=2, beta=0.25)
    got = kernels.fused_iwae_bound(*inputs, family, likelihood=lik, scale=scale)
    halves = log_w.view(1, 2, 6)
    want = (0.75 * ((torch.logsumexp(0.5 * halves, -1) - math.log(6)) / 0.5) + 0.25 * halves.mean(-1)).mean(-1)
    want = want.cpu()
    assert_close(got, want, what=f"{spec} family bound")


@pytest.mark.parametrize("spec", ["gaussian:sample", "discretized_logistic"])
def test_bfloat16_decoder_output(spec, device):
    """16-bit decoder outputs are read as they are: the reference on the same rounded values."""
    lik, (x, out, z, mu, logvar), scale = case(spec, seed=4, device=device)
    out16 = out.to(torch.bfloat16)
    got = kernels.log_weights(x, out16, z, mu, logvar, likelihood=lik, scale=scale)
    assert_close(got, reference.log_weights(x, out16.double(), z, mu, logvar, lik, scale), what=f"{spec} bf16")


def test_logistic_product_groups_past_64_tiles(device):
    """Each pixel's factor (1 + e^-|a|)(1 + e^-|b|) is near 4 when the mean sits on x at scale 1:
    65 tiles of them overflow float32 in one product of 64 tiles (4^64 = 2^128), so the
    logistic's groups must be 32 tiles long (``Likelihood.prod_group``)."""
    lik = Likelihood.parse("discretized_logistic")
    D = 65 * 256 + 7  # past 64 full interpreter tiles of 256 columns, and a ragged one
    g = torch.Generator().manual_seed(5)
    x = torch.randint(1, 255, (1, D), generator=g).float() / 255 * 2 - 1
    out = torch.cat([x[:, None, :].expand(1, 2, D), torch.zeros(1, 2, D)], dim=2)
    x, out = x.to(device), out.to(device)
    z, mu, logvar = (torch.zeros(shape, device=device) for shape in ((1, 2, 1), (1, 1), (1, 1)))
    want = reference.log_weights(x, out, z, mu, logvar, lik)
    assert torch.isfinite(want).all()
    assert_close(kernels.log_weights(x, out, z, mu, logvar, likelihood=lik), want, what="logistic, 66 tiles")


def test_bad_likelihood_inputs_are_named(device):
    lik, (x, out, z, mu, logvar), _ = case("gaussian:sample", device=device)
    with pytest.raises(ValueError, match="logits must hold 2 channels"):
        kernels.log_weights(x, out[..., :300], z, mu, logvar, likelihood=lik)
    with pytest.raises(ValueError, match="needs scale"):
        kernels.fused_iwae_bound(x, out[..., :300], z, mu, logvar, likelihood="gaussian:pixel")
    with pytest.raises(ValueError, match="scale is for a likelihood with a per-pixel scale"):
        kernels.log_weights(x, out, z, mu, logvar, likelihood=lik, scale=torch.zeros(300, device=device))
    with pytest.raises(ValueError, match="scale must have shape \\[300\\]"):
        kernels.log_weights(x, out[..., :300], z, mu, logvar, likelihood="gaussian:pixel", scale=torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="mixture runs on the torch backend"):
        kernels.log_weights(x, torch.zeros(2, 5, 6 * 300, device=device), z, mu, logvar, likelihood="discretized_logistic:mix=2")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        kernels.fused_iwae_bound(x, out, z, mu, logvar, likelihood="poisson")
    with pytest.raises(ValueError, match="floor must be finite"):
        Likelihood.parse("gaussian:sample,floor=nan")
