"""A VAE with one stochastic layer (the IWAE paper's small architecture, sized freely), and
``TwoLayerVAE``, its second (two stochastic layers), with any likelihood of kernels/likelihood.py
(the Bernoulli's by default).

``model(x, k)`` returns what the bounds take: (logits [B, k, C D], z [B, k, d], mu [B, d],
logvar [B, d]), with z drawn by the reparameterization trick so gradients reach the encoder;
C is the likelihood's channels per pixel (the output layer is [C D, H]). A likelihood with a
learned per-pixel scale keeps it as ``model.scale`` [D] (None otherwise), passed to the loss as
``scale=``.
``TwoLayerVAE(x, k)`` returns (logits, layers): the stochastic layers as ``Layer`` named tuples
that the bounds read as ``kernels.Latent`` (see the class). ``save_checkpoint``/``load_checkpoint`` keep a trained model (the experiment saves them, the
SNR benchmark loads them).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

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


def tanh_mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """Two deterministic tanh layers of ``hidden`` units, then a linear output of ``n_out``."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_out))


class Gaussian(nn.Module):
    """A diagonal Gaussian's (mu, logvar), each [..., d], from its input through ``tanh_mlp``."""

    def __init__(self, n_in: int, hidden: int, d: int):
        super().__init__()
        self.net = tanh_mlp(n_in, hidden, 2 * d)

    def forward(self, t: torch.Tensor):
        return tuple(self.net(t).chunk(2, dim=-1))


class Layer(NamedTuple):
    """One stochastic layer as a model hands it to the loss: ``kernels.Latent``'s five fields
    (what the bounds read) and how q's parameters were made, (mu, logvar) = posterior(given),
    for a posterior that depends on another layer's sample (q(h2|h1): given is h1). The
    estimators that hold q's weights fixed (training/objectives.py) recompute them from it;
    None (q(h1|x): x carries no gradient) lets them detach mu and logvar instead."""

    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    prior_mu: torch.Tensor | None = None
    prior_logvar: torch.Tensor | None = None
    posterior: nn.Module | None = None
    given: torch.Tensor | None = None


class TwoLayerVAE(nn.Module):
    """The IWAE paper's second architecture (Burda, Grosse & Salakhutdinov 2016, section 5):
    stochastic layers h1 (100 units) and h2 (50), two deterministic tanh layers of 200 units
    between x and h1 and two of 100 between h1 and h2, the decoder mirrored; every stochastic
    layer a diagonal Gaussian (log-variance output), p(h2) = N(0, I):

        q(h1|x), q(h2|h1)                 encoder   x -> 200 -> 200 -> h1 -> 100 -> 100 -> h2
        p(h1|h2), p(x|h1)                 decoder   h2 -> 100 -> 100 -> h1 -> 200 -> 200 -> x

    A class of its own rather than a depth argument to ``BernoulliVAE``: its forward returns
    the layers, not (z, mu, logvar), and its checkpoints hold other modules.

    ``forward(x, k)`` returns (logits [B, k, C D], (layer1, layer2)): layer1 =
    Layer(h1, mu1 [B, d1], logvar1 [B, d1], prior_mu [B, k, d1], prior_logvar [B, k, d1]) (the
    prior p(h1|h2) per sample), layer2 = Layer(h2, mu2 [B, k, d2], logvar2 [B, k, d2],
    posterior=q2, given=h1) (q(h2|h1) per sample, standard normal prior). The h1 that log w
    reads (the decoder's input, layer1.z, given) is an alias of the h1 that h2 is drawn from,
    so a hook on layer1.z sees only the gradient of log w (the estimators reweight it; the
    gradient through h2's draw reaches h1 past the alias, already reweighted at h2).

    Initialization: the paper's, Glorot & Bengio's uniform heuristic (weights U(-a, a), a =
    sqrt(6 / (fan_in + fan_out)), zero biases), not PyTorch's default U(+-1/sqrt(fan_in)) that
    ``BernoulliVAE`` keeps (its committed runs were trained so). Through six tanh layers the
    default's smaller weights hold the model on the data's plateau (about -208 nats, the
    pixels' marginals) longer and leave fewer units of h2 active in the first epochs."""

    def __init__(self, data_dim: int = 784, latents: tuple[int, int] = (100, 50),
                 hidden: tuple[int, int] = (200, 100), likelihood="bernoulli"):
        super().__init__()
        self.likelihood = as_likelihood(likelihood)
        (d1, d2), (w1, w2) = latents, hidden
        self.q1 = Gaussian(data_dim, w1, d1)
        self.q2 = Gaussian(d1, w2, d2)
        self.p1 = Gaussian(d2, w2, d1)
        self.decoder = tanh_mlp(d1, w1, self.likelihood.channels * data_dim)
        self.scale = nn.Parameter(torch.zeros(data_dim)) if self.likelihood.needs_scale else None
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def output_layer(self) -> nn.Linear:
        return self.decoder[-1]

    def sample(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Layer, Layer]:
        """The two layers of k reparameterized samples (h1 ~ q(h1|x), h2 ~ q(h2|h1))."""
        mu1, logvar1 = self.q1(x)
        eps1 = torch.randn((x.shape[0], k, mu1.shape[-1]), generator=generator, device=x.device, dtype=mu1.dtype)
        h1 = mu1.unsqueeze(1) + torch.exp(0.5 * logvar1).unsqueeze(1) * eps1
        mu2, logvar2 = self.q2(h1)
        eps2 = torch.randn(mu2.shape, generator=generator, device=x.device, dtype=mu2.dtype)
        h2 = mu2 + torch.exp(0.5 * logvar2) * eps2
        h1_read = h1.view_as(h1)  # the alias log w reads (class docstring)
        prior_mu, prior_logvar = self.p1(h2)
        return (Layer(h1_read, mu1, logvar1, prior_mu, prior_logvar),
                Layer(h2, mu2, logvar2, posterior=self.q2, given=h1_read))

    def forward(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None):
        layers = self.sample(x, k, generator)
        return self.decoder(layers[0].z), layers

    def forward_hidden(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None):
        """(h [B, k, H], layers): the decoder's last hidden layer, for ``IWAELoss.from_hidden``."""
        layers = self.sample(x, k, generator)
        return self.decoder[:-1](layers[0].z), layers

    @torch.no_grad()
    def posterior_means(self, x: torch.Tensor, samples: int = 64, generator=None) -> list[torch.Tensor]:
        """E_q[h_l | x] per layer, [N, d_l]: mu1 exactly; for h2 the mean over ``samples`` draws
        of h1 of mu2(h1) (E_q[h2 | x] = E_q(h1|x)[mu2(h1)])."""
        mu1, logvar1 = self.q1(x)
        eps = torch.randn((x.shape[0], samples, mu1.shape[-1]), generator=generator, device=x.device)
        mu2, _ = self.q2(mu1.unsqueeze(1) + torch.exp(0.5 * logvar1).unsqueeze(1) * eps)
        return [mu1, mu2.mean(dim=1)]


