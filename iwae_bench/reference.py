"""The float64 oracle: every test and every error column of a report compares against it.

Written straight from the math (DESIGN.md), not from the kernels' algebra: the Bernoulli term
as x * logsigmoid(l) + (1 - x) * logsigmoid(-l), both Gaussians with their 2 pi constants; the
continuous likelihoods (kernels/likelihood.py) from their papers' definitions: the Gaussian
density, the continuous Bernoulli with its normalizer l / tanh(l / 2), the discretized logistic
as the logistic CDF's mass on the bin (and its mixture).

Infinite logits: log sigmoid(+inf) = 0, log sigmoid(-inf) = -inf and 0 * inf = 0, so a pixel
adds 0 where its infinite logit sits on x's side (x = 1 for +inf, x = 0 for -inf) and -inf
otherwise; a NaN logit gives NaN. Every stable variant follows the same rule.

    log w_i = log p(x|h_i) + log p(h_i) - log q(h_i|x)
            = log p(x|h1_i) + log p(h1_i|h2_i) + log p(h2_i) - log q(h1_i|x) - log q(h2_i|h1_i)
              (two stochastic layers: ``kernels.Latent``, parameters per example or per sample)
    ELBO    L_1 = mean_i log w_i
    IWAE    L_k = logsumexp_i log w_i - log k

and the rest of the importance-weighted family (iwae_bench/training/family.py), each from its
paper's definition, on log w [..., k]: VR-alpha, MIWAE(M, K), CIWAE(beta); PIWAE and RWS report
L_k (their difference is in the gradients, which the tests build from the definitions too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.latent import Latent, as_layers
from kernels.likelihood import BERNOULLI, Likelihood, as_likelihood

LOG_2PI = math.log(2.0 * math.pi)


def log_bernoulli(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x|h) summed over D; x [B, D] broadcast against logits [B, k, D] -> [B, k]."""
    x = x.double().unsqueeze(1)
    logits = logits.double()
    # where x's weight is 0 the log-probability it multiplies may be -inf: 0 * inf = 0, taken
    # before the product so neither the value nor its gradient sees a NaN
    on = torch.where((x == 0) & (logits == -math.inf), 0.0, F.logsigmoid(logits))
    off = torch.where((x == 1) & (logits == math.inf), 0.0, F.logsigmoid(-logits))
    return (x * on + (1.0 - x) * off).sum(-1)


def log_gaussian(x, mean, log_var) -> torch.Tensor:
    """log N(x; mean, exp(log_var)) per element, float64 (broadcasting)."""
    return -0.5 * ((x - mean) ** 2 / torch.exp(log_var) + log_var + LOG_2PI)


def log_continuous_bernoulli(x, logits) -> torch.Tensor:
    """x log sigmoid(l) + (1 - x) log sigmoid(-l) + log C(l), C(l) = l / tanh(l / 2) and C(0) = 2
    (Loaiza-Ganem & Cunningham 2019, with lambda = sigmoid(l)), per element, float64."""
    safe = torch.where(logits == 0, 1.0, logits)
    log_norm = torch.where(logits == 0, math.log(2.0), torch.log(safe / torch.tanh(safe / 2)))
    return x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits) + log_norm


def log_discretized_logistic(x, mean, log_scale, bins: int = 256) -> torch.Tensor:
    """log of the logistic's mass on x's bin [x - d, x + d], d = 1 / (bins - 1), on data in
    [-1, 1], the bottom bin open to -inf and the top one to +inf; per element, float64.

    From the definition, F(a) - F(b) with F the logistic CDF, taken in logs as
    log F(a) + log1p(-F(b) / F(a)) for a bin below the mean and as the same difference of
    survival functions, log S(b) + log1p(-S(a) / S(b)) with S(t) = F(-t), for a bin above it
    (where F rounds to 1 even in float64): the bin above is the bin (-a, -b) below, so one
    formula on the mirrored ends serves both, and no unused branch (whose log1p(-1) would make
    the gradient 0 * inf = NaN) is ever evaluated. A different form from the kernels' (both are
    checked against scipy.stats and mpmath)."""
    half = 1.0 / (bins - 1)
    inv = torch.exp(-log_scale)
    a = (x + half - mean) * inv
    b = (x - half - mean) * inv
    log_fa, log_fb = F.logsigmoid(a), F.logsigmoid(b)
    log_sa, log_sb = F.logsigmoid(-a), F.logsigmoid(-b)
    bottom, top = x < half - 1, x > 1 - half
    above = (b > 0) & ~bottom & ~top
    below = (b <= 0) & ~bottom & ~top
    # each form fed -1 where it is not the one taken, so neither it nor its gradient is NaN there
    from_cdf = log_fa + torch.log1p(-torch.exp(torch.where(below, log_fb - log_fa, -1.0)))
    from_survival = log_sb + torch.log1p(-torch.exp(torch.where(above, log_sa - log_sb, -1.0)))
    return torch.where(bottom, log_fa, torch.where(top, log_sb, torch.where(above, from_survival, from_cdf)))


