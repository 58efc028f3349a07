"""The registered variants against the float64 reference, and bad input everywhere."""

import math

import pytest
import torch

import kernels
from iwae_bench import reference, variants
from iwae_bench.problems import Problem, make_inputs
from iwae_bench.training import IWAELoss

from .helpers import assert_close, make_case

STABLE = ["torch", "compile", "triton", "fused"]


def test_registry_holds_both_families_with_their_flags():
    assert list(variants.VARIANTS) == ["naive", "blog", "torch", "compile", "triton", "fused"]
    assert list(variants.REDUCTIONS) == ["naive", "torch", "compile", "triton"]
    assert list(variants.HEADS) == ["torch", "compile", "triton", "fused_linear"]
    for family in variants.REGISTRY.values():
        for v in family.values():
            assert v.compiles == (v.name == "compile")
            assert v.uses_triton == (v.name in ("triton", "fused", "fused_linear"))
            assert v.bernoulli_only == v.iwae_only == (v.name == "blog")
    with pytest.raises(ValueError, match="unknown bound variant 'nope'"):
        variants.get("nope")
    with pytest.raises(ValueError, match="unknown reduction variant 'fused'"):
        variants.get("fused", "reduction")


@pytest.mark.parametrize("name", STABLE)
@pytest.mark.parametrize("problem", [
    Problem(batch=4, k=16, latent=8),
    Problem(batch=3, k=7, latent=50, dtype="bfloat16"),
    Problem(batch=3, k=5, latent=6, regime="saturated"),
], ids=["realistic-f32", "realistic-bf16", "saturated"])
def test_stable_variants_match_reference(name, problem, device):
    inputs = make_inputs(problem, device)
    got = variants.get(name)(*inputs)
    assert got.dtype == torch.float32 and got.shape == (problem.batch,)
    assert_close(got, reference.bound(*inputs), what=name)


@pytest.mark.parametrize("name", ["torch", "triton", "fused"])
def test_stable_variants_on_adversarial_inputs(name, device):
    for options in ({"logit_scale": 60.0}, {"noncontiguous": True}, {"binary": False}):
        inputs = make_case(3, 9, 50, 4, device=device, **options)
        assert_close(variants.get(name)(*inputs), reference.bound(*inputs), what=f"{name} {options}")


@pytest.mark.parametrize("name", variants.REDUCTIONS)
def test_reductions_match_reference(name, device):
    log_w = torch.randn(5, 37, device=device) * 3 - 2  # mild: naive is fine here too
    assert_close(variants.get(name, "reduction")(log_w), reference.iwae_bound(log_w), what=name)