def active_units_per_layer(model: TwoLayerVAE, x: torch.Tensor, threshold: float = 1e-2, samples: int = 64,
                           generator=None) -> list[int]:
    """The IWAE paper's criterion per stochastic layer: unit u active if Cov_x(E_q[u | x]) >
    threshold (the paper's 10^-2), with E_q[u | x] from ``posterior_means``."""
    means = model.posterior_means(x, samples, generator)
    return [int((m.double().var(dim=0, unbiased=False) > threshold).sum()) for m in means]


def save_checkpoint(model: BernoulliVAE | TwoLayerVAE, path: Path) -> None:
    """``torch.save`` of {"state_dict" (on CPU), "data_dim", "latent", "hidden", "likelihood"},
    atomically; a TwoLayerVAE's with "layers": 2 and its two latent and two hidden widths as
    lists in "latent" and "hidden"."""
    if isinstance(model, TwoLayerVAE):
        data_dim = model.q1.net[0].in_features
        sizes = {"latent": [model.q2.net[0].in_features, model.p1.net[0].in_features],
                 "hidden": [model.q1.net[0].out_features, model.q2.net[0].out_features], "layers": 2}
    else:
        data_dim = model.encoder[0].in_features
        sizes = {"latent": model.decoder[0].in_features, "hidden": model.encoder[0].out_features}
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        torch.save({"state_dict": state, "data_dim": data_dim, **sizes, "likelihood": model.likelihood.label}, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> BernoulliVAE | TwoLayerVAE:
    """The model saved by ``save_checkpoint`` (a TwoLayerVAE where it says "layers": 2, else a
    BernoulliVAE); ValueError naming the path if it is not one."""
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
    if saved.get("layers", 1) == 2:
        cls, sizes = TwoLayerVAE, (int(saved["data_dim"]), tuple(saved["latent"]), tuple(saved["hidden"]))
    else:
        cls, sizes = BernoulliVAE, (int(saved["data_dim"]), int(saved["latent"]), int(saved["hidden"]))
    model = cls(*sizes, likelihood)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path}: state_dict does not fit {cls.__name__}"
                         f"{(*sizes, likelihood)}: {str(error).splitlines()[0]}") from None
    return model.to(device)
