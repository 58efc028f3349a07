"""The IWAE bound in one kernel: from (x, logits, z, mu, logvar) to L_k per example.

    L_k[b] = logsumexp_i log w[b, i] - log k

Grid (B, SPLITS, 1). Program (b, s) walks its range of samples in BLOCK_K blocks: it computes
the block's log-weights in registers (``_log_weight_block``: each logits element read once)
and folds them into a running (max, sum) pair (the family's M groups: grid (B, SPLITS, M)); no [B, k, D] or [B*k, ...] tensor is written,
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

from .likelihood import BERNOULLI, Likelihood
from ._common import IWAE, Reduction, SplitWorkspace, Tunable, interpreted, next_pow2, split_plan
from .logw import (SPLIT_QUANTUM, _log_weight_block, block_tiling, bound_coefficients, input_strides,
                   int32_tiles, latent_block, likelihood_launch, log_weights_backward, pixel_scale,
                   prepared_inputs)
from .lse import _fold_samples, _group_samples, _store_row_bound


@triton.jit
def _fused_iwae_forward_kernel(
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr, px_ptr, offset_ptr,
    bound_ptr, lse_ptr, log_w_ptr, partial_ptr, linear_ptr, ticket_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    B, k, D, d, M, K, k_per_split, SPLITS, log_K, scale, beta, inv_K,
    s_fixed, inv_fixed, floor, half_bin, log_two_half_bin, row_constant,
    SAVE_LOG_W: tl.constexpr, LINEAR: tl.constexpr, GROUPED: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PROD_GROUP: tl.constexpr, FAST: tl.constexpr, BLOCK_S: tl.constexpr,
    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, MASK_X: tl.constexpr, MASK_MEAN: tl.constexpr,
    LOAD_STAGES: tl.constexpr = 1, OFFSET: tl.constexpr = False,
):
    # Program (b, s, g): split s of group g of example b (its K samples g K .. g K + K - 1; row
    # b M + g of the per-group outputs). It walks its samples in BLOCK_K blocks, folds each
    # block's log-weights into the group's running logsumexp of scale log w (and their sum
    # with LINEAR), and ends with the group's value (kernels/lse.py ``_store_row_bound``). The
    # IWAE bound is one group, scale 1. OFFSET: a [B, k] float32 term added to each log w (the
    # stochastic layers' latent terms, kernels/latent.py; the kernel's own latent loop then has d = 0).
    b, row, k_start, k_stop = _group_samples(M, K, k_per_split, GROUPED)
    run_max = tl.full([1], float("-inf"), tl.float32)
    run_sum = tl.zeros([1], tl.float32)
    run_lin = tl.zeros([1], tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        log_w = _log_weight_block(
            b, k0, k_stop, x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr, px_ptr,
            stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
            stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
            D, d, s_fixed, inv_fixed, floor, half_bin, log_two_half_bin, row_constant,
            BLOCK_K, BLOCK_D, BLOCK_L, PROD_GROUP, FAST, LOAD_STAGES, LIKELIHOOD, SCALE, MASK_X, MASK_MEAN,
        )
        if OFFSET:
            log_w += tl.load(offset_ptr + b.to(tl.int64) * k + offs_k, mask=mask_k, other=0.0)
        if SAVE_LOG_W:
            tl.store(log_w_ptr + b.to(tl.int64) * k + offs_k, log_w, mask=mask_k)
        run_max, run_sum, run_lin = _fold_samples(run_max, run_sum, run_lin, log_w, mask_k, scale, LINEAR)
    _store_row_bound(run_max, run_sum, run_lin, row, tl.program_id(1), SPLITS,
                     partial_ptr, linear_ptr, ticket_ptr, lse_ptr, bound_ptr, log_K, scale, beta,
                     inv_K, LINEAR, SPLIT_K, BLOCK_S)


_fused_forward = Tunable(_fused_iwae_forward_kernel, block_tiling("SPLITS", "SAVE_LOG_W", pipelined=True))


MAX_GRID_GROUPS = 65535  # CUDA's limit on a grid's y and z sizes


def reduction_args(reduction: Reduction, k: int) -> tuple:
    """(M, K, log K, scale, beta, 1 / K): the bound kernels' epilogue arguments."""
    K = reduction.group_length(k)
    if reduction.groups > MAX_GRID_GROUPS:  # the groups are the launch grid's third axis
        raise ValueError(f"groups = {reduction.groups} is more than a launch grid's {MAX_GRID_GROUPS}")
    return (reduction.groups, K, math.log(K), float(reduction.scale), float(reduction.beta), 1.0 / K)


