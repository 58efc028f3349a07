"""Seeded problem inputs at realistic scales.

A ``Problem`` names a grid cell; ``make_inputs`` draws (x, logits, z, mu, logvar) for it the
way a trained Bernoulli VAE on binarized MNIST would produce them: about 13% of pixels on,
decoder logits that mostly agree with the pixels (a few nats of margin) but disagree on some,
sample-to-sample spread over k, and a posterior narrower than the prior. At D = 784, d = 50 the
log-weights land near -150 to -250 nats, where exp(log w) underflows in float32: the regime in
which the naive bound fails and the stable one is needed.

Only the logits take ``dtype`` (they are the B*k*D tensor that sets the cost); x, z, mu and
logvar stay float32.

A problem with ``hidden`` H > 0 is of the decoder-head family: instead of logits it gives the
decoder's last hidden layer h [B, k, H] (tanh units) and its output layer (weight [D, H], bias
[D], in nn.Linear's layout), scaled so that h W^T + b has the logits' spread and the pixels'
base rates; h, weight and bias take ``dtype`` (the matmul's).

Regimes: ``realistic`` is the above; ``saturated`` adds a decoder that is sure and mistaken on
2% of each example's pixels (logits of 20 to 40 nats on the wrong side), where sigmoid rounds
to exactly 0 or 1 in float32: the inputs that separate code working from logits from code
working from probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from .training.family import Objective, default_estimator
from .training.sampling import sample_noise

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
REGIMES = ("realistic", "saturated")
SATURATED_FRACTION = 0.02


@dataclass(frozen=True)
class Problem:
    batch: int
    k: int
    latent: int
    data_dim: int = 784
    dtype: str = "float32"
    seed: int = 0
    regime: str = "realistic"
    hidden: int = 0  # > 0: the decoder-head family (h and an output layer instead of logits)
    objective: str = "iwae"  # the member of the family its variants compute (training/family.py)

    def __post_init__(self):
        for name in ("batch", "k", "latent", "data_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.hidden, int) or self.hidden < 0:
            raise ValueError(f"hidden must be an integer >= 0, got {self.hidden!r}")
        if self.hidden and self.dtype == "float64":
            raise ValueError("dtype float64: the decoder head's matmul takes float32, bfloat16 or float16")
        if self.hidden and self.regime != "realistic":
            raise ValueError(f"regime {self.regime!r} is for the bound's logits; a decoder-head problem "
                             "(hidden > 0) has the realistic regime only")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.regime not in REGIMES:
            raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {self.regime!r}")
        spec = Objective.parse(self.objective)
        spec.check(self.k, default_estimator(spec))  # groups that divide k, the ELBO at k = 1
        object.__setattr__(self, "objective", spec.label)  # one spelling per objective

    @property
    def spec(self) -> Objective:
        return Objective.parse(self.objective)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def family(self) -> str:
        return "head" if self.hidden else "bound"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class Inputs(NamedTuple):
    x: torch.Tensor        # [B, D] binary, float32
    logits: torch.Tensor   # [B, k, D] in the problem's dtype
    z: torch.Tensor        # [B, k, d] samples of q, float32
    mu: torch.Tensor       # [B, d]
    logvar: torch.Tensor   # [B, d]


class HeadInputs(NamedTuple):
    x: torch.Tensor        # [B, D] binary, float32
    h: torch.Tensor        # [B, k, H] the decoder's last hidden layer, in the problem's dtype
    weight: torch.Tensor   # [D, H] the output layer's weight (nn.Linear's layout)
    bias: torch.Tensor     # [D]
    z: torch.Tensor        # [B, k, d] samples of q, float32
    mu: torch.Tensor       # [B, d]
    logvar: torch.Tensor   # [B, d]

    def logits(self) -> torch.Tensor:
        """h W^T + b in float64 (the reference's)."""
        return self.h.double() @ self.weight.double().T + self.bias.double()


def make_inputs(problem: Problem, device: str | torch.device = "cpu") -> Inputs | HeadInputs:
    """Draw the inputs of ``problem`` on ``device``, deterministically from its seed (the CPU
    and a GPU draw different numbers from the same seed).

    Samples are nested across k: the first k samples of a problem with k' > k samples are
    the samples of the problem with k (same seed, batch, widths), so L_k plotted against k
    follows one set of draws instead of a fresh one per k.
    """
    B, k, d, D = problem.batch, problem.k, problem.latent, problem.data_dim
    device = torch.device(device)  # drawn there: GPU-sized problems never pass through the CPU

    def stream(offset: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(problem.seed * 1000 + offset)

    def randn(*shape, generator):
        return torch.randn(*shape, generator=generator, device=device)

    data = stream(0)
    # Pixels: a per-pixel "on" probability with a mean near MNIST's 13%.
    pixel_on = torch.sigmoid(randn(1, D, generator=data) * 1.5 - 2.5)
    x = (torch.rand(B, D, generator=data, device=device) < pixel_on).float()
    # Decoder logits: a margin of a few nats towards the true pixel, often wrong by a little,
    # plus per-sample noise so the k log-weights differ by several nats.
    margin = 3.5 + 2.0 * randn(B, 1, D, generator=data)
    # Posterior: means of order one, standard deviations near 0.3.
    mu = 0.7 * randn(B, d, generator=data)
    logvar = -2.5 + 0.5 * randn(B, d, generator=data)
    logits = (2.0 * x[:, None, :] - 1.0) * margin + 1.0 * sample_noise(k, (B, D), stream(1), device)
    z = mu[:, None, :] + torch.exp(0.5 * logvar)[:, None, :] * sample_noise(k, (B, d), stream(2), device)
    if problem.hidden:
        H = problem.hidden
        dtype = problem.torch_dtype
        h = torch.tanh(1.5 * sample_noise(k, (B, H), stream(4), device))
        weight = randn(D, H, generator=stream(5)) * (3.5 / (0.75 * H ** 0.5))  # logits' spread ~3.5
        bias = torch.logit(pixel_on[0])  # the pixels' base rates
        return HeadInputs(x, h.to(dtype), weight.to(dtype), bias.to(dtype), z, mu, logvar)
    if problem.regime == "saturated":
        sure = stream(3)
        wrong = torch.rand(B, 1, D, generator=sure, device=device) < SATURATED_FRACTION
        confidence = 20.0 + 20.0 * torch.rand(B, 1, D, generator=sure, device=device)
        logits = torch.where(wrong, (1.0 - 2.0 * x[:, None, :]) * confidence, logits)
    return Inputs(x, logits.to(problem.torch_dtype), z, mu, logvar)