@pytest.mark.parametrize("name", list(variants.HEADS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_variants_match_reference(name, dtype, device):
    """The decoder-head family against the float64 bound on logits built in float64 from h,
    weight and bias (rounded to the problem's dtype first, as every variant sees them)."""
    inputs = make_inputs(Problem(batch=3, k=7, latent=6, data_dim=40, dtype=dtype, hidden=24), device)
    got = variants.get(name, "head")(*inputs)
    assert got.dtype == torch.float32 and got.shape == (3,)
    want = reference.bound(inputs.x, inputs.logits(), inputs.z, inputs.mu, inputs.logvar)
    rtol, atol = (2e-5, 2e-3) if dtype == "float32" else (2e-3, 0.5)  # bf16 logits: rounded matmul
    assert_close(got, want, rtol=rtol, atol=atol, what=f"{name} {dtype}")


def test_naive_and_blog_equal_reference_where_finite(device):
    # small D and mild logits: the weights stay inside float32's range and BCE's clamp
    inputs = make_case(4, 10, 8, 3, logit_scale=2.0, device=device)
    for name in ("naive", "blog"):
        got = variants.get(name)(*inputs)
        assert torch.isfinite(got).all()
        assert_close(got, reference.bound(*inputs), what=name)


def test_naive_underflows_at_realistic_scale_and_blog_does_not(device):
    inputs = make_inputs(Problem(batch=4, k=16, latent=50), device)
    want = reference.bound(*inputs)
    assert torch.isfinite(want).all() and (want < -110).all()  # exp(-110) < float32's tiniest
    assert (variants.get("naive")(*inputs) == float("-inf")).all()
    assert_close(variants.get("blog")(*inputs), want, what="blog")


def test_blog_is_wrong_where_sigmoid_saturates(device):
    """x = 0 and a logit of 30: float32 sigmoid is exactly 1, BCE's clamp gives -100 where the
    log-probability is -30, and the gradient through the saturated sigmoid is 0, not -1."""
    x = torch.zeros(1, 3, device=device)
    logits = torch.tensor([[[30.0, -2.0, 1.0]]], device=device)
    z, mu, logvar = torch.zeros(1, 1, 2, device=device), torch.zeros(1, 2, device=device), torch.zeros(1, 2, device=device)
    want = reference.bound(x, logits, z, mu, logvar).item()
    blog_value = variants.get("blog")(x, logits, z, mu, logvar).item()
    assert math.isclose(blog_value - want, -100 + 30, abs_tol=1e-3)
    for name in ("blog", "torch", "fused"):
        leaf = logits.clone().requires_grad_()
        variants.get(name)(x, leaf, z, mu, logvar).sum().backward()
        expected = -torch.sigmoid(logits.double())[0, 0, 0].item()  # d/dl log(1 - sigmoid(l))
        got = leaf.grad[0, 0, 0].item()
        if name == "blog":
            assert got == 0.0
        else:
            assert math.isclose(got, expected, rel_tol=1e-5)


# --------------------------------------------------------------------------- infinite logits

INF = float("inf")
# (x, logit) -> that pixel's log-likelihood under the rule (log sigmoid(+inf) = 0, 0 * inf = 0)
RULE = [(1.0, INF, 0.0), (0.0, -INF, 0.0), (0.0, INF, -INF), (1.0, -INF, -INF),
        (0.5, INF, -INF), (0.5, -INF, -INF)]


def _one_infinite_logit(x_value, logit, device):
    """Three samples of one example; sample 1 has one infinite logit, the others are finite."""
    x, logits, z, mu, logvar = make_case(1, 3, 6, 2, device=device)
    x[0, 0] = x_value
    logits[0, 1, 0] = logit
    return x, logits, z, mu, logvar


@pytest.mark.parametrize("x_value, logit, pixel", RULE, ids=lambda v: str(v))
def test_infinite_logits_follow_one_rule(x_value, logit, pixel, device):
    inputs = _one_infinite_logit(x_value, logit, device)
    x, logits, z, mu, logvar = inputs
    finite = logits.clone()
    finite[0, 1, 0] = 0.0
    # the reference: the sample with that pixel at logit 0 (log 1/2 whatever x), less log 1/2,
    # plus the rule's value for the pixel
    expected = reference.log_weights(x, finite, z, mu, logvar)[0, 1].item() - math.log(0.5) + pixel
    want_w = reference.log_weights(*inputs)
    assert not torch.isnan(want_w).any()
    assert math.isclose(want_w[0, 1].item(), expected, rel_tol=1e-12) or want_w[0, 1].item() == expected
    assert_close(kernels.log_weights(*inputs), want_w, what="kernels.log_weights")
    want = reference.bound(*inputs)
    for name in STABLE:
        assert_close(variants.get(name)(*inputs), want, what=name)


@pytest.mark.parametrize("x_value, logit, pixel", RULE, ids=lambda v: str(v))
@pytest.mark.parametrize("name", ["torch", "fused", "triton"])
def test_infinite_logits_gradients_are_finite_and_match(name, x_value, logit, pixel, device):
    """Gradients with respect to logits, z, mu and logvar: finite, zero for a sample of
    weight zero, equal to float64 autograd of the reference. (The gradient with respect to x
    is left out: at an infinite logit the log-likelihood is not continuous in x.)"""
    x, *rest = _one_infinite_logit(x_value, logit, device)
    ours = [t.clone().requires_grad_() for t in rest]
    variants.get(name)(x, *ours).sum().backward()
    ref = [t.double().requires_grad_() for t in rest]
    reference.bound(x, *ref).sum().backward()
    for label, got, want in zip(["logits", "z", "mu", "logvar"], ours, ref):
        assert torch.isfinite(got.grad).all(), f"d/d{label} not finite"
        assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4, what=f"{name} d/d{label}")
    if pixel == -INF:
        assert (ours[0].grad[0, 1] == 0).all() and (ours[1].grad[0, 1] == 0).all()


def test_nan_logit_still_gives_nan(device):
    inputs = _one_infinite_logit(1.0, float("nan"), device)
    for name in STABLE:
        assert torch.isnan(variants.get(name)(*inputs)).all(), name


# --------------------------------------------------------------------------- bad input

ENTRY_POINTS = {
    "kernels.log_weights": kernels.log_weights,
    "kernels.fused_iwae_bound": kernels.fused_iwae_bound,
    **{f"variant {n}": variants.get(n) for n in variants.VARIANTS},
}


def _good():
    return dict(zip(["x", "logits", "z", "mu", "logvar"], make_case(3, 4, 10, 2)))


def _with(**changes):
    inputs = _good()
    inputs.update(changes)
    return inputs


def _swapped():
    good = _good()
    good["logits"], good["z"] = good["z"], good["logits"]
    return good


BAD_INPUTS = [
    pytest.param(_with(logits=torch.zeros(3, 10)), ValueError, r"logits must have shape \[B, k, D\] \(3 dims\), got shape \[3, 10\]", id="logits-2d"),
    pytest.param(_with(x=torch.zeros(4, 10)), ValueError, r"^x must have shape \[3, 10\] \(B, D\) to match .*; got \[4, 10\]$", id="x-batch"),
    pytest.param(_with(x=torch.zeros(3, 11)), ValueError, r"^x must have shape \[3, 10\] .*; got \[3, 11\]$", id="x-data-dim"),
    pytest.param(_with(z=torch.zeros(3, 5, 2)), ValueError, r"^z must have shape \[3, 4, 2\] \(B, k, d\) to match x \[3, 10\], logits \[3, 4, 10\], mu \[3, 2\] and logvar \[3, 2\]; got \[3, 5, 2\]$", id="z-k"),
    pytest.param(_with(z=torch.zeros(3, 2, 2)), ValueError, r"^z must have shape \[3, 4, 2\] .*; got \[3, 2, 2\]$", id="z-k-equal-to-d"),
    pytest.param(_swapped(), ValueError, r"^z must have shape \[3, 4, 2\] .*; got \[3, 4, 10\]$", id="z-logits-swapped"),
    pytest.param(_with(mu=torch.zeros(3, 3)), ValueError, r"^mu must have shape \[3, 2\] .*; got \[3, 3\]$", id="mu-latent"),
    pytest.param(_with(logvar=torch.zeros(2)), ValueError, r"logvar must have shape \[B, d\] \(2 dims\), got shape \[2\]", id="logvar-1d"),
    pytest.param(_with(logits=torch.zeros(3, 4, 10, dtype=torch.int64)), TypeError, r"logits must be a floating tensor .* got torch.int64", id="logits-int"),
    pytest.param(_with(x=torch.zeros(3, 10, dtype=torch.bool)), TypeError, r"x must be a floating tensor .* got torch.bool", id="x-bool"),
    pytest.param(_with(mu=[[0.0, 0.0]] * 3), TypeError, r"mu must be a torch.Tensor, got list", id="mu-list"),
    pytest.param(_with(logits=torch.zeros(3, 0, 10), z=torch.zeros(3, 0, 2)), ValueError, r"k must be >= 1: logits has shape \[3, 0, 10\]", id="k-0"),
    pytest.param(_with(z=torch.zeros(3, 4, 2, device="meta")), ValueError, r"z is on the meta device; the bound needs real data", id="one-on-meta"),
    pytest.param({n: t.to("meta") for n, t in _good().items()}, ValueError, r"x is on the meta device", id="all-on-meta"),
]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=str)
@pytest.mark.parametrize("inputs, error, message", BAD_INPUTS)
def test_bad_input_names_the_argument(entry, inputs, error, message):
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](**inputs)


