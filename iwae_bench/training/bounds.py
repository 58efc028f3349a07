"""The bounds' math in one home, behind one ``backend=`` choice. Objectives, the experiments and
the benchmark's variants all call these functions.

    log w_i = log p(x|h_i) + log p(h_i) - log q(h_i|x)       log_weights      [B, k]
    IWAE    L_k = logsumexp_i log w_i - log k                 iwae_bound       [B]
    ELBOs   L_1 = log w (k = 1), mean_i log w_i (any k)       objective_bound  [B]
            or, kl="analytic": mean_i log p(x|h_i) - KL(q(h|x) || p(h)) in closed form

``backend="torch"``: stable PyTorch with autograd (broadcasting over k, BCE with logits,
``torch.logsumexp``). ``backend="fused"``: the Triton kernels (the fused bound for the IWAE,
the log-weights kernel for the ELBOs), backward passes in Triton. Both return float32 and
follow the same rule for infinite logits as the float64 reference (kernels/logw.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels
from kernels import check_bound_inputs

BACKENDS = ("torch", "fused")
OBJECTIVES = ("elbo", "multi_sample_elbo", "iwae")
KLS = ("sampled", "analytic")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def bernoulli_exact(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_D x log sigmoid(l) + (1 - x) log sigmoid(-l) with 0 * inf = 0, float32, written so
    that infinite logits give 0 or -inf (never NaN) and their gradients stay finite. x
    broadcasts against logits. Slower than BCE with logits: used only where that gave NaN."""
    on = torch.where(x == 0, 0.0, x * logits.clamp(max=0))
    off = torch.where(x == 1, 0.0, (1 - x) * logits.clamp(min=0))
    return (on - off - torch.log1p(torch.exp(-logits.abs()))).sum(-1)


def torch_log_likelihood(x, logits) -> torch.Tensor:
    """log p(x|h) [B, k] in float32: BCE with logits, broadcasting x over k (no repeats)."""
    logits = logits.float()
    x = x.float().unsqueeze(1)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    # BCE with logits is NaN where an infinite logit meets x on its side (0 * inf); those rows
    # only (never on finite logits) are summed again with the exact rule.
    if torch.isnan(log_px).any():
        log_px = torch.where(torch.isnan(log_px), bernoulli_exact(x, logits), log_px)
    return log_px


def latent_log_ratio(z, mu, logvar) -> torch.Tensor:
    """log p(h) - log q(h|x) [B, k] in float32 (the 2 pi terms cancel)."""
    z = z.float()
    mu = mu.float().unsqueeze(1)
    logvar = logvar.float().unsqueeze(1)
    return 0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar - z * z).sum(-1)


def gaussian_kl(mu, logvar) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) [B] in closed form, float32."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar).sum(-1)


def torch_log_weights(x, logits, z, mu, logvar) -> torch.Tensor:
    """log w [B, k] in float32 with broadcasting over k (no repeats) and BCE with logits."""
    return torch_log_likelihood(x, logits) + latent_log_ratio(z, mu, logvar)


def log_weights(x, logits, z, mu, logvar, backend: str = "torch") -> torch.Tensor:
    """log w [B, k] float32 from the five inputs (shapes as in ``kernels.log_weights``)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "fused":
        return kernels.log_weights(x, logits, z, mu, logvar)
    check_bound_inputs(x, logits, z, mu, logvar)
    return torch_log_weights(x, logits, z, mu, logvar)


def iwae_bound(x, logits, z, mu, logvar, backend: str = "torch") -> torch.Tensor:
    """L_k per example, [B] float32."""
    check_choice("backend", backend, BACKENDS)
    if backend == "fused":
        return kernels.fused_iwae_bound(x, logits, z, mu, logvar)
    log_w = log_weights(x, logits, z, mu, logvar, "torch")
    return torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1])


def log_likelihood(x, logits, z, mu, logvar, backend: str = "torch") -> torch.Tensor:
    """log p(x|h) [B, k] float32 alone. The fused backend takes it from the log-weights kernel
    less the latent terms (computed here, so their gradients cancel exactly)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "fused":
        return kernels.log_weights(x, logits, z, mu, logvar) - latent_log_ratio(z, mu, logvar)
    check_bound_inputs(x, logits, z, mu, logvar)
    return torch_log_likelihood(x, logits)


