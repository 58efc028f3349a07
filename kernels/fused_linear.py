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

The likelihood (kernels/likelihood.py) is a compile-time choice of every kernel here (the
constexprs LIKELIHOOD and SCALE; one kernel per path, the Bernoulli's code unchanged): W and
b_out hold the decoder's C output channels (W [C D, H], channel c of pixel j at row c D + j),
the mean channel (the logits above) from rows [tile] and, with a per-sample scale (C = 2), the
log-scale channel s_raw from rows [D + tile] by a second dot, floored, s = max(s_raw, floor).
A per-pixel scale comes floored from the host with exp(-s) as two float32 [D] rows; a fixed
one as numbers. The sums are ``likelihood_step`` per tile and ``likelihood_flush`` per group
of ``Likelihood.prod_group`` tiles, plus ``Likelihood.constant`` per sample; padded columns
load x = MASK_X and the mean MASK_MEAN (and s_raw 0), which add exactly 0. Backward, with
(g_m, g_s, g_x) = ``likelihood_grads`` per element, g_s zeroed where the floor clamped s:

    d/dh      = c g_m W[mean rows] (+ c g_s W[scale rows])       d/dW, d/db_out: per channel
    d/dscale  = sum_{b, i} c g_s   [D]   (a per-pixel scale; 0 where scale < floor)
    d/dx      = sum_i c g_x        [B, D]

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
- ``_fused_linear_backward_dw_kernel``, grid (C D tiles, ROW_SPLITS): program (t, r) holds W[tile]
  and walks the flattened samples r = b k + i of its range in BLOCK_M blocks (h[b, i] and
  x[b, tile] gathered by row, so small k packs several examples into a block); dW[tile] += g^T h
  and db[tile] += g accumulate in registers and are stored once to this program's slot of the
  [ROW_SPLITS, D, H] and [ROW_SPLITS, D] float32 partials, which the host adds up with one
  fixed-shape torch sum. ROW_SPLITS depends on the sizes and the device only (planned for
  64-wide D tiles, never for the tile the autotuner picks), so the same inputs give the same
  bits run after run for a given tile (the autotuner's pick is cached per key in a process;
  IWAE_BENCH_AUTOTUNE=0 pins the default). With a per-sample scale a program owns one
  channel's tile, [ROW_SPLITS, C D, H] partials, but needs both channels' outputs for either
  gradient: it holds both W tiles and does three dots per block of samples where one program
  per D tile owning both channels would do four for the two (1.5x the dots; that program
  would keep two [BLOCK_D, H] accumulators). A per-pixel scale's d/dscale sums beside db into
  [ROW_SPLITS, D] partials.
- The latent gradients are kernels/logw.py's backward itself, launched with D = 0 (its
  Bernoulli loop runs zero times; empty views stand in for x and the logits): one small launch
  over the [B, k, d] samples and one implementation of that math.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .likelihood import (BERNOULLI, SCALE_CODE, Likelihood, as_likelihood, floored_scale, likelihood_flush,
                         likelihood_grads, likelihood_step)
from ._common import (IWAE, Reduction, SplitPlan, SplitWorkspace, Tiling, Tunable, cdiv, check_channels,
                      check_devices, check_float_tensor, check_inputs, check_scale, interpreted, next_pow2, shape_str,
                      split_plan)
from .fused_bound import example_bound, reduction_args
from .latent import as_layers, check_layers, is_single, latent_log_ratio
from .logw import (SPLIT_QUANTUM, _bernoulli_exact, _latent_log_ratio, bound_coefficients, latent_block,
                   likelihood_only, log_weights_backward)
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


