"""Per-sample gradients scaled by the normalized importance weights, in one pass.

    out[b, i, :] = g[b, i, :] * w~[b, i],      w~[b, i] = exp(log_w[b, i] - lse[b])

DReG (Tucker, Lawson, Gu & Maddison 2019) gives the encoder the IWAE gradient arriving at each
reparameterized sample z_i multiplied once more by its normalized weight w~_i (so w~_i^2 in
all), with q's own parameters held fixed inside log q. The weight must multiply the whole
gradient at z_i, the part coming back through the decoder included, so it is applied where
the two paths have met: on the gradient of z itself. The weights are not materialized: each
program reads its samples' log_w once and lse[b] once, and g and out once.

A row whose lse is -inf (every weight -inf) has no weights to give: zeros, not NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Tiling, Tunable, cdiv, next_pow2
from ._math import exp_


@triton.jit
def _reweight_kernel(g_ptr, log_w_ptr, lse_ptr, out_ptr, k, d,
                     stride_gb, stride_gk, stride_gd,
                     BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    # grid (B, cdiv(k, BLOCK_K)): one example, BLOCK_K samples, all d columns in BLOCK_L steps.
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    lse = tl.load(lse_ptr + b)
    log_w = tl.load(log_w_ptr + b * k + offs_k, mask=mask_k, other=float("-inf"))
    weight = tl.where(lse == float("-inf"), 0.0, exp_(log_w - lse))
    rows64 = offs_k.to(tl.int64)
    for j0 in range(0, d, BLOCK_L):
        offs_l = j0 + tl.arange(0, BLOCK_L)
        mask = mask_k[:, None] & (offs_l < d)[None, :]
        g_block = tl.load(g_ptr + b * stride_gb + rows64[:, None] * stride_gk + offs_l[None, :] * stride_gd,
                          mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + (b * k + rows64)[:, None] * d + offs_l[None, :],
                 (g_block * weight[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(k: int, d: int) -> dict:
    block_l = min(next_pow2(d), 64)
    return {"BLOCK_K": min(next_pow2(k), max(1, 4096 // block_l)), "BLOCK_L": block_l}


_reweight = Tunable(_reweight_kernel, Tiling(
    [triton.Config({"BLOCK_K": bk, "BLOCK_L": bl}, num_warps=4) for bk, bl in ((32, 64), (64, 32), (128, 16))],
    key=["k", "d"], default=lambda k, d: {**_blocks(k, d), "num_warps": 4}, interpreter=_blocks,
    data_arg="g_ptr", tile=lambda meta: meta["BLOCK_K"] * meta["BLOCK_L"]))


def reweight(g: torch.Tensor, log_w: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """g [B, k, d] times exp(log_w [B, k] - lse [B]) per sample: a tensor like g."""
    B, k, d = g.shape
    out = torch.empty((B, k, d), device=g.device, dtype=g.dtype)
    if out.numel():
        _reweight.launch(lambda m: (B, cdiv(k, m["BLOCK_K"])), g, log_w.contiguous(), lse.contiguous(),
                         out, k, d, *g.stride(), sizes={"k": k, "d": d})
    return out
