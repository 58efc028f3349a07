"""The IWAE bound in one kernel: from (x, logits, z, mu, logvar) to L_k per example.

    L_k[b] = logsumexp_i log w[b, i] - log k

Grid (B, SPLITS). Program (b, s) walks its range of samples in BLOCK_K blocks: it computes
the block's log-weights in registers (``_log_weight_block``: each logits element read once)
and folds them into a running (max, sum) pair; no [B, k, D] or [B*k, ...] tensor is written,
only log_w itself when the backward asks for it (O(B*k)).

Small B with large k (k = 5000 test log-likelihoods) would leave most SMs idle with one
program per example, so k is split. Each split writes its partial logsumexp to a [B, SPLITS]
workspace and takes a ticket from a per-example counter; the program that draws the last
ticket reads the partials, combines them with the same logsumexp, writes L_k and puts the
counter back to zero, so the kernel stays one launch and can be rerun (by the autotuner too).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import SplitWorkspace, Tunable, check_bound_inputs, interpreted, next_pow2, split_plan
from .logw import (PROD_GROUP, SPLIT_QUANTUM, _log_weight_block, block_tiling, input_strides,
                   bound_coefficients, int32_tiles, latent_block, log_weights_backward)
from .lse import _lse_combine, _store_example_bound


@triton.jit
def _fused_iwae_forward_kernel(
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr,
    bound_ptr, lse_ptr, log_w_ptr, partial_ptr, ticket_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    B, k, D, d, k_per_split, SPLITS, log_k,
    SAVE_LOG_W: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PROD_GROUP: tl.constexpr, FAST: tl.constexpr, BLOCK_S: tl.constexpr,
    LOAD_STAGES: tl.constexpr = 1,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, k)
    run_max = tl.full([1], float("-inf"), tl.float32)
    run_sum = tl.zeros([1], tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        log_w = _log_weight_block(
            b, k0, k_stop, x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr,
            stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
            stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
            D, d, BLOCK_K, BLOCK_D, BLOCK_L, PROD_GROUP, FAST, LOAD_STAGES,
        )
        if SAVE_LOG_W:
            tl.store(log_w_ptr + b.to(tl.int64) * k + offs_k, log_w, mask=mask_k)
        log_w = tl.where(mask_k, log_w, float("-inf"))
        run_max, run_sum = _lse_combine(run_max, run_sum, log_w[None, :])
    _store_example_bound(run_max, run_sum, b, split, SPLITS, partial_ptr, ticket_ptr, lse_ptr,
                         bound_ptr, log_k, SPLIT_K, BLOCK_S)


_fused_forward = Tunable(_fused_iwae_forward_kernel, block_tiling("SPLITS", "SAVE_LOG_W", pipelined=True))


def fused_iwae_forward(x, logits, z, mu, logvar, save_log_w: bool = False, splits: int | None = None,
                       workspace: SplitWorkspace | None = None):
    """Return (bound [B], lse [B], log_w [B, k] or None), all float32 (inputs already checked).

    ``splits`` overrides the split plan and ``workspace`` supplies the split's partials and
    tickets (tests use them to walk the multi-split path and to reuse one ticket buffer).
    """
    B, k, D = logits.shape
    d = z.shape[2]
    device = logits.device
    plan = split_plan(B, k, device, SPLIT_QUANTUM, splits)
    bound = torch.empty(B, device=device, dtype=torch.float32)
    lse = torch.empty(B, device=device, dtype=torch.float32)
    log_w = torch.empty((B, k), device=device, dtype=torch.float32) if save_log_w else bound
    if plan.is_split:  # the [B, splits] partials and one ticket per example
        workspace = workspace or SplitWorkspace.allocate(B, plan, device)
        workspace.check(B, plan)
    else:
        workspace = SplitWorkspace(bound, bound)  # never read: SPLIT_K is off
    _fused_forward.launch(
        lambda meta: (B, plan.splits),
        x, logits, z, mu, logvar, bound, lse, log_w, workspace.partial, workspace.ticket,
        *input_strides(x, logits, z, mu, logvar),
        B, k, D, d, plan.per_split, plan.splits, math.log(k),
        SAVE_LOG_W=save_log_w, SPLIT_K=plan.is_split, BLOCK_L=latent_block(d), PROD_GROUP=PROD_GROUP,
        FAST=not interpreted(),
        BLOCK_S=next_pow2(plan.splits), sizes={"k": min(k, plan.per_split), "D": D},
    )
    return bound, lse, (log_w if save_log_w else None)


class FusedIWAEBoundFunction(torch.autograd.Function):
    """Forward in one kernel. For a backward it keeps log_w [B, k] and lse [B] (O(B*k)) beside
    the inputs; the backward turns them into normalized importance weights and recomputes
    sigmoid(logits) instead of storing anything of size [B, k, D]. With ``return_weights`` it
    also hands out log_w and lse (not differentiable), from which the normalized importance
    weights exp(log_w - lse) follow (DReG's reweighting uses them)."""

    @staticmethod
    def forward(ctx, x, logits, z, mu, logvar, return_weights: bool = False):
        inputs = (x, logits, z, mu, logvar)
        wants_grad = any(t.requires_grad for t in inputs)
        bound, lse, log_w = fused_iwae_forward(*inputs, save_log_w=wants_grad or return_weights)
        if wants_grad:
            ctx.save_for_backward(*inputs, log_w, lse)
        if not return_weights:
            return bound
        ctx.mark_non_differentiable(log_w, lse)
        return bound, log_w, lse

    @staticmethod
    def backward(ctx, grad_bound, *_):
        *inputs, log_w, lse = ctx.saved_tensors
        return (*log_weights_backward(*inputs, bound_coefficients(grad_bound, log_w, lse),
                                      need_dx=ctx.needs_input_grad[0]), None)


def fused_iwae_bound(x, logits, z, mu, logvar) -> torch.Tensor:
    """IWAE bound L_k per example, [B] float32, in one kernel from the inputs.

    Same inputs as ``kernels.log_weights``; k in the thousands streams with O(B) extra memory
    (O(B*k) when a gradient is needed). Differentiable (backward in Triton).
    """
    B = check_bound_inputs(x, logits, z, mu, logvar, for_kernel=True)[0]
    if B == 0:
        return torch.empty(0, device=logits.device, dtype=torch.float32)
    return FusedIWAEBoundFunction.apply(x, int32_tiles(logits), int32_tiles(z), mu, logvar)


def fused_iwae_bound_with_weights(x, logits, z, mu, logvar):
    """(bound [B], log_w [B, k], lse [B]) from one kernel; only the bound is differentiable."""
    B, k = check_bound_inputs(x, logits, z, mu, logvar, for_kernel=True)[:2]
    if B == 0:
        empty = torch.empty(0, device=logits.device, dtype=torch.float32)
        return empty, empty.view(0, k), empty
    return FusedIWAEBoundFunction.apply(x, int32_tiles(logits), int32_tiles(z), mu, logvar, True)
