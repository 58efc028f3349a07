"""The five ways to compute the IWAE bound, behind one registry and one calling convention.

Every variant is ``fn(x, logits, z, mu, logvar) -> [B] float32`` (shapes as in
``kernels.log_weights``) and checks its inputs with the same function as the kernels, so bad
input reads the same whichever variant meets it. Adding a variant is one decorated function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import kernels
from kernels import check_bound_inputs


@dataclass(frozen=True)
class Variant:
    name: str
    fn: Callable[..., torch.Tensor]
    description: str
    uses_triton: bool = False     # runs Triton kernels (interpreted, so not timed as speed, on CPU)
    differentiable: bool = True

    def __call__(self, x, logits, z, mu, logvar) -> torch.Tensor:
        check_bound_inputs(x, logits, z, mu, logvar)
        return self.fn(x, logits, z, mu, logvar)


VARIANTS: dict[str, Variant] = {}


def register(name: str, description: str, **flags):
    def wrap(fn):
        VARIANTS[name] = Variant(name, fn, description, **flags)
        return fn
    return wrap


def get(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]


@register("naive", "textbook: inputs repeated to [B*k, ...], BCE on sigmoid probabilities, "
                   "log(mean(exp(log_w))) with no max shift")
def naive_bound(x, logits, z, mu, logvar):
    B, k, D = logits.shape
    d = z.shape[2]
    # What the textbook code does: flatten the samples and repeat the per-example inputs.
    x_rep = x.float().repeat_interleave(k, dim=0)                   # [B*k, D]
    mu_rep = mu.float().repeat_interleave(k, dim=0)                 # [B*k, d]
    logvar_rep = logvar.float().repeat_interleave(k, dim=0)
    h = z.float().reshape(B * k, d)
    probs = torch.sigmoid(logits.float().reshape(B * k, D))
    log_px = -F.binary_cross_entropy(probs, x_rep, reduction="none").sum(dim=1)
    log_2pi = math.log(2.0 * math.pi)
    log_ph = -0.5 * (h ** 2).sum(dim=1) - 0.5 * d * log_2pi
    log_qh = -0.5 * ((h - mu_rep) ** 2 / torch.exp(logvar_rep) + logvar_rep).sum(dim=1) - 0.5 * d * log_2pi
    log_w = (log_px + log_ph - log_qh).view(B, k)
    return torch.log(torch.mean(torch.exp(log_w), dim=1))


def torch_log_weights(x, logits, z, mu, logvar):
    """log w [B, k] in float32 with broadcasting over k (no repeats) and BCE with logits."""
    logits = logits.float()
    log_px = -F.binary_cross_entropy_with_logits(
        logits, x.float().unsqueeze(1).expand_as(logits), reduction="none").sum(-1)
    z = z.float()
    mu = mu.float().unsqueeze(1)
    logvar = logvar.float().unsqueeze(1)
    log_ph_minus_log_qh = 0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar - z * z).sum(-1)
    return log_px + log_ph_minus_log_qh


def torch_bound(x, logits, z, mu, logvar):
    """Stable PyTorch: broadcasting over k, BCE with logits, torch.logsumexp."""
    log_w = torch_log_weights(x, logits, z, mu, logvar)
    return torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1])


register("torch", "stable PyTorch: broadcasting instead of repeats, BCE with logits, "
                  "torch.logsumexp")(torch_bound)

_compiled: dict[str, Callable] = {}


def reset_compiled() -> None:
    """Forget compiled code so the next ``compile`` call compiles afresh (one per sweep cell)."""
    _compiled.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # so a later count of captured graphs is this cell's


@register("compile", "torch.compile of the torch variant (default settings, static shapes)")
def compiled_bound(x, logits, z, mu, logvar):
    if "bound" not in _compiled:
        _compiled["bound"] = torch.compile(torch_bound, dynamic=False)
    return _compiled["bound"](x, logits, z, mu, logvar)


@register("triton", "two Triton kernels: batched log-weights, then the logsumexp over k",
          uses_triton=True)
def triton_bound(x, logits, z, mu, logvar):
    return kernels.iwae_bound(kernels.log_weights(x, logits, z, mu, logvar))


@register("fused", "one Triton kernel from (x, logits, z, mu, logvar) to the bound",
          uses_triton=True)
def fused_bound(x, logits, z, mu, logvar):
    return kernels.fused_iwae_bound(x, logits, z, mu, logvar)


# --------------------------------------------------------------------------- the reduction alone
# The same variants for the last step only, iwae_bound(log_w [B, k]) -> [B], for benchmarks of
# the logsumexp over k by itself ("fused" has nothing to fuse there).


def _naive_reduction(log_w):
    return torch.log(torch.mean(torch.exp(log_w.float()), dim=-1))


def _torch_reduction(log_w):
    return torch.logsumexp(log_w.float(), dim=-1) - math.log(log_w.shape[-1])


def _compiled_reduction(log_w):
    if "reduction" not in _compiled:
        _compiled["reduction"] = torch.compile(_torch_reduction, dynamic=False)
    return _compiled["reduction"](log_w)


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "naive": _naive_reduction,
    "torch": _torch_reduction,
    "compile": _compiled_reduction,
    "triton": kernels.iwae_bound,
}