def test_bad_log_weights_for_the_reduction():
    with pytest.raises(ValueError, match=r"k must be >= 1: log_w has shape \[4, 0\]"):
        kernels.iwae_bound(torch.zeros(4, 0))
    with pytest.raises(TypeError, match=r"log_w must be a floating tensor .* got torch.int32"):
        kernels.iwae_bound(torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"t must have at least one dimension"):
        kernels.logsumexp(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"log_w is on the meta device"):
        variants.get("torch", "reduction")(torch.zeros(4, 3, device="meta"))


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_loss_refuses_an_empty_batch(backend, device):
    inputs = make_case(1, 3, 5, 2, device=device)
    empty = [t[:0] for t in inputs]
    with pytest.raises(ValueError, match=r"IWAELoss needs a batch of at least one example: x has shape \[0, 5\]"):
        IWAELoss("iwae", backend)(*empty)


# --------------------------------------------------------------------------- the continuous likelihoods

LIKELIHOODS = ["continuous_bernoulli", "gaussian:sigma=0.1", "gaussian:pixel", "gaussian",
               "discretized_logistic", "discretized_logistic:pixel", "discretized_logistic:mix=3"]
KERNEL_LIKELIHOODS = [spec for spec in LIKELIHOODS if "mix" not in spec]


