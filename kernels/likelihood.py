"""The decoder's likelihood p(x | h): which one, and its per-pixel math in the forms the kernels use.

One ``Likelihood`` value names the choice everywhere (kernels, variants, ``IWAELoss``, the model,
the sweep's ``--likelihood``, the experiment, the reports), spelled by ``Likelihood.parse``:

    bernoulli                     x in {0, 1} or [0, 1]; logits l             log p = x l - softplus(l)
    continuous_bernoulli (cb)     x in [0, 1]; logits l (Loaiza-Ganem & Cunningham 2019)
                                  log p = x l - softplus(l) + log C(l),  C(l) = l / tanh(l / 2) (2 at 0)
    gaussian:sigma=S              x real; mean m, variance S^2 fixed
    gaussian:pixel                ... log-variance s, one learned value per pixel (``scale`` [D])
    gaussian:sample (gaussian)    ... log-variance s per sample from the decoder (a second channel)
                                  log p = -0.5 [(x - m)^2 exp(-s) + s + log 2 pi]
    discretized_logistic          x on ``bins`` levels of [-1, 1]; mean m, log-scale s per sample
    (logistic)                    (a second channel; ``:pixel`` / ``:scale=S`` as the Gaussian's)
                                  log p = log [F((x + d - m) e^-s) - F((x - d - m) e^-s)],
                                  F the logistic CDF, d = 1 / (bins - 1) half a bin, the edge
                                  bins open to -inf and +inf (Salimans et al. 2017)
    discretized_logistic:mix=L    L logistics per pixel and their mixing logits (PixelCNN++),
                                  in the float64 reference and the torch backend only

``,floor=F`` (pixel and sample scales) clamps the log-scale channel from below, s = max(s, F):
the log-variance for the Gaussian, the log-scale for the logistic. The gradient passes where
s >= F. It is how a learned variance is kept from collapsing onto pixels that are exactly 0
(with dequantized data, README "Continuous data").

The decoder's output (the kernels' ``logits`` argument) is [B, k, C D]: channel c of pixel j at
column c D + j, C = ``channels`` (1 or 2; 3 L for the mixture: mixing logits, means, log-scales).
A per-pixel scale is a separate [D] tensor (``scale``); a fixed one is a number.

Stable forms (a = |l|; the kernels, the torch backend and the float64 reference use them):

    continuous Bernoulli   log p = x l - max(l, 0) + log phi(a),   phi(a) = a / (1 - e^-a)
                           (the Bernoulli's log(1 + e^-a) cancels against log C's), with
                           log phi(a) = a/2 - a^2/24 + a^4/2880 below a = 1/2 (the direct
                           form cancels there: 1 - e^-a for small a) and log a - log(1 - e^-a)
                           above. Its gradient is x - mu(l), mu(l) = 1/(1 - e^-l) - 1/l, the
                           mean (1/2 + l/12 - l^3/720 + l^5/30240 below 1/2).
    discretized logistic   with a = (x + d - m) e^-s, b = (x - d - m) e^-s, eps = a - b = 2 d e^-s,
                           F(a) - F(b) = F(a) (1 - e^-eps) / (1 + e^b), so
                           log p = log F(a) - softplus(b) + log(1 - e^-eps)
                           (the bottom bin keeps only log F(a), the top one only -softplus(b)),
                           log(1 - e^-eps) = log eps - log phi(eps) below eps = 1/2: log eps =
                           log 2d - s is exact and free. No threshold, no mid-bin density.

MUFU ops per element in the forward hot loops (the floor each likelihood's arithmetic sets, met
by the kernels: the compiled-kernel profile's targets):

    bernoulli                    1  exp(-|l|); logs of 64-factor products of (1 + exp(-|l|))
    gaussian  fixed / pixel      0  exp(-s) is a number or a [D] vector from the host
              sample             1  exp(-s)
    continuous_bernoulli         2  exp(-a) and log a (1 - e^-a joins grouped products)
    discretized_logistic sample  4  exp(-s), exp(-|a|), exp(-|b|), exp(-eps); the logs grouped
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import triton
import triton.language as tl

from ._math import LN2, exp_neg_, log2_, sigmoid_

NAMES = ("bernoulli", "continuous_bernoulli", "gaussian", "discretized_logistic")
ALIASES = {"cb": "continuous_bernoulli", "logistic": "discretized_logistic"}
SCALED = ("gaussian", "discretized_logistic")  # the location families: a scale channel
SCALES = ("fixed", "pixel", "sample")
# the kernels' constexpr codes
CODE = {"bernoulli": 0, "gaussian": 1, "continuous_bernoulli": 2, "discretized_logistic": 3}
SCALE_CODE = {"": 0, "fixed": 1, "pixel": 2, "sample": 3}
SERIES_BELOW = 0.5  # below it the series forms of log phi and the CB mean (error < 1e-7)


@dataclass(frozen=True)
class Likelihood:
    """p(x | decoder output): see the module docstring for the spellings and the math.

    name: one of NAMES; scale: "" (bernoulli, continuous_bernoulli) or one of SCALES;
    log_scale: the fixed log-variance (Gaussian) or log-scale (logistic); floor: the clamp on
    a learned log-scale channel (-inf: none); mixture: logistics per pixel; bins: the
    discretized data's levels.
    """

    name: str = "bernoulli"
    scale: str = ""
    log_scale: float = 0.0
    floor: float = -math.inf
    mixture: int = 1
    bins: int = 256

    def __post_init__(self):
        name = ALIASES.get(self.name, self.name)
        object.__setattr__(self, "name", name)
        if name not in NAMES:
            raise ValueError(f"likelihood must be one of {', '.join(NAMES)}, got {self.name!r}")
        if name in SCALED:
            scale = self.scale or "sample"
            if scale not in SCALES:
                raise ValueError(f"{name}'s scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
            object.__setattr__(self, "scale", scale)
        elif self.scale:
            raise ValueError(f"{name} has no scale, got scale={self.scale!r}")
        if not math.isfinite(self.log_scale):
            raise ValueError(f"log_scale must be finite, got {self.log_scale!r}")
        if self.floor != -math.inf and not math.isfinite(self.floor):
            raise ValueError(f"floor must be finite (or -inf for none), got {self.floor!r}")
        if not isinstance(self.mixture, int) or self.mixture < 1:
            raise ValueError(f"mixture must be an integer >= 1, got {self.mixture!r}")
        if self.mixture > 1 and (name != "discretized_logistic" or self.scale != "sample"):
            raise ValueError("mixture > 1 is for discretized_logistic with a per-sample scale")
        if not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {self.bins!r}")

    @classmethod
    def parse(cls, spec) -> "Likelihood":
        """'bernoulli', 'cb', 'gaussian', 'gaussian:sigma=0.1', 'gaussian:pixel,floor=-9',
        'logistic', 'discretized_logistic:mix=5' -> a Likelihood; a ValueError says what was
        expected. A Likelihood passes through."""
        if isinstance(spec, Likelihood):
            return spec
        name, _, rest = str(spec).strip().partition(":")
        fields: dict = {"name": name}
        try:
            for part in filter(None, rest.split(",")):
                key, eq, value = part.partition("=")
                if not eq:
                    fields["scale"] = key
                elif key == "sigma":  # the Gaussian's standard deviation
                    fields.update(scale="fixed", log_scale=2.0 * math.log(float(value)))
                elif key == "scale":  # the logistic's scale
                    fields.update(scale="fixed", log_scale=math.log(float(value)))
                elif key == "floor":
                    fields["floor"] = float(value)
                elif key in ("mix", "bins"):
                    fields["mixture" if key == "mix" else "bins"] = int(value)
                else:
                    raise ValueError(f"unknown parameter {key!r} (sigma, scale, floor, mix, bins)")
            return cls(**fields)
        except ValueError as error:
            raise ValueError(f"likelihood {spec!r}: {error}") from None

    @property
    def label(self) -> str:
        """The one spelling of this likelihood (``parse(label)`` gives it back)."""
        parts = []
        if self.scale == "fixed":
            value = math.exp(self.log_scale / 2 if self.name == "gaussian" else self.log_scale)
            parts.append(f"{'sigma' if self.name == 'gaussian' else 'scale'}={value:.6g}")
        elif self.scale and self.scale != "sample":
            parts.append(self.scale)
        if self.floor != -math.inf:
            parts.append(f"floor={self.floor:g}")
        if self.mixture > 1:
            parts.append(f"mix={self.mixture}")
        if self.bins != 256:
            parts.append(f"bins={self.bins}")
        return self.name + (":" + ",".join(parts) if parts else "")

    def __str__(self) -> str:
        return self.label

    @property
    def channels(self) -> int:
        """C: the decoder's outputs per pixel (its output layer is [C D, H])."""
        if self.mixture > 1:
            return 3 * self.mixture
        return 2 if self.scale == "sample" else 1

    @property
    def needs_scale(self) -> bool:
        """Whether a [D] ``scale`` tensor (a learned per-pixel log-scale) must be given."""
        return self.scale == "pixel"

    @property
    def continuous(self) -> bool:
        """A density on real x (Gaussian, continuous Bernoulli), not a mass on levels."""
        return self.name in ("gaussian", "continuous_bernoulli")

    @property
    def half_bin(self) -> float:
        return 1.0 / (self.bins - 1)

    def constant(self, D: int) -> float:
        """What the kernels add once per sample, not per pixel: the Gaussian's
        -D/2 (log 2 pi + s) for a fixed log-variance s (-D/2 log 2 pi for a learned one)."""
        if self.name != "gaussian":
            return 0.0
        return -0.5 * D * (math.log(2.0 * math.pi) + (self.log_scale if self.scale == "fixed" else 0.0))

    def kernel_args(self) -> dict:
        """The constexprs every likelihood-aware kernel takes: the codes, and what a padded
        lane (a column past D) loads so that it adds exactly 0 and factors of 1 with no select:
        x = MASK_X and mean = MASK_MEAN (scale channel 0, inv 1). Bernoulli: l = -65504 beside
        x = 0; Gaussian and continuous Bernoulli: 0 and 0; logistic: the top bin (x = 1) far
        below its mean, so -softplus(b) = 0 exactly (any scale below ~3000)."""
        if self.mixture > 1:
            raise ValueError(f"likelihood {self.label!r}: the kernels take one logistic per pixel; "
                             "a mixture runs on the torch backend")
        mask_x, mask_mean = {"bernoulli": (0.0, -65504.0), "discretized_logistic": (1.0, 65504.0)}.get(
            self.name, (0.0, 0.0))
        return {"LIKELIHOOD": CODE[self.name], "SCALE": SCALE_CODE[self.scale], "MASK_X": mask_x,
                "MASK_MEAN": mask_mean}

    def kernel_numbers(self) -> tuple:
        """(s_fixed, inv_fixed, floor, half_bin, log 2 half_bin): the runtime numbers. s_fixed
        is what the step sees as s for a fixed scale (the Gaussian's -s/2 is in ``constant``)."""
        s_fixed = self.log_scale if self.name == "discretized_logistic" else 0.0
        return (s_fixed, math.exp(-self.log_scale), self.floor, self.half_bin,
                math.log(2.0 * self.half_bin))

    @property
    def prod_group(self) -> int:
        """Tiles whose factors a lane multiplies before one log: factors in (1, 2] or [0.39, 1]
        allow 64 (2**64, 1e-26); the logistic's (1 + e^-|a|)(1 + e^-|b|) lie in (1, 4]: 32."""
        return 32 if self.name == "discretized_logistic" else 64


