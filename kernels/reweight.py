"""Per-sample gradients scaled by a function of the importance weights, in one pass.

    out[b, i, :] = g[b, i, :] * f[b, i]
    f = (c + a u + b2 u^2) / (c2 + a2 u),    u[b, i] = exp(scale log_w[b, i] - offset[b, i // K])

DReG (Tucker, Lawson, Gu & Maddison 2019) gives the encoder a weight on the gradient arriving
at each reparameterized sample z_i (``iwae_bench.training.family`` derives it per objective):
w~_i^2 for the IWAE bound, alpha w~ + (1 - alpha) w~^2 for VR-alpha, and so on, with q's own
parameters held fixed inside log q. The weight must multiply the whole gradient at z_i, the
part coming back through the decoder included, so it is applied where the two paths have met:
on the gradient of z itself. That gradient already carries the surrogate's own weight on
log w_i (w~_i for the IWAE bound), so f is the ratio of the two: the numerator the DReG
weight, the denominator the surrogate's (1 for every member but CIWAE, whose weight mixes
beta / k in). With M groups of K samples, ``offset`` holds one value per group (its
logsumexp, or what the ratio needs: see the family module).

Defaults (scale 1, a = 1, the rest 0 but c2 = 1) give f = w~_i, the IWAE bound's DReG. The
weights are not materialized: each program reads its samples' log_w once and their groups'
offsets, and g and out once. A sample whose offset is -inf (a group with no weight to give)
or whose log-weight is -inf (no weight of its own: scale 0 would make 0 * inf) has u = 0, and
one whose denominator is 0 gets f = 0, instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import Tiling, Tunable, cdiv, next_pow2
from ._math import exp_


@dataclass(frozen=True)
class ReweightForm:
    """f = (c + a u + b u^2) / (c2 + a2 u), u = exp(scale log w - offset of the sample's group)."""

    scale: float = 1.0
    c: float = 0.0
    a: float = 1.0
    b: float = 0.0
    c2: float = 1.0
    a2: float = 0.0

    def factor(self, log_w: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """f [B, k] in torch (the torch backend's; the kernel computes the same in registers)."""
        B, k = log_w.shape
        M = offset.shape[1]
        u = torch.exp(self.scale * log_w.view(B, M, k // M) - offset.view(B, M, 1)).view(B, k)
        u = torch.where(torch.isneginf(offset).repeat_interleave(k // M, 1) | torch.isneginf(log_w), 0.0, u)
        den = self.c2 + self.a2 * u
        num = self.c + self.a * u + self.b * u * u
        return torch.where(den == 0, 0.0, num / torch.where(den == 0, 1.0, den))


@triton.jit
def _reweight_kernel(g_ptr, log_w_ptr, offset_ptr, out_ptr, k, d, M, K,
                     stride_gb, stride_gk, stride_gd, scale, c, a, b2, c2, a2,
                     BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr):
    # grid (B, cdiv(k, BLOCK_K)): one example, BLOCK_K samples, all d columns in BLOCK_L steps.
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    offset = tl.load(offset_ptr + b * M + offs_k // K, mask=mask_k, other=float("-inf"))
    log_w = tl.load(log_w_ptr + b * k + offs_k, mask=mask_k, other=float("-inf"))
    u = tl.where((offset == float("-inf")) | (log_w == float("-inf")), 0.0, exp_(scale * log_w - offset))
    den = c2 + a2 * u
    weight = tl.where(den == 0.0, 0.0, (c + u * (a + b2 * u)) / tl.where(den == 0.0, 1.0, den))
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

W_TILDE = ReweightForm()  # f = w~ = exp(log w - lse): the IWAE bound's DReG


def reweight(g: torch.Tensor, log_w: torch.Tensor, offset: torch.Tensor,
             form: ReweightForm = W_TILDE) -> torch.Tensor:
    """g [B, k, d] times f [B, k] per sample (module docstring): a tensor like g. ``offset`` is
    [B] (one group: the IWAE bound's lse) or [B, M] (M groups of k / M samples)."""
    B, k, d = g.shape
    offset = offset.reshape(B, -1).to(torch.float32).contiguous()
    M = offset.shape[1]
    out = torch.empty((B, k, d), device=g.device, dtype=g.dtype)
    if out.numel():
        _reweight.launch(lambda m: (B, cdiv(k, m["BLOCK_K"])), g, log_w.contiguous(), offset,
                         out, k, d, M, k // M, *g.stride(), float(form.scale), float(form.c),
                         float(form.a), float(form.b), float(form.c2), float(form.a2),
                         sizes={"k": k, "d": d})
    return out
