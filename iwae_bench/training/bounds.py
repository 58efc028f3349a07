"""The bounds' math in one home, behind one ``backend=`` choice. Objectives, the experiments and
the benchmark's variants all call these functions.

    log w_i = log p(x|h_i) + log p(h_i) - log q(h_i|x)       log_weights      [B, k]
    IWAE    L_k = logsumexp_i log w_i - log k                 iwae_bound       [B]
    family  any kernels.Reduction of log w (VR, MIWAE, ...)   reduced_bound    [B]
    named   an objective of training/family.py                objective_bound  [B]
            (ELBOs also with kl="analytic": mean_i log p(x|h_i) - KL(q(h|x) || p(h)) in closed form)

``backend="torch"``: stable PyTorch with autograd (broadcasting over k, BCE with logits,
``torch.logsumexp``). ``backend="fused"``: the Triton kernels (one fused kernel from the inputs
to any member of the family), backward passes in Triton. Both return float32 and follow the
same rule for infinite logits as the float64 reference (kernels/logw.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kernels
from kernels import IWAE, Reduction, check_bound_inputs
from kernels.latent import Latent, as_layers, check_layered_inputs, is_single
from kernels.likelihood import BERNOULLI, SERIES_BELOW, Likelihood, as_likelihood

from .family import OBJECTIVES, as_objective, default_estimator, torch_reduce  # noqa: F401 (re-exported)

BACKENDS = ("torch", "fused")
LOG_2PI = math.log(2.0 * math.pi)
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


def torch_log_likelihood(x, logits, likelihood: Likelihood = BERNOULLI, scale=None) -> torch.Tensor:
    """log p(x|h) [B, k] in float32 for any likelihood (kernels/likelihood.py has the stable
    forms), broadcasting x over k (no repeats); logits [B, k, C D] the decoder's C channels."""
    if likelihood.name == "bernoulli":
        return torch_bernoulli(x, logits)
    x = x.float().unsqueeze(1)
    if likelihood.name == "continuous_bernoulli":
        l = logits.float()  # x l - max(l, 0) + log phi(|l|), each side of l = 0 by one even function
        return ((x - 0.5) * l + log_phi_less_half(l)).sum(-1)
    mix, means, log_scales = location_channels(logits, likelihood, scale)
    if likelihood.name == "gaussian":
        m, s = means[0], log_scales[0]
        return (-0.5 * ((x - m) ** 2 * torch.exp(-s) + s + LOG_2PI)).sum(-1)
    each = [discretized_logistic(x, m, s, likelihood.half_bin) for m, s in zip(means, log_scales)]
    if not mix:
        return each[0].sum(-1)
    log_mix = torch.log_softmax(torch.stack(mix), dim=0)
    return torch.logsumexp(log_mix + torch.stack(each), dim=0).sum(-1)


def location_channels(outputs, likelihood: Likelihood, scale=None) -> tuple[list, list, list]:
    """A location family's decoder output [..., C D] (kernels/likelihood.py) as (mixing
    logits, means, log-scales), lists of [..., D] float32 tensors, L of each (no mixing logits
    for one logistic); the log-scales the channels, the per-pixel ``scale`` or the fixed
    number, clamped at the floor."""
    parts = [c.float() for c in outputs.unflatten(-1, (likelihood.channels, -1)).unbind(-2)]
    L = likelihood.mixture
    mix, means = (parts[:L], parts[L:2 * L]) if L > 1 else ([], parts[:1])
    if likelihood.scale == "sample":
        log_scales = parts[2 * L:] if L > 1 else parts[1:]
    elif likelihood.scale == "pixel":
        log_scales = [scale.float()]
    else:
        log_scales = [torch.tensor(likelihood.log_scale, device=outputs.device)]
    if likelihood.floor > -math.inf:
        log_scales = [torch.clamp(s, min=likelihood.floor) for s in log_scales]
    return mix, means, log_scales


