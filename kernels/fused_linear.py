"""The decoder's output layer fused into the bound: from its last hidden layer h to L_k, with
the logits built tile by tile on chip and never written, forward or backward.

For example b and sample i, h[b, i] the decoder's last hidden layer (width H) and its output
layer l = h W^T + b_out in nn.Linear's layout (W [D, H]; b_out [D], or none):

    l[b, i]     = h[b, i] W^T + b_out                                               [D]
    log w[b, i] = sum_D [x l - softplus(l)] + log p(z) - log q(z|x)    (as kernels/logw.py)
    L_k[b]      = logsumexp_i log w[b, i] - log k

Backward, for c[b, i] = d loss / d log w[b, i] (given for the log-weights; for the bound the
upstream gradient times the normalized importance weight, ``logw.bound_coefficients`` of the
log_w [B, k] and lse [B] the forward saved):

    g[b, i]   = c[b, i] (x[b] - sigmoid(l[b, i]))     d loss / d l: on chip only   [D]
    d/dh      = g W                  [B, k, H]
    d/dW      = sum_{b, i} g^T h     [D, H]
    d/db_out  = sum_{b, i} g         [D]
    d/dx      = sum_i c l            [B, D]   (only when x asks for it)

and the latent gradients (z, mu, logvar) of kernels/logw.py. Infinite logits (an infinite
bias, say) follow kernels/logw.py's rule, with its NaN-triggered exact second loop, which here
rebuilds the logits tiles from h and W.

Matmul precision: h and W share one dtype. bfloat16 and float16 use tensor-core dots with
float32 accumulation, and g is rounded to that dtype for its own two dots (as autograd's
grad_output of a 16-bit nn.Linear is). float32 follows
``torch.backends.cuda.matmul.allow_tf32``: a tf32 dot when True, exact
``input_precision="ieee"`` when False (CUDA-core FMAs on small tiles: hundreds of instructions
per logit at H = 200, the slow exact path). Under the CPU interpreter every dot is exact; its
tl.dot multiplies bfloat16 operands as their integer bit patterns (Triton 3.9), so there they
are widened to float32 first (``DOT_IN_FP32``): exact products, the numbers of the
tensor-core dot up to the order of the sums.

All of H in one block: every kernel holds an h or W block of BLOCK_H = next_pow2(H) >= 16
columns (256 for H = 200; masks pad the rest) and does one dot over it per tile, because the
backward's accumulators dh [BLOCK_K, H] and dW [BLOCK_D, H] must stay on chip anyway, and
because in the forward a stationary h block beat a GEMM loop over H chunks compiled for sm_90
(about 15-18 against 24-27 instructions per logit in the hot loop at H = 200, bf16). The cost
is shared memory and registers growing with H: the tile lists are chosen at H = 200 and the
prune keeps the tiles whose shared memory fits, down to the smallest (fine to H of a few
hundred; beyond about 1000 in bf16 even that one no longer fits on an H100).
Rows of h and W load as wide vectors: ALIGN (<= 16) divides H and their row strides, and the
H mask is written in ALIGN-wide groups so that the compiler sees it (``_hidden_mask``).

Forward, grid (B, SPLITS) with kernels/fused_bound.py's split plan (B = 20, k = 5000 is split
over k; the last split combines the partial logsumexps in the same launch): program (b, s)
walks its samples in BLOCK_K blocks. Per block it loads h[b, block] [BLOCK_K, H] once and
sweeps D in BLOCK_D tiles: W[tile] [BLOCK_D, H] (314 KB in all at the MNIST size, read by every
program from L2), one dot, the bias, and the tile goes straight into the Bernoulli sums (the
grouped products of kernels/logw.py); x[b, tile] is loaded once per tile and broadcast over the
samples. The block's log-weights (plus the latent term) go to the streaming logsumexp, and to
log_w [B, k] when a backward will need it. Nothing of size [B, k, D] exists; the backward keeps
log_w and lse (O(B k)) beside the inputs. A program owns one example, so with k under 64
most rows of a tensor-core tile are padding (training's k = 5): packing several examples per
block, as the dW kernel below does, is not done yet for the forward and dh kernels.

Backward: two kernels, because the two big gradients want opposite loop orders. d/dh of a block
of samples sums over every D tile, so it wants the samples on chip and D streaming past; d/dW
of a D tile sums over every sample, so it wants the tile on chip and the samples streaming past.
One kernel can hold only one of them: the other would need float atomics (whose order changes
the bits run to run) or a [row blocks, D, H] partial per block of samples (as large as the
logits). So each kernel rebuilds the logits tiles from h and W: one GEMM more than the
minimum, bought for determinism and O(B k) memory.

- ``_fused_linear_backward_dh_kernel``, grid (B, SPLITS), the forward's split plan: program
  (b, s) holds h[b, block] for each block of its samples, sweeps the D tiles (W[tile] from L2,
  x[b, tile]) and accumulates dh += g W[tile] in registers; d/dh is written once per block.
  d/dx, when asked, goes to this program's row of [B, SPLITS, D] partials (the first block
  stores, later ones add, so a rerun by the autotuner gives the same numbers), summed on the
  host.
- ``_fused_linear_backward_dw_kernel``, grid (D tiles, ROW_SPLITS): program (t, r) holds W[tile]
  and walks the flattened samples r = b k + i of its range in BLOCK_M blocks (h[b, i] and
  x[b, tile] gathered by row, so small k packs several examples into a block); dW[tile] += g^T h
  and db[tile] += g accumulate in registers and are stored once to this program's slot of the
  [ROW_SPLITS, D, H] and [ROW_SPLITS, D] float32 partials, which the host adds up with one
  fixed-shape torch sum. ROW_SPLITS depends on the sizes and the device only (planned for
  64-wide D tiles, never for the tile the autotuner picks), so the same inputs give the same
  bits run after run for a given tile (the autotuner's pick is cached per key in a process;
  IWAE_BENCH_AUTOTUNE=0 pins the default).
- The latent gradients are kernels/logw.py's backward itself, launched with D = 0 (its
  Bernoulli loop runs zero times; empty views stand in for x and the logits): one small launch
  over the [B, k, d] samples and one implementation of that math.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .likelihood import BERNOULLI, _bernoulli_only
from ._common import (IWAE, Reduction, SplitPlan, SplitWorkspace, Tiling, Tunable, cdiv, check_devices,
                      check_inputs, interpreted, next_pow2, shape_str, split_plan)
from .fused_bound import example_bound, reduction_args
from ._math import LN2, log2_, sigmoid_
from .logw import (MASKED_LOGIT, PROD_GROUP, SPLIT_QUANTUM, _bernoulli_exact, _bernoulli_step,
                   _latent_log_ratio, _row_block, bound_coefficients, latent_block,
                   log_weights_backward)
from .lse import _fold_samples, _group_samples, _store_row_bound

MATMUL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROW_QUANTUM = 128  # rows per split of the dW kernel are a multiple of this (any BLOCK_M <= 128)
DW_TILE_FOR_PLAN = 64  # the D tile the dW row split is planned for (the actual tile may differ)


# --------------------------------------------------------------------------- input checks

# layout of each input, in the order the kernels take them
HEAD_LAYOUT = {"x": ("B", "D"), "h": ("B", "k", "H"), "weight": ("D", "H"), "bias": ("D",),
               "z": ("B", "k", "d"), "mu": ("B", "d"), "logvar": ("B", "d")}
# who sets a size when the arguments disagree: the majority, ties broken in this order
HEAD_PRIORITY = {"B": ("h", "x", "z", "mu", "logvar"), "k": ("h", "z"), "H": ("h", "weight"),
                 "D": ("weight", "x", "bias"), "d": ("mu", "logvar", "z")}
# checked in this order, so the argument outvoted by the others is named before a tie's loser
HEAD_CHECK_ORDER = ("mu", "logvar", "z", "bias", "weight", "x", "h")


def check_head_inputs(x, h, weight, bias, z, mu, logvar, *, for_kernel: bool = False):
    """Validate the inputs of the fused output layer + bound; return (B, k, D, H, d).

    x [B, D], h [B, k, H], weight [D, H], bias [D] or None, z [B, k, d], mu and logvar [B, d];
    h and weight of one dtype among float32, bfloat16 and float16 (the matmul's), the others any
    floating dtype; one device. Errors name the argument and the shape it should have.
    """
    tensors = {"x": x, "h": h, "weight": weight, "bias": bias, "z": z, "mu": mu, "logvar": logvar}
    tensors = {name: t for name, t in tensors.items() if not (name == "bias" and t is None)}
    priority = {size: tuple(n for n in names if n in tensors) for size, names in HEAD_PRIORITY.items()}
    sizes = check_inputs(tensors, HEAD_LAYOUT, priority, tuple(n for n in HEAD_CHECK_ORDER if n in tensors))
    if h.dtype not in MATMUL_DTYPES:
        raise TypeError(f"h must be float32, bfloat16 or float16 (the dtypes tl.dot takes), got {h.dtype}")
    if weight.dtype != h.dtype:
        raise TypeError(f"weight must have h's dtype {h.dtype} (one matmul dtype), got {weight.dtype}")
    if sizes["k"] < 1:
        raise ValueError(f"k must be >= 1: h has shape {shape_str(h)} (k = {sizes['k']})")
    if sizes["H"] < 1:
        raise ValueError(f"h must have a hidden width H >= 1, got shape {shape_str(h)}")
    if sizes["D"] < 1:
        raise ValueError(f"weight must have D >= 1 output rows, got shape {shape_str(weight)}")
    if sizes["d"] < 1:
        raise ValueError(f"z must have a latent width d >= 1, got shape {shape_str(z)}")
    check_devices(tensors, for_kernel)
    return sizes["B"], sizes["k"], sizes["D"], sizes["H"], sizes["d"]


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc + a @ b in float32 (see the module docstring for the precision of each dtype)."""
    if DOT_IN_FP32:  # the interpreter with bfloat16 operands
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return out


@triton.jit
def _hidden_mask(offs_h, H, ALIGN: tl.constexpr):
    """offs_h < H, written as whole groups of ALIGN columns (ALIGN divides H) so the compiler
    sees the mask constant over each group and keeps the loads of h and W vectorized."""
    return (offs_h // ALIGN) < (H // ALIGN)


@triton.jit
def _hidden_tile(h_ptr, b64, rows64, offs_h, stride_hb, stride_hk, stride_hh, mask,
                 ALIGN: tl.constexpr):
    """h[b, rows64, offs_h]: [BLOCK_K, BLOCK_H] in h's dtype (a dot operand), 0 where masked.
    ``b64`` is a scalar or, like ``rows64``, one example per row. Row starts are multiples of
    ALIGN elements (the host checks the strides), so the loads vectorize with H = 200. The
    hint goes on the 1-D row starts, before they broadcast: Triton 3.6 drops a hint given on
    the 2-D offsets (``[ALIGN, 1]``) and loads h one element at a time (3.9 keeps either)."""
    row_start = tl.multiple_of(b64 * stride_hb + rows64 * stride_hk, ALIGN)
    return tl.load(h_ptr + row_start[:, None] + offs_h[None, :] * stride_hh, mask=mask, other=0.0)


@triton.jit
def _weight_tile(w_ptr, offs_d, offs_h, stride_wd, stride_wh, mask, ALIGN: tl.constexpr):
    """W[offs_d, offs_h]: [BLOCK_D, BLOCK_H] in W's dtype, 0 where masked (rows: as h's)."""
    row_start = tl.multiple_of(offs_d.to(tl.int64) * stride_wd, ALIGN)
    return tl.load(w_ptr + row_start[:, None] + offs_h[None, :] * stride_wh, mask=mask, other=0.0)


@triton.jit
def _bias_block(bias_ptr, offs_d, stride_bias, mask_d, HAS_BIAS: tl.constexpr):
    """b_out[offs_d] as float32 [BLOCK_D] (zeros without a bias), and MASKED_LOGIT in the
    columns past D: there W's rows load as 0, so the logit is MASKED_LOGIT, which adds exactly
    0 and a factor of 1 to the Bernoulli sums and has sigmoid 0 (no gradient): padded columns
    need no select per element."""
    if HAS_BIAS:
        block = tl.load(bias_ptr + offs_d * stride_bias, mask=mask_d, other=MASKED_LOGIT).to(tl.float32)
    else:
        block = tl.where(mask_d, 0.0, MASKED_LOGIT)
    return block


@triton.jit
def _logits(h_block, w_tile, bias_block, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """l = h W^T + b_out on one tile: h_block [rows, BLOCK_H] times w_tile [BLOCK_D, BLOCK_H]
    transposed, plus the bias block -> [rows, BLOCK_D] float32. Columns past D hold
    MASKED_LOGIT (see ``_bias_block``); rows past the samples junk their users drop."""
    return _dot(h_block, tl.trans(w_tile), None, INPUT_PRECISION, DOT_IN_FP32) + bias_block[None, :]


@triton.jit
def _logits_tile(h_block, w_ptr, bias_ptr, offs_d, mask_d, offs_h, mask_h, stride_wd, stride_wh,
                 stride_bias, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 DOT_IN_FP32: tl.constexpr, ALIGN: tl.constexpr):
    """(W[offs_d] [BLOCK_D, BLOCK_H], the logits of the rows of h_block at columns offs_d)."""
    w_tile = _weight_tile(w_ptr, offs_d, offs_h, stride_wd, stride_wh, mask_d[:, None] & mask_h[None, :], ALIGN)
    bias_block = _bias_block(bias_ptr, offs_d, stride_bias, mask_d, HAS_BIAS)
    return w_tile, _logits(h_block, w_tile, bias_block, INPUT_PRECISION, DOT_IN_FP32)


@triton.jit
def _bernoulli_linear_block(
    b, offs_k, mask_k, x_ptr, h_ptr, w_ptr, bias_ptr,
    stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
    D, H,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    PROD_GROUP: tl.constexpr, FAST: tl.constexpr,
):
    """log p(x|h) = sum_D [x l - softplus(l)] for the samples offs_k -> [BLOCK_K] float32 (rows
    past the samples: junk): the sums of kernels/logw.py's ``_log_weight_block``, on logits
    tiles built by ``_logits`` instead of loaded."""
    b64 = b.to(tl.int64)
    rows64 = offs_k.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = _hidden_mask(offs_h, H, ALIGN)
    h_block = _hidden_tile(h_ptr, b64, rows64, offs_h, stride_hb, stride_hk, stride_hh,
                           mask_k[:, None] & mask_h[None, :], ALIGN)
    # acc holds, lane by lane, x*l - max(l, 0) less the logs of finished groups of factors
    # (1 + exp(-|l|)); group_prod the factors of the group of PROD_GROUP tiles in progress.
    # The tiles are visited last one first: the ragged last tile's padded lanes (logit
    # MASKED_LOGIT, x = 0) then pass 32752 - 32752 through an accumulator that is still 0,
    # exactly, instead of rounding a lane's sum at the scale of 32752 (kernels/logw.py does its
    # ragged tile first for the same reason).
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    n_tiles = tl.cdiv(D, BLOCK_D)
    for g0 in range(0, n_tiles, PROD_GROUP):
        group_prod = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
        for i in range(g0, tl.minimum(g0 + PROD_GROUP, n_tiles)):  # the hot loop
            tile = i - 1 + tl.where(i == 0, n_tiles, 0)  # n_tiles - 1, 0, 1, ..., n_tiles - 2
            offs_d = tile * BLOCK_D + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            w_tile, logit_block = _logits_tile(h_block, w_ptr, bias_ptr, offs_d, mask_d, offs_h, mask_h,
                                               stride_wd, stride_wh, stride_bias, HAS_BIAS,
                                               INPUT_PRECISION, DOT_IN_FP32, ALIGN)
            x_block = _row_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d)
            acc, group_prod = _bernoulli_step(acc, group_prod, x_block[None, :], logit_block)
        acc -= LN2 * log2_(group_prod, FAST)
    log_px = tl.sum(acc, axis=1)

    # Infinite logits made 0 * inf = NaN above: rebuild those rows' tiles, sum them exactly.
    # (Only the samples' own rows count: a padded row may be NaN when the bias is infinite.)
    if tl.max(tl.where(mask_k & (log_px != log_px), 1, 0), axis=0) > 0:
        exact = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            w_tile, logit_block = _logits_tile(h_block, w_ptr, bias_ptr, offs_d, mask_d, offs_h, mask_h,
                                               stride_wd, stride_wh, stride_bias, HAS_BIAS,
                                               INPUT_PRECISION, DOT_IN_FP32, ALIGN)
            exact += _bernoulli_exact(_row_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d),
                                      logit_block, mask_k[:, None] & mask_d[None, :])
        log_px = tl.where(log_px != log_px, tl.sum(exact, axis=1), log_px)
    return log_px


# --------------------------------------------------------------------------- kernels


@triton.jit
def _fused_linear_forward_kernel(
    x_ptr, h_ptr, w_ptr, bias_ptr, z_ptr, mu_ptr, logvar_ptr,
    bound_ptr, lse_ptr, log_w_ptr, partial_ptr, linear_ptr, ticket_ptr,
    stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    B, k, D, H, d, M, K, k_per_split, SPLITS, log_K, scale, beta, inv_K,
    HAS_BIAS: tl.constexpr, SAVE_LOG_W: tl.constexpr, BOUND: tl.constexpr,
    LINEAR: tl.constexpr, GROUPED: tl.constexpr, SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr, PROD_GROUP: tl.constexpr, FAST: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid (B, SPLITS, M): group g of example b (row b M + g, kernels/fused_bound.py's layout),
    # its split's samples [k_start, k_stop) in BLOCK_K blocks. Per block the log-weights are
    # built in registers from h and W (no logits in memory), written to the contiguous [B, k]
    # log_w when SAVE_LOG_W, and with BOUND folded into the group's running logsumexp of
    # scale log w (and sum, LINEAR); with SPLIT_K the splits' partials are combined by the
    # last one, and the group's value stored (kernels/lse.py ``_store_row_bound``).
    b, row, k_start, k_stop = _group_samples(M, K, k_per_split, GROUPED)
    run_max = tl.full([1], float("-inf"), tl.float32)
    run_sum = tl.zeros([1], tl.float32)
    run_lin = tl.zeros([1], tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        log_w = _bernoulli_linear_block(
            b, offs_k, mask_k, x_ptr, h_ptr, w_ptr, bias_ptr,
            stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
            D, H, HAS_BIAS, INPUT_PRECISION, DOT_IN_FP32, ALIGN, BLOCK_K, BLOCK_D, BLOCK_H,
            PROD_GROUP, FAST,
        ) + _latent_log_ratio(
            b.to(tl.int64), tl.cast(k0, tl.int64), tl.arange(0, BLOCK_K), mask_k, z_ptr, mu_ptr, logvar_ptr,
            stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd, d,
            BLOCK_K, BLOCK_L,
        )
        if SAVE_LOG_W:
            tl.store(log_w_ptr + b.to(tl.int64) * k + offs_k, log_w, mask=mask_k)
        if BOUND:
            run_max, run_sum, run_lin = _fold_samples(run_max, run_sum, run_lin, log_w, mask_k, scale, LINEAR)
    if BOUND:
        _store_row_bound(run_max, run_sum, run_lin, row, tl.program_id(1), SPLITS,
                         partial_ptr, linear_ptr, ticket_ptr, lse_ptr, bound_ptr, log_K, scale, beta,
                         inv_K, LINEAR, SPLIT_K, BLOCK_S)


@triton.jit
def _fused_linear_backward_dh_kernel(
    x_ptr, h_ptr, w_ptr, bias_ptr, coef_ptr, grad_h_ptr, part_x_ptr,
    stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
    B, k, D, H, k_per_split, SPLITS,
    HAS_BIAS: tl.constexpr, NEED_DX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, ALIGN: tl.constexpr, FAST: tl.constexpr, TANH_SIGMOID: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # grid (B, SPLITS): example b, samples [k_start, k_stop). Per block of samples, h[b, block]
    # (all of H) stays on chip while the D tiles stream past: W[tile] (from L2) builds the logits
    # tile, g = c (x - sigmoid(l)) is formed in registers, and dh += g W[tile]. d/dh (contiguous
    # [B, k, H]) is written once per block; with NEED_DX, sum_i c l lands in this program's row
    # of the [B, SPLITS, D] partials (stored by the first block, added by the next ones).
    b = tl.program_id(0)
    split = tl.program_id(1)
    b64 = b.to(tl.int64)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, k)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = _hidden_mask(offs_h, H, ALIGN)
    part_x_row = part_x_ptr + (b64 * SPLITS + split) * D
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        rows64 = offs_k.to(tl.int64)
        coef = tl.load(coef_ptr + b64 * k + rows64, mask=mask_k, other=0.0)
        h_block = _hidden_tile(h_ptr, b64, rows64, offs_h, stride_hb, stride_hk, stride_hh,
                               mask_k[:, None] & mask_h[None, :], ALIGN)
        grad_h = tl.zeros([BLOCK_K, BLOCK_H], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            w_tile, logit_block = _logits_tile(h_block, w_ptr, bias_ptr, offs_d, mask_d, offs_h, mask_h,
                                               stride_wd, stride_wh, stride_bias, HAS_BIAS,
                                               INPUT_PRECISION, DOT_IN_FP32, ALIGN)
            x_block = _row_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d)
            # padded rows have c = 0, padded columns sigmoid(MASKED_LOGIT) = 0 = x: g = 0 there
            grad_logits = coef[:, None] * (x_block[None, :] - sigmoid_(logit_block, FAST, TANH_SIGMOID))
            grad_h = _dot(grad_logits.to(w_tile.dtype), w_tile, grad_h, INPUT_PRECISION, DOT_IN_FP32)
            if NEED_DX:
                # a sample of weight 0 adds nothing, even where its logit is infinite
                x_sum = tl.sum(tl.where(coef[:, None] == 0.0, 0.0, coef[:, None] * logit_block), axis=0)
                if k0 > k_start:
                    x_sum += tl.load(part_x_row + offs_d, mask=mask_d, other=0.0)
                tl.store(part_x_row + offs_d, x_sum, mask=mask_d)
        tl.store(grad_h_ptr + (b64 * k + rows64)[:, None] * H + offs_h[None, :],
                 grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_h[None, :])


@triton.jit
def _fused_linear_backward_dw_kernel(
    x_ptr, h_ptr, w_ptr, bias_ptr, coef_ptr, part_w_ptr, part_b_ptr,
    stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
    R, k, D, H, rows_per_split, ROW_SPLITS,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ALIGN: tl.constexpr, FAST: tl.constexpr, TANH_SIGMOID: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # grid (cdiv(D, BLOCK_D), ROW_SPLITS): D tile t, flattened samples r = b k + i in
    # [r_start, r_stop). W[tile] (all of H) stays on chip while the samples stream past in
    # BLOCK_M blocks (h[b, i] and x[b, tile] gathered per row);
    # dW[tile] += g^T h and db[tile] += g accumulate in registers (db as a 2-D block, summed
    # over its rows once) and are stored once to this program's slot of the [ROW_SPLITS, D, H]
    # and [ROW_SPLITS, D] partials.
    offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    mask_d = offs_d < D
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = _hidden_mask(offs_h, H, ALIGN)
    w_tile = _weight_tile(w_ptr, offs_d, offs_h, stride_wd, stride_wh,
                          mask_d[:, None] & mask_h[None, :], ALIGN)
    bias_block = _bias_block(bias_ptr, offs_d, stride_bias, mask_d, HAS_BIAS)
    r_start = split * rows_per_split
    r_stop = tl.minimum(r_start + rows_per_split, R)
    grad_w = tl.zeros([BLOCK_D, BLOCK_H], tl.float32)
    grad_b = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # summed over its rows once, at the end
    for r0 in range(r_start, r_stop, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask_r = rows < r_stop
        rows = tl.where(mask_r, rows, 0)  # masked rows read row 0 and weigh 0
        coef = tl.load(coef_ptr + rows, mask=mask_r, other=0.0)  # c is a contiguous [B, k]
        b_rows = rows // k  # int32 division (the host checks B k < 2**31)
        i_rows = (rows - b_rows * k).to(tl.int64)
        b_rows = b_rows.to(tl.int64)
        h_block = _hidden_tile(h_ptr, b_rows, i_rows, offs_h, stride_hb, stride_hk,
                               stride_hh, mask_r[:, None] & mask_h[None, :], ALIGN)
        logit_block = _logits(h_block, w_tile, bias_block, INPUT_PRECISION, DOT_IN_FP32)
        x_block = tl.load(x_ptr + b_rows[:, None] * stride_xb + offs_d[None, :] * stride_xd,
                          mask=mask_r[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        # padded rows have c = 0, padded columns sigmoid(MASKED_LOGIT) = 0 = x: g = 0 there
        grad_logits = coef[:, None] * (x_block - sigmoid_(logit_block, FAST, TANH_SIGMOID))
        grad_w = _dot(tl.trans(grad_logits.to(h_block.dtype)), h_block, grad_w,
                      INPUT_PRECISION, DOT_IN_FP32)
        grad_b += grad_logits
    slot = split.to(tl.int64) * D + offs_d
    tl.store(part_w_ptr + slot[:, None] * H + offs_h[None, :], grad_w,
             mask=mask_d[:, None] & mask_h[None, :])
    tl.store(part_b_ptr + slot, tl.sum(grad_b, axis=0), mask=mask_d)


# --------------------------------------------------------------------------- tiling


# Tiles as (rows, BLOCK_D, num_warps, num_stages), by the kind of dot: 16-bit inputs, float32 as
# tf32, float32 exact ("ieee": CUDA-core FMAs, whose operands are held whole in registers, so
# only small tiles compile sanely). Every kernel keeps all of H in one block, so shared memory
# holds a rows x H block (h, or W for the dW kernel) and num_stages blocks of what streams past
# it. Chosen from what Triton's compiler emits for sm_90 at B = 20, k = 5000, D = 784, H = 200
# (registers, spills, instructions per logit in the hot loop, in the module docstring): the
# first that fits is the tile launched without autotuning and compiles without spills except
# for the exact float32 forward (~0.2 KB); the others are for the autotuner to measure. The
# dh kernel's 64-row tiles take about half the instructions per logit of its 32-row ones
# (tensor-core wgmma wants 64 rows) but keep a [64, H] float32 accumulator beside the h block
# and spill ~0.6-0.8 KB per thread outside the hot loop, once per block of samples.
FORWARD_SHAPES = {
    "16-bit": [(128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 3), (64, 128, 8, 2), (64, 32, 4, 2)],
    "tf32": [(64, 32, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2)],
    "ieee": [(16, 16, 8, 1)],
}
DH_SHAPES = {
    "16-bit": [(32, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
    "tf32": [(32, 64, 8, 2), (32, 32, 4, 2), (128, 32, 8, 2)],
    "ieee": [(16, 32, 4, 1), (16, 16, 4, 1)],
}
DW_SHAPES = {
    "16-bit": [(32, 64, 4, 3), (128, 64, 8, 2), (32, 32, 4, 2)],
    "tf32": [(32, 64, 4, 3), (32, 32, 4, 2)],
    "ieee": [(16, 16, 4, 1), (32, 16, 4, 1)],
}
SHARED_BUDGET = 200 * 1024  # bytes of shared memory a tile may plan for (227 KB on sm_90)


def hidden_block(H: int) -> int:
    """The H block of every kernel: all of H, padded to a power of two (dots need >= 16)."""
    return max(16, next_pow2(H))


def dot_kind(elem: int, input_precision: str) -> str:
    return "16-bit" if elem == 2 else input_precision


def _shared_bytes(shape, H: int, elem: int, rows_stream: bool) -> int:
    """The h and W blocks a tile keeps in shared memory: the stationary block plus num_stages
    of the streaming one (W tiles past an h block; for the dW kernel, h blocks past W)."""
    rows, block_d, _, stages = shape
    stationary, streaming = (block_d, rows) if rows_stream else (rows, block_d)
    return (stationary + stages * streaming) * hidden_block(H) * elem


def _tiling(rows_name: str, shapes: dict, walked: str, total: str, key: list,
            rows_stream: bool = False) -> Tiling:
    """Autotuned over the shapes of the launch's kind of dot, pruned to those that fit (no
    wider than the rows a program walks, ``walked`` of ``total``, or D; shared memory within
    budget); without autotuning the first of them that fits; large tiles in the interpreter
    (it pays per operation, not per element)."""
    every = list(dict.fromkeys(shape for kind in shapes.values() for shape in kind))
    configs = [triton.Config({rows_name: r, "BLOCK_D": bd}, num_warps=w, num_stages=s)
               for r, bd, w, s in every]

    def fitting(rows, D, H, elem, precision):
        mine = [shape for shape in every if shape in shapes[dot_kind(elem, precision)]]
        mine.sort(key=shapes[dot_kind(elem, precision)].index)
        in_smem = [shape for shape in mine if _shared_bytes(shape, H, elem, rows_stream) <= SHARED_BUDGET]
        kept = [shape for shape in in_smem
                if shape[0] <= max(16, next_pow2(rows)) and shape[1] <= max(16, next_pow2(D))]
        # few rows or a narrow D: the smallest tile (dots need 16 rows, wgmma 64)
        kept = kept or sorted(in_smem or mine, key=lambda shape: shape[0] * shape[1])[:1]
        return [configs[every.index(shape)] for shape in kept]

    def prune(configs_, named_args, **kwargs):
        named = {**named_args, **kwargs}
        return fitting(min(named[walked], named[total]), named["D"], named["H"],
                       named["h_ptr"].element_size(), named["INPUT_PRECISION"])

    def default(rows, D, H, elem, precision):
        best = fitting(rows, D, H, elem, precision)[0]
        return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}

    def interpreter(rows, D, H, elem, precision):
        return {rows_name: min(max(16, next_pow2(rows)), 64), "BLOCK_D": min(max(16, next_pow2(D)), 256)}

    return Tiling(configs, key=key, default=default, interpreter=interpreter, prune=prune,
                  data_arg="h_ptr", tile=lambda meta: meta[rows_name] * meta["BLOCK_D"])


_fused_linear_forward = Tunable(_fused_linear_forward_kernel, _tiling(
    "BLOCK_K", FORWARD_SHAPES, "k_per_split", "k",
    key=["B", "k", "D", "H", "d", "SPLITS", "SAVE_LOG_W", "BOUND", "INPUT_PRECISION"]))
_fused_linear_backward_dh = Tunable(_fused_linear_backward_dh_kernel, _tiling(
    "BLOCK_K", DH_SHAPES, "k_per_split", "k",
    key=["B", "k", "D", "H", "SPLITS", "NEED_DX", "INPUT_PRECISION"]))
_fused_linear_backward_dw = Tunable(_fused_linear_backward_dw_kernel, _tiling(
    "BLOCK_M", DW_SHAPES, "rows_per_split", "R",
    key=["R", "k", "D", "H", "ROW_SPLITS", "INPUT_PRECISION"], rows_stream=True))


# --------------------------------------------------------------------------- host functions


@contextlib.contextmanager
def matmul_tf32(enabled: bool):
    """torch.backends.cuda.matmul.allow_tf32 set to ``enabled`` for the block, then put back:
    the switch the float32 head's dots follow (``_dot_options``)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _dot_options(h: torch.Tensor, weight: torch.Tensor) -> dict:
    """The constexprs every kernel here takes from h and W: the matmul precision of their dtype
    (see the module docstring) and ALIGN, the power of two (<= 16 elements) that divides H and
    every row start of h and W, so their rows load in wide vectors (a launch only marks
    integers divisible by 16: H = 200 rows would load element by element)."""
    tf32 = h.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    align = 1
    if h.stride(-1) == 1 and weight.stride(1) == 1:
        strides = (h.shape[-1], *h.stride()[:-1], weight.stride(0))
        while align < 16 and all(s % (2 * align) == 0 for s in strides):
            align *= 2
    return {"INPUT_PRECISION": "tf32" if tf32 else "ieee",
            "DOT_IN_FP32": interpreted() and h.dtype == torch.bfloat16, "ALIGN": align}


def _sizes(rows: int, D: int, H: int, h: torch.Tensor, dots: dict) -> dict:
    """What a launch's tile depends on: the rows a program walks, D, H, and the kind of dot."""
    return {"rows": rows, "D": D, "H": H, "elem": h.element_size(), "precision": dots["INPUT_PRECISION"]}


def _head_strides(x, h, weight, bias) -> tuple:
    """The 8 strides of x, h, weight and bias, in the order the kernels take them."""
    return (*x.stride(), *h.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0)


def fused_linear_forward(x, h, weight, bias, z, mu, logvar, *, bound: bool = True,
                         save_log_w: bool = False, splits: int | None = None,
                         workspace: SplitWorkspace | None = None, reduction: Reduction = IWAE):
    """Return (bound [B] or None, lse [B * M] or None, log_w [B, k] or None), float32 (inputs
    already checked). ``bound`` computes the bound (the IWAE bound, or the member of the
    family ``reduction`` names: lse then holds each group's logsumexp of scale log w),
    ``save_log_w`` writes log w.

    ``splits`` overrides the split plan over each group's samples and ``workspace`` supplies
    the split's partials and tickets (tests walk the multi-split path with them).
    """
    B, k, H = h.shape
    D = weight.shape[0]
    d = z.shape[2]
    device = h.device
    reduction = reduction if bound else IWAE  # log_w alone: one group, never reduced
    epilogue = reduction_args(reduction, k)
    rows, K = B * reduction.groups, epilogue[1]
    plan = split_plan(rows, K, device, SPLIT_QUANTUM, splits)
    out = torch.empty(rows, device=device, dtype=torch.float32) if bound else None
    lse = torch.empty(rows, device=device, dtype=torch.float32) if bound else None
    log_w = torch.empty((B, k), device=device, dtype=torch.float32) if save_log_w else None
    split_k = bound and plan.is_split
    if split_k:  # the [rows, splits] partials and one ticket per group
        workspace = workspace or SplitWorkspace.allocate(rows, plan, device, linear=reduction.linear)
        workspace.check(rows, plan, reduction.linear)
    any_out = next(t for t in (out, log_w) if t is not None)  # stands in for unused pointers
    partial, linear, ticket = ((workspace.partial, workspace.linear_partial, workspace.ticket) if split_k
                               else (any_out, any_out, any_out))
    dots = _dot_options(h, weight)
    _fused_linear_forward.launch(
        lambda meta: (B, plan.splits, reduction.groups),
        x, h, weight, bias if bias is not None else weight, z, mu, logvar,
        out if bound else any_out, lse if bound else any_out, log_w if save_log_w else any_out,
        partial, linear, ticket, *_head_strides(x, h, weight, bias),
        *z.stride(), *mu.stride(), *logvar.stride(),
        B, k, D, H, d, *epilogue[:2], plan.per_split, plan.splits, *epilogue[2:],
        HAS_BIAS=bias is not None, SAVE_LOG_W=save_log_w, BOUND=bound, LINEAR=reduction.linear,
        GROUPED=reduction.groups > 1, SPLIT_K=split_k, BLOCK_L=latent_block(d), PROD_GROUP=PROD_GROUP,
        FAST=not interpreted(),
        BLOCK_S=next_pow2(plan.splits), BLOCK_H=hidden_block(H), **dots,
        sizes=_sizes(min(K, plan.per_split), D, H, h, dots),
    )
    return (example_bound(out, reduction) if bound else None), lse, log_w


def dw_row_plan(rows: int, D: int, device: torch.device, splits: int | None = None) -> SplitPlan:
    """How the dW kernel splits the B k samples: enough (D tile, row range) programs to fill
    the device, ranges a multiple of ROW_QUANTUM; planned for DW_TILE_FOR_PLAN-wide D tiles so
    the partials' shape (and the bits) never depend on the tile the autotuner picks."""
    return split_plan(cdiv(D, DW_TILE_FOR_PLAN), rows, device, ROW_QUANTUM, splits)


def fused_linear_backward(x, h, weight, bias, z, mu, logvar, coef, *, needs=(True,) * 7,
                          plan: SplitPlan | None = None, row_plan: SplitPlan | None = None) -> tuple:
    """Gradients of (x, h, weight, bias, z, mu, logvar), each in its input's dtype, None where
    ``needs`` (autograd's needs_input_grad) is False, for ``coef`` = d loss / d log w [B, k]
    (for the bound: ``kernels.logw.bound_coefficients`` of what the forward saved).

    ``plan`` overrides the split over k of the dh kernel and of the latent backward, ``row_plan``
    the split over the B k samples of the dW kernel (tests walk the split paths with them).
    """
    need_x, need_h, need_w, need_b, need_z, need_mu, need_logvar = needs
    need_b = need_b and bias is not None
    B, k, H = h.shape
    D = weight.shape[0]
    device = h.device
    coef = coef.to(torch.float32).contiguous()
    plan = plan or split_plan(B, k, device, SPLIT_QUANTUM)
    fast = not interpreted()
    dots = _dot_options(h, weight)
    common = dict(HAS_BIAS=bias is not None, BLOCK_H=hidden_block(H), **dots,
                  FAST=fast, TANH_SIGMOID=fast and h.element_size() == 2)  # g is 16-bit anyway
    bias_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    grad_x = grad_h = grad_w = grad_bias = grad_z = grad_mu = grad_logvar = None

    if need_h or need_x:
        grad_h = torch.empty((B, k, H), device=device, dtype=h.dtype)
        part_x = (torch.empty((B, plan.splits, D), device=device, dtype=torch.float32)
                  if need_x else coef)
        _fused_linear_backward_dh.launch(
            lambda meta: (B, plan.splits),
            x, h, weight, bias_arg, coef, grad_h, part_x, *_head_strides(x, h, weight, bias),
            B, k, D, H, plan.per_split, plan.splits, NEED_DX=need_x, **common,
            sizes=_sizes(min(k, plan.per_split), D, H, h, dots),
        )
        grad_x = part_x.sum(1).to(x.dtype) if need_x else None
        grad_h = grad_h if need_h else None

    if need_w or need_b:
        R = B * k
        if R >= 2**31:
            raise ValueError(f"h has B k = {R} samples; the dW kernel indexes them in int32")
        row_plan = row_plan or dw_row_plan(R, D, device)
        part_w = torch.empty((row_plan.splits, D, H), device=device, dtype=torch.float32)
        part_b = torch.empty((row_plan.splits, D), device=device, dtype=torch.float32)
        _fused_linear_backward_dw.launch(
            lambda meta: (cdiv(D, meta["BLOCK_D"]), row_plan.splits),
            x, h, weight, bias_arg, coef, part_w, part_b, *_head_strides(x, h, weight, bias),
            R, k, D, H, row_plan.per_split, row_plan.splits, **common,
            sizes=_sizes(min(R, row_plan.per_split), D, H, h, dots),
        )
        # a fixed-shape sum over the splits: the same bits run after run
        grad_w = part_w.sum(0).to(weight.dtype) if need_w else None
        grad_bias = part_b.sum(0).to(bias.dtype) if need_b else None

    if need_z or need_mu or need_logvar:
        # kernels/logw.py's backward with D = 0: empty views stand in for x and the logits
        _, _, grad_z, grad_mu, grad_logvar, _ = log_weights_backward(
            x[:, :0], h[:, :, :0], z, mu, logvar, coef, plan=plan)
    return (grad_x, grad_h, grad_w, grad_bias, grad_z if need_z else None,
            grad_mu if need_mu else None, grad_logvar if need_logvar else None)


class FusedLinearBoundFunction(torch.autograd.Function):
    """Forward in one kernel. For a backward it keeps log_w [B, k] and lse [B] (O(B k)) beside
    the inputs; the backward rebuilds the logits tiles from h and W instead of storing them."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, z, mu, logvar, reduction: Reduction, return_weights: bool = False):
        inputs = (x, h, weight, bias, z, mu, logvar)
        wants_grad = any(t is not None and t.requires_grad for t in inputs)
        bound, lse, log_w = fused_linear_forward(*inputs, save_log_w=wants_grad or return_weights,
                                                 reduction=reduction)
        ctx.reduction = reduction
        if wants_grad:
            ctx.save_for_backward(*inputs, log_w, lse)
        if not return_weights:
            return bound
        ctx.mark_non_differentiable(log_w, lse)
        return bound, log_w, lse

    @staticmethod
    def backward(ctx, grad_bound, *_):
        *inputs, log_w, lse = ctx.saved_tensors
        coef = bound_coefficients(grad_bound, log_w, lse, ctx.reduction)
        return (*fused_linear_backward(*inputs, coef, needs=ctx.needs_input_grad[:7]), None, None)


class FusedLinearLogWeightsFunction(torch.autograd.Function):
    """log w [B, k] from h and W; the backward takes d loss / d log w and keeps only the inputs."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, z, mu, logvar):
        ctx.save_for_backward(x, h, weight, bias, z, mu, logvar)
        return fused_linear_forward(x, h, weight, bias, z, mu, logvar, bound=False,
                                    save_log_w=True)[2]

    @staticmethod
    def backward(ctx, grad_log_w):
        return fused_linear_backward(*ctx.saved_tensors, grad_log_w, needs=ctx.needs_input_grad)


def fused_linear_iwae_bound(x, h, weight, bias, z, mu, logvar, reduction: Reduction = IWAE, *, likelihood=BERNOULLI, scale=None) -> torch.Tensor:
    """IWAE bound L_k per example, [B] float32, from the decoder's last hidden layer: the
    logits h W^T + bias are built on chip and never stored (forward or backward).

    x [B, D] (binary or in [0, 1]); h [B, k, H], weight [D, H] and bias [D] (or None) of the
    output nn.Linear, h and weight of one dtype (float32, bfloat16 or float16); z [B, k, d],
    mu and logvar [B, d]. Differentiable in every tensor (backward in Triton, O(B k) saved).
    ``reduction`` (``kernels.Reduction``) computes any member of the family instead.
    """
    _bernoulli_only(likelihood, scale)
    B, k = check_head_inputs(x, h, weight, bias, z, mu, logvar, for_kernel=True)[:2]
    reduction.group_length(k)
    if B == 0:
        return torch.empty(0, device=h.device, dtype=torch.float32)
    return FusedLinearBoundFunction.apply(x, h, weight, bias, z, mu, logvar, reduction)


def fused_linear_iwae_bound_with_weights(x, h, weight, bias, z, mu, logvar, reduction: Reduction = IWAE, *, likelihood=BERNOULLI, scale=None):
    """(bound [B], log_w [B, k], lse [B * M]) from one kernel; only the bound is differentiable."""
    _bernoulli_only(likelihood, scale)
    B, k = check_head_inputs(x, h, weight, bias, z, mu, logvar, for_kernel=True)[:2]
    reduction.group_length(k)
    if B == 0:
        empty = torch.empty(0, device=h.device, dtype=torch.float32)
        return empty, empty.view(0, k), empty
    return FusedLinearBoundFunction.apply(x, h, weight, bias, z, mu, logvar, reduction, True)


def fused_linear_log_weights(x, h, weight, bias, z, mu, logvar, *, likelihood=BERNOULLI, scale=None) -> torch.Tensor:
    """log w [B, k] float32 with the output layer fused in (inputs as ``fused_linear_iwae_bound``).
    The multi-sample ELBO is its mean over k; autograd through it needs no [B, k, D] memory."""
    _bernoulli_only(likelihood, scale)
    B, k = check_head_inputs(x, h, weight, bias, z, mu, logvar, for_kernel=True)[:2]
    if B == 0:
        return torch.empty((0, k), device=h.device, dtype=torch.float32)
    return FusedLinearLogWeightsFunction.apply(x, h, weight, bias, z, mu, logvar)
