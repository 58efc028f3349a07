"""Stochastic layers (kernels/latent.py): the latent side of the log-weights as a sum of Gaussian
terms whose parameters are per example, per sample or absent, against the float64 reference, in
the torch backend, the log-weight kernel and the fused bound, values and every gradient; the
one-layer call unchanged."""

import math

import pytest
import torch

import kernels
from iwae_bench import reference
from iwae_bench.training import bounds
from kernels import Latent

from .helpers import assert_close, make_case

B, K, D, D1, D2 = 3, 5, 12, 6, 4

# (posterior mu, logvar; prior mu, logvar) of each layer: "e" per example [B, d], "s" per sample
# [B, k, d], None absent
LAYOUTS = {
    "two-layer-vae": (("e", "e", "s", "s"), ("s", "s", None, None)),
    "per-sample-posterior": (("s", "s", None, None),),
    "prior-mean-only": (("e", "s", "e", None), ("e", "e", None, "s")),
    "one-layer-prior-logvar-only": (("e", "e", None, "s"),),
}


def _layers(layout, seed=0, k=K, device="cpu"):
    """Random layers of the layout: z ~ N(0, 1), parameters ~ 0.5 N(0, 1), float32 leaves,
    drawn on the CPU and moved to ``device`` (the kernels compiled on a GPU)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for kinds, d in zip(layout, (D1, D2)):
        shape = {"e": (B, d), "s": (B, k, d)}
        params = [None if c is None else 0.5 * torch.randn(shape[c], generator=g) for c in kinds]
        out.append(Latent(*(None if t is None else t.to(device) for t in (torch.randn(B, k, d, generator=g), *params))))
    return out


def _leaves(x, logits, layers):
    """(logits, every present layer tensor) as leaves that want a gradient."""
    tensors = [logits] + [t for layer in layers for t in layer if t is not None]
    return [t.detach().clone().requires_grad_() for t in tensors]


def _rebuild(leaves, layers):
    """The layers with their tensors replaced, in order, by ``leaves`` (after the logits)."""
    it = iter(leaves[1:])
    return [Latent(*(None if t is None else next(it) for t in layer)) for layer in layers]


def _check(compute, layout, reduce, k=K, device="cpu"):
    """compute(x, logits, layers) -> [B, k] or [B] on ``device`` against the reference in
    float64 on the CPU, value and the gradient of every tensor for a random cotangent."""
    x, logits = make_case(B, k, D, D1)[:2]
    layers = _layers(layout, k=k)
    ours_in = [t.to(device) for t in _leaves(x, logits, layers)]
    ours_in = [t.detach().requires_grad_() for t in ours_in]
    ref_in = [t.detach().cpu().double().requires_grad_() for t in ours_in]
    ours = compute(x.to(device), ours_in[0], _rebuild(ours_in, layers))
    want = reduce(reference.log_weights(x, ref_in[0], _rebuild(ref_in, layers)))
    assert_close(ours, want)
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((ours * cot.to(device)).sum(), ours_in)
    expected = torch.autograd.grad((want * cot.double()).sum(), ref_in)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, rtol=1e-4, atol=1e-4, what=f"gradient of input {i}")


PATHS = {
    "torch-log-weights": (lambda x, l, ls: bounds.log_weights(x, l, ls, backend="torch"), lambda w: w),
    "kernel-log-weights": (lambda x, l, ls: kernels.log_weights(x, l, ls), lambda w: w),
    "fused-bound": (lambda x, l, ls: kernels.fused_iwae_bound(x, l, ls), reference.iwae_bound),
    "fused-miwae": (lambda x, l, ls: kernels.fused_iwae_bound(x, l, ls, reduction=kernels.Reduction(groups=5)),
                    lambda w: reference.miwae_bound(w, 5, 1)),
    "torch-bound": (lambda x, l, ls: bounds.iwae_bound(x, l, ls), reference.iwae_bound),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
@pytest.mark.parametrize("path", PATHS, ids=list(PATHS))
def test_layers_match_the_float64_reference(path, layout, device):
    compute, reduce = PATHS[path]
    _check(compute, LAYOUTS[layout], reduce, device=device)


def test_per_example_gradients_sum_over_sample_blocks(device):
    """k = 70 walks several sample blocks (64 rows at most): the per-example parameters'
    gradients are sums over all of them."""
    compute, reduce = PATHS["fused-bound"]
    _check(compute, LAYOUTS["two-layer-vae"], reduce, k=70, device=device)


def test_the_reference_layer_is_the_two_densities():
    """log p(z) - log q(z) from torch.distributions, independently of the reference's algebra."""
    layer = _layers(LAYOUTS["two-layer-vae"])[0]
    z = layer.z.double()
    prior = torch.distributions.Normal(layer.prior_mu.double(), torch.exp(0.5 * layer.prior_logvar.double()))
    post = torch.distributions.Normal(layer.mu.double()[:, None], torch.exp(0.5 * layer.logvar.double())[:, None])
    want = (prior.log_prob(z) - post.log_prob(z)).sum(-1)
    assert_close(reference.log_latent(layer), want, rtol=1e-12, atol=1e-12)


