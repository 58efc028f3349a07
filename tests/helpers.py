"""Comparison against the float64 reference, and adversarial bound inputs."""

from __future__ import annotations

import contextlib
import math

import torch

# Tolerances by the dtype the kernel accumulates in: float32 for every input dtype, so the
# error is float32 rounding of sums, relative to the magnitude of the bound.
RTOL = 2e-5
ATOL = 2e-3


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL,
                 atol: float = ATOL, what: str = "result") -> None:
    """Equal within atol + rtol * |expected|, NaN where NaN, same infinities; on failure the
    message lists the worst mismatches with their indices."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.nonzero().tolist()}, expected at {nan_e.nonzero().tolist()}"
    inf_e = torch.isinf(expected)
    assert torch.equal(torch.isinf(actual), inf_e) and torch.equal(actual[inf_e], expected[inf_e]), \
        f"{what}: infinities differ: got {actual[inf_e | torch.isinf(actual)].tolist()}, expected {expected[inf_e | torch.isinf(actual)].tolist()}"
    finite = torch.isfinite(expected)
    err = (actual - expected).abs().where(finite, torch.zeros_like(actual))
    bound = atol + rtol * expected.abs().where(finite, torch.zeros_like(expected))
    bad = err > bound
    if bad.any():
        excess = (err - bound).flatten()
        worst = excess.topk(min(5, int(bad.sum()))).indices
        rows = []
        for flat in worst.tolist():
            idx = tuple(torch.unravel_index(torch.tensor(flat), actual.shape)) if actual.dim() else ()
            idx = tuple(int(i) for i in idx)
            rows.append(f"  at {idx}: got {actual[idx].item():.9g}, expected {expected[idx].item():.9g}, "
                        f"|err| {err[idx].item():.3g} > {bound[idx].item():.3g}")
        raise AssertionError(f"{what}: {int(bad.sum())} of {finite.sum().item()} finite values out of "
                             f"tolerance (atol {atol}, rtol {rtol}); worst:\n" + "\n".join(rows))


def make_case(B: int, k: int, D: int, d: int, *, logit_scale: float = 4.0, binary: bool = True,
              dtype: torch.dtype = torch.float32, noncontiguous: bool = False, seed: int = 0,
              device: str = "cpu"):
    """Random bound inputs. ``logit_scale`` 60 gives log-weights near -1e4; ``noncontiguous``
    hands out strided views: every other sample of a [B, 2k, ...] tensor, every other pixel
    of x, and mu/logvar as transposes."""
    g = torch.Generator().manual_seed(seed)
    k_alloc, D_alloc = (2 * k, 2 * D) if noncontiguous else (k, D)
    x = torch.rand(B, D_alloc, generator=g)
    if binary:
        x = (x < 0.3).float()
    logits = (torch.randn(B, k_alloc, D, generator=g) * logit_scale).clamp(-60, 60)
    z = torch.randn(B, k_alloc, d, generator=g)
    mu = torch.randn(d, B, generator=g) * 0.5
    logvar = torch.randn(d, B, generator=g) * 0.5
    if noncontiguous:
        x, logits, z = x[:, ::2], logits[:, ::2], z[:, ::2]
        mu, logvar = mu.t(), logvar.t()
    else:
        mu, logvar = mu.t().contiguous(), logvar.t().contiguous()
    return tuple(t.to(device) for t in (x, logits.to(dtype), z, mu, logvar))



@contextlib.contextmanager
def one_thread():
    """torch on one thread for the block: hundreds of tiny steps, where threads only contend
    (with xdist's workers too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def paired_z_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|mean(a - b)| / its standard error, per parameter (paired over the rows, the groups);
    parameters where the two agree exactly in every group are left out."""
    diff = a - b
    se = diff.std(0) / math.sqrt(diff.shape[0])
    keep = se > 1e-12
    return diff.mean(0)[keep].abs() / se[keep]