def example_bound(row_bound: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """The per-example bound [B] from the kernels' per-group values [B * M]: their mean."""
    M = reduction.groups
    return row_bound if M == 1 else row_bound.view(-1, M).mean(1)


def fused_iwae_forward(x, logits, z, mu, logvar, save_log_w: bool = False, splits: int | None = None,
                       workspace: SplitWorkspace | None = None, reduction: Reduction = IWAE,
                       likelihood: Likelihood = BERNOULLI, scale=None, offset=None):
    """Return (bound [B], lse [B * M], log_w [B, k] or None), all float32 (inputs already
    checked); lse holds each group's logsumexp of scale log w (``reduction``; one group per
    example for the IWAE bound). ``offset`` [B, k] float32 is added to every log w.

    ``splits`` overrides the split plan of each group and ``workspace`` supplies the split's
    partials and tickets (tests use them to walk the multi-split path and to reuse one ticket
    buffer).
    """
    B, k = logits.shape[:2]
    D = x.shape[1]
    d = z.shape[2]
    device = logits.device
    epilogue = reduction_args(reduction, k)
    numbers, codes = likelihood_launch(likelihood, D)
    rows, K = B * reduction.groups, epilogue[1]
    plan = split_plan(rows, K, device, SPLIT_QUANTUM, splits)
    row_bound = torch.empty(rows, device=device, dtype=torch.float32)
    lse = torch.empty(rows, device=device, dtype=torch.float32)
    log_w = torch.empty((B, k), device=device, dtype=torch.float32) if save_log_w else lse
    if plan.is_split:  # the [rows, splits] partials and one ticket per group
        workspace = workspace or SplitWorkspace.allocate(rows, plan, device, linear=reduction.linear)
        workspace.check(rows, plan, reduction.linear)
    else:
        workspace = SplitWorkspace(lse, lse)  # never read: SPLIT_K is off
    _fused_forward.launch(
        lambda meta: (B, plan.splits, reduction.groups),
        x, logits, z, mu, logvar, pixel_scale(scale, likelihood, D, device),
        lse if offset is None else offset.contiguous(), row_bound, lse, log_w,
        workspace.partial, workspace.linear_partial, workspace.ticket, *input_strides(x, logits, z, mu, logvar),
        B, k, D, d, *epilogue[:2], plan.per_split, plan.splits, *epilogue[2:], *numbers,
        SAVE_LOG_W=save_log_w, LINEAR=reduction.linear, GROUPED=reduction.groups > 1, SPLIT_K=plan.is_split,
        BLOCK_L=latent_block(d), PROD_GROUP=likelihood.prod_group, FAST=not interpreted(),
        BLOCK_S=next_pow2(plan.splits), OFFSET=offset is not None, **codes,
        sizes={"k": min(K, plan.per_split), "D": D},
    )
    return example_bound(row_bound, reduction), lse, (log_w if save_log_w else None)


class FusedIWAEBoundFunction(torch.autograd.Function):
    """Forward in one kernel. For a backward it keeps log_w [B, k] and lse [B * M] (O(B*k))
    beside the inputs; the backward turns them into the bound's weights d bound / d log w
    (``Reduction.weights``: the normalized importance weights for the IWAE bound) and
    recomputes sigmoid(logits) instead of storing anything of size [B, k, D]. With
    ``return_weights`` it also hands out log_w and lse (not differentiable), from which the
    weights follow (DReG's reweighting uses them). ``offset`` [B, k] (the stochastic layers'
    terms) gets d bound / d log w as its gradient."""

    @staticmethod
    def forward(ctx, x, logits, z, mu, logvar, scale, reduction: Reduction, likelihood: Likelihood,
                return_weights: bool = False, offset=None):
        inputs = (x, logits, z, mu, logvar)
        wants_grad = any(t is not None and t.requires_grad for t in (*inputs, scale, offset))
        bound, lse, log_w = fused_iwae_forward(*inputs, save_log_w=wants_grad or return_weights,
                                               reduction=reduction, likelihood=likelihood, scale=scale,
                                               offset=offset)
        ctx.reduction, ctx.likelihood, ctx.offset = reduction, likelihood, offset is not None
        if wants_grad:
            ctx.save_for_backward(*inputs, scale, log_w, lse)
        if not return_weights:
            return bound
        ctx.mark_non_differentiable(log_w, lse)
        return bound, log_w, lse

    @staticmethod
    def backward(ctx, grad_bound, *_):
        *inputs, scale, log_w, lse = ctx.saved_tensors
        coef = bound_coefficients(grad_bound, log_w, lse, ctx.reduction)
        grads = log_weights_backward(*inputs, coef, need_dx=ctx.needs_input_grad[0], likelihood=ctx.likelihood,
                                     scale=scale)
        return (*grads, None, None, None, coef if ctx.offset else None)


def fused_iwae_bound(x, logits, z, mu=None, logvar=None, reduction: Reduction = IWAE, *, likelihood=BERNOULLI,
                     scale=None) -> torch.Tensor:
    """IWAE bound L_k per example, [B] float32, in one kernel from the inputs; any member of
    the family with ``reduction`` (``kernels.Reduction``: scale, groups, beta) and any
    likelihood of kernels/likelihood.py (logits then [B, k, C D]; ``scale`` a per-pixel one).

    Same inputs as ``kernels.log_weights``; k in the thousands streams with O(B) extra memory
    (O(B*k) when a gradient is needed). Differentiable (backward in Triton). Stochastic layers
    (``z`` a sequence of ``kernels.Latent``) add one small launch per layer before it.
    """
    B, k, likelihood, latent, offset = prepared_inputs(x, logits, z, mu, logvar, likelihood, scale)
    reduction.group_length(k)
    if B == 0:
        return torch.empty(0, device=logits.device, dtype=torch.float32)
    return FusedIWAEBoundFunction.apply(x, int32_tiles(logits), *latent, scale, reduction, likelihood, False, offset)


def fused_iwae_bound_with_weights(x, logits, z, mu=None, logvar=None, reduction: Reduction = IWAE, *,
                                  likelihood=BERNOULLI, scale=None):
    """(bound [B], log_w [B, k], lse [B * M]) from one kernel; only the bound is differentiable."""
    B, k, likelihood, latent, offset = prepared_inputs(x, logits, z, mu, logvar, likelihood, scale)
    reduction.group_length(k)
    if B == 0:
        empty = torch.empty(0, device=logits.device, dtype=torch.float32)
        return empty, empty.view(0, k), empty
    return FusedIWAEBoundFunction.apply(x, int32_tiles(logits), *latent, scale, reduction, likelihood, True, offset)
