"""The continuous likelihoods (kernels/likelihood.py): the float64 reference against scipy.stats
in float64 and, for the continuous Bernoulli's normalizer, against mpmath at 50 digits (with
torch.distributions.ContinuousBernoulli measured beside it: a peer to beat, not an oracle); the
torch backend in float32 against the reference, values and gradients, in every likelihood and
scale mode and at each likelihood's trap; the series/direct switches continuous."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

# scipy is a test extra (CI has it); a bare GPU image may not, and this file checks the oracle
scipy = pytest.importorskip("scipy")
from scipy import stats  # noqa: E402
from scipy.special import logsumexp as sp_logsumexp  # noqa: E402
import mpmath  # noqa: E402  (torch's sympy brings it; a test extra too)

from iwae_bench import reference  # noqa: E402
from iwae_bench.training import bounds  # noqa: E402
from kernels.likelihood import SERIES_BELOW, Likelihood  # noqa: E402

from .helpers import assert_close  # noqa: E402

F64 = torch.float64
HALF = 1.0 / 255.0  # half a bin of 8-bit data on [-1, 1]

# every likelihood and scale mode the torch backend and the reference share
MODES = ["continuous_bernoulli", "gaussian:sigma=0.1", "gaussian:pixel", "gaussian",
         "gaussian:floor=-5", "discretized_logistic", "discretized_logistic:pixel",
         "discretized_logistic:scale=0.02", "discretized_logistic:floor=-5",
         "discretized_logistic:mix=3", "discretized_logistic:bins=16"]


def _levels(shape, generator, bins=256, logistic=False):
    """Gray levels v / (bins - 1) in [0, 1] (a third exactly 0, as MNIST's background), or on
    the logistic's [-1, 1] grid."""
    v = torch.randint(0, bins, shape, generator=generator)
    v = torch.where(torch.rand(shape, generator=generator) < 0.33, 0, v).double()
    return 2.0 * v / (bins - 1) - 1.0 if logistic else v / (bins - 1)


def _draw(spec: str, B=3, k=4, D=24, seed=0):
    """Realistic decoder outputs for ``spec``: (x [B, D], logits [B, k, C D], scale [D] or None),
    float64 values that are exactly float32 (so both sides see the same inputs)."""
    lik = Likelihood.parse(spec)
    g = torch.Generator().manual_seed(seed)
    x = _levels((B, D), g, lik.bins, lik.name == "discretized_logistic")
    noise = lambda spread: spread * torch.randn(B, k, D, generator=g, dtype=F64)  # noqa: E731
    if lik.name == "continuous_bernoulli":
        parts = [8.0 * (2.0 * x[:, None] - 1.0) + noise(2.0)]
    else:
        log_s = -4.0 if lik.name == "gaussian" else -4.5
        L = lik.mixture
        means = [x[:, None] + noise(0.1) for _ in range(L)]
        scales = [log_s + noise(0.7) for _ in range(L)] if lik.scale == "sample" else []
        parts = ([noise(1.0) for _ in range(L)] if L > 1 else []) + means + scales
    scale = log_s + 0.7 * torch.randn(D, generator=g, dtype=F64) if lik.needs_scale else None
    logits = torch.cat(parts, dim=-1)
    return x.float().double(), logits.float().double(), None if scale is None else scale.float().double()


def _trap(spec: str, D=16, seed=1):
    """One example, one sample, at the likelihood's trap (x [1, D], logits [1, 1, C D], scale):
    Gaussian: pixels exactly 0, means within 1e-4 and log-variances at -15 (and +-20);
    continuous Bernoulli: logits at 0, +-1e-4, +-1e-2, +-80 and in (-1e-3, 1e-3);
    discretized logistic: bins 10 to 40 scales from the mean (F(a) - F(b) underflows in
    float32) on both sides, and both edge bins far from their means."""
    lik = Likelihood.parse(spec)
    g = torch.Generator().manual_seed(seed)
    if lik.name == "continuous_bernoulli":
        band = (torch.rand(D - 9, generator=g, dtype=F64) * 2 - 1) * 1e-3
        logits = torch.cat([torch.tensor([0.0, 1e-4, -1e-4, 1e-2, -1e-2, 80.0, -80.0, 0.4999, 0.5001],
                                         dtype=F64), band])
        x = torch.rand(D, generator=g, dtype=F64)
        return x[None].float().double(), logits[None, None].float().double(), None
    if lik.name == "gaussian":
        x = torch.zeros(D, dtype=F64)
        mean = 1e-4 * torch.randn(D, generator=g, dtype=F64)
        log_s = torch.full((D,), -15.0, dtype=F64)
        log_s[:2] = torch.tensor([20.0, -20.0])
    else:
        log_s = -4.5 + 0.3 * torch.randn(D, generator=g, dtype=F64)
        if lik.scale == "fixed":
            log_s = torch.full((D,), lik.log_scale, dtype=F64)
        away = (10.0 + 30.0 * torch.rand(D, generator=g, dtype=F64)) * torch.exp(log_s)
        side = torch.where(torch.arange(D) % 2 == 0, 1.0, -1.0).double()
        x = _levels((D,), g, lik.bins, logistic=True)
        x[:4] = torch.tensor([-1.0, -1.0, 1.0, 1.0])
        side[:4] = torch.tensor([1.0, -1.0, -1.0, 1.0])  # each edge bin with its mean inside and outside
        mean = x + side * away
    L = lik.mixture
    if L > 1:  # the components spread a little about the trap's mean, equal mixing logits
        parts = [torch.zeros(D, dtype=F64)] * L + [mean + 0.01 * c for c in range(L)] + [log_s] * L
    else:
        parts = [mean] + ([log_s] if lik.scale == "sample" else [])
    scale = log_s if lik.needs_scale else None
    x, logits = x[None].float().double(), torch.cat(parts)[None, None].float().double()
    return x, logits, None if scale is None else scale.float().double()


# --------------------------------------------------------------------------- the reference against scipy


def _scipy_logistic(x, mean, log_s, lik):
    """log of the bin's mass from scipy.stats.logistic: the edge bins by logcdf / logsf, the
    middle ones as a difference on the tail side of the mean (cdf below it, sf above), where
    both terms are accurate and the difference keeps its digits."""
    half = lik.half_bin
    x, mean, s = np.broadcast_arrays(*(np.asarray(t, dtype=np.float64) for t in (x, mean, np.exp(log_s))))
    dist = stats.logistic(loc=mean, scale=s)
    below = dist.cdf(x + half) - dist.cdf(x - half)
    above = dist.sf(x - half) - dist.sf(x + half)
    middle = np.log(np.where(x < mean, below, above))
    return np.where(x < half - 1, dist.logcdf(x + half), np.where(x > 1 - half, dist.logsf(x - half), middle))


def _mean_and_log_scale(logits, lik, scale):
    """The location channel and the log-scale (its channel, the per-pixel vector or the fixed
    number), clamped at the floor, as numpy arrays."""
    mean, *rest = reference.channels(logits, lik)
    log_s = rest[0] if rest else (scale if scale is not None else torch.tensor(lik.log_scale, dtype=F64))
    return mean.numpy(), np.maximum(log_s.numpy(), lik.floor)


def _scipy_gaussian(x, mean, log_var, lik):
    return stats.norm.logpdf(x, mean, np.exp(0.5 * log_var))


@pytest.mark.parametrize("spec, scipy_log_p", [
    *[pytest.param(spec, _scipy_gaussian, id=spec) for spec in (
        "gaussian:sigma=0.1", "gaussian:pixel", "gaussian", "gaussian:floor=-5")],
    *[pytest.param(spec, _scipy_logistic, id=spec) for spec in (
        "discretized_logistic", "discretized_logistic:pixel", "discretized_logistic:scale=0.02",
        "discretized_logistic:bins=16")]])
def test_reference_matches_scipy(spec, scipy_log_p):
    """The Gaussian's density and the logistic's bin masses, realistic and at the traps."""
    lik = Likelihood.parse(spec)
    for x, logits, scale in (_draw(spec), _trap(spec)):
        got = reference.log_likelihood(x, logits, lik, scale).numpy()
        want = scipy_log_p(x[:, None].numpy(), *_mean_and_log_scale(logits, lik, scale), lik).sum(-1)
        np.testing.assert_allclose(got, want, rtol=1e-11)


def test_discretized_logistic_masses_sum_to_one():
    """Every one of the 256 bins' masses (the reference's) adds up to 1: the edge bins are open."""
    x = torch.linspace(-1.0, 1.0, 256, dtype=F64)
    for mean, log_s in [(0.0, -4.5), (0.99, -2.0), (-1.3, -6.0), (0.3, 1.0)]:
        log_p = reference.log_discretized_logistic(x, torch.tensor(mean, dtype=F64), torch.tensor(log_s, dtype=F64))
        assert math.isclose(torch.logsumexp(log_p, 0).item(), 0.0, abs_tol=1e-13)


def test_logistic_mixture_reference_matches_scipy_logsumexp():
    lik = Likelihood.parse("discretized_logistic:mix=3")
    x, logits, _ = _draw(lik.label)
    got = reference.log_likelihood(x, logits, lik).numpy()
    parts = [c.numpy() for c in reference.channels(logits, lik)]
    mix, means, log_s = parts[:3], parts[3:6], parts[6:]
    log_weights = np.stack(mix) - sp_logsumexp(np.stack(mix), axis=0)
    each = np.stack([_scipy_logistic(x[:, None].numpy(), m, s, lik) for m, s in zip(means, log_s)])
    want = sp_logsumexp(log_weights + each, axis=0).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-12)


