"""The oracle itself, against independent formulas (scipy) and known values."""

import math

import numpy as np
import pytest
import torch

# scipy is a test extra (CI has it); a bare GPU image may not, and this file checks the oracle,
# not the device
scipy = pytest.importorskip("scipy")
from scipy import stats  # noqa: E402
from scipy.special import logsumexp as sp_logsumexp  # noqa: E402

from iwae_bench import reference


def test_log_weights_match_scipy_densities():
    g = torch.Generator().manual_seed(1)
    B, k, D, d = 3, 4, 6, 5
    x = (torch.rand(B, D, generator=g) < 0.5).double()
    logits = torch.randn(B, k, D, generator=g, dtype=torch.float64) * 3
    z = torch.randn(B, k, d, generator=g, dtype=torch.float64)
    mu = torch.randn(B, d, generator=g, dtype=torch.float64)
    logvar = torch.randn(B, d, generator=g, dtype=torch.float64) * 0.3
    got = reference.log_weights(x, logits, z, mu, logvar).numpy()
    p = 1.0 / (1.0 + np.exp(-logits.numpy()))
    want = np.empty((B, k))
    for b in range(B):
        for i in range(k):
            log_px = stats.bernoulli.logpmf(x[b].numpy(), p[b, i]).sum()
            log_ph = stats.norm.logpdf(z[b, i].numpy()).sum()
            log_qh = stats.norm.logpdf(z[b, i].numpy(), mu[b].numpy(),
                                       np.exp(0.5 * logvar[b].numpy())).sum()
            want[b, i] = log_px + log_ph - log_qh
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-10)


def test_bounds_known_values():
    log_w = torch.tensor([[-1000.0, -1000.0], [0.0, math.log(3.0)]], dtype=torch.float64)
    # equal weights: L_k = L_1 = the common value; otherwise L_k = log mean exp >= mean
    np.testing.assert_allclose(reference.iwae_bound(log_w).numpy(), [-1000.0, math.log(2.0)])
    np.testing.assert_allclose(reference.elbo(log_w).numpy(), [-1000.0, 0.5 * math.log(3.0)])
    assert (reference.iwae_bound(log_w) >= reference.elbo(log_w)).all()


def test_iwae_bound_matches_scipy_at_scale():
    log_w = torch.randn(5, 5000, dtype=torch.float64) * 30 - 1e4
    want = sp_logsumexp(log_w.numpy(), axis=1) - math.log(5000)
    np.testing.assert_allclose(reference.iwae_bound(log_w).numpy(), want, rtol=1e-14)


@pytest.mark.parametrize("logit", [-80.0, -30.0, 0.0, 30.0, 80.0])
def test_bernoulli_term_is_stable_for_large_logits(logit):
    # log sigmoid(l) for x = 1 and log sigmoid(-l) for x = 0, exact: -softplus(-l), -softplus(l)
    logits = torch.full((2, 1, 1), logit, dtype=torch.float64)
    x = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    got = reference.log_bernoulli(x, logits)[:, 0]
    want = torch.tensor([-math.log1p(math.exp(-logit)) if logit > -50 else logit,
                         -math.log1p(math.exp(logit)) if logit < 50 else -logit], dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)