def check_head_inputs(x, h, weight, bias, z, mu, logvar, *, likelihood: Likelihood = BERNOULLI, scale=None,
                      for_kernel: bool = False):
    """Validate the inputs of the fused output layer + bound; return (B, k, D, H, d).

    x [B, D], h [B, k, H], weight [C D, H], bias [C D] or None (C = ``likelihood.channels``,
    channel c of pixel j at row c D + j), z [B, k, d], mu and logvar [B, d], ``scale`` [D] when
    the likelihood takes a per-pixel scale (else None); h and weight of one dtype among float32,
    bfloat16 and float16 (the matmul's), the others any floating dtype; one device. Errors name
    the argument and the shape it should have.
    """
    tensors = {"x": x, "h": h, "weight": check_channels("weight", weight, x, likelihood, axis=0),
               "bias": check_channels("bias", bias, x, likelihood, axis=0), "z": z, "mu": mu, "logvar": logvar}
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
    check_scale(scale, sizes["D"], likelihood, tensors)
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
def _bias_block(bias_ptr, offs_d, stride_bias, mask_d, PAD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """b_out[offs_d] as float32 [BLOCK_D] (zeros without a bias), and PAD in the columns past D:
    there W's rows load as 0, so the channel's output is PAD. For the mean channel PAD is the
    likelihood's MASK_MEAN, which beside x = MASK_X adds exactly 0 and a factor of 1 to the
    sums and has no gradient (kernels/likelihood.py ``kernel_args``; the Bernoulli's -65504);
    for the scale channel 0. Padded columns need no select per element."""
    if HAS_BIAS:
        block = tl.load(bias_ptr + offs_d * stride_bias, mask=mask_d, other=PAD).to(tl.float32)
    else:
        block = tl.where(mask_d, 0.0, PAD)
    return block


@triton.jit
def _logits(h_block, w_tile, bias_block, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """l = h W^T + b_out on one tile: h_block [rows, BLOCK_H] times w_tile [BLOCK_D, BLOCK_H]
    transposed, plus the bias block -> [rows, BLOCK_D] float32. Columns past D hold the bias
    block's PAD (see ``_bias_block``); rows past the samples junk their users drop."""
    return _dot(h_block, tl.trans(w_tile), None, INPUT_PRECISION, DOT_IN_FP32) + bias_block[None, :]


@triton.jit
def _logits_tile(h_block, w_ptr, bias_ptr, rows_w, mask_d, offs_h, mask_h, stride_wd, stride_wh,
                 stride_bias, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 DOT_IN_FP32: tl.constexpr, ALIGN: tl.constexpr):
    """(W[rows_w] [BLOCK_D, BLOCK_H], the outputs of the rows of h_block at W's rows rows_w):
    rows_w = offs_d for the mean channel, D + offs_d for the scale channel."""
    w_tile = _weight_tile(w_ptr, rows_w, offs_h, stride_wd, stride_wh, mask_d[:, None] & mask_h[None, :], ALIGN)
    bias_block = _bias_block(bias_ptr, rows_w, stride_bias, mask_d, PAD, HAS_BIAS)
    return w_tile, _logits(h_block, w_tile, bias_block, INPUT_PRECISION, DOT_IN_FP32)


@triton.jit
def _x_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d, MASK_X: tl.constexpr):
    """x[b, offs_d] as float32 [BLOCK_D], MASK_X past D (beside MASK_MEAN: adds exactly 0)."""
    return tl.load(x_ptr + b64 * stride_xb + offs_d * stride_xd, mask=mask_d, other=MASK_X).to(tl.float32)


@triton.jit
def _given_scale(pixel_s_ptr, pixel_inv_ptr, offs_d, mask_d, lik_s, lik_inv, LIKELIHOOD: tl.constexpr,
                 SCALE: tl.constexpr):
    """(s, inv) of a scale the decoder does not output: SCALE 2 the host's floored per-pixel
    (s, exp(-s)) at columns offs_d as [1, BLOCK_D] rows (0 and 1 past D: adding 0 with x =
    MASK_X and mean = MASK_MEAN); SCALE 1 the numbers (the Gaussian's s is in
    ``Likelihood.constant``: 0 here, folded away); SCALE 0 unused."""
    if SCALE == 2:
        s = tl.load(pixel_s_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
        inv = tl.load(pixel_inv_ptr + offs_d, mask=mask_d, other=1.0)[None, :]
    elif LIKELIHOOD == 1:
        s = 0.0
        inv = lik_inv
    else:
        s = lik_s
        inv = lik_inv
    return s, inv


@triton.jit
def _outputs_tile(h_block, x_ptr, w_ptr, bias_ptr, pixel_s_ptr, pixel_inv_ptr, b64, offs_d, offs_h, mask_h,
                  D, stride_xb, stride_xd, stride_wd, stride_wh, stride_bias, lik_s, lik_inv, floor,
                  LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, MASK_X: tl.constexpr, MASK_MEAN: tl.constexpr,
                  HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                  ALIGN: tl.constexpr):
    """What one D tile of a block of samples of example b64 needs: (W[tile], the mean tile,
    x[b, tile], W_scale[tile], s, inv, keep), s and inv as ``likelihood_step`` and
    ``likelihood_grads`` take them. SCALE 3 (per sample): the scale channel's outputs from W's
    rows D + offs_d (a second dot; 0 past D), floored, and keep = where the floor let the
    gradient through; otherwise ``_given_scale``, and 0.0 and True stand in for W_scale and
    keep."""
    mask_d = offs_d < D
    w_tile, mean_block = _logits_tile(h_block, w_ptr, bias_ptr, offs_d, mask_d, offs_h, mask_h, stride_wd,
                                      stride_wh, stride_bias, MASK_MEAN, HAS_BIAS, INPUT_PRECISION,
                                      DOT_IN_FP32, ALIGN)
    x_block = _x_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d, MASK_X)
    w_scale = 0.0
    keep = True
    if SCALE == 3:
        w_scale, s_raw = _logits_tile(h_block, w_ptr, bias_ptr, D + offs_d, mask_d, offs_h, mask_h,
                                      stride_wd, stride_wh, stride_bias, 0.0, HAS_BIAS, INPUT_PRECISION,
                                      DOT_IN_FP32, ALIGN)
        s, inv = floored_scale(s_raw, floor)
        keep = s_raw >= floor
    else:
        s, inv = _given_scale(pixel_s_ptr, pixel_inv_ptr, offs_d, mask_d, lik_s, lik_inv, LIKELIHOOD, SCALE)
    return w_tile, mean_block, x_block, w_scale, s, inv, keep


@triton.jit
def _row_constant(log_px, lik_constant, floor, D, LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """log p(x|h) of a block of samples plus the likelihood's per-sample constant (the
    Gaussian's; the Bernoulli has none). A per-sample Gaussian log-variance has one more term:
    its padded lanes (x = mean = 0, scale channel 0) were floored to s = max(floor, 0) and
    added -s/2 each; added back here (0 unless the floor is above 0)."""
    if LIKELIHOOD != 0:
        log_px += lik_constant
    if LIKELIHOOD == 1:
        if SCALE == 3:
            padded = tl.cdiv(D, BLOCK_D) * BLOCK_D - D
            log_px += 0.5 * tl.maximum(floor, 0.0) * padded
    return log_px


@triton.jit
def _head_log_likelihood(
    b, offs_k, mask_k, x_ptr, h_ptr, w_ptr, bias_ptr, pixel_s_ptr, pixel_inv_ptr,
    stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
    D, H, lik_s, lik_inv, floor, half_bin, log_two_half_bin, lik_constant,
    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, MASK_X: tl.constexpr, MASK_MEAN: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    PROD_GROUP: tl.constexpr, FAST: tl.constexpr,
):
    """log p(x|h) summed over D for the samples offs_k -> [BLOCK_K] float32 (rows past the
    samples: junk): kernels/likelihood.py's ``likelihood_step`` on outputs tiles built by
    ``_logits`` (the mean channel, and the scale channel for SCALE 3) instead of loaded."""
    b64 = b.to(tl.int64)
    rows64 = offs_k.to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = _hidden_mask(offs_h, H, ALIGN)
    h_block = _hidden_tile(h_ptr, b64, rows64, offs_h, stride_hb, stride_hk, stride_hh,
                           mask_k[:, None] & mask_h[None, :], ALIGN)
    # acc holds, lane by lane, the terms without a log less (plus) the logs of finished groups
    # of factors; prod and prod2 the factors of the group of PROD_GROUP tiles in progress
    # (``likelihood_step``; the Bernoulli: x*l - max(l, 0) and 1 + exp(-|l|)). The tiles are
    # visited last one first: the ragged last tile's padded lanes (the Bernoulli's logit
    # -65504 beside x = 0) then pass 32752 - 32752 through an accumulator that is still 0,
    # exactly, instead of rounding a lane's sum at the scale of 32752 (kernels/logw.py does its
    # ragged tile first for the same reason).
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    n_tiles = tl.cdiv(D, BLOCK_D)
    for g0 in range(0, n_tiles, PROD_GROUP):
        prod = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
        prod2 = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
        for i in range(g0, tl.minimum(g0 + PROD_GROUP, n_tiles)):  # the hot loop
            tile = i - 1 + tl.where(i == 0, n_tiles, 0)  # n_tiles - 1, 0, 1, ..., n_tiles - 2
            offs_d = tile * BLOCK_D + tl.arange(0, BLOCK_D)
            w_tile, mean_block, x_block, w_scale, s, inv, keep = _outputs_tile(
                h_block, x_ptr, w_ptr, bias_ptr, pixel_s_ptr, pixel_inv_ptr, b64, offs_d, offs_h, mask_h, D,
                stride_xb, stride_xd, stride_wd, stride_wh, stride_bias, lik_s, lik_inv, floor, LIKELIHOOD,
                SCALE, MASK_X, MASK_MEAN, HAS_BIAS, INPUT_PRECISION, DOT_IN_FP32, ALIGN)
            acc, prod, prod2 = likelihood_step(acc, prod, prod2, x_block[None, :], mean_block, s, inv,
                                               half_bin, log_two_half_bin, LIKELIHOOD, SCALE, FAST)
        acc = likelihood_flush(acc, prod, prod2, LIKELIHOOD, FAST)
    log_px = tl.sum(acc, axis=1)

    if LIKELIHOOD == 0:
        # Infinite logits made 0 * inf = NaN above: rebuild those rows' tiles, sum them exactly.
        # (Only the samples' own rows count: a padded row may be NaN when the bias is infinite.)
        if tl.max(tl.where(mask_k & (log_px != log_px), 1, 0), axis=0) > 0:
            exact = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                w_tile, logit_block = _logits_tile(h_block, w_ptr, bias_ptr, offs_d, mask_d, offs_h, mask_h,
                                                   stride_wd, stride_wh, stride_bias, MASK_MEAN, HAS_BIAS,
                                                   INPUT_PRECISION, DOT_IN_FP32, ALIGN)
                exact += _bernoulli_exact(_x_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d, MASK_X),
                                          logit_block, mask_k[:, None] & mask_d[None, :])
            log_px = tl.where(log_px != log_px, tl.sum(exact, axis=1), log_px)
    return _row_constant(log_px, lik_constant, floor, D, LIKELIHOOD, SCALE, BLOCK_D)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _fused_linear_forward_kernel(
    x_ptr, h_ptr, w_ptr, bias_ptr, z_ptr, mu_ptr, logvar_ptr, pixel_s_ptr, pixel_inv_ptr, offset_ptr,
    bound_ptr, lse_ptr, log_w_ptr, partial_ptr, linear_ptr, ticket_ptr,
    stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    B, k, D, H, d, M, K, k_per_split, SPLITS, log_K, scale, beta, inv_K,
    lik_s, lik_inv, floor, half_bin, log_two_half_bin, lik_constant,
    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, MASK_X: tl.constexpr, MASK_MEAN: tl.constexpr,
    HAS_BIAS: tl.constexpr, SAVE_LOG_W: tl.constexpr, BOUND: tl.constexpr,
    LINEAR: tl.constexpr, GROUPED: tl.constexpr, SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr, PROD_GROUP: tl.constexpr, FAST: tl.constexpr, BLOCK_S: tl.constexpr,
    OFFSET: tl.constexpr = False,
):
    # grid (B, SPLITS, M): group g of example b (row b M + g, kernels/fused_bound.py's layout),
    # its split's samples [k_start, k_stop) in BLOCK_K blocks. Per block the log-weights are
    # built in registers from h and W (no decoder outputs in memory), written to the contiguous
    # [B, k] log_w when SAVE_LOG_W, and with BOUND folded into the group's running logsumexp of
    # scale log w (and sum, LINEAR); with SPLIT_K the splits' partials are combined by the
    # last one, and the group's value stored (kernels/lse.py ``_store_row_bound``). OFFSET adds
    # a [B, k] float32 term to each log w (stochastic layers, as in kernels/fused_bound.py).
    b, row, k_start, k_stop = _group_samples(M, K, k_per_split, GROUPED)
    run_max = tl.full([1], float("-inf"), tl.float32)
    run_sum = tl.zeros([1], tl.float32)
    run_lin = tl.zeros([1], tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        log_w = _head_log_likelihood(
            b, offs_k, mask_k, x_ptr, h_ptr, w_ptr, bias_ptr, pixel_s_ptr, pixel_inv_ptr,
            stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
            D, H, lik_s, lik_inv, floor, half_bin, log_two_half_bin, lik_constant,
            LIKELIHOOD, SCALE, MASK_X, MASK_MEAN, HAS_BIAS, INPUT_PRECISION, DOT_IN_FP32, ALIGN,
            BLOCK_K, BLOCK_D, BLOCK_H, PROD_GROUP, FAST,
        ) + _latent_log_ratio(
            b.to(tl.int64), tl.cast(k0, tl.int64), tl.arange(0, BLOCK_K), mask_k, z_ptr, mu_ptr, logvar_ptr,
            stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd, d,
            BLOCK_K, BLOCK_L,
        )
        if OFFSET:
            log_w += tl.load(offset_ptr + b.to(tl.int64) * k + offs_k, mask=mask_k, other=0.0)
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
    x_ptr, h_ptr, w_ptr, bias_ptr, pixel_s_ptr, pixel_inv_ptr, coef_ptr, grad_h_ptr, part_x_ptr,
    stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
    B, k, D, H, k_per_split, SPLITS, lik_s, lik_inv, floor, half_bin,
    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, MASK_X: tl.constexpr, MASK_MEAN: tl.constexpr,
    HAS_BIAS: tl.constexpr, NEED_DX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, ALIGN: tl.constexpr, FAST: tl.constexpr, TANH_SIGMOID: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # grid (B, SPLITS): example b, samples [k_start, k_stop). Per block of samples, h[b, block]
    # (all of H) stays on chip while the D tiles stream past: W[tile] (from L2) builds the mean
    # tile (and W[D + tile] the scale tile, SCALE 3), g = c d log p / d(mean, s) is formed in
    # registers, and dh += g_mean W[tile] (+ g_s W[D + tile]). d/dh (contiguous [B, k, H]) is
    # written once per block; with NEED_DX, sum_i c d log p / dx lands in this program's row
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
            w_tile, mean_block, x_block, w_scale, s, inv, keep = _outputs_tile(
                h_block, x_ptr, w_ptr, bias_ptr, pixel_s_ptr, pixel_inv_ptr, b64, offs_d, offs_h, mask_h, D,
                stride_xb, stride_xd, stride_wd, stride_wh, stride_bias, lik_s, lik_inv, floor, LIKELIHOOD,
                SCALE, MASK_X, MASK_MEAN, HAS_BIAS, INPUT_PRECISION, DOT_IN_FP32, ALIGN)
            g_mean, g_s, g_x = likelihood_grads(x_block[None, :], mean_block, s, inv, half_bin, LIKELIHOOD,
                                                FAST, TANH_SIGMOID)
            # padded rows have c = 0; padded columns a gradient of 0 (MASK_X beside MASK_MEAN)
            # against W rows loaded as 0
            grad_mean = coef[:, None] * g_mean
            grad_h = _dot(grad_mean.to(w_tile.dtype), w_tile, grad_h, INPUT_PRECISION, DOT_IN_FP32)
            if SCALE == 3:
                grad_s = tl.where(keep, coef[:, None] * g_s, 0.0)  # the floor stops the gradient
                grad_h = _dot(grad_s.to(w_scale.dtype), w_scale, grad_h, INPUT_PRECISION, DOT_IN_FP32)
            if NEED_DX:
                # a sample of weight 0 adds nothing, even where its logit is infinite
                x_sum = tl.sum(tl.where(coef[:, None] == 0.0, 0.0, coef[:, None] * g_x), axis=0)
                if k0 > k_start:
                    x_sum += tl.load(part_x_row + offs_d, mask=mask_d, other=0.0)
                tl.store(part_x_row + offs_d, x_sum, mask=mask_d)
        tl.store(grad_h_ptr + (b64 * k + rows64)[:, None] * H + offs_h[None, :],
                 grad_h.to(grad_h_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_h[None, :])


@triton.jit
def _fused_linear_backward_dw_kernel(
    x_ptr, h_ptr, w_ptr, bias_ptr, pixel_s_ptr, pixel_inv_ptr, coef_ptr, part_w_ptr, part_b_ptr, part_s_ptr,
    stride_xb, stride_xd, stride_hb, stride_hk, stride_hh, stride_wd, stride_wh, stride_bias,
    R, k, D, H, rows_per_split, ROW_SPLITS, lik_s, lik_inv, floor, half_bin,
    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, MASK_X: tl.constexpr, MASK_MEAN: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ALIGN: tl.constexpr, FAST: tl.constexpr, TANH_SIGMOID: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # grid (C cdiv(D, BLOCK_D), ROW_SPLITS): channel c's D tile t (program c n_tiles + t; C = 2
    # for a per-sample scale, else 1), flattened samples r = b k + i in [r_start, r_stop).
    # W[tile] (all of H; with C = 2 both channels' rows) stays on chip while the samples
    # stream past in BLOCK_M blocks (h[b, i] and x[b, tile] gathered per row); this channel's
    # dW[tile] += g^T h and db[tile] += g accumulate in registers (db as a 2-D block, summed
    # over its rows once), and with a per-pixel scale d/dscale[tile] += c d log p / ds as db;
    # each is stored once to this program's slot of the [ROW_SPLITS, C D, H], [ROW_SPLITS, C D]
    # and [ROW_SPLITS, D] partials.
    if SCALE == 3:  # two channels' programs
        channel = tl.program_id(0) // tl.cdiv(D, BLOCK_D)
        tile = tl.program_id(0) - channel * tl.cdiv(D, BLOCK_D)
    else:
        channel = 0
        tile = tl.program_id(0)
    offs_d = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(1)
    mask_d = offs_d < D
    offs_h = tl.arange(0, BLOCK_H)
    mask_h = _hidden_mask(offs_h, H, ALIGN)
    mask_w = mask_d[:, None] & mask_h[None, :]
    w_tile = _weight_tile(w_ptr, offs_d, offs_h, stride_wd, stride_wh, mask_w, ALIGN)
    bias_block = _bias_block(bias_ptr, offs_d, stride_bias, mask_d, MASK_MEAN, HAS_BIAS)
    if SCALE == 3:
        w_scale = _weight_tile(w_ptr, D + offs_d, offs_h, stride_wd, stride_wh, mask_w, ALIGN)
        bias_scale = _bias_block(bias_ptr, D + offs_d, stride_bias, mask_d, 0.0, HAS_BIAS)
    else:
        s, inv = _given_scale(pixel_s_ptr, pixel_inv_ptr, offs_d, mask_d, lik_s, lik_inv, LIKELIHOOD, SCALE)
    r_start = split * rows_per_split
    r_stop = tl.minimum(r_start + rows_per_split, R)
    grad_w = tl.zeros([BLOCK_D, BLOCK_H], tl.float32)
    grad_b = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # summed over its rows once, at the end
    grad_scale = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # SCALE 2 only (else unused)
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
        mean_block = _logits(h_block, w_tile, bias_block, INPUT_PRECISION, DOT_IN_FP32)
        x_block = tl.load(x_ptr + b_rows[:, None] * stride_xb + offs_d[None, :] * stride_xd,
                          mask=mask_r[:, None] & mask_d[None, :], other=MASK_X).to(tl.float32)
        if SCALE == 3:
            s_raw = _logits(h_block, w_scale, bias_scale, INPUT_PRECISION, DOT_IN_FP32)
            s, inv = floored_scale(s_raw, floor)
        g_mean, g_s, g_x = likelihood_grads(x_block, mean_block, s, inv, half_bin, LIKELIHOOD, FAST,
                                            TANH_SIGMOID)
        # padded rows have c = 0; padded columns a gradient of 0 (MASK_X beside MASK_MEAN)
        if SCALE == 3:  # this program's channel; the floor stops the scale's gradient
            grad_out = coef[:, None] * tl.where(channel == 0, g_mean, tl.where(s_raw >= floor, g_s, 0.0))
        else:
            grad_out = coef[:, None] * g_mean
        grad_w = _dot(tl.trans(grad_out.to(h_block.dtype)), h_block, grad_w,
                      INPUT_PRECISION, DOT_IN_FP32)
        grad_b += grad_out
        if SCALE == 2:
            grad_scale += coef[:, None] * g_s
    slot = (split.to(tl.int64) * (2 if SCALE == 3 else 1) + channel) * D + offs_d
    tl.store(part_w_ptr + slot[:, None] * H + offs_h[None, :], grad_w, mask=mask_w)
    tl.store(part_b_ptr + slot, tl.sum(grad_b, axis=0), mask=mask_d)
    if SCALE == 2:
        tl.store(part_s_ptr + split.to(tl.int64) * D + offs_d, tl.sum(grad_scale, axis=0), mask=mask_d)


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
# With a per-sample scale (two W tiles, two outputs tiles and the likelihood's temporaries per
# D tile), where the one-channel lists spill at the validate shape: the 16-bit forward's
# 128 x 64 tile spills ~0.6 KB per thread in the logistic's hot loop (128 x 32: none, ~72
# instructions per element against ~69), and the exact dh kernel's 16 x 32 one spills too.
# (The 16-bit and tf32 dh kernels still spill 0.1-0.6 KB there; their 8-warp 32 x 32 tile
# does not, but computes each element twice: a GPU run decides.)
TWO_CHANNEL_SHAPES = {
    "forward": {**FORWARD_SHAPES, "16-bit": [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2)]},
    "dh": {**DH_SHAPES, "ieee": [(16, 16, 4, 1)]},
}
SHARED_BUDGET = 200 * 1024  # bytes of shared memory a tile may plan for (227 KB on sm_90)


def hidden_block(H: int) -> int:
    """The H block of every kernel: all of H, padded to a power of two (dots need >= 16)."""
    return max(16, next_pow2(H))


def w_tiles(scale_code: int) -> int:
    """W tiles per D tile: 2 with a per-sample scale (SCALE 3: the decoder's second channel)."""
    return 2 if scale_code == SCALE_CODE["sample"] else 1


def dot_kind(elem: int, input_precision: str) -> str:
    return "16-bit" if elem == 2 else input_precision


def _shared_bytes(shape, H: int, elem: int, rows_stream: bool, w_tiles: int = 1) -> int:
    """The h and W blocks a tile keeps in shared memory: the stationary block plus num_stages
    of the streaming one (W tiles past an h block; for the dW kernel, h blocks past W);
    ``w_tiles`` W tiles per D tile (2: a per-sample scale's second channel)."""
    rows, block_d, _, stages = shape
    block_d *= w_tiles
    stationary, streaming = (block_d, rows) if rows_stream else (rows, block_d)
    return (stationary + stages * streaming) * hidden_block(H) * elem


def _tiling(rows_name: str, shapes: dict, walked: str, total: str, key: list,
            rows_stream: bool = False, two_channel_shapes: dict | None = None) -> Tiling:
    """Autotuned over the shapes of the launch's kind of dot (``two_channel_shapes`` with two
    W tiles per D tile), pruned to those that fit (no wider than the rows a program walks,
    ``walked`` of ``total``, or D; shared memory within budget); without autotuning the first
    of them that fits; large tiles in the interpreter (it pays per operation, not per
    element)."""
    two_channel_shapes = two_channel_shapes or shapes
    every = list(dict.fromkeys(shape for table in (shapes, two_channel_shapes)
                               for kind in table.values() for shape in kind))
    configs = [triton.Config({rows_name: r, "BLOCK_D": bd}, num_warps=w, num_stages=s)
               for r, bd, w, s in every]

    def fitting(rows, D, H, elem, precision, w_tiles=1):
        listed = (shapes if w_tiles == 1 else two_channel_shapes)[dot_kind(elem, precision)]
        mine = [shape for shape in every if shape in listed]
        mine.sort(key=listed.index)
        in_smem = [shape for shape in mine
                   if _shared_bytes(shape, H, elem, rows_stream, w_tiles) <= SHARED_BUDGET]
        kept = [shape for shape in in_smem
                if shape[0] <= max(16, next_pow2(rows)) and shape[1] <= max(16, next_pow2(D))]
        # few rows or a narrow D: the smallest tile (dots need 16 rows, wgmma 64)
        kept = kept or sorted(in_smem or mine, key=lambda shape: shape[0] * shape[1])[:1]
        return [configs[every.index(shape)] for shape in kept]

    def prune(configs_, named_args, **kwargs):
        named = {**named_args, **kwargs}
        return fitting(min(named[walked], named[total]), named["D"], named["H"],
                       named["h_ptr"].element_size(), named["INPUT_PRECISION"], w_tiles(named["SCALE"]))

    def default(rows, D, H, elem, precision, w_tiles=1):
        best = fitting(rows, D, H, elem, precision, w_tiles)[0]
        return {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}

    def interpreter(rows, D, H, elem, precision, w_tiles=1):
        return {rows_name: min(max(16, next_pow2(rows)), 64), "BLOCK_D": min(max(16, next_pow2(D)), 256)}

    return Tiling(configs, key=key, default=default, interpreter=interpreter, prune=prune,
                  data_arg="h_ptr", tile=lambda meta: meta[rows_name] * meta["BLOCK_D"])


_fused_linear_forward = Tunable(_fused_linear_forward_kernel, _tiling(
    "BLOCK_K", FORWARD_SHAPES, "k_per_split", "k",
    key=["B", "k", "D", "H", "d", "SPLITS", "SAVE_LOG_W", "BOUND", "INPUT_PRECISION", "LIKELIHOOD", "SCALE"],
    two_channel_shapes=TWO_CHANNEL_SHAPES["forward"]))
_fused_linear_backward_dh = Tunable(_fused_linear_backward_dh_kernel, _tiling(
    "BLOCK_K", DH_SHAPES, "k_per_split", "k",
    key=["B", "k", "D", "H", "SPLITS", "NEED_DX", "INPUT_PRECISION", "LIKELIHOOD", "SCALE"],
    two_channel_shapes=TWO_CHANNEL_SHAPES["dh"]))
_fused_linear_backward_dw = Tunable(_fused_linear_backward_dw_kernel, _tiling(
    "BLOCK_M", DW_SHAPES, "rows_per_split", "R",
    key=["R", "k", "D", "H", "ROW_SPLITS", "INPUT_PRECISION", "LIKELIHOOD", "SCALE"], rows_stream=True))


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


def _sizes(rows: int, D: int, H: int, h: torch.Tensor, dots: dict, likelihood: Likelihood) -> dict:
    """What a launch's tile depends on: the rows a program walks, D, H, the kind of dot, and
    the W tiles per D tile."""
    return {"rows": rows, "D": D, "H": H, "elem": h.element_size(), "precision": dots["INPUT_PRECISION"],
            "w_tiles": w_tiles(SCALE_CODE[likelihood.scale])}


def _head_strides(x, h, weight, bias) -> tuple:
    """The 8 strides of x, h, weight and bias, in the order the kernels take them."""
    return (*x.stride(), *h.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0)


def _likelihood_args(likelihood: Likelihood, scale, stand_in: torch.Tensor) -> tuple:
    """What every kernel here takes of the likelihood: the per-pixel rows (s, exp(-s)) as
    float32 [D], s = max(scale, floor) (``stand_in`` twice, never read, without a per-pixel
    scale); the numbers (s_fixed, inv_fixed, floor, half_bin, log 2 half_bin); the constexprs."""
    if likelihood.needs_scale:
        s = torch.clamp(scale.detach().float(), min=likelihood.floor).contiguous()
        pixel = (s, torch.exp(-s))
    else:
        pixel = (stand_in, stand_in)
    return pixel, likelihood.kernel_numbers(), likelihood.kernel_args()


def fused_linear_forward(x, h, weight, bias, z, mu, logvar, *, likelihood: Likelihood = BERNOULLI,
                         scale=None, bound: bool = True, save_log_w: bool = False, splits: int | None = None,
                         workspace: SplitWorkspace | None = None, reduction: Reduction = IWAE, offset=None):
    """Return (bound [B] or None, lse [B * M] or None, log_w [B, k] or None), float32 (inputs
    already checked; weight and bias hold the likelihood's C channels, ``scale`` its per-pixel
    log-scale or None; ``offset`` [B, k] float32 added to every log w). ``bound`` computes the bound (the IWAE bound, or the member of the
    family ``reduction`` names: lse then holds each group's logsumexp of scale log w),
    ``save_log_w`` writes log w.

    ``splits`` overrides the split plan over each group's samples and ``workspace`` supplies
    the split's partials and tickets (tests walk the multi-split path with them).
    """
    likelihood = as_likelihood(likelihood)
    B, k, H = h.shape
    D = x.shape[1]
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
    pixel, numbers, constexprs = _likelihood_args(likelihood, scale, any_out)
    dots = _dot_options(h, weight)
    _fused_linear_forward.launch(
        lambda meta: (B, plan.splits, reduction.groups),
        x, h, weight, bias if bias is not None else weight, z, mu, logvar, *pixel,
        any_out if offset is None else offset.contiguous(), out if bound else any_out, lse if bound else any_out, log_w if save_log_w else any_out,
        partial, linear, ticket, *_head_strides(x, h, weight, bias),
        *z.stride(), *mu.stride(), *logvar.stride(),
        B, k, D, H, d, *epilogue[:2], plan.per_split, plan.splits, *epilogue[2:],
        *numbers, likelihood.constant(D), **constexprs,
        HAS_BIAS=bias is not None, SAVE_LOG_W=save_log_w, BOUND=bound, LINEAR=reduction.linear,
        GROUPED=reduction.groups > 1, SPLIT_K=split_k, BLOCK_L=latent_block(d),
        PROD_GROUP=likelihood.prod_group, FAST=not interpreted(),
        BLOCK_S=next_pow2(plan.splits), BLOCK_H=hidden_block(H), OFFSET=offset is not None, **dots,
        sizes=_sizes(min(K, plan.per_split), D, H, h, dots, likelihood),
    )
    return (example_bound(out, reduction) if bound else None), lse, log_w


def dw_row_plan(rows: int, D: int, device: torch.device, splits: int | None = None) -> SplitPlan:
    """How the dW kernel splits the B k samples: enough (D tile, row range) programs to fill
    the device, ranges a multiple of ROW_QUANTUM; planned for DW_TILE_FOR_PLAN-wide D tiles so
    the partials' shape (and the bits) never depend on the tile the autotuner picks. ``D``:
    W's rows (C D with C channels)."""
    return split_plan(cdiv(D, DW_TILE_FOR_PLAN), rows, device, ROW_QUANTUM, splits)


def fused_linear_backward(x, h, weight, bias, z, mu, logvar, coef, *, likelihood: Likelihood = BERNOULLI,
                          scale=None, needs=(True,) * 8, plan: SplitPlan | None = None,
                          row_plan: SplitPlan | None = None) -> tuple:
    """Gradients of (x, h, weight, bias, z, mu, logvar, scale), each in its input's dtype, None
    where ``needs`` (autograd's needs_input_grad; a 7-tuple: scale's False) is False or the
    input is None, for ``coef`` = d loss / d log w [B, k] (for the bound:
    ``kernels.logw.bound_coefficients`` of what the forward saved).

    ``plan`` overrides the split over k of the dh kernel and of the latent backward, ``row_plan``
    the split over the B k samples of the dW kernel (tests walk the split paths with them).
    """
    need_x, need_h, need_w, need_b, need_z, need_mu, need_logvar, need_scale = (*needs, False)[:8]
    need_b = need_b and bias is not None
    need_scale = need_scale and scale is not None
    likelihood = as_likelihood(likelihood)
    B, k, H = h.shape
    D = x.shape[1]
    C = likelihood.channels
    device = h.device
    coef = coef.to(torch.float32).contiguous()
    plan = plan or split_plan(B, k, device, SPLIT_QUANTUM)
    fast = not interpreted()
    dots = _dot_options(h, weight)
    pixel, numbers, constexprs = _likelihood_args(likelihood, scale, coef)
    common = dict(HAS_BIAS=bias is not None, BLOCK_H=hidden_block(H), **dots, **constexprs,
                  FAST=fast, TANH_SIGMOID=fast and h.element_size() == 2)  # g is 16-bit anyway
    bias_arg = bias if bias is not None else weight  # never read without HAS_BIAS
    grad_x = grad_h = grad_w = grad_bias = grad_z = grad_mu = grad_logvar = grad_scale = None

    if need_h or need_x:
        grad_h = torch.empty((B, k, H), device=device, dtype=h.dtype)
        part_x = (torch.empty((B, plan.splits, D), device=device, dtype=torch.float32)
                  if need_x else coef)
        _fused_linear_backward_dh.launch(
            lambda meta: (B, plan.splits),
            x, h, weight, bias_arg, *pixel, coef, grad_h, part_x, *_head_strides(x, h, weight, bias),
            B, k, D, H, plan.per_split, plan.splits, *numbers[:4], NEED_DX=need_x, **common,
            sizes=_sizes(min(k, plan.per_split), D, H, h, dots, likelihood),
        )
        grad_x = part_x.sum(1).to(x.dtype) if need_x else None
        grad_h = grad_h if need_h else None

    if need_w or need_b or need_scale:
        R = B * k
        if R >= 2**31:
            raise ValueError(f"h has B k = {R} samples; the dW kernel indexes them in int32")
        row_plan = row_plan or dw_row_plan(R, C * D, device)
        part_w = torch.empty((row_plan.splits, C * D, H), device=device, dtype=torch.float32)
        part_b = torch.empty((row_plan.splits, C * D), device=device, dtype=torch.float32)
        part_s = (torch.empty((row_plan.splits, D), device=device, dtype=torch.float32)
                  if need_scale else part_b)
        _fused_linear_backward_dw.launch(
            lambda meta: (C * cdiv(D, meta["BLOCK_D"]), row_plan.splits),
            x, h, weight, bias_arg, *pixel, coef, part_w, part_b, part_s, *_head_strides(x, h, weight, bias),
            R, k, D, H, row_plan.per_split, row_plan.splits, *numbers[:4], **common,
            sizes=_sizes(min(R, row_plan.per_split), D, H, h, dots, likelihood),
        )
        # fixed-shape sums over the splits: the same bits run after run
        grad_w = part_w.sum(0).to(weight.dtype) if need_w else None
        grad_bias = part_b.sum(0).to(bias.dtype) if need_b else None
        if need_scale:  # the floor passes the gradient where scale >= floor
            grad_scale = torch.where(scale >= likelihood.floor, part_s.sum(0), 0.0).to(scale.dtype)

    if need_z or need_mu or need_logvar:
        # kernels/logw.py's backward with D = 0: empty views stand in for x and the logits
        _, _, grad_z, grad_mu, grad_logvar, _ = log_weights_backward(
            x[:, :0], h[:, :, :0], z, mu, logvar, coef, plan=plan)
    return (grad_x, grad_h, grad_w, grad_bias, grad_z if need_z else None,
            grad_mu if need_mu else None, grad_logvar if need_logvar else None, grad_scale)


class FusedLinearBoundFunction(torch.autograd.Function):
    """Forward in one kernel. For a backward it keeps log_w [B, k] and lse [B] (O(B k)) beside
    the inputs; the backward rebuilds the decoder's outputs tiles from h and W instead of
    storing them. ``offset`` (the stochastic layers' [B, k] terms) gets d bound / d log w."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, z, mu, logvar, scale, reduction: Reduction, likelihood: Likelihood,
                return_weights: bool = False, offset=None):
        inputs = (x, h, weight, bias, z, mu, logvar)
        wants_grad = any(t is not None and t.requires_grad for t in (*inputs, scale, offset))
        bound, lse, log_w = fused_linear_forward(*inputs, likelihood=likelihood, scale=scale,
                                                 save_log_w=wants_grad or return_weights, reduction=reduction,
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
        return (*fused_linear_backward(*inputs, coef, likelihood=ctx.likelihood, scale=scale,
                                       needs=ctx.needs_input_grad[:8]), None, None, None,
                coef if ctx.offset else None)


class FusedLinearLogWeightsFunction(torch.autograd.Function):
    """log w [B, k] from h and W; the backward takes d loss / d log w and keeps only the inputs."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, z, mu, logvar, scale, likelihood: Likelihood):
        ctx.save_for_backward(x, h, weight, bias, z, mu, logvar, scale)
        ctx.likelihood = likelihood
        return fused_linear_forward(x, h, weight, bias, z, mu, logvar, likelihood=likelihood, scale=scale,
                                    bound=False, save_log_w=True)[2]

    @staticmethod
    def backward(ctx, grad_log_w):
        *inputs, scale = ctx.saved_tensors
        return (*fused_linear_backward(*inputs, grad_log_w, likelihood=ctx.likelihood, scale=scale,
                                       needs=ctx.needs_input_grad[:8]), None)


def _prepared(x, h, weight, bias, z, mu, logvar, likelihood, scale) -> tuple:
    """(likelihood as a Likelihood, B, k, the kernel's (z, mu, logvar), the stochastic layers or
    None) of checked inputs (a likelihood the kernels do not take, the logistic mixture, is
    refused by name). Stochastic layers (kernels/latent.py) are checked against h's B and k,
    and the kernel then reads stand-ins of width d = 0 (their terms come as an offset)."""
    likelihood = as_likelihood(likelihood)
    likelihood.kernel_args()
    layers = as_layers(z, mu, logvar)
    if is_single(layers):
        B, k = check_head_inputs(x, h, weight, bias, *layers[0][:3], likelihood=likelihood, scale=scale,
                                 for_kernel=True)[:2]
        return likelihood, B, k, layers[0][:3], None
    check_float_tensor("h", h, 3, "[B, k, H]")
    check_layers(layers, h.shape[0], h.shape[1], {"h": h}, for_kernel=True)
    first = layers[0].z  # stands in for z, mu and logvar in the head's own checks
    B, k = check_head_inputs(x, h, weight, bias, first, first[:, 0], first[:, 0], likelihood=likelihood,
                             scale=scale, for_kernel=True)[:2]
    return likelihood, B, k, likelihood_only(h), layers


def fused_linear_iwae_bound(x, h, weight, bias, z, mu=None, logvar=None, reduction: Reduction = IWAE, *,
                            likelihood=BERNOULLI, scale=None) -> torch.Tensor:
    """IWAE bound L_k per example, [B] float32, from the decoder's last hidden layer: the
    decoder's outputs h W^T + bias are built on chip and never stored (forward or backward).

    x [B, D] (in the likelihood's domain: binary or in [0, 1] for the Bernoulli); h [B, k, H],
    weight [C D, H] and bias [C D] (or None) of the output nn.Linear, C the likelihood's
    channels (kernels/likelihood.py: 2 with a per-sample scale), h and weight of one dtype
    (float32, bfloat16 or float16); z [B, k, d], mu and logvar [B, d], or z a sequence of
    ``kernels.Latent`` (mu, logvar None: their terms one launch each, added as an offset);
    ``likelihood`` a ``kernels.Likelihood`` or its spelling, ``scale`` [D] its per-pixel
    log-scale (``:pixel``) or None. Differentiable in every tensor (backward in Triton, O(B k)
    saved). ``reduction`` (``kernels.Reduction``) computes any member of the family instead.
    """
    likelihood, B, k, latent, layers = _prepared(x, h, weight, bias, z, mu, logvar, likelihood, scale)
    reduction.group_length(k)
    if B == 0:
        return torch.empty(0, device=h.device, dtype=torch.float32)
    return FusedLinearBoundFunction.apply(x, h, weight, bias, *latent, scale, reduction, likelihood, False,
                                          None if layers is None else latent_log_ratio(layers))


def fused_linear_iwae_bound_with_weights(x, h, weight, bias, z, mu=None, logvar=None, reduction: Reduction = IWAE,
                                         *, likelihood=BERNOULLI, scale=None):
    """(bound [B], log_w [B, k], lse [B * M]) from one kernel; only the bound is differentiable."""
    likelihood, B, k, latent, layers = _prepared(x, h, weight, bias, z, mu, logvar, likelihood, scale)
    reduction.group_length(k)
    if B == 0:
        empty = torch.empty(0, device=h.device, dtype=torch.float32)
        return empty, empty.view(0, k), empty
    return FusedLinearBoundFunction.apply(x, h, weight, bias, *latent, scale, reduction, likelihood, True,
                                          None if layers is None else latent_log_ratio(layers))


def fused_linear_log_weights(x, h, weight, bias, z, mu=None, logvar=None, *, likelihood=BERNOULLI,
                             scale=None) -> torch.Tensor:
    """log w [B, k] float32 with the output layer fused in (inputs as ``fused_linear_iwae_bound``).
    The multi-sample ELBO is its mean over k; autograd through it needs no [B, k, D] memory."""
    likelihood, B, k, latent, layers = _prepared(x, h, weight, bias, z, mu, logvar, likelihood, scale)
    if B == 0:
        return torch.empty((0, k), device=h.device, dtype=torch.float32)
    log_w = FusedLinearLogWeightsFunction.apply(x, h, weight, bias, *latent, scale, likelihood)
    return log_w if layers is None else log_w + latent_log_ratio(layers)