# --------------------------------------------------------------------------- the continuous Bernoulli's normalizer

CB_LOGITS = [0.0, 1e-8, 1e-4, 0.3, 0.4999, 0.5001, 1.0, 10.0, 80.0, -80.0, 300.0]


def _mp_continuous_bernoulli(x: float, logit: float) -> mpmath.mpf:
    """x log sigmoid(l) + (1 - x) log sigmoid(-l) + log C(l), C(l) = l / tanh(l / 2), at 50 digits."""
    with mpmath.workdps(50):
        l, x = mpmath.mpf(logit), mpmath.mpf(x)
        log_norm = mpmath.log(2) if l == 0 else mpmath.log(l / mpmath.tanh(l / 2))
        return -x * mpmath.log1p(mpmath.exp(-l)) - (1 - x) * mpmath.log1p(mpmath.exp(l)) + log_norm


def _cb_errors(logit: float) -> tuple[float, float]:
    """(largest |error| of the reference, of torch.distributions in float64) against mpmath,
    over x in {0, 0.3, 1}."""
    xs = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    logits = torch.full_like(xs, logit)
    ours = reference.log_continuous_bernoulli(xs, logits)
    peer = torch.distributions.ContinuousBernoulli(logits=logits).log_prob(xs)
    want = [_mp_continuous_bernoulli(x, logit) for x in xs.tolist()]
    return (max(abs(float(mpmath.mpf(o) - w)) for o, w in zip(ours.tolist(), want)),
            max(abs(float(mpmath.mpf(p) - w)) for p, w in zip(peer.tolist(), want)))


