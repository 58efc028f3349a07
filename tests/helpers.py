"""Comparison against the float64 reference, and adversarial bound inputs."""

from __future__ import annotations

import contextlib
import math

import torch

from kernels._common import interpreted

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


# The unit roundoff of the 16-bit dtypes tl.dot takes.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def dot_error_scales(loss_of_outputs, h, weight, bias) -> dict:
    """sum_j |c_j| |b_j|, in float64, for each gradient an output layer's dots make: c =
    dloss/d(outputs) by float64 autograd through ``loss_of_outputs`` on the outputs h W^T + b
    rebuilt in float64 (W [C D, H]: a row per channel and pixel, so c holds every channel's
    coefficients), and dh = c W, dW = c^T h, dbias = sum of c over the samples. By name:
    "h", "weight" and, with a bias, "bias"."""
    h, weight = h.detach().double(), weight.detach().double()
    outputs = h @ weight.t()
    if bias is not None:
        outputs = outputs + bias.detach().double()
    (c,) = torch.autograd.grad(loss_of_outputs(outputs.requires_grad_()), outputs)
    c = c.abs()
    rows, H = weight.shape
    scales = {"h": c @ weight.abs(), "weight": c.reshape(-1, rows).t() @ h.abs().reshape(-1, H)}
    if bias is not None:
        scales["bias"] = c.reshape(-1, rows).sum(0)
    return scales


def assert_within_dot_bound(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor,
                            what: str = "gradient") -> None:
    """A 16-bit gradient that a dot made within that dot's error bound of the float64 one,
    ``scale`` its sum_j |c_j| |b_j| (``dot_error_scales``). The kernel rounds the coefficient c
    to the input dtype before the dot and the float32 sum to the output dtype, so each element
    is off by at most 2u sum_j |c_j| |b_j| (u = 2^-8 for bfloat16, 2^-11 for float16; the
    float32 accumulation adds far less). Triton's interpreter casts float32 to bfloat16 by
    truncation (measured with 3.9: every value of a 1024-draw cast matched the truncated bits),
    up to 2u per coefficient, so there the bound is 3u. An elementwise relative tolerance fails
    on cancelling sums, whatever its size, at some seed."""
    err = (actual.detach().double() - expected.detach().double()).abs()
    u = UNIT_ROUNDOFF[actual.dtype]
    bound = ((2 * u if interpreted() else u) + u) * scale + 1e-6
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: {worst:.2f} times the {actual.dtype} dot's error bound"


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
