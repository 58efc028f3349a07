"""Training objectives over the same inputs: the seed's three, one argument apart.

    elbo               k = 1:  log w                      (the VAE)
    multi_sample_elbo  any k:  mean_i log w_i             ("average of logs")
    iwae               any k:  logsumexp_i log w_i - log k ("log of average", the IWAE)

``backend="torch"`` computes them with stable PyTorch (autograd), ``backend="fused"`` with the
Triton kernels (the fused bound for iwae, the log-weights kernel for the ELBOs), both with
backward passes, so training code switches with one argument.
"""

from __future__ import annotations


import torch

import kernels
from kernels import check_bound_inputs

from .variants import torch_bound, torch_log_weights

OBJECTIVES = ("elbo", "multi_sample_elbo", "iwae")
BACKENDS = ("torch", "fused")


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def bound(x, logits, z, mu, logvar, objective: str = "iwae", backend: str = "fused") -> torch.Tensor:
    """The objective's lower bound per example, [B] float32 (to be maximized)."""
    _check_choice("objective", objective, OBJECTIVES)
    _check_choice("backend", backend, BACKENDS)
    _, k, _, _ = check_bound_inputs(x, logits, z, mu, logvar)
    if objective == "elbo" and k != 1:
        raise ValueError(f"objective 'elbo' is the one-sample VAE bound and needs k = 1, got k = {k}; "
                         "use 'multi_sample_elbo' for the average over k samples")
    fused = backend == "fused"
    if objective == "iwae":
        return (kernels.fused_iwae_bound if fused else torch_bound)(x, logits, z, mu, logvar)
    return (kernels.log_weights if fused else torch_log_weights)(x, logits, z, mu, logvar).mean(dim=1)


class IWAELoss(torch.nn.Module):
    """Negative mean bound over the batch: ``loss = IWAELoss("iwae")(x, logits, z, mu, logvar)``.

    x [B, D]; logits [B, k, D] from the decoder at the samples z [B, k, d] drawn (with the
    reparameterization) from q = N(mu, exp(logvar)) of the encoder; mu, logvar [B, d].
    """

    def __init__(self, objective: str = "iwae", backend: str = "fused"):
        super().__init__()
        _check_choice("objective", objective, OBJECTIVES)
        _check_choice("backend", backend, BACKENDS)
        self.objective = objective
        self.backend = backend

    def forward(self, x, logits, z, mu, logvar) -> torch.Tensor:
        return -bound(x, logits, z, mu, logvar, self.objective, self.backend).mean()

    def extra_repr(self) -> str:
        return f"objective={self.objective!r}, backend={self.backend!r}"