@pytest.mark.parametrize("logit", CB_LOGITS, ids=str)
def test_continuous_bernoulli_reference_matches_mpmath(logit):
    """log C(l) cancels catastrophically near l = 0 when written as log(l) - log(tanh(l / 2))
    in pieces, and the logsigmoids round at |l| = 300: the reference stays within 1e-12."""
    ours, _ = _cb_errors(logit)
    assert ours < 1e-12, f"l = {logit}: reference off by {ours:.3g}"


def test_torch_distributions_continuous_bernoulli_is_a_peer_to_beat():
    """torch.distributions clamps its probabilities: even in float64 it is ~0.8 nats off at
    l = 80 (and more at 300), where the reference is within 1e-12 of mpmath."""
    far = {logit: _cb_errors(logit) for logit in (80.0, -80.0, 300.0)}
    for logit, (ours, peer) in far.items():
        assert peer > 0.1 and ours < 1e-12, f"l = {logit}: reference {ours:.3g}, torch.distributions {peer:.3g}"


def test_continuous_bernoulli_density_integrates_to_one():
    """The normalizer makes the density a density: the integral over [0, 1] is 1 at every l."""
    for logit in (0.0, 1e-4, 0.4999, 3.0, -40.0):
        density = lambda x: math.exp(reference.log_continuous_bernoulli(  # noqa: E731
            torch.tensor(x, dtype=F64), torch.tensor(logit, dtype=F64)).item())
        total, _ = scipy.integrate.quad(density, 0.0, 1.0, epsabs=1e-13)
        assert math.isclose(total, 1.0, abs_tol=1e-10), (logit, total)


# --------------------------------------------------------------------------- the torch backend against the reference