def log_phi_less_half(t: torch.Tensor) -> torch.Tensor:
    """log phi(|t|) - |t| / 2, phi(a) = a / (1 - e^-a): an even function of t, written without
    |t| below 1/2 (the series -t^2/24 + t^4/2880 - t^6/181440, within 4e-10 and its slope
    within 7e-9 at 1/2: a term more than the kernels' value takes, for the gradient), so its gradient at t = 0 is exactly 0 (autograd
    through |t| or max(t, 0) gives 0 for the slope there, and the continuous Bernoulli's
    gradient x instead of x - 1/2); above, log a - log(-expm1(-a)) - a/2. The unused branch is
    fed a safe value, so neither it nor its gradient is ever NaN."""
    series = t.abs() < SERIES_BELOW
    safe = torch.where(series, 1.0, t.abs())
    t2 = t * t
    return torch.where(series, t2 * (t2 * (1.0 / 2880.0 - t2 / 181440.0) - 1.0 / 24.0),
                       torch.log(safe) - torch.log(-torch.expm1(-safe)) - 0.5 * safe)


def log_phi(a: torch.Tensor) -> torch.Tensor:
    """log(a / (1 - e^-a)) for a >= 0: a/2 and the series above below 1/2, log a -
    log(-expm1(-a)) above."""
    return 0.5 * a + log_phi_less_half(a)


def discretized_logistic(x, mean, log_scale, half_bin: float) -> torch.Tensor:
    """log of the logistic's mass on x's bin per element (kernels/likelihood.py's stable form:
    log F(a) - softplus(b) + log(1 - e^-eps), the edge bins open)."""
    inv = torch.exp(-log_scale)
    a = (x - mean + half_bin) * inv
    b = (x - mean - half_bin) * inv
    eps = 2.0 * half_bin * inv
    log_one_minus = math.log(2.0 * half_bin) - log_scale - log_phi(eps)  # log(1 - e^-eps)
    log_fa, neg_softplus_b = F.logsigmoid(a), -F.softplus(b)
    middle = log_fa + neg_softplus_b + log_one_minus
    return torch.where(x < half_bin - 1.0, log_fa, torch.where(x > 1.0 - half_bin, neg_softplus_b, middle))


def torch_bernoulli(x, logits) -> torch.Tensor:
    """log p(x|h) [B, k] in float32 for the Bernoulli: BCE with logits, broadcasting x over k."""
    logits = logits.float()
    x = x.float().unsqueeze(1)
    log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    # BCE with logits is NaN where an infinite logit meets x on its side (0 * inf); those rows
    # only (never on finite logits) are summed again with the exact rule.
    if torch.isnan(log_px).any():
        log_px = torch.where(torch.isnan(log_px), bernoulli_exact(x, logits), log_px)
    return log_px


def layer_log_ratio(layer: Latent) -> torch.Tensor:
    """log p(z) - log q(z) [B, k] in float32 of one stochastic layer (kernels.Latent): each
    parameter [B, d] broadcast over the samples, [B, k, d] per sample, or an absent prior one 0
    (the standard normal; the 2 pi terms cancel)."""
    z = layer.z.float()

    def param(t):
        return 0.0 if t is None else (t.float().unsqueeze(1) if t.dim() == 2 else t.float())

    mu, logvar, prior_mu, prior_logvar = (param(t) for t in layer[1:])
    log_q = (z - mu) ** 2 * torch.exp(-logvar) + logvar
    log_p = (z - prior_mu) ** 2 * torch.exp(-torch.as_tensor(prior_logvar)) + prior_logvar
    return 0.5 * (log_q - log_p).sum(-1)


def latent_terms(layers) -> torch.Tensor:
    """The latent side of log w [B, k] float32: the sum of the stochastic layers' terms."""
    total = layer_log_ratio(layers[0])
    for layer in layers[1:]:
        total = total + layer_log_ratio(layer)
    return total


def checked_layers(x, logits, z, mu, logvar, *, for_kernel=False, likelihood=None, scale=None):
    """(layers, B, k) of a call: the one-layer call's checks (``check_bound_inputs``) or the
    stochastic layers' (kernels/latent.py)."""
    layers = as_layers(z, mu, logvar)
    if is_single(layers):
        B, k = check_bound_inputs(x, logits, *layers[0][:3], for_kernel=for_kernel, likelihood=likelihood,
                                  scale=scale)[:2]
    else:
        B, k = check_layered_inputs(x, logits, layers, for_kernel=for_kernel, likelihood=likelihood, scale=scale)
    return layers, B, k


