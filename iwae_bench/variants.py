"""The ways to compute the IWAE bound, behind one registry and one calling convention.

Three families share the registry and its flags:

- ``bound``: ``variant(x, logits, z, mu, logvar[, scale], objective=, likelihood=) -> [B] float32``
  (shapes as in ``kernels.log_weights``), from the five inputs, or with a sequence of
  ``kernels.Latent`` stochastic layers in z's place (mu, logvar None; ``one_layer`` variants refuse);
- ``reduction``: ``variant(log_w [B, k]) -> [B] float32``, the last step alone (the logsumexp over k);
- ``head``: ``variant(x, h, weight, bias, z, mu, logvar[, scale], objective=, likelihood=) -> [B]
  float32``, the decoder's output layer (l = h weight^T + bias) and the bound together.

``objective`` (training/family.py; the IWAE bound when not given) is the member of the family a
bound or head variant computes: each variant computes every member in its own style (naive
without the max shift, torch stable, triton and fused through ``kernels.Reduction``), except
``blog``, which stands for one blog's IWAE code and computes that bound only.

``likelihood`` (kernels/likelihood.py; the Bernoulli's when not given) is the decoder's p(x|h):
the logits then hold its C channels ([B, k, C D]; the head's weight [C D, H]) and ``scale`` is
its per-pixel log-scale [D] where it has one. Each variant computes every likelihood in its own
style: ``naive`` as typical code does (torch.distributions' Normal and ContinuousBernoulli on
inputs repeated to [B*k, ...], PixelCNN++'s recipe for the discretized logistic), the stable
ones through the stable forms (training.bounds, the kernels), except ``blog`` (the Bernoulli's
only) and the kernels' variants on a logistic mixture (one logistic per pixel: a mixture runs
on torch).

Every variant checks its inputs with the same function as the kernels, so bad input reads
the same whichever variant meets it. The harness reads a variant's flags (``uses_triton``:
interpreted, so not a speed, on a CPU; ``compiles``: compiled afresh per cell), never its
name. Adding a variant is one decorated function.

The stable variants call the training math (``training.bounds``); ``naive`` and ``blog`` are
kept as written in the code they stand for, mistakes included, so a reader sees what that
code costs and where it is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import kernels
from kernels import IWAE, Reduction
from kernels._common import check_log_weights
from kernels.latent import Latent, as_layers, is_single
from kernels.fused_linear import check_head_inputs
from kernels.likelihood import BERNOULLI, Likelihood, as_likelihood

from .training import bounds
from .training.family import IWAE_OBJECTIVE, Objective, default_estimator

FAMILIES = ("bound", "reduction", "head")
INPUTS = {"bound": ("x", "logits", "z", "mu", "logvar"), "reduction": ("log_w",),
          "head": ("x", "h", "weight", "bias", "z", "mu", "logvar")}


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    fn: Callable[..., torch.Tensor]
    description: str
    uses_triton: bool = False   # runs Triton kernels (interpreted, so not timed as speed, on CPU)
    compiles: bool = False      # torch.compile: compiled afresh for every cell
    iwae_only: bool = False     # computes the IWAE bound only (not the rest of the family)
    bernoulli_only: bool = False  # computes the Bernoulli likelihood only
    one_layer: bool = False     # computes one stochastic layer only (z, mu, logvar; no kernels.Latent)

    def computes(self, objective: Objective) -> bool:
        """Whether this variant computes ``objective``'s bound (the reduction family: the IWAE's)."""
        return objective.name == "iwae" or not (self.iwae_only or self.family == "reduction")

    def takes(self, likelihood: Likelihood) -> bool:
        """Whether this variant computes a bound under ``likelihood`` (the kernels take one
        logistic per pixel; the reduction family takes log-weights, whatever made them)."""
        if self.bernoulli_only:
            return likelihood.name == "bernoulli"
        return not (self.uses_triton and likelihood.mixture > 1)

    def refuses_layers(self, layers: int) -> str | None:
        """Why this variant cannot compute a bound with ``layers`` stochastic layers, or None."""
        if layers > 1 and self.one_layer:
            return (f"variant {self.name!r} computes one stochastic layer (z, mu, logvar), not {layers} "
                    "(kernels.Latent): the code it stands for has one latent")
        return None

    def __call__(self, *args, objective: Objective | None = None, likelihood=None, **kwargs) -> torch.Tensor:
        names = INPUTS[self.family]
        optional = () if self.family == "reduction" else ("scale",)
        layered = {} if self.family == "reduction" else {"mu": None, "logvar": None}  # z: kernels.Latent layers
        given = {**layered, **dict(zip(names + optional, args)), **kwargs}
        if len(args) > len(names) + len(optional) or not set(names) <= set(given) <= set(names + optional):
            raise TypeError(f"a {self.family} variant takes ({', '.join(names + optional)}), got "
                            f"{len(args)} positional and {sorted(kwargs)} keyword arguments")
        inputs = [given[name] for name in names]
        if self.family == "reduction":
            if likelihood is not None:
                raise TypeError("a reduction variant takes log_w alone: the likelihood is the bound's")
            check_log_weights("log_w", *inputs, for_kernel=self.uses_triton)
            return self.fn(*inputs)
        likelihood, scale = as_likelihood(likelihood), given.get("scale")
        if not self.takes(likelihood):
            why = "the Bernoulli likelihood only" if self.bernoulli_only else \
                "the kernels, which take one logistic per pixel (a mixture runs on torch)"
            raise ValueError(f"variant {self.name!r} computes {why}, not likelihood {likelihood.label!r}")
        if self.family == "bound":
            layers, _, _ = bounds.checked_layers(*inputs, for_kernel=self.uses_triton, likelihood=likelihood,
                                                 scale=scale)
            why = self.refuses_layers(len(layers)) if not is_single(layers) else None
            if why:
                raise ValueError(why)
        else:
            check_head(*inputs, for_kernel=self.uses_triton, likelihood=likelihood, scale=scale)
        objective = objective or IWAE_OBJECTIVE
        if not self.computes(objective):
            raise ValueError(f"variant {self.name!r} computes the IWAE bound only, not {objective.label!r}")
        objective.check(inputs[1].shape[1], default_estimator(objective))
        return self.fn(*inputs, objective.value(inputs[1].shape[1]), likelihood, scale)


def check_head(x, h, weight, bias, z, mu, logvar, *, for_kernel: bool, likelihood: Likelihood, scale) -> None:
    """The decoder head's inputs for ``likelihood``: weight [C D, H] and bias [C D] hold its C
    channels, ``scale`` [D] where it has a per-pixel scale (the kernels' own check)."""
    check_head_inputs(x, h, weight, bias, z, mu, logvar, for_kernel=for_kernel, likelihood=likelihood, scale=scale)


REGISTRY: dict[str, dict[str, Variant]] = {family: {} for family in FAMILIES}
VARIANTS = REGISTRY["bound"]
REDUCTIONS = REGISTRY["reduction"]
HEADS = REGISTRY["head"]


def register(family: str, name: str, description: str, **flags):
    def wrap(fn):
        REGISTRY[family][name] = Variant(name, family, fn, description, **flags)
        return fn
    return wrap


def get(name: str, family: str = "bound") -> Variant:
    if family not in REGISTRY:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if name not in REGISTRY[family]:
        raise ValueError(f"unknown {family} variant {name!r}; choose from {', '.join(REGISTRY[family])}")
    return REGISTRY[family][name]


# --------------------------------------------------------------------------- torch.compile

_compiled: dict[Callable, Callable] = {}


def reset_compiled() -> None:
    """Forget compiled code so the next ``compile`` call compiles afresh (one per sweep cell)."""
    _compiled.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # so a later count of captured graphs is this cell's


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)`` (default settings, static shapes), compiled on first use."""

    def call(*inputs):
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn, dynamic=False)
        return _compiled[fn](*inputs)

    return call


# --------------------------------------------------------------------------- the bound


def textbook_log_weights(x, logits, z, mu=None, logvar=None, likelihood: Likelihood = BERNOULLI,
                         scale=None) -> torch.Tensor:
    """log w [B, k] as the textbook and blog code compute it: the per-example inputs repeated
    to [B*k, ...], the likelihood as ``textbook_log_likelihood`` writes it, and each stochastic
    layer's term as ``textbook_log_ratio`` writes it (z, mu, logvar or kernels.Latent layers)."""
    B, k, _ = logits.shape
    x_rep = x.float().repeat_interleave(k, dim=0)                   # [B*k, D]
    log_px = textbook_log_likelihood(x_rep, logits.float().reshape(B * k, -1), likelihood, scale)
    return (log_px + sum(textbook_log_ratio(layer, k) for layer in as_layers(z, mu, logvar))).view(B, k)


