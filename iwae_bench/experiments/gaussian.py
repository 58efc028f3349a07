"""The linear-Gaussian model of Rainforth et al. (2018, sec. 4), where every bound's target is
known in closed form: the SNR benchmark's check on itself (``snr --model gaussian``).

The setup, as Rainforth et al. state it and Tucker et al. (2019, DReG) reuse for their SNR
figure (D = 20 dimensions, N = 1024 data points):

    p(z) = N(z; mu, I),   p(x|z) = N(x; z, I),   q(z|x) = N(z; A x + b, (2/3) I)
    data: mu_true ~ N(0, I), then x_n ~ p(x) = N(mu_true, 2 I), n = 1..N
    decoder parameters theta = mu; encoder parameters phi = (A, b); q's variance is fixed

so p(x) = N(x; mu, 2 I) and p(z|x) = N(z; (x + mu)/2, I/2). The optimum: mu* = the data mean
(the maximum-likelihood mu of p(x)), A* = I/2, b* = mu*/2 (q's mean is the posterior mean; its
variance 2/3 cannot match the posterior's 1/2, so q is never exact and no bound is tight at
finite k). The SNR is measured at the optimum with every parameter moved by an independent
N(0, 0.01^2) ("perturbed slightly", as the papers do: at the exact optimum the encoder's
expected gradient is 0 and has no SNR to speak of).

Where this departs from, or could not be checked against, the papers' text (the setup above is
theirs as recalled and cross-checked against the closed forms, not quoted): the gradient is of
the first ``--batch`` data points' mean bound (one by default; the papers' figure is per
parameter of one gradient estimate, the benchmark's the group's average), and the draws are
the benchmark's (``--draws``). The SNR's exponents do not depend on either.

The suite's log-weights take a standard-normal prior, so the model is written in u = z - mu:

    p(u) = N(u; 0, I),   p(x|u) = N(x; u + mu, I),   q(u|x) = N(u; A x + c, (2/3) I), c = b - mu

the same joint distribution of (x, z = u + mu) and the same bounds. The decoder's output u + mu
goes through the suite's Gaussian likelihood ("gaussian:sigma=1") and the bounds through
``IWAELoss`` (torch backend): the estimator code measured is the MNIST benchmark's. The encoder's
gradients are the paper's (d/dc = d/db at fixed mu, d/dA unchanged). The decoder's gradient is
taken at fixed c rather than at fixed b: it differs from the paper's by d bound / db, the
encoder's gradient, which is 0 at the optimum in expectation (and of the size of the 0.01
perturbation near it), while d bound / d mu itself is of the size of x - mu; both tend to
d log p(x) / d mu as k grows (Burda et al.: L_k -> log p(x)), so the decoder's SNR exponent
(+1/2) is the same.

``gradient_draws`` computes many draws at once: each draw gets its own copy of the parameters
in one batched forward pass (the rows of ``IWAELoss``'s batch never mix), so the gradient with
respect to copy r is draw r's gradient, exactly as one draw at a time would give it.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..training import IWAELoss

D = 20
N = 1024
Q_VAR = 2.0 / 3.0
PERTURBATION = 0.01
LIKELIHOOD = "gaussian:sigma=1"
LOG_2PI = math.log(2 * math.pi)
ELEMENTS = 1 << 22   # draws x batch x k x D per batched pass (a few hundred MB of autograd state)


class Shift(nn.Module):
    """The decoder: u -> u + mu, the mean of p(x|u)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(dim))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.mu


class LinearGaussian(nn.Module):
    """The model in u = z - mu (module docstring): ``encoder`` the linear map x -> A x + c
    (weight A, bias c), ``decoder`` the shift by mu. ``encode`` and ``decoder`` have the
    BernoulliVAE's signatures, so the SNR benchmark's single-draw step applies unchanged."""

    def __init__(self, dim: int = D):
        super().__init__()
        self.encoder = nn.Linear(dim, dim)
        self.decoder = Shift(dim)
        self.likelihood = LIKELIHOOD

    @property
    def dim(self) -> int:
        return self.encoder.in_features

    def encode(self, x: torch.Tensor):
        mean = self.encoder(x)
        return mean, torch.full_like(mean, math.log(Q_VAR))

    @torch.no_grad()
    def set_parameters(self, A, b, mu) -> "LinearGaussian":
        """Set the paper's (A, b, mu) (stored as A, c = b - mu, mu)."""
        self.encoder.weight.copy_(torch.as_tensor(A))
        self.encoder.bias.copy_(torch.as_tensor(b) - torch.as_tensor(mu))
        self.decoder.mu.copy_(torch.as_tensor(mu))
        return self

    def paper_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, b, mu) in the paper's parameterization."""
        mu = self.decoder.mu.detach()
        return self.encoder.weight.detach(), self.encoder.bias.detach() + mu, mu


