"""A Bernoulli VAE with one stochastic layer (the IWAE paper's small architecture, sized freely).

``model(x, k)`` returns what the bounds take: (logits [B, k, D], z [B, k, d], mu [B, d],
logvar [B, d]), with z drawn by the reparameterization trick so gradients reach the encoder.
"""

from __future__ import annotations

import torch
from torch import nn


class BernoulliVAE(nn.Module):
    def __init__(self, data_dim: int = 784, latent: int = 50, hidden: int = 200):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, data_dim))

    def encode(self, x: torch.Tensor):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def forward(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None):
        mu, logvar = self.encode(x)
        eps = torch.randn((x.shape[0], k, mu.shape[-1]), generator=generator,
                          device=x.device, dtype=mu.dtype)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        return self.decoder(z), z, mu, logvar