def _likelihood_case(spec: str, regime: str = "realistic", d: int = 3, device: str = "cpu"):
    """(inputs, likelihood): bound inputs with decoder outputs for ``spec`` (tests/test_likelihoods:
    realistic, or one example at the likelihood's trap) and a posterior beside them."""
    from .test_likelihoods import _draw, _trap

    x, logits, scale = (_draw if regime == "realistic" else _trap)(spec)
    B, k = logits.shape[:2]
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(B, d, generator=g), 0.3 * torch.randn(B, d, generator=g) - 1.0
    z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * torch.randn(B, k, d, generator=g)
    inputs = [x.float(), logits.float(), z, mu, logvar] + ([scale.float()] if scale is not None else [])
    return [t.to(device) for t in inputs], kernels.Likelihood.parse(spec)


def _want(inputs, likelihood):
    return reference.bound(*inputs[:5], likelihood, inputs[5] if len(inputs) > 5 else None)


@pytest.mark.parametrize("regime", ["realistic", "trap"])
@pytest.mark.parametrize("spec", LIKELIHOODS)
def test_torch_variant_matches_reference_on_every_likelihood(spec, regime):
    inputs, likelihood = _likelihood_case(spec, regime)
    got = variants.get("torch")(*inputs, likelihood=likelihood)
    assert got.dtype == torch.float32
    assert_close(got, _want(inputs, likelihood), what=f"torch {spec} {regime}")


def test_compile_variant_matches_reference_on_a_likelihood():
    """One likelihood (with a per-pixel scale, the argument the others lack): torch.compile
    takes ~6 s a likelihood on CPU."""
    inputs, likelihood = _likelihood_case("discretized_logistic:pixel")
    assert_close(variants.get("compile")(*inputs, likelihood=likelihood), _want(inputs, likelihood),
                 what="compile discretized_logistic:pixel")


@pytest.mark.parametrize("spec", LIKELIHOODS)
def test_torch_head_matches_reference_on_every_likelihood(spec):
    """The head family with C output channels: weight [C D, H], bias [C D]."""
    inputs, likelihood = _likelihood_case(spec)
    x, logits, z, mu, logvar, *scale = inputs
    g = torch.Generator().manual_seed(4)
    h = torch.tanh(torch.randn(*logits.shape[:2], 8, generator=g))
    weight = 0.05 * torch.randn(logits.shape[-1], 8, generator=g)
    bias = logits[0, 0]  # a decoder output of the right scale for each channel
    got = variants.get("torch", "head")(x, h, weight, bias, z, mu, logvar, *scale, likelihood=likelihood)
    want = reference.bound(x, h.double() @ weight.double().T + bias.double(), z, mu, logvar, likelihood,
                           *scale)
    assert_close(got, want, what=f"torch head {spec}")