def check_analytic(layers) -> None:
    """kl="analytic" is the one-layer closed form KL(q(h|x) || N(0, I)): refused otherwise."""
    if not is_single(layers):
        raise ValueError("kl='analytic' is the closed-form KL of one stochastic layer with a standard normal "
                         "prior; stochastic layers (kernels.Latent) or per-sample parameters take kl='sampled'")


def gaussian_kl(mu, logvar) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) [B] in closed form, float32."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar).sum(-1)


def torch_log_weights(x, logits, z, mu=None, logvar=None, likelihood: Likelihood = BERNOULLI,
                      scale=None) -> torch.Tensor:
    """log w [B, k] in float32 with broadcasting over k (no repeats) and BCE with logits."""
    return torch_log_likelihood(x, logits, likelihood, scale) + latent_terms(as_layers(z, mu, logvar))


def log_weights(x, logits, z, mu=None, logvar=None, backend: str = "torch", *, likelihood=BERNOULLI,
                scale=None) -> torch.Tensor:
    """log w [B, k] float32 from the five inputs (shapes as in ``kernels.log_weights``;
    ``likelihood`` a ``kernels.Likelihood`` or its spelling, ``scale`` a per-pixel log-scale);
    ``z`` a sequence of ``kernels.Latent`` for stochastic layers (mu, logvar None)."""
    check_choice("backend", backend, BACKENDS)
    likelihood = as_likelihood(likelihood)
    if backend == "fused":
        return kernels.log_weights(x, logits, z, mu, logvar, likelihood=likelihood, scale=scale)
    checked_layers(x, logits, z, mu, logvar, likelihood=likelihood, scale=scale)
    return torch_log_weights(x, logits, z, mu, logvar, likelihood, scale)


def reduced_bound(x, logits, z, mu=None, logvar=None, reduction: Reduction = IWAE, backend: str = "torch",
                  with_log_w: bool = False, *, likelihood=BERNOULLI, scale=None):
    """The bound ``reduction`` (``kernels.Reduction``: the IWAE bound by default, any member of
    the family) per example, [B] float32; with ``with_log_w`` also log w [B, k] (detached: the
    estimators' weights are constants of the forward pass)."""
    check_choice("backend", backend, BACKENDS)
    likelihood = as_likelihood(likelihood)
    if backend == "fused":
        if with_log_w:
            bound, log_w, _ = kernels.fused_iwae_bound_with_weights(x, logits, z, mu, logvar, reduction,
                                                                    likelihood=likelihood, scale=scale)
            return bound, log_w
        return kernels.fused_iwae_bound(x, logits, z, mu, logvar, reduction, likelihood=likelihood, scale=scale)
    log_w = log_weights(x, logits, z, mu, logvar, "torch", likelihood=likelihood, scale=scale)
    bound = torch_reduce(log_w, reduction)
    return (bound, log_w.detach()) if with_log_w else bound


def iwae_bound(x, logits, z, mu=None, logvar=None, backend: str = "torch", *, likelihood=BERNOULLI,
               scale=None) -> torch.Tensor:
    """L_k per example, [B] float32."""
    return reduced_bound(x, logits, z, mu, logvar, IWAE, backend, likelihood=likelihood, scale=scale)


def log_likelihood(x, logits, z, mu=None, logvar=None, backend: str = "torch", *, likelihood=BERNOULLI,
                   scale=None) -> torch.Tensor:
    """log p(x|h) [B, k] float32 alone. The fused backend takes it from the log-weights kernel
    less the latent terms (computed here, so their gradients cancel exactly)."""
    check_choice("backend", backend, BACKENDS)
    likelihood = as_likelihood(likelihood)
    if backend == "fused":
        return (kernels.log_weights(x, logits, z, mu, logvar, likelihood=likelihood, scale=scale)
                - latent_terms(as_layers(z, mu, logvar)))
    checked_layers(x, logits, z, mu, logvar, likelihood=likelihood, scale=scale)
    return torch_log_likelihood(x, logits, likelihood, scale)


