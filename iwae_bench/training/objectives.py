"""Training objectives over the same inputs: the seed's three, one argument apart.

    elbo               k = 1:  log w                      (the VAE)
    multi_sample_elbo  any k:  mean_i log w_i             ("average of logs")
    iwae               any k:  logsumexp_i log w_i - log k ("log of average", the IWAE)

``backend="torch"`` computes them with stable PyTorch (autograd), ``backend="fused"`` with the
Triton kernels, both with backward passes (``training.bounds``), so training code switches
with one argument.
"""

from __future__ import annotations

import torch

from .bounds import BACKENDS, OBJECTIVES, check_choice, objective_bound


class IWAELoss(torch.nn.Module):
    """Negative mean bound over the batch: ``loss = IWAELoss("iwae")(x, logits, z, mu, logvar)``.

    x [B, D]; logits [B, k, D] from the decoder at the samples z [B, k, d] drawn (with the
    reparameterization) from q = N(mu, exp(logvar)) of the encoder; mu, logvar [B, d].
    """

    def __init__(self, objective: str = "iwae", backend: str = "fused"):
        super().__init__()
        check_choice("objective", objective, OBJECTIVES)
        check_choice("backend", backend, BACKENDS)
        self.objective = objective
        self.backend = backend

    def forward(self, x, logits, z, mu, logvar) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 0:
            raise ValueError("IWAELoss needs a batch of at least one example: x has shape "
                             f"[{', '.join(map(str, x.shape))}] (the mean over no examples is undefined)")
        return -objective_bound(x, logits, z, mu, logvar, self.objective, self.backend).mean()

    def extra_repr(self) -> str:
        return f"objective={self.objective!r}, backend={self.backend!r}"
