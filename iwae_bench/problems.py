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

``likelihood`` (kernels/likelihood.py; the Bernoulli's by default, drawn as above) changes the
data and the decoder's output. The data are gray levels on 256 levels (the likelihood's bins):
the same pixels on as above, about 40% of them at full intensity and the rest spread below, the
background exactly 0, in [0, 1] (Gaussian, continuous Bernoulli) or as 2 v / 255 - 1 in
[-1, 1] (discretized logistic). The decoder's C output channels, each a centre with an error
per example and noise per sample:

    continuous Bernoulli  logits 12 (2 x - 1): about -12 on the background and +12 on the strokes,
                          the gray pixels crossing 0 (the Taylor band); errors of 3, noise of 1
    Gaussian              means x with errors of 0.07 and noise of 0.07 (0.1 in all), log-variances
                          near -4 (0.5 and 0.2): per sample a second channel, per pixel the [D]
                          ``scale``, a fixed one the likelihood's number
    discretized logistic  means x with errors of 0.015 and noise of 0.015 (two of its scales),
                          log-scales near -4.5 (a scale of 1.4 bins); the mixture's mixing
                          logits near 0 (1 and 0.3), its means and log-scales each drawn as above

(a decoder-head problem's output layer has [C D, H] rows and the same centres at each pixel's
mean value; it sees no x, so its log-scales are the pixel's spread under the data).

and ``saturated`` sets each likelihood's trap on 2% of each example's pixels: the Gaussian's
collapsed variance (where x is exactly 0, means within 1e-4 of it and log-variances of -15;
per pixel, the scale of columns that are 0 in every example), the continuous Bernoulli's
logits in (-1e-3, 1e-3) (half of them) and at +-80 (the rest, on x's side), the logistic's bins
10 to 40 scales from their means (F(a) - F(b) underflows in float32), both edge bins among
them with their means inside [-1, 1].

``layers`` = 2 is the IWAE paper's second architecture's latent side (a bound problem only): in
z's place a pair of ``kernels.Latent``, h1 of 2 d units (the paper's 100 at d = 50) and h2 of d.
q(h1|x) per example as above (means 0.7, standard deviations near 0.3); p(h1|h2) per sample,
its means the posterior's plus 0.5 per example and 0.3 per sample, its log-variances near -1.5
(a prior looser than the posterior); q(h2|h1) per sample, means 0.7 per example and 0.3 per
sample, log-variances near -2 and p(h2) the standard normal. The per-sample parameters are
[B, k, d] tensors the bound reads: the case whose cost the sweep measures beside the one layer.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from kernels.latent import Latent
from kernels.likelihood import Likelihood

from .training.family import Objective, default_estimator
from .training.sampling import sample_noise

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
REGIMES = ("realistic", "saturated")
SATURATED_FRACTION = 0.02
LAYERS = (1, 2)  # stochastic layers: the one-layer bound, the two-layer model's per-sample latents


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
    likelihood: str = "bernoulli"  # the decoder's p(x|h) (kernels/likelihood.py), as its label
    layers: int = 1  # stochastic layers: 2 puts h1 (2 latent wide) and h2 (latent wide) in z's place

    def __post_init__(self):
        if self.layers not in LAYERS:
            raise ValueError(f"layers must be one of {', '.join(map(str, LAYERS))}, got {self.layers!r}")
        if self.layers > 1 and self.hidden:
            raise ValueError("layers 2 is a bound problem: a decoder-head problem (hidden > 0) has one "
                             "stochastic layer")
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
        likelihood = Likelihood.parse(self.likelihood)
        if self.regime == "saturated" and likelihood.name == "gaussian" and likelihood.scale == "fixed":
            raise ValueError(f"regime 'saturated' is a Gaussian's learned variance collapsed onto pixels "
                             f"that are 0; likelihood {likelihood.label!r} has a fixed one")
        object.__setattr__(self, "likelihood", likelihood.label)  # one spelling per likelihood

    @property
    def spec(self) -> Objective:
        return Objective.parse(self.objective)

    @property
    def likelihood_spec(self) -> Likelihood:
        return Likelihood.parse(self.likelihood)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def family(self) -> str:
        return "head" if self.hidden else "bound"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class Inputs(NamedTuple):
    x: torch.Tensor        # [B, D] binary (gray levels for the continuous likelihoods), float32
    logits: torch.Tensor   # [B, k, C D] the decoder's C channels, in the problem's dtype
    z: torch.Tensor        # [B, k, d] samples of q, float32 (layers 2: (h1, h2) as kernels.Latent)
    mu: torch.Tensor       # [B, d] (layers 2: None, each layer carries its own)
    logvar: torch.Tensor   # [B, d] (layers 2: None)
    scale: torch.Tensor | None = None  # [D] float32: a per-pixel log-scale (":pixel"), else None


class HeadInputs(NamedTuple):
    x: torch.Tensor        # [B, D] binary (gray levels for the continuous likelihoods), float32
    h: torch.Tensor        # [B, k, H] the decoder's last hidden layer, in the problem's dtype
    weight: torch.Tensor   # [C D, H] the output layer's weight (nn.Linear's layout)
    bias: torch.Tensor     # [C D]
    z: torch.Tensor        # [B, k, d] samples of q, float32
    mu: torch.Tensor       # [B, d]
    logvar: torch.Tensor   # [B, d]
    scale: torch.Tensor | None = None  # [D] float32: a per-pixel log-scale (":pixel"), else None

    def logits(self) -> torch.Tensor:
        """h W^T + b in float64 (the reference's)."""
        return self.h.double() @ self.weight.double().T + self.bias.double()


def make_inputs(problem: Problem, device: str | torch.device = "cpu") -> Inputs | HeadInputs:
    """Draw the inputs of ``problem`` on ``device``, deterministically from its seed (the CPU
    and a GPU draw different numbers from the same seed).

    Samples are nested across k: the first k samples of a problem with k' > k samples are
    the samples of the problem with k (same seed, batch, widths), so L_k plotted against k
    follows one set of draws instead of a fresh one per k. The latent side (z, mu, logvar) and
    which pixels are on are the same draws whatever the likelihood.
    """
    B, k, d, D = problem.batch, problem.k, problem.latent, problem.data_dim
    device = torch.device(device)  # drawn there: GPU-sized problems never pass through the CPU
    likelihood = problem.likelihood_spec

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
    z = mu[:, None, :] + torch.exp(0.5 * logvar)[:, None, :] * sample_noise(k, (B, d), stream(2), device)
    dtype = problem.torch_dtype
    if likelihood.name != "bernoulli":
        gray = stream(6)
        x = gray_levels(x, likelihood, gray)
        scale = (LOG_SCALE[likelihood.name] + 0.5 * randn(D, generator=gray)) if likelihood.needs_scale else None
    if problem.hidden:
        H = problem.hidden
        h = torch.tanh(1.5 * sample_noise(k, (B, H), stream(4), device))
        if likelihood.name == "bernoulli":
            weight = randn(D, H, generator=stream(5)) * (3.5 / (0.75 * H ** 0.5))  # logits' spread ~3.5
            bias = torch.logit(pixel_on[0])  # the pixels' base rates
            return HeadInputs(x, h.to(dtype), weight.to(dtype), bias.to(dtype), z, mu, logvar)
        weight, bias, log_scale = head_layer(likelihood, pixel_on[0], H, stream(5))
        scale = log_scale if likelihood.needs_scale else None
        return HeadInputs(x, h.to(dtype), weight.to(dtype), bias.to(dtype), z, mu, logvar, scale)
    if likelihood.name == "bernoulli":
        logits = (2.0 * x[:, None, :] - 1.0) * margin + 1.0 * sample_noise(k, (B, D), stream(1), device)
        if problem.regime == "saturated":
            sure = stream(3)
            wrong = torch.rand(B, 1, D, generator=sure, device=device) < SATURATED_FRACTION
            confidence = 20.0 + 20.0 * torch.rand(B, 1, D, generator=sure, device=device)
            logits = torch.where(wrong, (1.0 - 2.0 * x[:, None, :]) * confidence, logits)
        if problem.layers > 1:
            return Inputs(x, logits.to(dtype), two_layers(B, k, d, stream, device), None, None)
        return Inputs(x, logits.to(dtype), z, mu, logvar)
    noise = sample_noise(k, (B, likelihood.channels * D), stream(1), device)
    channels = [centre + error * randn(B, 1, D, generator=gray) + spread * part
                for (centre, error, spread), part in zip(decoder_channels(likelihood, x[:, None, :]),
                                                         noise.split(D, dim=-1))]
    if problem.regime == "saturated":
        scale = saturate(likelihood, x[:, None, :], channels, scale, stream(3))
    if problem.layers > 1:
        z, mu, logvar = two_layers(B, k, d, stream, device), None, None
    return Inputs(x, torch.cat(channels, dim=-1).to(dtype), z, mu, logvar, scale)


def two_layers(B: int, k: int, d: int, stream, device) -> tuple[Latent, Latent]:
    """(h1, h2) of the two-layer model's latent side (the module docstring), h1 2 d wide and h2
    d wide; ``stream(offset)`` a fresh generator, one per draw over k, so the samples nest
    across k like the one layer's."""
    per_example = stream(7)

    def randn(*shape):
        return torch.randn(*shape, generator=per_example, device=device)

    def per_sample(centre, spread_example, spread_sample, width, offset):
        base = centre + spread_example * randn(B, 1, width)
        return base + spread_sample * sample_noise(k, (B, width), stream(offset), device)

    mu1, logvar1 = 0.7 * randn(B, 2 * d), -2.5 + 0.5 * randn(B, 2 * d)
    h1 = mu1[:, None] + torch.exp(0.5 * logvar1)[:, None] * sample_noise(k, (B, 2 * d), stream(8), device)
    prior_mu1 = mu1[:, None] + per_sample(0.0, 0.5, 0.3, 2 * d, 9)
    prior_logvar1 = per_sample(-1.5, 0.3, 0.2, 2 * d, 10)
    mu2, logvar2 = per_sample(0.0, 0.7, 0.3, d, 11), per_sample(-2.0, 0.5, 0.2, d, 12)
    h2 = mu2 + torch.exp(0.5 * logvar2) * sample_noise(k, (B, d), stream(13), device)
    return Latent(h1, mu1, logvar1, prior_mu1, prior_logvar1), Latent(h2, mu2, logvar2)


def named_tensors(inputs) -> dict[str, torch.Tensor]:
    """Every tensor of ``inputs`` (an Inputs or HeadInputs) by name, in field order, the
    stochastic layers' as ``layers[l].field``; None fields left out."""
    named = {}
    for name, value in zip(inputs._fields, inputs):
        if isinstance(value, tuple):  # the stochastic layers in z's place
            for l, layer in enumerate(value):
                named.update({f"layers[{l}].{f}": t for f, t in zip(Latent._fields, layer) if t is not None})
        elif value is not None:
            named[name] = value
    return named


def with_tensors(inputs, tensors: dict[str, torch.Tensor]):
    """``inputs`` with the tensors ``named_tensors`` names replaced by those given (the rest kept)."""
    def layer(l, latent):
        return Latent(*(tensors.get(f"layers[{l}].{f}", t) for f, t in zip(Latent._fields, latent)))

    return type(inputs)(*(tuple(layer(l, v) for l, v in enumerate(value)) if isinstance(value, tuple)
                          else tensors.get(name, value) for name, value in zip(inputs._fields, inputs)))


# --------------------------------------------------------------------------- the continuous likelihoods

LOG_SCALE = {"gaussian": -4.0, "discretized_logistic": -4.5}  # a trained decoder's log-scale channel
# a trained decoder's mean: this far from x per example and again per sample (the Gaussian's 0.1
# in all; the logistic's 0.02, about two of its scales, on [-1, 1])
MEAN_ERROR = {"gaussian": 0.07, "discretized_logistic": 0.015}
FULL = 1.3  # an on pixel's intensity min(1, FULL sqrt(u)): 41% at full intensity, the rest below
MEAN_INTENSITY, MEAN_SQUARE = 0.803, 0.704  # of an on pixel: E min(1, FULL sqrt(u)), E of its square


def gray_levels(on: torch.Tensor, likelihood: Likelihood, generator: torch.Generator) -> torch.Tensor:
    """Gray-level data on the likelihood's levels from the pixels that are on (the rest exactly
    0): v / (bins - 1) in [0, 1], or 2 v / (bins - 1) - 1 in [-1, 1] for the discretized logistic."""
    levels = likelihood.bins - 1
    u = torch.rand(on.shape, generator=generator, device=on.device)
    v = torch.round(levels * torch.clamp(FULL * torch.sqrt(u), max=1.0)) * on
    return 2.0 * v / levels - 1.0 if likelihood.name == "discretized_logistic" else v / levels


def decoder_channels(likelihood: Likelihood, x: torch.Tensor, log_scale=None) -> list[tuple]:
    """(centre, error per example, noise per sample) of each of the decoder's C output channels
    in their order (kernels/likelihood.py), the centres from the pixel values ``x`` (the
    log-scales' from ``log_scale``, LOG_SCALE when not given)."""
    if likelihood.name == "continuous_bernoulli":
        return [(12.0 * (2.0 * x - 1.0), 3.0, 1.0)]
    L = likelihood.mixture
    log_scale = LOG_SCALE[likelihood.name] if log_scale is None else log_scale
    mix = [(0.0 * x, 1.0, 0.3)] * L if L > 1 else []
    scales = [(log_scale + 0.0 * x, 0.5, 0.2)] * L if likelihood.scale == "sample" else []
    return mix + [(x, MEAN_ERROR[likelihood.name], MEAN_ERROR[likelihood.name])] * L + scales


def head_layer(likelihood: Likelihood, pixel_on: torch.Tensor, H: int, generator: torch.Generator):
    """(weight [C D, H], bias [C D], per-pixel log-scale [D]) of a decoder head for a continuous
    likelihood: each channel's rows spread as its error and noise together over tanh units, its
    bias the centre at the pixel's mean value. A head sees no x, so a trained one is as unsure
    as the pixel's spread under the data (a Gaussian's variance, a logistic's scale std sqrt 3 /
    pi), and never surer than LOG_SCALE."""
    on_mean = pixel_on * MEAN_INTENSITY
    std = torch.sqrt(pixel_on * MEAN_SQUARE - on_mean ** 2)
    if likelihood.name == "discretized_logistic":
        mean, log_scale = 2.0 * on_mean - 1.0, torch.log(2.0 * std * math.sqrt(3.0) / math.pi)
    else:
        mean, log_scale = on_mean, 2.0 * torch.log(std)
    log_scale = torch.clamp(log_scale, min=LOG_SCALE.get(likelihood.name, 0.0))
    weights, biases = [], []
    for centre, error, spread in decoder_channels(likelihood, mean, log_scale):
        weights.append(torch.randn(mean.shape[0], H, generator=generator, device=mean.device)
                       * (math.hypot(error, spread) / (0.75 * H ** 0.5)))
        biases.append(centre)
    return torch.cat(weights), torch.cat(biases), log_scale


def saturate(likelihood: Likelihood, x: torch.Tensor, channels: list, scale, generator: torch.Generator):
    """Each likelihood's trap on SATURATED_FRACTION of each example's pixels (the module
    docstring), in place in ``channels`` ([B, k, D] each; ``x`` [B, 1, D]); returns the scale."""
    B, _, D = x.shape
    device = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    chosen = rand(B, 1, D) < SATURATED_FRACTION
    if likelihood.name == "continuous_bernoulli":
        band = (2.0 * rand(B, 1, D) - 1.0) * 1e-3
        sure = torch.where(x > 0.5, 80.0, -80.0)
        channels[0] = torch.where(chosen, torch.where(rand(B, 1, D) < 0.5, band, sure), channels[0])
        return scale
    if likelihood.name == "gaussian":
        collapsed = chosen & (x == 0)
        if likelihood.scale == "pixel":  # columns that are 0 in every example
            columns = (rand(D) < SATURATED_FRACTION) & (x == 0).all(0).all(0)
            scale = torch.where(columns, -15.0, scale)
            collapsed = collapsed | columns
        channels[0] = torch.where(collapsed, 1e-4 * torch.randn(B, 1, D, generator=generator, device=device),
                                  channels[0])
        if likelihood.scale == "sample":
            channels[1] = torch.where(collapsed, -15.0, channels[1])
        return scale
    half = likelihood.half_bin
    side = torch.where(x < half - 1.0, 1.0, torch.where(x > 1.0 - half, -1.0,
                                                        torch.where(rand(B, 1, D) < 0.5, 1.0, -1.0)))
    away = side * (10.0 + 30.0 * rand(B, 1, D))  # in scales: each edge bin with its mean inside
    L = likelihood.mixture
    first = L if L > 1 else 0  # the means' channels, each followed L channels later by its log-scale
    for c in range(first, first + L):
        if likelihood.scale == "sample":
            log_s = channels[c + L]
        else:
            log_s = scale if likelihood.scale == "pixel" else torch.tensor(likelihood.log_scale, device=device)
        channels[c] = torch.where(chosen, x + away * torch.exp(log_s), channels[c])
    return scale