def objective_bound(x, logits, z, mu=None, logvar=None, objective="iwae", backend: str = "torch",
                    kl: str = "sampled", *, likelihood=BERNOULLI, scale=None, **params) -> torch.Tensor:
    """The objective's bound per example, [B] float32 (to be maximized): a name with its
    parameters as keywords (``objective="vr", alpha=0.5``), a spelling (``"miwae:8x8"``) or an
    ``Objective`` (training/family.py). PIWAE and RWS report the IWAE bound. ``kl``: "sampled"
    (log p(h) - log q(h|x) at the samples, the default) or "analytic" (the ELBOs' Gaussian KL
    in closed form: mean_i log p(x|h_i) - KL(q || p)). ``likelihood``: kernels/likelihood.py."""
    objective = as_objective(objective, **params)
    likelihood = as_likelihood(likelihood)
    check_choice("backend", backend, BACKENDS)
    check_choice("kl", kl, KLS)
    layers, _, k = checked_layers(x, logits, z, mu, logvar, for_kernel=backend == "fused", likelihood=likelihood,
                                  scale=scale)
    objective.check(k, default_estimator(objective), kl)
    lik = {"likelihood": likelihood, "scale": scale}
    if kl == "analytic":
        check_analytic(layers)
        return log_likelihood(x, logits, z, mu, logvar, backend, **lik).mean(dim=1) - gaussian_kl(mu, logvar)
    return reduced_bound(x, logits, z, mu, logvar, objective.value(k), backend, **lik)


# --------------------------------------------------------------------------- the decoder head
# The same bounds from the decoder's last hidden layer h and its output layer (weight, bias):
# the torch backend builds the logits with F.linear; the fused one never stores them.


def head_log_weights(x, h, weight, bias, z, mu=None, logvar=None, backend: str = "torch", *, likelihood=BERNOULLI,
                     scale=None) -> torch.Tensor:
    """log w [B, k] float32 from h [B, k, H] and the output layer (weight [C D, H], bias [C D]:
    the likelihood's C channels)."""
    check_choice("backend", backend, BACKENDS)
    likelihood = as_likelihood(likelihood)
    if backend == "fused":
        return kernels.fused_linear_log_weights(x, h, weight, bias, z, mu, logvar, likelihood=likelihood,
                                                scale=scale)
    return log_weights(x, F.linear(h, weight, bias), z, mu, logvar, "torch", likelihood=likelihood, scale=scale)


def head_reduced_bound(x, h, weight, bias, z, mu=None, logvar=None, reduction: Reduction = IWAE,
                       backend: str = "torch", with_log_w: bool = False, *, likelihood=BERNOULLI, scale=None):
    """``reduced_bound`` from h and the output layer (the fused backend never stores logits)."""
    check_choice("backend", backend, BACKENDS)
    lik = {"likelihood": as_likelihood(likelihood), "scale": scale}
    if backend == "torch":
        return reduced_bound(x, F.linear(h, weight, bias), z, mu, logvar, reduction, "torch", with_log_w, **lik)
    if with_log_w:
        bound, log_w, _ = kernels.fused_linear_iwae_bound_with_weights(x, h, weight, bias, z, mu, logvar,
                                                                       reduction, **lik)
        return bound, log_w
    return kernels.fused_linear_iwae_bound(x, h, weight, bias, z, mu, logvar, reduction, **lik)


def head_objective_bound(x, h, weight, bias, z, mu=None, logvar=None, objective="iwae", backend: str = "torch",
                         *, likelihood=BERNOULLI, scale=None, **params) -> torch.Tensor:
    """``objective_bound`` with the output layer fused in (kl sampled)."""
    objective = as_objective(objective, **params)
    objective.check(h.shape[1] if h.dim() == 3 else 1, default_estimator(objective))
    return head_reduced_bound(x, h, weight, bias, z, mu, logvar, objective.value(h.shape[1]), backend,
                              likelihood=likelihood, scale=scale)
