"""Evaluation diagnostics: the jackknife estimate against its definition, PSIS k-hat against
known tails."""

import itertools
import math

import pytest
import torch

from iwae_bench.experiments.diagnostics import (gpd_shape, jvi, jvi_coefficients, psis_khat, tail_length)


def _jvi_by_definition(log_w: torch.Tensor, order: int) -> float:
    """sum_j c(k, m, j) mean over the (k - j)-subsets of L_{k-j}, every subset enumerated, float64."""
    k, log_w = len(log_w), log_w.double()
    total = 0.0
    for j, c in enumerate(jvi_coefficients(k, order)):
        bounds = [torch.logsumexp(log_w[[i for i in range(k) if i not in removed]], 0) - math.log(k - j)
                  for removed in itertools.combinations(range(k), j)]
        total += c * torch.stack(bounds).mean().item()
    return total


def test_jvi_coefficients_are_the_papers():
    """Order 1: k and -(k - 1); order 2: k^2/2, -(k-1)^2, (k-2)^2/2; each set sums to 1."""
    assert jvi_coefficients(50, 1) == [50, -49]
    assert jvi_coefficients(50, 2) == [1250, -2401, 1152]
    assert sum(jvi_coefficients(5000, 2)) == 1


@pytest.mark.parametrize("order", [1, 2])
def test_jvi_matches_its_definition_on_spread_and_dominated_weights(order):
    """k = 60 (the series covers the 45 smallest weights), spreads 0.1 to 30 nats, and a row one
    weight dominates by 200 nats (where log(sum - w_i) taken naively cancels to nothing)."""
    generator = torch.Generator().manual_seed(0)
    for spread in (0.1, 3.0, 30.0):
        log_w = torch.randn(3, 60, generator=generator, dtype=torch.float64) * spread - 90.0
        log_w[2, 0] += 200.0
        got = jvi(log_w.float() if spread == 3.0 else log_w, order)
        want = [_jvi_by_definition(row.float() if spread == 3.0 else row, order) for row in log_w]
        for g, w in zip(got.tolist(), want):
            assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9), (spread, g, w)