def test_one_layer_is_todays_call_bit_for_bit(device):
    x, logits, z, mu, logvar = make_case(B, K, D, D1, device=device)
    one = [Latent(z, mu, logvar)]
    assert torch.equal(kernels.log_weights(x, logits, one), kernels.log_weights(x, logits, z, mu, logvar))
    assert torch.equal(kernels.fused_iwae_bound(x, logits, one), kernels.fused_iwae_bound(x, logits, z, mu, logvar))
    assert torch.equal(bounds.log_weights(x, logits, one), bounds.log_weights(x, logits, z, mu, logvar))
    assert torch.equal(reference.log_weights(x, logits, one), reference.log_weights(x, logits, z, mu, logvar))
    # the standard normal given explicitly takes the general path and agrees
    zero = torch.zeros_like(mu)
    explicit = [Latent(z, mu, logvar, zero, zero)]
    assert_close(kernels.fused_iwae_bound(x, logits, explicit), reference.bound(x, logits, z, mu, logvar))
    assert_close(bounds.log_weights(x, logits, explicit), reference.log_weights(x, logits, z, mu, logvar))


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_bad_layers_are_named(backend, device):
    x, logits = make_case(B, K, D, D1, device=device)[:2]
    layers = _layers(LAYOUTS["two-layer-vae"], device=device)
    bad = [layers[0], layers[1]._replace(mu=torch.zeros(B, K + 1, D2, device=device))]
    with pytest.raises(ValueError, match=r"layers\[1\]\.mu must have shape \[3, 4\] \(per example\) or \[3, 5, 4\]"):
        bounds.iwae_bound(x, logits, bad, backend=backend)
    with pytest.raises(ValueError, match=r"layers\[0\]\.z must have shape \[3, 5, d\]"):
        bounds.iwae_bound(x, logits, [layers[0]._replace(z=layers[0].z[:, :2])], backend=backend)
    with pytest.raises(ValueError, match="mu and logvar must be None"):
        bounds.iwae_bound(x, logits, layers, layers[0].mu, backend=backend)
    with pytest.raises(ValueError, match="kl='analytic' is the closed-form KL of one stochastic layer"):
        bounds.objective_bound(x, logits, layers, objective="multi_sample_elbo", backend=backend, kl="analytic")


def _head_case(device="cpu"):
    g = torch.Generator().manual_seed(6)
    x = make_case(B, K, D, D1)[0]
    head = (x, torch.randn(B, K, 8, generator=g), 0.3 * torch.randn(D, 8, generator=g), torch.randn(D, generator=g))
    return tuple(t.to(device) for t in head)


HEAD_PATHS = {
    "head-bound": (lambda *a: kernels.fused_linear_iwae_bound(*a), reference.iwae_bound),
    "head-log-weights": (lambda *a: kernels.fused_linear_log_weights(*a), lambda w: w),
    "head-torch-bound": (lambda *a: bounds.head_reduced_bound(*a), reference.iwae_bound),
}


@pytest.mark.parametrize("path", HEAD_PATHS, ids=list(HEAD_PATHS))
def test_the_fused_head_takes_layers(path, device):
    """The decoder's output layer fused in: values and the gradients of h, weight, bias and
    every layer tensor against float64 autograd through the reference."""
    compute, reduce = HEAD_PATHS[path]
    x, *head = _head_case(device)
    layers = _layers(LAYOUTS["two-layer-vae"], device=device)
    ours_in = _leaves(x, head[0], layers)[1:]
    head_in = [t.clone().requires_grad_() for t in head]
    ref_in = [t.detach().double().requires_grad_() for t in head_in + ours_in]
    ours = compute(x, *head_in, _rebuild([None] + ours_in, layers))
    logits64 = torch.nn.functional.linear(*ref_in[:3])
    want = reduce(reference.log_weights(x, logits64, _rebuild([None] + ref_in[3:], layers)))
    assert_close(ours, want)
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad((ours * cot.to(device)).sum(), head_in + ours_in)
    expected = torch.autograd.grad((want * cot.double()).sum(), ref_in)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, rtol=1e-4, atol=1e-4, what=f"gradient of input {i}")


def test_the_fused_head_names_bad_layers(device):
    x, h, weight, bias = _head_case(device)
    layers = _layers(LAYOUTS["two-layer-vae"], device=device)
    with pytest.raises(ValueError, match=r"layers\[0\]\.z must have shape \[3, 5, d\]"):
        kernels.fused_linear_iwae_bound(x, h, weight, bias, [layers[0]._replace(z=layers[0].z[:, :2])])
    with pytest.raises(ValueError, match=r"weight must have shape"):
        kernels.fused_linear_iwae_bound(x, h, weight[:, :3], bias, layers)


def test_latent_terms_sum_over_layers_in_log_space(device):
    """The two-layer log w is log p(x|h1) plus each layer's term: the kernels' likelihood-only
    path (d = 0) plus kernels/latent.py, nothing counted twice."""
    x, logits = make_case(B, K, D, D1, device=device)[:2]
    layers = _layers(LAYOUTS["two-layer-vae"], device=device)
    log_px = reference.log_likelihood(x, logits)
    parts = sum(reference.log_latent(layer) for layer in layers)
    assert_close(kernels.log_weights(x, logits, layers), log_px + parts)
    assert math.isfinite(float(parts.sum()))