def channels(logits: torch.Tensor, likelihood: Likelihood) -> list[torch.Tensor]:
    """The decoder output [..., C D] split into its C channels [..., D] (channel c at columns
    c D .. c D + D - 1)."""
    C = likelihood.channels
    return list(logits.unflatten(-1, (C, logits.shape[-1] // C)).unbind(-2))


def log_likelihood(x, logits, likelihood=BERNOULLI, scale=None) -> torch.Tensor:
    """log p(x|h) summed over D, [B, k] float64: x [B, D] against the decoder output logits
    [B, k, C D] (kernels/likelihood.py: C channels; ``scale`` [D] a per-pixel log-scale)."""
    likelihood = as_likelihood(likelihood)
    if likelihood.name == "bernoulli":
        return log_bernoulli(x, logits)
    parts = [c.double() for c in channels(logits, likelihood)]
    x = x.double().unsqueeze(1)
    if likelihood.name == "continuous_bernoulli":
        return log_continuous_bernoulli(x, parts[0]).sum(-1)
    L = likelihood.mixture
    mean = parts[L:2 * L] if L > 1 else parts[:1]
    if likelihood.scale == "sample":
        log_scale = parts[2 * L:] if L > 1 else parts[1:]
    elif likelihood.scale == "pixel":
        log_scale = [scale.double()]
    else:
        log_scale = [torch.tensor(likelihood.log_scale, dtype=torch.float64)]
    log_scale = [torch.clamp(s, min=likelihood.floor) for s in log_scale]
    if likelihood.name == "gaussian":
        return log_gaussian(x, mean[0], log_scale[0]).sum(-1)
    each = torch.stack([log_discretized_logistic(x, m, s, likelihood.bins) for m, s in zip(mean, log_scale)])
    if L == 1:
        return each[0].sum(-1)
    log_mix = torch.log_softmax(torch.stack(parts[:L]), dim=0)  # the mixing weights, per pixel
    return torch.logsumexp(log_mix + each, dim=0).sum(-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over d: [B, k, d] -> [B, k]."""
    z = z.double()
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def log_diag_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over d; mu, logvar [B, d] (per example) or
    [B, k, d] (per sample) -> [B, k]."""
    z = z.double()
    mu = per_sample(mu.double())
    logvar = per_sample(logvar.double())
    return -0.5 * ((z - mu) ** 2 / torch.exp(logvar) + logvar).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """A Gaussian parameter as [B, 1 or k, d]: a per-example [B, d] one broadcast over the samples."""
    return t.unsqueeze(1) if t.dim() == 2 else t


def log_latent(layer: Latent) -> torch.Tensor:
    """log p(z) - log q(z) [B, k] of one stochastic layer (kernels.Latent), float64, from the two
    densities: the prior N(prior_mu, exp(prior_logvar)) with a missing parameter 0 (both
    missing: N(0, I)), and the posterior N(mu, exp(logvar))."""
    z = layer.z
    if layer.prior_mu is None and layer.prior_logvar is None:
        log_prior = log_standard_normal(z)
    else:
        zero = torch.zeros(z.shape[0], z.shape[-1], dtype=torch.float64, device=z.device)
        log_prior = log_diag_normal(z, zero if layer.prior_mu is None else layer.prior_mu,
                                    zero if layer.prior_logvar is None else layer.prior_logvar)
    return log_prior - log_diag_normal(z, layer.mu, layer.logvar)


def log_weights(x, logits, z, mu=None, logvar=None, likelihood=BERNOULLI, scale=None) -> torch.Tensor:
    """log w [B, k] in float64 (``likelihood``: kernels/likelihood.py; the Bernoulli's by default):
    log p(x|h1) plus every stochastic layer's log p(z) - log q(z). ``z`` the one layer's
    samples with mu, logvar (per example or per sample), or a sequence of ``kernels.Latent``
    (h1, the layer the decoder reads, first)."""
    return log_likelihood(x, logits, likelihood, scale) + sum(log_latent(layer) for layer in as_layers(z, mu, logvar))


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """L_k = logsumexp over the last dim minus log k, float64."""
    log_w = log_w.double()
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


def elbo(log_w: torch.Tensor) -> torch.Tensor:
    """L_1 estimate: the mean of the log-weights over the last dim (the multi-sample ELBO), float64."""
    return log_w.double().mean(dim=-1)


def bound(x, logits, z, mu=None, logvar=None, likelihood=BERNOULLI, scale=None) -> torch.Tensor:
    """L_k per example [B] in float64, from the five inputs (or x, logits and the layers)."""
    return iwae_bound(log_weights(x, logits, z, mu, logvar, likelihood, scale))


def vr_bound(log_w: torch.Tensor, alpha: float) -> torch.Tensor:
    """Li & Turner's Renyi bound (1 / (1 - alpha)) log (1/k) sum_i w_i^(1 - alpha), float64;
    alpha = 1 is its limit, the ELBO."""
    if alpha == 1.0:
        return elbo(log_w)
    log_w = log_w.double()
    return (torch.logsumexp((1.0 - alpha) * log_w, dim=-1) - math.log(log_w.shape[-1])) / (1.0 - alpha)


def miwae_bound(log_w: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """Rainforth et al.'s MIWAE: the mean over M groups of K consecutive samples of each group's
    IWAE bound, float64."""
    groups = log_w.double().unflatten(-1, (M, K))
    return iwae_bound(groups).mean(dim=-1)


def ciwae_bound(log_w: torch.Tensor, beta: float) -> torch.Tensor:
    """Rainforth et al.'s CIWAE: beta ELBO + (1 - beta) IWAE on the same samples, float64."""
    return beta * elbo(log_w) + (1.0 - beta) * iwae_bound(log_w)


def objective_bound(log_w: torch.Tensor, objective) -> torch.Tensor:
    """The value an ``Objective`` (training/family.py) reports, from the definitions above."""
    name, k = objective.name, log_w.shape[-1]
    if name in ("elbo", "multi_sample_elbo"):
        return elbo(log_w)
    if name == "vr":
        return vr_bound(log_w, objective.alpha)
    if name == "miwae":
        return miwae_bound(log_w, *objective.groups(k))
    if name == "ciwae":
        return ciwae_bound(log_w, objective.beta)
    return iwae_bound(log_w)  # iwae, and the value piwae and rws report
