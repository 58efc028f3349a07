"""A VAE with one stochastic layer (the IWAE paper's small architecture, sized freely) and any
likelihood of kernels/likelihood.py (the Bernoulli's by default).

``model(x, k)`` returns what the bounds take: (logits [B, k, C D], z [B, k, d], mu [B, d],
logvar [B, d]), with z drawn by the reparameterization trick so gradients reach the encoder;
C is the likelihood's channels per pixel (the output layer is [C D, H]). A likelihood with a
learned per-pixel scale keeps it as ``model.scale`` [D] (None otherwise), passed to the loss as
``scale=``.
``save_checkpoint``/``load_checkpoint`` keep a trained model (the experiment saves them, the
SNR benchmark loads them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kernels.likelihood import as_likelihood

from ..files import atomic_path


class BernoulliVAE(nn.Module):
    def __init__(self, data_dim: int = 784, latent: int = 50, hidden: int = 200, likelihood="bernoulli"):
        super().__init__()
        self.likelihood = as_likelihood(likelihood)
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, self.likelihood.channels * data_dim))
        self.scale = nn.Parameter(torch.zeros(data_dim)) if self.likelihood.needs_scale else None

    def encode(self, x: torch.Tensor):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    @property
    def output_layer(self) -> nn.Linear:
        """The decoder's last layer: logits = output_layer(hidden)."""
        return self.decoder[-1]

    def decode_hidden(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden layer h [..., H] (everything before the output layer)."""
        return self.decoder[:-1](z)

    def sample(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None):
        """(z [B, k, d], mu, logvar): k reparameterized samples of q(z|x)."""
        mu, logvar = self.encode(x)
        eps = torch.randn((x.shape[0], k, mu.shape[-1]), generator=generator,
                          device=x.device, dtype=mu.dtype)
        return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps, mu, logvar

    def forward(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None):
        z, mu, logvar = self.sample(x, k, generator)
        return self.decoder(z), z, mu, logvar

    def forward_hidden(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None):
        """(h [B, k, H], z, mu, logvar): what ``IWAELoss.from_hidden`` takes with
        ``output_layer``, so the logits need never exist (the fused head)."""
        z, mu, logvar = self.sample(x, k, generator)
        return self.decode_hidden(z), z, mu, logvar


VAE = BernoulliVAE  # the name that fits a model of any likelihood


def save_checkpoint(model: BernoulliVAE, path: Path) -> None:
    """``torch.save`` of {"state_dict" (on CPU), "data_dim", "latent", "hidden", "likelihood"},
    atomically."""
    data_dim, hidden = model.encoder[0].in_features, model.encoder[0].out_features
    latent = model.decoder[0].in_features
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        torch.save({"state_dict": state, "data_dim": data_dim, "latent": latent, "hidden": hidden,
                    "likelihood": model.likelihood.label}, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> BernoulliVAE:
    """The BernoulliVAE saved by ``save_checkpoint``; ValueError naming the path if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"checkpoint {path}: not a torch.save file ({type(error).__name__})") from None
    keys = {"state_dict", "data_dim", "latent", "hidden"}
    if not isinstance(saved, dict) or not keys <= set(saved):
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"checkpoint {path}: expected a dict with keys {sorted(keys)}, found {found}")
    likelihood = saved.get("likelihood", "bernoulli")  # older checkpoints: the Bernoulli's
    model = BernoulliVAE(int(saved["data_dim"]), int(saved["latent"]), int(saved["hidden"]), likelihood)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path}: state_dict does not fit BernoulliVAE("
                         f"{saved['data_dim']}, {saved['latent']}, {saved['hidden']}, {likelihood!r}): "
                         f"{str(error).splitlines()[0]}") from None
    return model.to(device)