BERNOULLI = Likelihood()


def as_likelihood(spec) -> Likelihood:
    return Likelihood.parse(spec if spec is not None else "bernoulli")


def slug(likelihood: Likelihood) -> str:
    """The label as a file-name part."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "-", likelihood.label)


# --------------------------------------------------------------------------- kernel math
# Codes: LIKELIHOOD 0 bernoulli, 1 gaussian, 2 continuous_bernoulli, 3 discretized_logistic;
# SCALE 0 none, 1 fixed (s, inv numbers), 2 pixel (s, inv [D] rows from the host), 3 sample (s a
# tile of the decoder's second channel, inv = exp(-s) here). Every function works elementwise on
# tiles; x, s and inv broadcast.


@triton.jit
def _log_phi_series(a):
    """log(a / (1 - e^-a)) for 0 <= a < 1/2: a/2 - a^2/24 + a^4/2880 (next term a^6/181440)."""
    a2 = a * a
    return a * 0.5 + a2 * (a2 * (1.0 / 2880.0) - 1.0 / 24.0)


@triton.jit
def floored_scale(s_raw, floor):
    """(s, inv): a per-sample log-scale tile clamped at the floor, and exp(-s). A select, not
    a max: a NaN stays NaN (max would return the floor)."""
    s = tl.where(s_raw < floor, floor, s_raw)
    return s, exp_neg_(s)


@triton.jit
def _logistic_bin(x, m, inv, half_bin):
    """x's bin in the logistic's standardized units: (a, b) its upper and lower edges
    (x +- d - m) e^-s, eps = a - b, and whether it is the top or the bottom bin (open)."""
    c = x - m
    top = x > 1.0 - half_bin
    bottom = x < half_bin - 1.0
    return (c + half_bin) * inv, (c - half_bin) * inv, (2.0 * half_bin) * inv, top, bottom


@triton.jit
def likelihood_step(acc, prod, prod2, x, m, s, inv, half_bin, log_two_half_bin,
                    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, FAST: tl.constexpr):
    """One tile of log p(x | m, s), lane by lane, into three accumulators: acc += the terms
    without a log, prod *= the factors whose logs are subtracted, prod2 *= those whose logs are
    added (``likelihood_flush`` takes the logs). x, s and inv broadcast against m; s is 0.0 for
    a fixed scale (its -s/2 is in ``Likelihood.constant``). FAST (a compiled launch): the
    continuous Bernoulli's log a is one MUFU.LG2, not libdevice's software log."""
    if LIKELIHOOD == 0:  # Bernoulli: x l - max(l, 0) = (x - 1/2) l - |l| / 2; factor 1 + e^-|l|
        magnitude = tl.abs(m)
        acc = tl.fma(magnitude, -0.5, tl.fma(x - 0.5, m, acc))
        prod = tl.fma(prod, exp_neg_(magnitude), prod)
    elif LIKELIHOOD == 1:  # Gaussian: -((x - m)^2 e^-s + s) / 2
        r = x - m
        acc = tl.fma(r * r, -0.5 * inv, acc) - 0.5 * s
    elif LIKELIHOOD == 2:  # continuous Bernoulli: x l - max(l, 0) + log phi(|l|)
        a = tl.abs(m)
        series = a < 0.5
        acc = tl.fma(a, -0.5, tl.fma(x - 0.5, m, acc))
        acc += tl.where(series, _log_phi_series(a), LN2 * log2_(a, FAST))
        prod *= tl.where(series, 1.0, 1.0 - exp_neg_(a))
    else:  # discretized logistic: log F(a) - softplus(b) + log(1 - e^-eps), edges open
        a, b, eps, top, bottom = _logistic_bin(x, m, inv, half_bin)
        series = eps < 0.5
        # log F(a) = min(a, 0) - log(1 + e^-|a|); -softplus(b) = -max(b, 0) - log(1 + e^-|b|)
        acc += tl.where(top, 0.0, tl.minimum(a, 0.0)) - tl.where(bottom, 0.0, tl.maximum(b, 0.0))
        # (nested selects, not series & ~edge: with a fixed scale series is a scalar, and the
        # interpreter cannot combine a scalar and a block mask)
        edge = top | bottom
        log_eps = log_two_half_bin - s
        acc += tl.where(edge, 0.0, tl.where(series, log_eps - _log_phi_series(eps), 0.0))
        prod *= tl.where(top, 1.0, 1.0 + exp_neg_(tl.abs(a))) * tl.where(bottom, 1.0, 1.0 + exp_neg_(tl.abs(b)))
        prod2 *= tl.where(edge, 1.0, tl.where(series, 1.0, 1.0 - exp_neg_(eps)))
    return acc, prod, prod2


@triton.jit
def likelihood_flush(acc, prod, prod2, LIKELIHOOD: tl.constexpr, FAST: tl.constexpr):
    """acc less log(prod) plus log(prod2): the logs of a finished group's products (one
    MUFU.LG2 per lane each, compiled)."""
    if LIKELIHOOD != 1:
        acc -= LN2 * log2_(prod, FAST)
    if LIKELIHOOD == 3:
        acc += LN2 * log2_(prod2, FAST)
    return acc


@triton.jit
def likelihood_grads(x, m, s, inv, half_bin, LIKELIHOOD: tl.constexpr, FAST: tl.constexpr,
                     TANH: tl.constexpr):
    """(d/dm, d/ds, d/dx) of log p(x | m, s) per element (d/ds: 0 without a scale channel; the
    caller masks it where the floor clamped s)."""
    if LIKELIHOOD == 0:  # x - sigmoid(l); d/dx = l
        g_m = x - sigmoid_(m, FAST, TANH)
        g_s = 0.0 * m
        g_x = m
    elif LIKELIHOOD == 1:  # r = (x - m) e^-s: d/dm = r, d/ds = (r (x - m) - 1) / 2, d/dx = -r
        r = (x - m) * inv
        g_m = r
        g_s = 0.5 * (r * (x - m) - 1.0)
        g_x = -r
    elif LIKELIHOOD == 2:  # x - mu(l), mu(l) = 1/(1 - e^-l) - 1/l; d/dx = l
        l2 = m * m
        series = 0.5 + m * (1.0 / 12.0 + l2 * (l2 * (1.0 / 30240.0) - 1.0 / 720.0))
        mean = tl.where(tl.abs(m) < 0.5, series, 1.0 / (1.0 - exp_neg_(m)) - 1.0 / m)
        g_m = x - mean
        g_s = 0.0 * m
        g_x = m
    else:
        # d log p / d m = e^-s (sigmoid(b) [not bottom] - sigmoid(-a) [not top]) (the
        # 1/(e^eps - 1) terms of the middle bins cancel); d/ds = -(a dF/da + b dF/db) =
        # -(a sigmoid(-a) [not top] - b sigmoid(b) [not bottom] + eps / (e^eps - 1) [middle]);
        # d/dx = -d/dm
        a, b, eps, top, bottom = _logistic_bin(x, m, inv, half_bin)
        sig_neg_a = tl.where(top, 0.0, 1.0 / (1.0 + tl.exp(a)))
        sig_b = tl.where(bottom, 0.0, 1.0 / (1.0 + tl.exp(-b)))
        e2 = eps * eps
        ratio = tl.where(eps < 0.5, 1.0 - eps * 0.5 + e2 * (1.0 / 12.0 - e2 * (1.0 / 720.0)),
                         eps / (tl.exp(eps) - 1.0))
        g_m = inv * (sig_b - sig_neg_a)
        g_s = -(tl.where(top, 0.0, a * sig_neg_a) - tl.where(bottom, 0.0, b * sig_b)
                + tl.where(top | bottom, 0.0, ratio))
        g_x = -g_m
    return g_m, g_s, g_x