def test_naive_log_weights_equal_reference_where_its_recipes_hold():
    """Mild decoder outputs (no trap: continuous Bernoulli logits within +-6, logistic means
    within a few scales of x): typical code gets every likelihood's log-weights right (its bound,
    with no max shift, underflows at these scales as the Bernoulli's does)."""
    for spec in LIKELIHOODS:
        inputs, likelihood = _likelihood_case(spec)
        parts = reference.channels(inputs[1], likelihood)
        if likelihood.name == "continuous_bernoulli":
            parts[0] = parts[0].clamp(-6.0, 6.0)
        elif likelihood.name == "discretized_logistic":
            L = likelihood.mixture
            for c in range(L if L > 1 else 0, 2 * L if L > 1 else 1):
                parts[c] = inputs[0][:, None] + 0.05 * (parts[c] - inputs[0][:, None])
        inputs[1] = torch.cat(parts, dim=-1)
        want = reference.log_weights(*inputs[:5], likelihood, *inputs[5:])
        got = variants.textbook_log_weights(*inputs[:5], likelihood, *inputs[5:])
        assert_close(got, want, rtol=1e-5, atol=1e-3, what=f"naive {spec}")


@pytest.mark.parametrize("spec, nats", [("continuous_bernoulli", 1.0), ("discretized_logistic", 0.5)])
def test_naive_variant_falls_into_each_trap(spec, nats):
    """At the traps typical code is wrong where the stable forms are not: torch.distributions'
    continuous Bernoulli clamps its probabilities (|l| = 80 costs ~1.6 nats in float32), and
    PixelCNN++'s mid-bin density patch misses bins 10 or more scales from the mean."""
    inputs, likelihood = _likelihood_case(spec, "trap")
    want = _want(inputs, likelihood)
    naive = variants.get("naive")(*inputs, likelihood=likelihood)
    stable = variants.get("torch")(*inputs, likelihood=likelihood)
    assert (naive.double() - want).abs().max() > nats
    assert_close(stable, want, what=f"torch {spec} trap")


def test_variants_refuse_likelihoods_they_do_not_compute():
    inputs, mixture = _likelihood_case("discretized_logistic:mix=3")
    for name in ("triton", "fused"):
        with pytest.raises(ValueError, match=rf"variant '{name}' computes the kernels, which take one logistic "
                                             r"per pixel .* not likelihood 'discretized_logistic:mix=3'"):
            variants.get(name)(*inputs, likelihood=mixture)
    gaussian_inputs, gaussian = _likelihood_case("gaussian")
    with pytest.raises(ValueError, match=r"variant 'blog' computes the Bernoulli likelihood only, not "
                                         r"likelihood 'gaussian'"):
        variants.get("blog")(*gaussian_inputs, likelihood=gaussian)
    with pytest.raises(TypeError, match=r"a reduction variant takes log_w alone"):
        variants.get("torch", "reduction")(torch.zeros(2, 3), likelihood=gaussian)
    assert not variants.get("blog").takes(gaussian) and variants.get("naive").takes(mixture)
    assert not variants.get("fused_linear", "head").takes(mixture) and variants.get("fused").takes(gaussian)