def make_data(seed: int = 0, n: int = N, dim: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, dim] float32, mu_true [dim]): mu_true ~ N(0, I), x = z + noise with z ~ N(mu_true, I)."""
    generator = torch.Generator().manual_seed(seed)
    mu_true = torch.randn(dim, generator=generator, dtype=torch.float64)
    z = mu_true + torch.randn(n, dim, generator=generator, dtype=torch.float64)
    x = z + torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return x.float(), mu_true.float()


def near_optimum(x: torch.Tensor, seed: int = 0, perturbation: float = PERTURBATION) -> LinearGaussian:
    """The model at the optimum for the data x (mu* = mean x, A* = I/2, b* = mu*/2), every
    parameter moved by N(0, perturbation^2) drawn with ``seed``."""
    dim = x.shape[1]
    mu = x.double().mean(0)
    generator = torch.Generator().manual_seed(seed + 7919)
    jitter = lambda *shape: perturbation * torch.randn(*shape, generator=generator, dtype=torch.float64)
    return LinearGaussian(dim).set_parameters(torch.eye(dim, dtype=torch.float64) / 2 + jitter(dim, dim),
                                              mu / 2 + jitter(dim), mu + jitter(dim))


def describe(model: LinearGaussian, seed: int) -> str:
    return (f"LinearGaussian(D={model.dim}, q variance 2/3), N={N} points from seed {seed}, at the "
            f"optimum + N(0, {PERTURBATION}^2) (Rainforth et al. 2018 sec. 4)")


# --------------------------------------------------------------------------- closed forms (float64)


def log_normal(x: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    """log N(x; mean, var I) summed over the last dimension."""
    return -0.5 * (((x - mean) ** 2) / var + math.log(var) + LOG_2PI).sum(-1)


def log_marginal(model: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log N(x; mu, 2 I) [B], float64."""
    return log_normal(x.double(), model.decoder.mu.detach().double(), 2.0)


def posterior(model: LinearGaussian, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """p(u|x) = N((x - mu)/2, I/2) in u = z - mu: (mean [B, D], variance), float64."""
    return (x.double() - model.decoder.mu.detach().double()) / 2, 0.5


def q_mean(model: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ model.encoder.weight.detach().double().T + model.encoder.bias.detach().double()


def elbo(model: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    """The ELBO [B] in closed form: log p(x) - KL(q(u|x) || p(u|x)), float64."""
    mean, var = posterior(model, x)
    kl = 0.5 * (Q_VAR / var + (q_mean(model, x) - mean) ** 2 / var - 1 + math.log(var / Q_VAR)).sum(-1)
    return log_marginal(model, x) - kl


def log_weights64(model: LinearGaussian, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log w = log p(x|u) + log p(u) - log q(u|x) [B, k] from the densities, float64."""
    x, u = x.double().unsqueeze(1), u.double()
    mu = model.decoder.mu.detach().double()
    return (log_normal(x, u + mu, 1.0) + log_normal(u, torch.zeros(()), 1.0)
            - log_normal(u, q_mean(model, x.squeeze(1)).unsqueeze(1), Q_VAR))


def second_moment(model: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    """E_q[(w / p(x))^2] = integral of p(u|x)^2 / q(u|x) [B], float64: per dimension, for
    p = N(m, s) and q = N(n, t) (variances, 2 t > s), t / sqrt(s (2 t - s)) exp((m - n)^2 / (2 t - s)).
    The IWAE bound's gap is (E w~^2 - 1) / (2 k) + O(1/k^2) (the delta method)."""
    mean, s = posterior(model, x)
    t = Q_VAR
    per_dim = (math.log(t) - 0.5 * math.log(s * (2 * t - s))
               + (mean - q_mean(model, x)) ** 2 / (2 * t - s))
    return per_dim.sum(-1).exp()


# --------------------------------------------------------------------------- the draws


def gradient_draws(model: LinearGaussian, x: torch.Tensor, k: int, loss_fn: IWAELoss, draws: int,
                   noise, step_seconds: list | None = None) -> torch.Tensor:
    """[draws, parameters] float32: each draw's flat gradient of the batch loss (named_parameters
    order: A, c, mu), draw r with the noise ``noise(r)`` [B, k, D]. Many draws per pass, each
    with its own copy of the parameters (module docstring); with ``step_seconds``, each pass's
    time per draw is appended (the noise drawn outside the timed span)."""
    B, dim = x.shape
    per_pass = max(1, ELEMENTS // (B * k * dim))
    out = torch.empty(draws, sum(p.numel() for p in model.parameters()), device=x.device)
    A, c, mu = (p.detach() for p in model.parameters())
    for start in range(0, draws, per_pass):
        R = min(per_pass, draws - start)
        eps = torch.cat([noise(start + r) for r in range(R)])                  # [R B, k, D]
        copies = [p.expand(R, *p.shape).clone().requires_grad_() for p in (A, c, mu)]
        started = time.perf_counter()
        mean = (torch.einsum("rij,bj->rbi", copies[0], x) + copies[1].unsqueeze(1)).reshape(R * B, dim)
        logvar = torch.full_like(mean, math.log(Q_VAR))
        u = mean.unsqueeze(1) + math.sqrt(Q_VAR) * eps
        outputs = u + copies[2].repeat_interleave(B, dim=0).unsqueeze(1)
        loss = loss_fn(x.repeat(R, 1), outputs, u, mean, logvar) * R  # each draw's own batch mean
        grads = torch.autograd.grad(loss, copies)
        if step_seconds is not None:
            step_seconds.extend([(time.perf_counter() - started) / R] * R)
        torch.cat([g.reshape(R, -1) for g in grads], dim=1, out=out[start:start + R])
    return out