def iwae_bound_with_weights(x, logits, z, mu, logvar, backend: str = "torch"):
    """(L_k [B], reweight) where ``reweight(g)`` multiplies a per-sample gradient g [B, k, d]
    by the normalized importance weights exp(log w - logsumexp log w) of this forward (as
    constants): in Triton for the fused backend, without materializing the weights."""
    check_choice("backend", backend, BACKENDS)
    if backend == "fused":
        bound, log_w, lse = kernels.fused_iwae_bound_with_weights(x, logits, z, mu, logvar)
        return bound, lambda g: kernels.reweight(g, log_w, lse)
    log_w = log_weights(x, logits, z, mu, logvar, "torch")
    lse = torch.logsumexp(log_w, dim=1)
    frozen = log_w.detach() - lse.detach()[:, None]
    weights = torch.where(torch.isneginf(lse.detach())[:, None], 0.0, torch.exp(frozen))
    return lse - math.log(log_w.shape[1]), lambda g: g * weights.unsqueeze(-1).to(g.dtype)


def objective_bound(x, logits, z, mu, logvar, objective: str = "iwae",
                    backend: str = "torch", kl: str = "sampled") -> torch.Tensor:
    """The objective's lower bound per example, [B] float32 (to be maximized). ``kl``:
    "sampled" (log p(h) - log q(h|x) at the samples, the default) or "analytic" (the ELBOs'
    Gaussian KL in closed form: mean_i log p(x|h_i) - KL(q || p))."""
    check_choice("objective", objective, OBJECTIVES)
    check_choice("backend", backend, BACKENDS)
    check_choice("kl", kl, KLS)
    _, k, _, _ = check_bound_inputs(x, logits, z, mu, logvar, for_kernel=backend == "fused")
    if objective == "elbo" and k != 1:
        raise ValueError(f"objective 'elbo' is the one-sample VAE bound and needs k = 1, got k = {k}; "
                         "use 'multi_sample_elbo' for the average over k samples")
    if kl == "analytic":
        if objective == "iwae":
            raise ValueError("kl='analytic' applies to the ELBOs (elbo, multi_sample_elbo): the IWAE "
                             "bound has no KL term to take in closed form; use kl='sampled'")
        return log_likelihood(x, logits, z, mu, logvar, backend).mean(dim=1) - gaussian_kl(mu, logvar)
    if objective == "iwae":
        return iwae_bound(x, logits, z, mu, logvar, backend)
    return log_weights(x, logits, z, mu, logvar, backend).mean(dim=1)


# --------------------------------------------------------------------------- the decoder head
# The same bounds from the decoder's last hidden layer h and its output layer (weight, bias):
# the torch backend builds the logits with F.linear; the fused one never stores them.


def head_log_weights(x, h, weight, bias, z, mu, logvar, backend: str = "torch") -> torch.Tensor:
    """log w [B, k] float32 from h [B, k, H] and the output layer (weight [D, H], bias [D])."""
    check_choice("backend", backend, BACKENDS)
    if backend == "fused":
        return kernels.fused_linear_log_weights(x, h, weight, bias, z, mu, logvar)
    return log_weights(x, F.linear(h, weight, bias), z, mu, logvar, "torch")


def head_objective_bound(x, h, weight, bias, z, mu, logvar, objective: str = "iwae",
                         backend: str = "torch") -> torch.Tensor:
    """``objective_bound`` with the output layer fused in (kl sampled)."""
    check_choice("objective", objective, OBJECTIVES)
    check_choice("backend", backend, BACKENDS)
    if objective == "elbo" and h.shape[1] != 1:
        raise ValueError(f"objective 'elbo' is the one-sample VAE bound and needs k = 1, got k = "
                         f"{h.shape[1]}; use 'multi_sample_elbo' for the average over k samples")
    if backend == "torch":
        return objective_bound(x, F.linear(h, weight, bias), z, mu, logvar, objective, "torch")
    if objective == "iwae":
        return kernels.fused_linear_iwae_bound(x, h, weight, bias, z, mu, logvar)
    return kernels.fused_linear_log_weights(x, h, weight, bias, z, mu, logvar).mean(dim=1)


def head_iwae_bound_with_weights(x, h, weight, bias, z, mu, logvar, backend: str = "torch"):
    """``iwae_bound_with_weights`` from h and the output layer (DReG through the fused head)."""
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return iwae_bound_with_weights(x, F.linear(h, weight, bias), z, mu, logvar, "torch")
    log_w = kernels.fused_linear_log_weights(x, h, weight, bias, z, mu, logvar)
    lse = torch.logsumexp(log_w, dim=1)
    frozen_log_w, frozen_lse = log_w.detach(), lse.detach()
    return lse - math.log(log_w.shape[1]), lambda g: kernels.reweight(g, frozen_log_w, frozen_lse)