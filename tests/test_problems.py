"""The seeded problems of each likelihood (iwae_bench/problems.py): gray-level data as the
documentation says, decoder outputs at trained models' scales, each saturated regime at its
trap, the latent side shared by every likelihood, and the torch variant within float32 of the
float64 reference on all of them."""

from __future__ import annotations

import pytest
import torch

from iwae_bench import reference, variants
from iwae_bench.problems import SATURATED_FRACTION, Problem, make_inputs

from .helpers import assert_close

CONTINUOUS = ["continuous_bernoulli", "gaussian:sigma=0.1", "gaussian:pixel", "gaussian",
              "discretized_logistic", "discretized_logistic:pixel", "discretized_logistic:scale=0.01",
              "discretized_logistic:mix=3"]


def _problem(spec, regime="realistic", **sizes):
    sizes = {"batch": 4, "k": 8, "latent": 5, "data_dim": 784, **sizes}
    return Problem(**sizes, regime=regime, likelihood=spec)


@pytest.mark.parametrize("spec", CONTINUOUS)
def test_gray_level_data_and_decoder_outputs(spec):
    problem = _problem(spec)
    inputs = make_inputs(problem)
    likelihood = problem.likelihood_spec
    levels = likelihood.bins - 1
    x = inputs.x.double()
    v = (x + 1.0) / 2.0 * levels if likelihood.name == "discretized_logistic" else x * levels
    assert (v - v.round()).abs().max() < 1e-4  # on the 256 levels (to float32's rounding), both ends
    v = v.round()
    assert v.min() == 0 and v.max() == levels and inputs.x.min() == (-1.0 if "logistic" in spec else 0.0)
    assert 0.6 < (v == 0).double().mean() < 0.95  # MNIST-like: a background of exact zeros
    assert 0.2 < (v[v > 0] == levels).double().mean() < 0.6  # strokes at full intensity, the rest gray
    assert inputs.logits.shape == (4, 8, likelihood.channels * 784)
    assert (inputs.scale is not None) == likelihood.needs_scale
    log_px = reference.log_likelihood(inputs.x, inputs.logits, likelihood, inputs.scale) / 784
    assert torch.isfinite(log_px).all()
    # per pixel, what trained decoders reach: continuous densities above 0 nats, the logistic's
    # masses at 1 to 2 bits per dimension
    low, high = {"discretized_logistic": (-1.5, -0.4)}.get(likelihood.name, (0.3, 3.0))
    assert low < log_px.mean() < high, f"{spec}: {log_px.mean():.3f} nats per pixel"


def test_every_likelihood_shares_the_latent_side_and_the_pixels_on():
    bernoulli = make_inputs(_problem("bernoulli"))
    for spec in CONTINUOUS:
        inputs = make_inputs(_problem(spec))
        low = -1.0 if "logistic" in spec else 0.0
        assert torch.equal(inputs.x > low, bernoulli.x == 1.0), spec
        for name in ("z", "mu", "logvar"):
            assert torch.equal(getattr(inputs, name), getattr(bernoulli, name)), f"{spec} {name}"


def _pixels(inputs, channel: int):
    D = inputs.x.shape[1]
    return inputs.logits[..., channel * D:(channel + 1) * D]


def test_saturated_continuous_bernoulli_sits_in_the_taylor_band_and_at_80():
    problem = _problem("cb", "saturated", batch=16)
    logits = make_inputs(problem).logits
    band, far = (logits.abs() < 1e-3).double().mean(), (logits.abs() == 80.0).double().mean()
    for fraction in (band, far):  # half of the 2% each
        assert 0.3 * SATURATED_FRACTION < fraction < 0.7 * SATURATED_FRACTION


@pytest.mark.parametrize("spec", ["gaussian", "gaussian:pixel"])
def test_saturated_gaussian_collapses_onto_pixels_that_are_zero(spec):
    problem = _problem(spec, "saturated", batch=16)
    inputs = make_inputs(problem)
    log_var = _pixels(inputs, 1) if spec == "gaussian" else inputs.scale.expand(16, 8, 784)
    collapsed = log_var == -15.0
    assert collapsed.any() and (inputs.x[:, None].expand_as(log_var)[collapsed] == 0).all()
    assert (_pixels(inputs, 0)[collapsed].abs() < 1e-3).all()  # means on the data, to 1e-4
    log_px = reference.log_likelihood(inputs.x, inputs.logits, problem.likelihood_spec, inputs.scale)
    realistic = make_inputs(_problem(spec, batch=16))
    assert log_px.mean() > reference.log_likelihood(realistic.x, realistic.logits, problem.likelihood_spec,
                                                    realistic.scale).mean()  # the likelihood runs up


@pytest.mark.parametrize("spec", ["discretized_logistic", "discretized_logistic:scale=0.01",
                                  "discretized_logistic:mix=3"])