@pytest.mark.parametrize("family", ["bound", "head"])
def test_bad_likelihood_input_names_the_argument(family):
    inputs, pixel = _likelihood_case("gaussian:pixel")
    x, logits, z, mu, logvar, scale = inputs
    sample = kernels.Likelihood.parse("gaussian")
    if family == "bound":
        variant, args = variants.get("torch"), [x, logits, z, mu, logvar]
    else:
        h, weight = torch.zeros(*logits.shape[:2], 5), torch.zeros(logits.shape[-1], 5)
        variant, args = variants.get("torch", "head"), [x, h, weight, weight[:, 0], z, mu, logvar]
    with pytest.raises(ValueError, match=r"likelihood 'gaussian:pixel' needs scale, the per-pixel log-scale \[D\]"):
        variant(*args, likelihood=pixel)
    with pytest.raises(ValueError, match=r"scale must have shape \[24\] \(D\), got shape \[23\]"):
        variant(*args, scale=scale[:23], likelihood=pixel)
    with pytest.raises(ValueError, match=r"scale is for a likelihood with a per-pixel scale .* 'bernoulli' takes none"):
        variant(*args, scale=scale)
    name = "logits" if family == "bound" else "weight"
    with pytest.raises(ValueError, match=rf"{name} must hold 2 channels of D = 24 \(x's width\) for likelihood "
                                         r"'gaussian': 48 along dim \d, got shape"):
        variant(*args, likelihood=sample)
    with pytest.raises(ValueError, match=r"likelihood 'gauss': likelihood must be one of bernoulli, "):
        variant(*args, likelihood="gauss")


@pytest.mark.parametrize("spec", KERNEL_LIKELIHOODS)
@pytest.mark.parametrize("family, name", [("bound", "triton"), ("bound", "fused"), ("head", "triton"),
                                          ("head", "fused_linear")])
def test_kernel_variants_on_every_likelihood(family, name, spec, device):
    """The kernels' variants on every likelihood they take, realistic and at the traps, values
    and gradients (every input but x, and the per-pixel scale) against float64 autograd."""
    for regime in ("realistic", "trap"):
        inputs, likelihood = _likelihood_case(spec, regime, device=device)
        x, logits, z, mu, logvar, *scale = inputs
        if family == "head":
            g = torch.Generator().manual_seed(4)
            h = torch.tanh(torch.randn(*logits.shape[:2], 8, generator=g)).to(device)
            weight = (0.05 * torch.randn(logits.shape[-1], 8, generator=g)).to(device)
            leaves = [t.clone().requires_grad_() for t in (h, weight, logits[0, 0], z, mu, logvar, *scale)]
            logits64 = lambda p: p[0].double() @ p[1].double().T + p[2].double()  # noqa: E731
        else:
            leaves = [t.clone().requires_grad_() for t in (logits, z, mu, logvar, *scale)]
            logits64 = lambda p: p[0].double()  # noqa: E731
        got = variants.get(name, family)(x, *leaves, likelihood=likelihood)
        grads = torch.autograd.grad(got.sum(), leaves)
        ref = [t.detach().double().requires_grad_() for t in leaves]
        n = 3 if family == "head" else 1
        want = reference.bound(x, logits64(ref), *ref[n:n + 3], likelihood, *ref[n + 3:])
        assert_close(got, want, what=f"{name} {spec} {regime}")
        for got_grad, want_grad in zip(grads, torch.autograd.grad(want.sum(), ref)):
            assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4 * max(1.0, want_grad.abs().max().item()),
                         what=f"{name} {spec} {regime} gradient")


def test_every_variant_but_blog_takes_two_stochastic_layers():
    """The two-layer bound (per-sample prior p(h1|h2) and posterior q(h2|h1)) by each bound
    variant, naive in its textbook form (every parameter repeated to [B*k, d]), against float64
    (at D = 20 the naive one's exp does not underflow); blog refuses, naming why."""
    inputs = make_inputs(Problem(3, 5, 4, 20, layers=2))
    want = reference.bound(inputs.x, inputs.logits, inputs.z)
    for name in ("naive", "torch", "triton", "fused"):
        assert_close(variants.get(name)(inputs.x, inputs.logits, inputs.z), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"variant 'blog' computes one stochastic layer \(z, mu, logvar\), not 2"):
        variants.get("blog")(*inputs)
