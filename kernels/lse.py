"""Streaming logsumexp over the last dimension, and the IWAE bound on log-weights.

    logsumexp(t)[r] = m_r + log sum_j exp(t[r, j] - m_r),     m_r = max_j t[r, j]
    iwae_bound(log_w)  = logsumexp(log_w) - log k

The reduction streams over k in blocks with a running max and a running (rescaled) sum, so
any k works in one pass. Special values follow ``torch.logsumexp``: a row of all -inf gives
-inf, a +inf entry gives +inf, NaN propagates.

Memory: a program owns BLOCK_R rows (many for short rows, one for long ones) and reads each
element once. When a few very long rows could not fill the GPU, k is also split across
programs; the split that finishes last combines the partial results in the same launch
(``_combine_split_partials``, shared with the fused bound).

Backward: d logsumexp / d t[r, j] = exp(t[r, j] - lse_r), the softmax over the row; the
forward saves only lse (one float per row) and the backward recomputes the weights.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (IWAE, Reduction, SplitWorkspace, Tiling, Tunable, cdiv, check_log_weights, next_pow2,
                      split_plan)
from ._math import exp_


@triton.jit
def _lse_shift(run_max):
    # The value exponents are taken relative to: the running max, or 0 where it is +-inf
    # (as torch does), so an all -inf row stays -inf and a +inf entry gives +inf, not NaN.
    return tl.where(tl.abs(run_max) == float("inf"), 0.0, run_max)


@triton.jit
def _lse_combine(run_max, run_sum, tile):
    """Fold a [R, K] tile into running (max, sum of exp(t - shift)) pairs of shape [R]."""
    new_max = tl.maximum(run_max, tl.max(tile, axis=1))
    new_shift = _lse_shift(new_max)
    # Rescale the old sum to the new shift. A row that has seen only -inf has sum 0; give it
    # scale 0 outright so 0 * exp(huge) cannot make a NaN.
    scale = tl.where(run_max == float("-inf"), 0.0, exp_(_lse_shift(run_max) - new_shift))
    run_sum = run_sum * scale + tl.sum(exp_(tile - new_shift[:, None]), axis=1)
    return new_max, run_sum


@triton.jit
def _lse_finalize(run_max, run_sum):
    return tl.log(run_sum) + _lse_shift(run_max)


@triton.jit
def _combine_split_partials(part, lin, rows, mask_r, split, SPLITS, partial_ptr, linear_ptr,
                            ticket_ptr, ticket_index, LINEAR: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    """Split-k epilogue, in the same launch. Each of SPLITS programs holds ``part`` [BLOCK_R],
    the logsumexp of its share of the rows ``rows`` (and with LINEAR ``lin``, the plain sum of
    that share); it stores them to the [R, SPLITS] partials and takes a ticket. The holder of
    the last ticket reads every partial of these rows and gets their logsumexp (and the sum of
    the sums) with ``is_last`` true on its valid rows (false for everyone else), and puts the
    ticket back to 0 so the next launch (or the autotuner's rerun) starts clean."""
    rows64 = rows.to(tl.int64)
    tl.store(partial_ptr + rows64 * SPLITS + split, part, mask=mask_r)
    if LINEAR:
        tl.store(linear_ptr + rows64 * SPLITS + split, lin, mask=mask_r)
    # Every thread's partial store is issued before the ticket (barrier), and the ticket is
    # acq_rel (the default): our partial is visible before our ticket is, and the last holder,
    # acquiring, sees every partial stored before the other tickets were taken.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + ticket_index, 1)
    tl.debug_barrier()
    n_read = tl.where(ticket == SPLITS - 1, SPLITS, 0)
    offs_s = tl.arange(0, BLOCK_S)
    read_mask = mask_r[:, None] & (offs_s[None, :] < n_read)
    parts = tl.load(partial_ptr + rows64[:, None] * SPLITS + offs_s[None, :], mask=read_mask,
                    other=float("-inf"), volatile=True)
    lse = _lse_finalize(*_lse_combine(tl.full([BLOCK_R], float("-inf"), tl.float32),
                                      tl.zeros([BLOCK_R], tl.float32), parts))
    if LINEAR:
        lin = tl.sum(tl.load(linear_ptr + rows64[:, None] * SPLITS + offs_s[None, :], mask=read_mask,
                             other=0.0, volatile=True), axis=1)
    is_last = mask_r & ((tl.zeros([BLOCK_R], tl.int32) + n_read) > 0)
    one = tl.arange(0, 1)
    tl.store(ticket_ptr + ticket_index + one, tl.zeros([1], tl.int32), mask=one < n_read)
    return lse, lin, is_last


@triton.jit
def _row_value(lse, lin, log_K, scale, beta, inv_K, LINEAR: tl.constexpr):
    """A group's share of the bound (``kernels._common.Reduction``), from the logsumexp of its
    scaled log-weights and, with LINEAR, their plain sum: (1 - beta) (lse - log K) / scale +
    beta sum / K. The first term is dropped outright at beta = 1 (0 * inf would be NaN)."""
    value = (lse - log_K) / scale
    if LINEAR:
        value = tl.where(beta == 1.0, 0.0, (1.0 - beta) * value) + beta * (lin * inv_K)
    return value


@triton.jit
def _fold_samples(run_max, run_sum, run_lin, log_w, mask_k, scale, LINEAR: tl.constexpr):
    """Fold a block of log-weights [BLOCK_K] (``mask_k``: the real ones) into a group's running
    logsumexp of scale log w and, with LINEAR, the running sum of log w."""
    scaled = tl.where(mask_k, scale * log_w, float("-inf"))
    run_max, run_sum = _lse_combine(run_max, run_sum, scaled[None, :])
    if LINEAR:
        run_lin += tl.sum(tl.where(mask_k, log_w, 0.0), axis=0)
    return run_max, run_sum, run_lin


@triton.jit
def _group_samples(M, K, k_per_split, GROUPED: tl.constexpr):
    """Program (b, s, g) of a bound kernel (grid (B, SPLITS, M)) owns split s of group g of
    example b, the group's K samples g K .. g K + K - 1: (b, row, first, stop), row = b M + g
    its row of the per-group outputs. The group comes from its own grid axis, not row // M: a
    division by the runtime M moves b, and every address made from it, out of the uniform
    registers into each thread's (30 more registers and a spill, sm_90); and reading the third
    axis at all costs the IWAE bound a spill (bf16, sm_90), so GROUPED (M > 1) alone reads it."""
    b = tl.program_id(0)
    first = tl.program_id(1) * k_per_split
    if not GROUPED:  # M = 1: the IWAE bound's prologue, no group index
        return b, b, first, tl.minimum(first + k_per_split, K)
    g = tl.program_id(2)
    return b, b * M + g, g * K + first, tl.minimum(g * K + first + k_per_split, g * K + K)


@triton.jit
def _store_row_bound(run_max, run_sum, run_lin, row, split, SPLITS, partial_ptr, linear_ptr,
                     ticket_ptr, lse_ptr, bound_ptr, log_K, scale, beta, inv_K,
                     LINEAR: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """The end of a program that streamed one group's log-weights (the fused bounds): the
    logsumexp of its share, combined with the other splits' by the last one to finish when the
    group is split, stored as lse[row], and the group's value (``_row_value``) as bound[row]."""
    lse = _lse_finalize(run_max, run_sum)  # [1]: logsumexp over this split's samples
    lin = run_lin
    one = tl.arange(0, 1)
    store_mask = one < 1
    if SPLIT_K:
        lse, lin, store_mask = _combine_split_partials(lse, lin, row + one, one < 1, split, SPLITS,
                                                       partial_ptr, linear_ptr, ticket_ptr, row,
                                                       LINEAR, 1, BLOCK_S)
    tl.store(lse_ptr + row + one, lse, mask=store_mask)
    tl.store(bound_ptr + row + one, _row_value(lse, lin, log_K, scale, beta, inv_K, LINEAR),
             mask=store_mask)


@triton.jit
def _logsumexp_forward_kernel(
    t_ptr, lse_ptr, out_ptr, partial_ptr, linear_ptr, ticket_ptr,
    R, K, stride_r, stride_k, offset, scale, beta, inv_K, k_per_split, SPLITS,
    LINEAR: tl.constexpr, SCALED: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Program (i, s) owns BLOCK_R rows and walks columns [s * k_per_split, (s+1) * k_per_split)
    # of them in [BLOCK_R, BLOCK_K] tiles: each element is read once. Per row it writes lse, the
    # logsumexp of scale * t, and the row's value (lse - offset) / scale (with LINEAR, mixed
    # with the row's mean as ``_row_value`` says; SCALED: scale is not 1, so the hot loop of
    # the plain logsumexp has no multiply); with SPLIT_K the splits' partials are
    # combined by the last one to finish (a few rows of a huge K would otherwise leave most
    # SMs idle).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    mask_r = rows < R
    row_ptrs = t_ptr + rows.to(tl.int64)[:, None] * stride_r
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    run_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_R], tl.float32)
    run_lin = tl.zeros([BLOCK_R], tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = mask_r[:, None] & (offs_k < k_stop)[None, :]
        tile = tl.load(row_ptrs + offs_k[None, :].to(tl.int64) * stride_k, mask=mask,
                       other=float("-inf")).to(tl.float32)
        if LINEAR:
            run_lin += tl.sum(tl.where(mask, tile, 0.0), axis=1)
        if SCALED:  # masked after scaling: a negative scale would turn a masked -inf into +inf
            tile = tl.where(mask, tile * scale, float("-inf"))
        run_max, run_sum = _lse_combine(run_max, run_sum, tile)
    lse = _lse_finalize(run_max, run_sum)
    store_mask = mask_r
    if SPLIT_K:
        lse, run_lin, store_mask = _combine_split_partials(lse, run_lin, rows, mask_r, split, SPLITS,
                                                           partial_ptr, linear_ptr, ticket_ptr,
                                                           tl.program_id(0), LINEAR, BLOCK_R, BLOCK_S)
    tl.store(lse_ptr + rows, lse, mask=store_mask)
    tl.store(out_ptr + rows, _row_value(lse, run_lin, offset, scale, beta, inv_K, LINEAR), mask=store_mask)


@triton.jit
def _logsumexp_backward_kernel(
    t_ptr, lse_ptr, grad_out_ptr, grad_t_ptr,
    R, K, stride_r, stride_k, scale, beta, inv_K,
    LINEAR: tl.constexpr, SCALED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grad_t[r, j] = grad_out[r] * ((1 - beta) exp(scale t[r, j] - lse[r]) + beta / K): the
    # softmax of the scaled row, mixed with the mean's uniform weights. One [BLOCK_R, BLOCK_K]
    # tile per program, t read once, grad_t (contiguous [R, K]) written once. A row of infinite
    # lse (all -inf; with a negative scale, any -inf) has no finite softmax weights to give: 0
    # rather than exp(inf - inf) = NaN. LINEAR and SCALED
    # as in the forward: the plain logsumexp's loop has neither the mix nor the multiply.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_r = rows < R
    mask = mask_r[:, None] & (offs_k < K)[None, :]
    rows64 = rows.to(tl.int64)
    tile = tl.load(t_ptr + rows64[:, None] * stride_r + offs_k[None, :] * stride_k,
                   mask=mask, other=float("-inf")).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=mask_r, other=0.0)
    grad_out = tl.load(grad_out_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)
    if SCALED:
        tile = tile * scale
    weights = tl.where(tl.abs(lse[:, None]) == float("inf"), 0.0, exp_(tile - lse[:, None]))
    if LINEAR:
        weights = (1.0 - beta) * weights + beta * inv_K
    grad = grad_out[:, None] * weights
    tl.store(grad_t_ptr + rows64[:, None] * K + offs_k[None, :],
             grad.to(grad_t_ptr.dtype.element_ty), mask=mask)


def _lse_configs():
    # Few rows of long K, or many rows of short K; tiles of 1-8K elements. Pruned by K below.
    # A long row's per-tile rescale is one exp per thread: 8K-element tiles make it 1/32 of one
    # per element.
    shapes = [(1, 8192, 8), (1, 4096, 8), (1, 2048, 8), (1, 1024, 4), (4, 256, 4), (16, 64, 4),
              (64, 16, 4), (256, 4, 4), (1024, 1, 4)]
    return [triton.Config({"BLOCK_R": r, "BLOCK_K": k}, num_warps=w) for r, k, w in shapes]


def _default_blocks(K: int) -> dict:
    # launched without autotuning (IWAE_BENCH_AUTOTUNE=0) on a GPU: the tile that fits K
    block_k = min(next_pow2(K), 1024)
    return {"BLOCK_R": max(1, 1024 // block_k), "BLOCK_K": block_k, "num_warps": 4}


def _interpreter_blocks(K: int) -> dict:
    # Large tiles: the interpreter pays per operation, not per element.
    block_k = min(next_pow2(K), 1024)
    return {"BLOCK_R": max(1, min(64, 4096 // block_k)), "BLOCK_K": block_k}


def _prune_by_width(configs, K: int, few_rows: bool):
    # A tile wider than the columns a program walks wastes lanes; keep those no wider (at least
    # the narrowest). With a split K, keep single-row tiles: the split is for few, long rows.
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= next_pow2(K)
            and (not few_rows or c.kwargs["BLOCK_R"] <= 4)]
    return kept or configs[-1:]


# The columns a program walks: its split's share of K in the forward, one tile in the backward.
def _tile(meta: dict) -> int:
    return meta["BLOCK_R"] * meta["BLOCK_K"]


_lse_forward = Tunable(_logsumexp_forward_kernel, Tiling(
    _lse_configs(), key=["R", "K", "SPLITS"], default=_default_blocks, interpreter=_interpreter_blocks,
    prune=lambda configs, named_args, **_: _prune_by_width(
        configs, min(named_args["K"], named_args["k_per_split"]), named_args["SPLITS"] > 1),
    data_arg="t_ptr", tile=_tile))
_lse_backward = Tunable(_logsumexp_backward_kernel, Tiling(
    _lse_configs(), key=["R", "K"], default=_default_blocks, interpreter=_interpreter_blocks,
    prune=lambda configs, named_args, **_: _prune_by_width(configs, named_args["K"], False),
    data_arg="t_ptr", tile=_tile))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A [R, K] view of a [..., K] tensor; strided over K and one row stride read in place."""
    K = t.shape[-1]
    try:
        return t.view(-1, K)
    except RuntimeError:  # leading dims that no single stride covers: copy them once
        return t.reshape(-1, K)


SPLIT_QUANTUM = 8192  # columns per split are a multiple of the widest tile


def logsumexp_forward(t: torch.Tensor, offset: float = 0.0, splits: int | None = None,
                      workspace: SplitWorkspace | None = None, reduction: Reduction = IWAE):
    """Return (out, lse) per row of t [..., K], float32: lse = logsumexp(scale t) and out the
    row's value under ``reduction`` (``_row_value``; (lse - offset) / scale for beta = 0, so
    logsumexp(t) - offset by default). ``reduction.groups`` is not read here: a row is a group.

    ``splits`` overrides the split plan and ``workspace`` supplies the split's partials and
    tickets (tests use them to walk the split-k path and to reuse one ticket buffer).
    """
    rows = _as_rows(t)
    R, K = rows.shape
    lse = torch.empty(R, device=t.device, dtype=torch.float32)
    out = torch.empty(R, device=t.device, dtype=torch.float32)
    if R == 0:
        return out.view(t.shape[:-1]), lse
    plan = split_plan(R, K, t.device, SPLIT_QUANTUM, splits)
    if plan.is_split:  # the [R, splits] partials and one ticket per row block (at most R)
        workspace = workspace or SplitWorkspace.allocate(R, plan, t.device, linear=reduction.linear)
        workspace.check(R, plan, reduction.linear)
    else:
        workspace = SplitWorkspace(lse, lse)  # never read: SPLIT_K is off
    _lse_forward.launch(
        lambda m: (cdiv(R, m["BLOCK_R"]), plan.splits),
        rows, lse, out, workspace.partial, workspace.linear_partial, workspace.ticket, R, K,
        rows.stride(0), rows.stride(1), float(offset), float(reduction.scale), float(reduction.beta),
        1.0 / K, plan.per_split, plan.splits, LINEAR=reduction.linear, SCALED=reduction.scale != 1.0,
        SPLIT_K=plan.is_split,
        BLOCK_S=next_pow2(plan.splits), sizes={"K": min(K, plan.per_split)},
    )
    return out.view(t.shape[:-1]), lse


def logsumexp_backward(t: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                       reduction: Reduction = IWAE) -> torch.Tensor:
    """Gradient of the rows' values (``logsumexp_forward``) for incoming ``grad_out`` [...]:
    a tensor like t."""
    rows = _as_rows(t)
    R, K = rows.shape
    grad = torch.empty((R, K), device=t.device, dtype=t.dtype)
    if R > 0 and K > 0:
        _lse_backward.launch(
            lambda m: (cdiv(R, m["BLOCK_R"]), cdiv(K, m["BLOCK_K"])),
            rows, lse, grad_out.reshape(R).contiguous(), grad, R, K, rows.stride(0), rows.stride(1),
            float(reduction.scale), float(reduction.beta), 1.0 / K, LINEAR=reduction.linear,
            SCALED=reduction.scale != 1.0, sizes={"K": K},
        )
    return grad.view(t.shape)


class LogSumExpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, offset: float, reduction: Reduction):
        out, lse = logsumexp_forward(t, offset, reduction=reduction)
        ctx.save_for_backward(t, lse)
        ctx.reduction = reduction
        return out

    @staticmethod
    def backward(ctx, grad_out):
        t, lse = ctx.saved_tensors
        return logsumexp_backward(t, lse, grad_out, ctx.reduction), None, None


def logsumexp(t: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension of ``t`` [..., K] -> [...] in float32."""
    if check_log_weights("t", t, allow_empty=True, for_kernel=True) == 0:
        return torch.full(t.shape[:-1], float("-inf"), device=t.device, dtype=torch.float32)  # as torch
    return LogSumExpFunction.apply(t, 0.0, IWAE)


def iwae_bound(log_w: torch.Tensor, reduction: Reduction = IWAE) -> torch.Tensor:
    """The bound from log-weights [..., k] -> [...] float32: logsumexp over k minus log k by
    default, any member of the family with ``reduction`` (groups of K consecutive samples: each
    group a row of the kernel, their values averaged)."""
    k = check_log_weights("log_w", log_w, for_kernel=True)
    K = reduction.group_length(k, "k (log_w's last dim)")
    M = reduction.groups
    grouped = log_w if M == 1 else log_w.unflatten(-1, (M, K))
    values = LogSumExpFunction.apply(grouped, math.log(K), reduction)
    return values if M == 1 else values.mean(-1)