def test_saturated_logistic_bins_lie_where_the_sigmoid_difference_underflows(spec):
    """The means moved (every component's) are 10 to 40 scales from their bins, both edge
    bins among them with the mean inside [-1, 1]; float32's difference of sigmoids is 0 there."""
    problem = _problem(spec, "saturated", batch=16)
    inputs, realistic = make_inputs(problem), make_inputs(_problem(spec, batch=16))
    likelihood = problem.likelihood_spec
    L = likelihood.mixture
    first = L if L > 1 else 0
    x = inputs.x[:, None].expand(16, 8, 784)
    for c in range(first, first + L):
        mean = _pixels(inputs, c)
        moved = mean != _pixels(realistic, c)
        assert 0.5 * SATURATED_FRACTION < moved.double().mean() < 1.5 * SATURATED_FRACTION
        log_s = _pixels(inputs, c + L) if likelihood.scale == "sample" else torch.tensor(likelihood.log_scale)
        inv = torch.exp(-log_s)
        away = ((x - mean).abs() * inv)[moved]
        assert away.min() > 10.0 - 1e-3 and away.max() < 40.0 + 1e-3
        assert (moved & (x == -1.0) & (mean > x)).any() and (moved & (x == 1.0) & (mean < x)).any()
        half = likelihood.half_bin
        difference = torch.sigmoid((x - mean + half) * inv) - torch.sigmoid((x - mean - half) * inv)
        assert (difference[moved & (x.abs() < 1.0)] == 0.0).any()  # the naive difference is exactly 0
    assert torch.isfinite(reference.log_likelihood(inputs.x, inputs.logits, likelihood, inputs.scale)).all()


@pytest.mark.parametrize("regime", ["realistic", "saturated"])
@pytest.mark.parametrize("spec", CONTINUOUS)
def test_torch_variant_matches_reference_on_every_problem(spec, regime):
    if regime == "saturated" and spec == "gaussian:sigma=0.1":
        pytest.raises(ValueError, _problem, spec, regime)  # a fixed variance cannot collapse
        return
    problem = _problem(spec, regime, k=4)
    inputs = make_inputs(problem)
    want = reference.bound(*inputs[:5], problem.likelihood_spec, inputs.scale)
    got = variants.get("torch")(*inputs, likelihood=problem.likelihood_spec)
    assert_close(got, want, rtol=2e-6, atol=5e-3, what=f"torch {spec} {regime}")


@pytest.mark.parametrize("spec", ["continuous_bernoulli", "gaussian", "discretized_logistic:pixel"])
def test_head_problem_has_the_likelihoods_channels(spec):
    problem = Problem(3, 4, 5, 40, hidden=16, likelihood=spec)
    inputs = make_inputs(problem)
    likelihood = problem.likelihood_spec
    C = likelihood.channels
    assert inputs.weight.shape == (C * 40, 16) and inputs.bias.shape == (C * 40,)
    assert (inputs.scale is not None) == likelihood.needs_scale
    want = reference.bound(inputs.x, inputs.logits(), *inputs[4:7], likelihood, inputs.scale)
    got = variants.get("torch", "head")(*inputs, likelihood=likelihood)
    assert torch.isfinite(want).all()
    assert_close(got, want, what=f"head {spec}")


def test_problem_spells_its_likelihood_one_way_and_refuses_bad_ones():
    assert Problem(2, 3, 4, likelihood="logistic").likelihood == "discretized_logistic"
    assert Problem(2, 3, 4, likelihood="cb").likelihood == "continuous_bernoulli"
    assert Problem(2, 3, 4, likelihood="gaussian:sigma=0.1").likelihood == "gaussian:sigma=0.1"
    assert Problem(2, 3, 4).likelihood == "bernoulli"
    with pytest.raises(ValueError, match=r"^likelihood 'poisson': likelihood must be one of bernoulli, "):
        Problem(2, 3, 4, likelihood="poisson")
    with pytest.raises(ValueError, match=r"regime 'saturated' is a Gaussian's learned variance .* "
                                         r"'gaussian:sigma=0.1' has a fixed one"):
        Problem(2, 3, 4, regime="saturated", likelihood="gaussian:sigma=0.1")


def test_two_layer_problem_has_per_sample_latent_parameters_nested_over_k():
    """layers 2: (h1, h2) as kernels.Latent in z's place, h1 2 d wide with q(h1|x) per example
    and p(h1|h2) per sample, h2 d wide with q(h2|h1) per sample and a standard normal prior; the
    first k samples the same at a larger k (across the 64-sample noise blocks too); the
    logits and pixels those of the one-layer problem."""
    small, large = make_inputs(Problem(2, 3, 5, 20, layers=2)), make_inputs(Problem(2, 70, 5, 20, layers=2))
    h1, h2 = small.z
    assert small.mu is None and small.logvar is None
    assert h1.z.shape == h1.prior_mu.shape == h1.prior_logvar.shape == (2, 3, 10) and h1.mu.shape == (2, 10)
    assert h2.z.shape == h2.mu.shape == h2.logvar.shape == (2, 3, 5) and h2.prior_mu is None
    for a, b in zip(small.z, large.z):
        for p, q in zip(a, b):
            if p is not None:
                assert torch.equal(p, q if p.dim() == 2 else q[:, :3])
    one = make_inputs(Problem(2, 3, 5, 20))
    assert torch.equal(one.x, small.x) and torch.equal(one.logits, small.logits)
    log_w = reference.log_weights(small.x, small.logits, small.z)
    assert torch.isfinite(log_w).all() and (log_w != reference.log_weights(*one)).all()


def test_problem_refuses_bad_layers():
    with pytest.raises(ValueError, match="layers must be one of 1, 2, got 3"):
        Problem(2, 3, 4, layers=3)
    with pytest.raises(ValueError, match="layers 2 is a bound problem"):
        Problem(2, 3, 4, hidden=8, layers=2)
