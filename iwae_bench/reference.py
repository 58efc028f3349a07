"""The float64 oracle: every test and every error column of a report compares against it.

Written straight from the math (DESIGN.md), not from the kernels' algebra: the Bernoulli term
as x * logsigmoid(l) + (1 - x) * logsigmoid(-l), both Gaussians with their 2 pi constants.

Infinite logits: log sigmoid(+inf) = 0, log sigmoid(-inf) = -inf and 0 * inf = 0, so a pixel
adds 0 where its infinite logit sits on x's side (x = 1 for +inf, x = 0 for -inf) and -inf
otherwise; a NaN logit gives NaN. Every stable variant follows the same rule.

    log w_i = log p(x|h_i) + log p(h_i) - log q(h_i|x)
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


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over d: [B, k, d] -> [B, k]."""
    z = z.double()
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def log_diag_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over d; mu, logvar [B, d] -> [B, k]."""
    z = z.double()
    mu = mu.double().unsqueeze(1)
    logvar = logvar.double().unsqueeze(1)
    return -0.5 * ((z - mu) ** 2 / torch.exp(logvar) + logvar).sum(-1) - 0.5 * z.shape[-1] * LOG_2PI


def log_weights(x, logits, z, mu, logvar) -> torch.Tensor:
    """log w [B, k] in float64."""
    return log_bernoulli(x, logits) + log_standard_normal(z) - log_diag_normal(z, mu, logvar)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """L_k = logsumexp over the last dim minus log k, float64."""
    log_w = log_w.double()
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


def elbo(log_w: torch.Tensor) -> torch.Tensor:
    """L_1 estimate: the mean of the log-weights over the last dim (the multi-sample ELBO), float64."""
    return log_w.double().mean(dim=-1)


def bound(x, logits, z, mu, logvar) -> torch.Tensor:
    """L_k per example [B] in float64, from the five inputs."""
    return iwae_bound(log_weights(x, logits, z, mu, logvar))


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