def textbook_log_ratio(layer: Latent, k: int) -> torch.Tensor:
    """log p(h) - log q(h) [B*k] of one stochastic layer as textbook code writes it: every
    parameter as a [B*k, d] tensor (a per-example one repeated k times, a per-sample one
    reshaped) and hand-written Gaussian log-densities with their 2 pi terms (the standard
    normal prior's as -h^2 / 2)."""
    B, _, d = layer.z.shape
    h = layer.z.float().reshape(B * k, d)
    log_2pi = math.log(2.0 * math.pi)

    def rows(t):
        return t.float().repeat_interleave(k, dim=0) if t.dim() == 2 else t.float().reshape(B * k, d)

    def log_normal(mean, logvar):
        return -0.5 * ((h - rows(mean)) ** 2 / torch.exp(rows(logvar)) + rows(logvar)).sum(dim=1) - 0.5 * d * log_2pi

    if layer.prior_mu is None and layer.prior_logvar is None:
        log_ph = -0.5 * (h ** 2).sum(dim=1) - 0.5 * d * log_2pi
    else:
        zero = torch.zeros_like(h)
        log_ph = log_normal(zero if layer.prior_mu is None else layer.prior_mu,
                            zero if layer.prior_logvar is None else layer.prior_logvar)
    return log_ph - log_normal(layer.mu, layer.logvar)


