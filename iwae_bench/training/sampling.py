"""Noise for the reparameterized samples, drawn so that k-sample results nest.

Drawing in fixed blocks of ``SAMPLE_BLOCK`` samples makes the first k samples the same
whatever the total drawn or the chunks they are taken in: L_k plotted against k follows one
set of draws, and a streamed evaluation matches the unchunked one sample for sample.
"""

from __future__ import annotations

from typing import Iterator

import torch

SAMPLE_BLOCK = 64


def noise_blocks(shape, generator: torch.Generator, device) -> Iterator[torch.Tensor]:
    """Standard normal noise, SAMPLE_BLOCK samples ([SAMPLE_BLOCK, *shape]) at a time."""
    while True:
        yield torch.randn(SAMPLE_BLOCK, *shape, generator=generator, device=device)


def sample_noise(k: int, shape, generator: torch.Generator, device) -> torch.Tensor:
    """The first k samples of the block stream: [*shape[:1], k, *shape[1:]] (samples second)."""
    blocks = noise_blocks(shape, generator, device)
    drawn = torch.cat([next(blocks) for _ in range(-(-k // SAMPLE_BLOCK))])
    return drawn[:k].transpose(0, 1).contiguous()