def _grads(fn, x, logits, scale, lik, dtype):
    """fn's value [B, k] and its gradients by name (logits, scale where given, x) from autograd
    in ``dtype``."""
    leaves = {name: t.to(dtype).requires_grad_() for name, t in
              (("logits", logits), ("scale", scale), ("x", x)) if t is not None}
    value = fn(leaves["x"], leaves["logits"], lik, leaves.get("scale"))
    return value, dict(zip(leaves, torch.autograd.grad(value.sum(), list(leaves.values()))))


@pytest.mark.parametrize("regime", ["realistic", "trap"])
@pytest.mark.parametrize("spec", MODES)
def test_torch_backend_matches_reference_values_and_gradients(spec, regime):
    """float32 torch backend (kernels/likelihood.py's stable forms) against float64 autograd
    through the reference, with respect to every decoder output, the per-pixel scale and x."""
    lik = Likelihood.parse(spec)
    x, logits, scale = (_draw if regime == "realistic" else _trap)(spec)
    want, want_grads = _grads(reference.log_likelihood, x, logits, scale, lik, F64)
    got, got_grads = _grads(bounds.torch_log_likelihood, x, logits, scale, lik, torch.float32)
    assert got.dtype == torch.float32
    assert_close(got, want, rtol=2e-6, atol=2e-4, what=f"{spec} log p")
    for name, w in want_grads.items():
        assert torch.isfinite(got_grads[name]).all(), f"{spec}: d/d{name} not finite"
        atol = 1e-4 * max(1.0, w.abs().max().item())
        assert_close(got_grads[name], w, rtol=1e-4, atol=atol, what=f"{spec} d/d{name}")


def test_continuous_bernoulli_float32_within_ulps_across_the_taylor_band():
    """Per pixel, the float32 backend within 4 ulps of float64 wherever the series serves
    (|l| < 1/2: logits at 0, +-1e-4, +-1e-2, +-0.4999 and a grid): ulps of the larger of its
    two terms, (x - 1/2) l and l^2/24 (where they cancel, of the result no float32 sum can
    do better), plus 1e-15 for the reference's own rounding near 0."""
    g = torch.Generator().manual_seed(2)
    band = torch.cat([torch.linspace(-0.4999, 0.4999, 1001, dtype=F64),
                      torch.tensor([0.0, 1e-4, -1e-4, 1e-2, -1e-2], dtype=F64)]).float()
    x = torch.rand(band.shape, generator=g)
    got = bounds.torch_log_likelihood(x[:, None], band[:, None, None], Likelihood.parse("cb"))[:, 0]
    want = reference.log_continuous_bernoulli(x.double(), band.double())
    l64 = band.double()
    terms = torch.maximum(((x.double() - 0.5) * l64).abs(), l64 * l64 / 24)
    ulps = (got.double() - want).abs() / (torch.finfo(torch.float32).eps * terms + 1e-15)
    assert ulps.max() <= 4.0, f"{ulps.max():.3g} ulps at l = {band[ulps.argmax()]:.6g}"


def _across(fn, at: float):
    """fn and its derivative just below and at ``at`` (float64): the jumps of both."""
    t = torch.tensor([math.nextafter(at, -math.inf), at], dtype=F64, requires_grad=True)
    value = fn(t)
    slope, = torch.autograd.grad(value.sum(), t)
    return abs(value[1] - value[0]).item(), abs(slope[1] - slope[0]).item()


@pytest.mark.parametrize("at", [SERIES_BELOW, -SERIES_BELOW])
def test_series_and_direct_forms_meet_at_the_switch(at):
    """The torch backend switches from the series to the direct forms at |t| = 1/2: the
    continuous Bernoulli's log phi at |l| = 1/2, the logistic's log(1 - e^-eps) at eps = 1/2
    (a log-scale of log(4 d)). Values and slopes jump by less than the series' truncation."""
    jumps = {"log phi(|l|) - |l|/2": _across(bounds.log_phi_less_half, at)}
    if at > 0:
        s_switch = math.log(4.0 * HALF)  # eps = 2 d e^-s = 1/2
        x, mean = torch.tensor(0.2, dtype=F64), torch.tensor(0.21, dtype=F64)
        jumps["logistic bin in s"] = _across(lambda s: bounds.discretized_logistic(x, mean, s, HALF), s_switch)
    for what, (value, slope) in jumps.items():
        assert value < 1e-9 and slope < 2e-8, f"{what}: jumps {value:.3g} in value, {slope:.3g} in slope"