def textbook_log_likelihood(x_rep, outputs, likelihood: Likelihood, scale) -> torch.Tensor:
    """log p(x|h) [B*k] on repeated inputs (x_rep [B*k, D], outputs [B*k, C D]) as typical code
    writes each likelihood: BCE on sigmoid probabilities (torch clamps each log at -100);
    torch.distributions' Normal (mean, exp(s / 2)) and ContinuousBernoulli(logits) (which clamps
    its probabilities: ~0.8 nats off at |l| = 80 even in float64, more in float32);
    ``pixelcnn_logistic`` for the discretized logistic and its mixture."""
    if likelihood.name == "bernoulli":
        return -F.binary_cross_entropy(torch.sigmoid(outputs), x_rep, reduction="none").sum(dim=1)
    if likelihood.name == "continuous_bernoulli":
        return torch.distributions.ContinuousBernoulli(logits=outputs).log_prob(x_rep).sum(dim=1)
    mix, means, log_scales = bounds.location_channels(outputs, likelihood, scale)
    if likelihood.name == "gaussian":
        return torch.distributions.Normal(means[0], torch.exp(0.5 * log_scales[0])).log_prob(x_rep).sum(dim=1)
    each = torch.stack([pixelcnn_logistic(x_rep, m, s, likelihood.half_bin) for m, s in zip(means, log_scales)])
    if not mix:
        return each[0].sum(dim=1)
    return torch.logsumexp(each + torch.log_softmax(torch.stack(mix), dim=0), dim=0).sum(dim=1)


def pixelcnn_logistic(x, mean, log_scale, half_bin: float) -> torch.Tensor:
    """The log mass of x's bin as PixelCNN++'s published loss computes it (Salimans et al. 2017):
    the difference of the two sigmoids, its log clamped at 1e-12; where that difference is
    below 1e-5, the density at the bin's centre times the bin's width instead (a patch for the
    difference's underflow, wrong by the density's curvature over the bin); the edge bins from
    log sigmoid(a) and -softplus(b). (The recipe's clamp of the log-scales at -7 belongs to its
    model, not to the likelihood: left out, as ``floor`` is the spec's.)"""
    centred = x - mean
    inv = torch.exp(-log_scale)
    plus, minus = inv * (centred + half_bin), inv * (centred - half_bin)
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    log_cdf_plus = plus - F.softplus(plus)      # the bottom bin: log F(a)
    log_one_minus_cdf_min = -F.softplus(minus)  # the top bin: log(1 - F(b))
    mid = inv * centred
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)
    inner = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                        log_pdf_mid + math.log(2.0 * half_bin))
    return torch.where(x < half_bin - 1.0, log_cdf_plus,
                       torch.where(x > 1.0 - half_bin, log_one_minus_cdf_min, inner))