def test_jvi_of_equal_weights_is_the_bound_and_corrects_a_known_bias():
    """Equal weights: every subset's bound is log w, so JVI = L_k. Lognormal weights
    (log w ~ N(0, s^2), log E w = s^2/2): L_k is biased low by about Var(w) / (2 k E[w]^2), and
    the jackknife's mean over 4000 images lands closer to the truth at each order."""
    flat = torch.full((2, 100), -3.5, dtype=torch.float64)
    for order in (1, 2):
        assert torch.allclose(jvi(flat, order), flat[:, 0], rtol=0, atol=1e-12)
    s, k = 0.8, 20
    log_w = torch.randn(4000, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * s
    truth = s * s / 2
    bias = [abs(estimate.mean().item() - truth) for estimate in
            (torch.logsumexp(log_w, 1) - math.log(k), jvi(log_w, 1), jvi(log_w, 2))]
    assert bias[0] > 0.01 and bias[1] < bias[0] / 3 and bias[2] < bias[0] / 3


def test_jvi_refuses_too_few_samples_and_orders_it_lacks():
    with pytest.raises(ValueError, match="needs k > 2"):
        jvi(torch.zeros(1, 2), 2)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        jvi(torch.zeros(1, 9), 3)


@pytest.mark.parametrize("shape", [0.2, 0.5, 0.9])
def test_gpd_shape_recovered_within_its_standard_error(shape):
    """2000 draws of a generalized Pareto (scipy draws them): the maximum-likelihood standard
    error of the shape is (1 + xi) / sqrt(n); each of 6 fits lands within 3 of them, their mean
    within 2 standard errors of the mean."""
    from scipy.stats import genpareto

    n, fits = 2000, 6
    x = torch.tensor(genpareto.rvs(shape, scale=2.5, size=(fits, n), random_state=7))
    got = gpd_shape(x, prior=False)
    se = (1 + shape) / math.sqrt(n)
    assert (got - shape).abs().max() < 3 * se, got
    assert abs(got.mean().item() - shape) < 2 * se / math.sqrt(fits), got
    prior = gpd_shape(x, prior=True)  # pulled to 0.5 by 10 of n + 10 observations' weight
    assert torch.allclose(prior, (n * got + 5) / (n + 10), rtol=0, atol=1e-12)


def test_khat_of_generalized_pareto_weights():
    """Weights drawn from a generalized Pareto: the M = 213 largest of 5000 (above the next)
    are again generalized Pareto with that shape, so the mean k-hat over 40 images lands within
    2 standard errors (1 + xi) / sqrt(213 * 40) plus the prior's pull 10 (0.5 - xi) / 223."""
    from scipy.stats import genpareto

    assert tail_length(5000) == 213 and tail_length(100) == 20
    for shape in (0.2, 0.5, 0.9):
        w = torch.tensor(genpareto.rvs(shape, size=(40, 5000), random_state=3))
        khat = psis_khat(torch.log(w))
        pull = 10 * (0.5 - shape) / 223
        assert abs(khat.mean().item() - shape - pull) < 2 * (1 + shape) / math.sqrt(213 * 40), (shape, khat.mean())


def test_khat_of_an_importance_sampler_with_a_known_tail():
    """Target N(0, 1), proposal N(0, s^2): w(z) = s exp(z^2 (1/s^2 - 1) / 2). For s < 1,
    w > t iff z^2 > 2 log(t/s) / (1/s^2 - 1), and under q P(|z| > r) ~ exp(-r^2 / (2 s^2)), so
    P(w > t) ~ (t/s)^(-1 / (1 - s^2)) up to a slowly varying factor: the tail index is
    xi = 1 - s^2 (finite variance iff s^2 > 1/2, xi < 1/2). Over 100 images of 5000 draws the
    mean k-hat lands within 0.12 of xi (the slowly varying factor 1/r makes the finite tail look
    lighter: 0.80 at xi = 0.9), and the verdicts follow: s^2 = 0.1 (xi = 0.9) is flagged above
    0.7 on most images and above 0.5 on nearly all, s^2 = 0.8 (xi = 0.2) on none."""
    generator = torch.Generator().manual_seed(5)
    khats = {}
    for s2 in (0.1, 0.5, 0.8):
        z = torch.randn(100, 5000, generator=generator, dtype=torch.float64) * math.sqrt(s2)
        log_w = 0.5 * math.log(s2) + z * z * (1 / s2 - 1) / 2
        khats[s2] = psis_khat(log_w)
        assert abs(khats[s2].mean().item() - (1 - s2)) < 0.12, (s2, khats[s2].mean())
    assert (khats[0.1] > 0.7).float().mean() > 0.6 and (khats[0.1] > 0.5).float().mean() > 0.95
    assert (khats[0.8] > 0.5).sum() == 0
    assert khats[0.1].mean() > khats[0.5].mean() + 0.2 > khats[0.8].mean() + 0.4


def test_khat_needs_a_tail_of_five():
    assert torch.isnan(psis_khat(torch.randn(2, 20))).all()
    assert torch.isfinite(psis_khat(torch.randn(2, 25))).all()


def test_khat_of_a_degenerate_tail_is_infinite_and_of_equal_weights_undefined():
    """One weight (or a few equal ones) 2000 nats above the rest: float64 holds no other tail
    weight, the fit's grid is undefined, and the sampler is as unreliable as one can be: k-hat
    +inf, above any threshold. Every weight equal: no tail to fit, NaN (the evaluation's median
    skips it and does not count it unreliable). An ordinary row beside them keeps its value."""
    generator = torch.Generator().manual_seed(2)
    log_w = torch.randn(4, 1000, generator=generator, dtype=torch.float64)
    ordinary = psis_khat(log_w[3:])
    log_w[0, 7] = 2000.0
    log_w[1] = 5.0
    log_w[2, :10] = 2000.0
    khat = psis_khat(log_w)
    assert torch.isinf(khat[0]) and khat[0] > 0 and torch.isinf(khat[2]) and khat[2] > 0
    assert torch.isnan(khat[1]) and torch.equal(khat[3:], ordinary) and 0 < khat[3] < 0.7