def naive_reduce(log_w: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """The reduction as textbook code writes it: log(mean(exp(s log w))) / s per group, with no
    max shift (so realistic log-weights underflow to -inf), beta mean log w mixed in."""
    B, k = log_w.shape
    grouped = log_w.view(B, reduction.groups, -1)
    s, beta = reduction.scale, reduction.beta
    value = 0.0
    if beta < 1.0:
        value = (1.0 - beta) * torch.log(torch.mean(torch.exp(s * grouped), dim=2)) / s
    if reduction.linear:
        value = value + beta * grouped.mean(2)
    return value.mean(1)


@register("bound", "naive", "textbook: inputs repeated to [B*k, ...], BCE on sigmoid probabilities "
                            "(torch.distributions' Normal and ContinuousBernoulli, PixelCNN++'s "
                            "discretized logistic), log(mean(exp(log_w))) with no max shift")
def naive_bound(x, logits, z, mu, logvar, reduction=IWAE, likelihood=BERNOULLI, scale=None):
    return naive_reduce(textbook_log_weights(x, logits, z, mu, logvar, likelihood, scale), reduction)


@register("bound", "blog", "the blog code's IWAE loss as written: inputs repeated to [B*k, ...], "
                           "BCE on sigmoid probabilities (log clamped at -100), then torch.logsumexp",
          iwae_only=True, bernoulli_only=True, one_layer=True)
def blog_bound(x, logits, z, mu, logvar, reduction=IWAE, likelihood=BERNOULLI, scale=None):
    log_w = textbook_log_weights(x, logits, z, mu, logvar)
    return torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1])


def torch_bound(x, logits, z, mu, logvar, reduction=IWAE, likelihood=BERNOULLI, scale=None):
    return bounds.reduced_bound(x, logits, z, mu, logvar, reduction, backend="torch", likelihood=likelihood,
                                scale=scale)


register("bound", "torch", "stable PyTorch: broadcasting instead of repeats, BCE with logits, "
                           "torch.logsumexp")(torch_bound)
register("bound", "compile", "torch.compile of the torch variant (default settings, static shapes)",
         compiles=True)(compiled(torch_bound))


@register("bound", "triton", "two Triton kernels: batched log-weights, then the logsumexp over k",
          uses_triton=True)
def triton_bound(x, logits, z, mu, logvar, reduction=IWAE, likelihood=BERNOULLI, scale=None):
    log_w = kernels.log_weights(x, logits, z, mu, logvar, likelihood=likelihood, scale=scale)
    return kernels.iwae_bound(log_w, reduction)


@register("bound", "fused", "one Triton kernel from (x, logits, z, mu, logvar) to the bound",
          uses_triton=True)
def fused_bound(x, logits, z, mu, logvar, reduction=IWAE, likelihood=BERNOULLI, scale=None):
    return bounds.reduced_bound(x, logits, z, mu, logvar, reduction, backend="fused", likelihood=likelihood,
                                scale=scale)


# --------------------------------------------------------------------------- the reduction alone
# iwae_bound(log_w [B, k]) -> [B] by itself ("fused" has nothing to fuse there).


@register("reduction", "naive", "log(mean(exp(log_w))) with no max shift")
def naive_reduction(log_w):
    return torch.log(torch.mean(torch.exp(log_w.float()), dim=-1))


def torch_reduction(log_w):
    return torch.logsumexp(log_w.float(), dim=-1) - math.log(log_w.shape[-1])


register("reduction", "torch", "torch.logsumexp minus log k")(torch_reduction)
register("reduction", "compile", "torch.compile of the torch reduction", compiles=True)(
    compiled(torch_reduction))
register("reduction", "triton", "the streaming Triton logsumexp (kernels.iwae_bound)",
         uses_triton=True)(kernels.iwae_bound)


# --------------------------------------------------------------------------- the decoder head
# The output layer l = h W^T + b and the bound: with the logits in memory (torch, compile,
# triton) or never (fused_linear).


def torch_head(x, h, weight, bias, z, mu, logvar, reduction=IWAE, likelihood=BERNOULLI, scale=None):
    return torch_bound(x, F.linear(h, weight, bias), z, mu, logvar, reduction, likelihood, scale)


register("head", "torch", "nn.Linear's matmul, then the stable torch bound")(torch_head)
register("head", "compile", "torch.compile of the torch head (matmul and bound together)",
         compiles=True)(compiled(torch_head))


@register("head", "triton", "the matmul by torch, then the fused Triton bound on the logits",
          uses_triton=True)
def triton_head(x, h, weight, bias, z, mu, logvar, reduction=IWAE, likelihood=BERNOULLI, scale=None):
    return kernels.fused_iwae_bound(x, F.linear(h, weight, bias), z, mu, logvar, reduction,
                                    likelihood=likelihood, scale=scale)


@register("head", "fused_linear", "one Triton kernel from h and the output layer to the bound: "
                                  "logits built on chip, never stored", uses_triton=True)
def fused_linear_head(x, h, weight, bias, z, mu, logvar, reduction=IWAE, likelihood=BERNOULLI, scale=None):
    return kernels.fused_linear_iwae_bound(x, h, weight, bias, z, mu, logvar, reduction,
                                           likelihood=likelihood, scale=scale)
