"""Batched log-weights of a VAE, broadcast over k samples without repeats.

The decoder's likelihood is a compile-time choice (LIKELIHOOD, SCALE: kernels/likelihood.py
has each one's math, its stable form and its MUFU floor; ``likelihood_step`` is one tile of
it, with the same accumulators, group products and padded-lane rule as below). What follows
is written for the Bernoulli, the default. For example b and sample i (h = z[b, i], logits
l = logits[b, i]):

    log w[b, i] = log p(x|h) + log p(h) - log q(h|x)
                = sum_D [x * l - softplus(l)]
                + sum_d 0.5 * [(h - mu)^2 * exp(-logvar) + logvar - h^2]

(the 2 pi terms of the two Gaussians cancel). x * logsigmoid(l) + (1 - x) * logsigmoid(-l)
equals x * l - softplus(l) for any finite l and any x, binary or in [0, 1], with no clamping, and

    softplus(l) = max(l, 0) + log(1 + exp(-|l|)),
    x * l - max(l, 0) = (x - 0.5) * l - 0.5 * |l|

(the second form shares |l| with the exp and takes two FMAs where the first takes a max, an
FMA and an add; for x in {0, 1} it is exact, as the first).

The last term costs an exp and a log per element, and those, not the bytes, bound the kernel
once the logits are 16-bit. Each factor 1 + exp(-|l|) lies in (1, 2], so a lane multiplies up
to PROD_GROUP of them in float32 (at most 2**64) and takes one log per group: one exp per
element instead of exp + log. The D-loop is two nested loops for it: the inner one, the hot
loop, streams PROD_GROUP full tiles with no log and no mask in it (rows past the last sample
reread it, and the caller drops them); the outer one takes the group's log (one MUFU.LG2 per
lane when compiled). The ragged last D-tile is done first, masked: its lanes past D load the
logit -65504 (finite in every float dtype) and x = 0, adding exactly 0 and a factor of 1.

Infinite logits follow one rule (the float64 reference and the torch backend follow it too):
log sigmoid(+inf) = 0 and log sigmoid(-inf) = -inf, with 0 * inf = 0, so a pixel whose logit
is infinite adds 0 where x is on the logit's side (x = 1 for +inf, x = 0 for -inf) and -inf
otherwise (x in (0, 1) included); a NaN logit gives NaN. The fast formula above turns those
0 * inf cases into NaN, so a block whose sum came out NaN is summed again, exactly, in a
second loop that runs only then (``_bernoulli_exact``): the hot loop pays nothing for the rule.

Memory: a program owns one example b and BLOCK_K samples. It streams their logits in
[BLOCK_K, BLOCK_D] tiles, reading each element once, while x[b, D-block] is read once per
tile in the tile's own layout (every row the same columns, so a thread issues one load for
the rows it holds and the repeats hit L1) rather than as a vector that a shared-memory round
trip with two barriers per iteration would broadcast over the rows; x, mu and logvar are
never repeated over k in memory. The
sums live in a 2-D accumulator reduced once at the end, not once per tile.

Backward, for c[b, i] = d loss / d log w[b, i] (given, or for the bound g[b] times the
normalized importance weight exp(log w[b, i] - lse[b]), formed on the host from the log_w and
lse the fused forward saved, so the kernel's loops take no exp for it):

    d/d logits[b, i] = c * (x - sigmoid(l))
    d/d z[b, i]      = c * ((z - mu) * exp(-logvar) - z)
    d/d mu[b]        = - sum_i c * (z - mu) * exp(-logvar)
    d/d logvar[b]    =   sum_i c * 0.5 * (1 - (z - mu)^2 * exp(-logvar))
    d/d x[b]         =   sum_i c * l

A backward program owns one example and one split of its samples (the same split plan as the
fused forward: one split unless B is too small to fill the device). It walks D-blocks outer and
its samples inner, so x[b, D-block] is loaded once and dx sums in registers; the elementwise
gradients are written once, and the sums over k land in [B, splits, .] partials added up on the
host: deterministic (no float atomics), and their shape does not depend on the tile, so the
backward is autotuned like the forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .latent import as_layers, check_layered_inputs, is_single, latent_log_ratio
from .likelihood import BERNOULLI, Likelihood, as_likelihood
from ._common import (IWAE, Reduction, SplitPlan, Tiling, Tunable, cdiv, check_bound_inputs, interpreted,
                      next_pow2, split_plan)
from ._math import exp_neg_
from .likelihood import floored_scale, likelihood_flush, likelihood_grads, likelihood_step

PROD_GROUP = 64  # factors in (1, 2] multiplied before one log: product <= 2**64
SPLIT_QUANTUM = 256  # samples per split are a multiple of this, so any BLOCK_K <= 256 tiles it


@triton.jit
def _row_block(ptr, b64, stride_b, offs, stride_c, mask):
    """One example's values at columns ``offs`` (x, mu or logvar): [BLOCK] float32, 0 where masked."""
    return tl.load(ptr + b64 * stride_b + offs * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_offsets(rows, cols, stride_r, stride_c):
    """Offsets of a [rows, cols] tile from its first element, in int32: the same for every tile
    a loop visits, so the loop adds one scalar base (int64) per iteration instead of 64-bit
    arithmetic per element. The host keeps strides small enough (``int32_tiles``)."""
    return rows[:, None] * stride_r + cols[None, :] * stride_c


@triton.jit
def _bernoulli_exact(x_block, logit_block, mask):
    """x log sigmoid(l) + (1 - x) log sigmoid(-l) per element with 0 * inf = 0 (see the module
    docstring): = x min(l, 0) - (1 - x) max(l, 0) - log(1 + exp(-|l|)). 0 where masked."""
    x = x_block[None, :]
    on = tl.where(x == 0.0, 0.0, x * tl.minimum(logit_block, 0.0))
    off = tl.where(x == 1.0, 0.0, (1.0 - x) * tl.maximum(logit_block, 0.0))
    term = on - off - tl.log(1.0 + tl.exp(-tl.abs(logit_block)))
    term = tl.where(logit_block != logit_block, logit_block, term)  # NaN stays NaN
    return tl.where(mask, term, 0.0)


@triton.jit
def _scale_tile(logit_base, d0, D, stride_ld, logit_tile, px_base, px_tile, s_fixed, inv_fixed, floor,
                mask, SCALE: tl.constexpr):
    """(s, inv) for one tile, by the likelihood's scale (kernels/likelihood.py): none (0, 1);
    fixed (numbers); pixel (the host's floored [D] log-scale and exp(-s), read in the tile's
    layout like x); sample (the decoder's second channel, columns D + d, floored here).
    ``mask`` None in the hot loop; padded lanes read s = 0, inv = 1."""
    if SCALE == 0:
        s, inv = 0.0, 1.0
    elif SCALE == 1:
        s, inv = s_fixed, inv_fixed
    elif SCALE == 2:
        if mask is None:
            s = tl.load(px_base + d0 + px_tile)
            inv = tl.load(px_base + D + d0 + px_tile)
        else:
            s = tl.load(px_base + d0 + px_tile, mask=mask, other=0.0)
            inv = tl.load(px_base + D + d0 + px_tile, mask=mask, other=1.0)
    else:
        if mask is None:
            s_raw = tl.load(logit_base + (D + d0) * stride_ld + logit_tile).to(tl.float32)
        else:
            s_raw = tl.load(logit_base + (D + d0) * stride_ld + logit_tile, mask=mask, other=0.0).to(tl.float32)
        s, inv = floored_scale(s_raw, floor)
    return s, inv


@triton.jit
def _log_weight_block(
    b, k0, k_stop,
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr, px_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    D, d, s_fixed, inv_fixed, floor, half_bin, log_two_half_bin, row_constant,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PROD_GROUP: tl.constexpr, FAST: tl.constexpr, LOAD_STAGES: tl.constexpr,
    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, MASK_X: tl.constexpr, MASK_MEAN: tl.constexpr,
):
    """log w for example ``b`` and its samples k0 .. k0 + BLOCK_K (those at or past ``k_stop``
    masked) -> [BLOCK_K] float32 (masked rows: junk). LOAD_STAGES > 1 has the compiler load
    that many D-tiles ahead (cp.async into shared memory) instead of each in its iteration.
    LIKELIHOOD and SCALE pick p(x|h) (kernels/likelihood.py; the module docstring's sums are
    the Bernoulli's); ``px_ptr`` holds a per-pixel scale's [2, D] (s, exp(-s)) rows."""
    b64 = b.to(tl.int64)
    k64 = tl.cast(k0, tl.int64)
    rows = tl.arange(0, BLOCK_K)
    mask_k = k0 + rows < k_stop
    cols = tl.arange(0, BLOCK_D)
    # Rows past k_stop read the last sample again instead of being masked: the hot loop's
    # loads then need no mask (the caller drops those rows), and only the ragged last D-tile
    # masks its columns.
    logit_tile = _tile_offsets(tl.minimum(rows, k_stop - 1 - k0), cols, stride_lk, stride_ld)
    logit_base = logits_ptr + b64 * stride_lb + k64 * stride_lk  # this block's first sample
    x_base = x_ptr + b64 * stride_xb
    # x's D-tile read straight into the logits tile's layout (every row the same columns: the
    # repeats hit L1), not as a vector that a shared-memory round trip and two barriers per
    # iteration would broadcast across the rows; a per-pixel scale's rows the same way
    x_tile = _tile_offsets(rows * 0, cols, 0, stride_xd)
    px_tile = _tile_offsets(rows * 0, cols, 0, 1)

    # log p(x|h): acc holds, lane by lane, the terms without a log (Bernoulli: x*l - max(l, 0))
    # less the logs of finished groups of factors, prod (and prod2) the factors of the group in
    # progress (Bernoulli: 1 + exp(-|l|)). The ragged last tile goes first, masked (its padded
    # lanes then set back to adding 0 and factors of 1), its factors starting the first group.
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    prod = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
    prod2 = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
    n_full = D // BLOCK_D
    if n_full * BLOCK_D < D:
        d0 = n_full * BLOCK_D
        mask_d = d0 + cols < D
        mask = (rows >= 0)[:, None] & mask_d[None, :]
        x_block = tl.load(x_base + (d0 + cols) * stride_xd, mask=mask_d, other=MASK_X).to(tl.float32)
        logit_block = tl.load(logit_base + d0 * stride_ld + logit_tile, mask=mask_d[None, :],
                              other=MASK_MEAN).to(tl.float32)
        s, inv = _scale_tile(logit_base, d0, D, stride_ld, logit_tile, px_ptr, px_tile, s_fixed, inv_fixed,
                             floor, mask, SCALE)
        acc, prod, prod2 = likelihood_step(acc, prod, prod2, x_block[None, :], logit_block, s, inv, half_bin,
                                           log_two_half_bin, LIKELIHOOD, SCALE, FAST)
        if LIKELIHOOD != 0:  # the Bernoulli's padded lanes add exactly 0 and 1 by themselves
            acc = tl.where(mask, acc, 0.0)
            prod = tl.where(mask, prod, 1.0)
            prod2 = tl.where(mask, prod2, 1.0)
    for g0 in range(0, n_full, PROD_GROUP):
        for i in tl.range(g0, tl.minimum(g0 + PROD_GROUP, n_full), num_stages=LOAD_STAGES):  # the hot loop: no masks
            d0 = i * BLOCK_D
            x_block = tl.load(x_base + d0 * stride_xd + x_tile).to(tl.float32)
            logit_block = tl.load(logit_base + d0 * stride_ld + logit_tile).to(tl.float32)
            s, inv = _scale_tile(logit_base, d0, D, stride_ld, logit_tile, px_ptr, px_tile, s_fixed, inv_fixed,
                                 floor, None, SCALE)
            acc, prod, prod2 = likelihood_step(acc, prod, prod2, x_block, logit_block, s, inv, half_bin,
                                               log_two_half_bin, LIKELIHOOD, SCALE, FAST)
        acc = likelihood_flush(acc, prod, prod2, LIKELIHOOD, FAST)
        prod = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
        prod2 = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
    if n_full == 0:  # D < BLOCK_D: the ragged tile was all there was
        acc = likelihood_flush(acc, prod, prod2, LIKELIHOOD, FAST)
    log_px = tl.sum(acc, axis=1) + row_constant

    # Bernoulli: infinite logits made 0 * inf = NaN above: sum those rows again with the exact rule.
    if LIKELIHOOD == 0:
        if tl.max(tl.where(log_px != log_px, 1, 0), axis=0) > 0:
            exact = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                mask_d = d0 + cols < D
                mask = mask_k[:, None] & mask_d[None, :]
                x_block = tl.load(x_base + (d0 + cols) * stride_xd, mask=mask_d, other=0.0).to(tl.float32)
                logit_block = tl.load(logit_base + d0 * stride_ld + logit_tile, mask=mask, other=0.0).to(tl.float32)
                exact += _bernoulli_exact(x_block, logit_block, mask)
            log_px = tl.where(log_px != log_px, tl.sum(exact, axis=1), log_px)

    return log_px + _latent_log_ratio(b64, k64, rows, mask_k, z_ptr, mu_ptr, logvar_ptr,
                                      stride_zb, stride_zk, stride_zd, stride_mb, stride_md,
                                      stride_vb, stride_vd, d, BLOCK_K, BLOCK_L)


@triton.jit
def _latent_log_ratio(
    b64, k64, rows, mask_k, z_ptr, mu_ptr, logvar_ptr,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd, d,
    BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """log p(h) - log q(h|x) = sum_d 0.5 [(z - mu)^2 exp(-logvar) + logvar - z^2] for the
    samples k64 + rows of example b -> [BLOCK_K] float32. mu, logvar and exp(-logvar) once
    per latent block, broadcast over the samples; masked lanes load zeros and add exactly 0."""
    lcols = tl.arange(0, BLOCK_L)
    z_tile = _tile_offsets(rows, lcols, stride_zk, stride_zd)
    z_base = z_ptr + b64 * stride_zb + k64 * stride_zk
    latent = tl.zeros([BLOCK_K, BLOCK_L], tl.float32)
    for j0 in range(0, d, BLOCK_L):
        mask_l = j0 + lcols < d
        mu_block = _row_block(mu_ptr, b64, stride_mb, j0 + lcols, stride_md, mask_l)
        logvar_block = _row_block(logvar_ptr, b64, stride_vb, j0 + lcols, stride_vd, mask_l)
        z_block = tl.load(z_base + j0 * stride_zd + z_tile, mask=mask_k[:, None] & mask_l[None, :],
                          other=0.0).to(tl.float32)
        inv_var = exp_neg_(logvar_block)
        diff = z_block - mu_block[None, :]
        latent += 0.5 * (diff * diff * inv_var[None, :] + logvar_block[None, :] - z_block * z_block)
    return tl.sum(latent, axis=1)


@triton.jit
def _log_weights_forward_kernel(
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr, px_ptr, log_w_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    B, k, D, d, s_fixed, inv_fixed, floor, half_bin, log_two_half_bin, row_constant,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PROD_GROUP: tl.constexpr, FAST: tl.constexpr,
    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr, MASK_X: tl.constexpr, MASK_MEAN: tl.constexpr,
    LOAD_STAGES: tl.constexpr = 1,
):
    # grid (B, cdiv(k, BLOCK_K)); writes log_w[b, k0 .. k0 + BLOCK_K] of a contiguous [B, k]
    # float32. (B is an argument only so the autotuner's key can see it.)
    b = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    log_w = _log_weight_block(
        b, k0, k, x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr, px_ptr,
        stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
        stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
        D, d, s_fixed, inv_fixed, floor, half_bin, log_two_half_bin, row_constant,
        BLOCK_K, BLOCK_D, BLOCK_L, PROD_GROUP, FAST, LOAD_STAGES, LIKELIHOOD, SCALE, MASK_X, MASK_MEAN,
    )
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(log_w_ptr + b.to(tl.int64) * k + offs_k, log_w, mask=offs_k < k)


@triton.jit
def _log_weights_backward_kernel(
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr, px_ptr, coef_ptr,
    grad_logits_ptr, grad_z_ptr, part_mu_ptr, part_logvar_ptr, part_x_ptr, part_scale_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    B, k, D, d, k_per_split, SPLITS, s_fixed, inv_fixed, floor, half_bin,
    NEED_DX: tl.constexpr, FAST: tl.constexpr, TANH_SIGMOID: tl.constexpr,
    LIKELIHOOD: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # grid (B, SPLITS): example b, samples [k_start, k_stop). Logits and z are read once and
    # their gradients (contiguous [B, k, C D] and [B, k, d]) written once; x, mu and logvar are
    # loaded once per column block and broadcast over the samples; c = d loss / d log w is a
    # contiguous [B, k] float32 (0 for a sample of weight 0). Tiles are addressed as a scalar
    # base per iteration plus loop-invariant int32 offsets. A per-sample scale's gradient goes
    # to the second channel's columns (0 where the floor clamped it); a per-pixel scale's sums
    # over this split's samples to its row of the [B, SPLITS, D] partials, like dx's.
    b = tl.program_id(0)
    split = tl.program_id(1)
    b64 = b.to(tl.int64)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, k)
    part_row = b64 * SPLITS + split  # this program's row of the [B, SPLITS, .] partials
    rows = tl.arange(0, BLOCK_K)
    coef_base = coef_ptr + b64 * k
    if SCALE == 3:
        width = 2 * D  # the gradient's row: both channels
    else:
        width = D

    cols = tl.arange(0, BLOCK_D)
    logit_tile = _tile_offsets(rows, cols, stride_lk, stride_ld)
    grad_tile = _tile_offsets(rows, cols, width, 1)
    px_tile = _tile_offsets(rows * 0, cols, 0, 1)
    for d0 in range(0, D, BLOCK_D):
        mask_d = d0 + cols < D
        x_block = _row_block(x_ptr, b64, stride_xb, d0 + cols, stride_xd, mask_d)
        x_sum = tl.zeros([BLOCK_D], tl.float32)  # sum_i c_i d log p / d x over this split's samples
        scale_sum = tl.zeros([BLOCK_D], tl.float32)  # sum_i c_i d log p / d s (a per-pixel scale)
        for k0 in range(k_start, k_stop, BLOCK_K):
            k64 = tl.cast(k0, tl.int64)
            mask_k = k0 + rows < k_stop
            mask = mask_k[:, None] & mask_d[None, :]
            coef = tl.load(coef_base + k0 + rows, mask=mask_k, other=0.0)
            logit_base = logits_ptr + b64 * stride_lb + k64 * stride_lk
            logit_block = tl.load(logit_base + d0 * stride_ld + logit_tile, mask=mask, other=0.0).to(tl.float32)
            s, inv = _scale_tile(logit_base, d0, D, stride_ld, logit_tile, px_ptr, px_tile, s_fixed, inv_fixed,
                                 floor, mask, SCALE)
            g_m, g_s, g_x = likelihood_grads(x_block[None, :], logit_block, s, inv, half_bin, LIKELIHOOD,
                                             FAST, TANH_SIGMOID)
            grad_base = grad_logits_ptr + (b64 * k + k64) * width + d0
            tl.store(grad_base + grad_tile, (coef[:, None] * g_m).to(grad_logits_ptr.dtype.element_ty), mask=mask)
            if SCALE == 3:
                s_raw = tl.load(logit_base + (D + d0) * stride_ld + logit_tile, mask=mask, other=0.0).to(tl.float32)
                g_s = tl.where(s_raw < floor, 0.0, coef[:, None] * g_s)
                tl.store(grad_base + D + grad_tile, g_s.to(grad_logits_ptr.dtype.element_ty), mask=mask)
            if SCALE == 2:
                scale_sum += tl.sum(coef[:, None] * g_s, axis=0)  # padded lanes: c = 0 or a masked store
            if NEED_DX:
                # a sample of weight 0 adds nothing, even where its logit is infinite
                x_sum += tl.sum(tl.where(coef[:, None] == 0.0, 0.0, coef[:, None] * g_x), axis=0)
        if NEED_DX:
            tl.store(part_x_ptr + part_row * D + d0 + cols, x_sum, mask=mask_d)
        if SCALE == 2:
            tl.store(part_scale_ptr + part_row * D + d0 + cols, scale_sum, mask=mask_d)

    lcols = tl.arange(0, BLOCK_L)
    z_tile = _tile_offsets(rows, lcols, stride_zk, stride_zd)
    grad_z_tile = _tile_offsets(rows, lcols, d, 1)
    for j0 in range(0, d, BLOCK_L):
        mask_l = j0 + lcols < d
        mu_block = _row_block(mu_ptr, b64, stride_mb, j0 + lcols, stride_md, mask_l)
        logvar_block = _row_block(logvar_ptr, b64, stride_vb, j0 + lcols, stride_vd, mask_l)
        inv_var = exp_neg_(logvar_block)
        mu_sum = tl.zeros([BLOCK_L], tl.float32)
        logvar_sum = tl.zeros([BLOCK_L], tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            k64 = tl.cast(k0, tl.int64)
            mask_k = k0 + rows < k_stop
            mask = mask_k[:, None] & mask_l[None, :]
            coef = tl.load(coef_base + k0 + rows, mask=mask_k, other=0.0)
            z_block = tl.load(z_ptr + b64 * stride_zb + k64 * stride_zk + j0 * stride_zd + z_tile,
                              mask=mask, other=0.0).to(tl.float32)
            diff = z_block - mu_block[None, :]
            scaled = diff * inv_var[None, :]  # (z - mu) / var
            tl.store(grad_z_ptr + (b64 * k + k64) * d + j0 + grad_z_tile,
                     (coef[:, None] * (scaled - z_block)).to(grad_z_ptr.dtype.element_ty), mask=mask)
            mu_sum -= tl.sum(coef[:, None] * scaled, axis=0)
            logvar_sum += tl.sum(coef[:, None] * 0.5 * (1.0 - diff * scaled), axis=0)
        tl.store(part_mu_ptr + part_row * d + j0 + lcols, mu_sum, mask=mask_l)
        tl.store(part_logvar_ptr + part_row * d + j0 + lcols, logvar_sum, mask=mask_l)


# --------------------------------------------------------------------------- tiling


def _block_configs(pipelined: bool = False):
    """Tile shapes of the log-weight family (forward, fused forward, backward): a few
    [BLOCK_K, BLOCK_D] areas of 2-4K elements, rows traded against columns. ``pipelined`` (the
    forwards) adds two with LOAD_STAGES = 3: the hot loop's loads issued two tiles ahead
    through shared memory (cp.async), for about 1.6x the registers, ~30% more instructions
    per element and two barriers per iteration (the compiled-kernel profile shows both kinds);
    which wins is a measurement, so the autotuner decides. The last shape holds 8 elements per
    thread instead of 16: the discretized logistic's three accumulators and its temporaries
    spill at 16 in float32 (168 registers, 40 B) and fit at 8 (88 registers, compiled for sm_90)."""
    shapes = [(8, 256, 4), (16, 128, 4), (32, 64, 4), (16, 256, 8), (32, 128, 8), (64, 64, 8), (8, 256, 8)]
    configs = [triton.Config({"BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=3)
               for bk, bd, w in shapes]
    if pipelined:
        configs += [triton.Config({"BLOCK_K": bk, "BLOCK_D": bd, "LOAD_STAGES": 3}, num_warps=w,
                                  num_stages=3) for bk, bd, w in ((16, 128, 4), (32, 128, 8))]
    return configs


def _default_blocks(k: int, D: int) -> dict:
    # launched without autotuning (IWAE_BENCH_AUTOTUNE=0) on a GPU
    return {"BLOCK_K": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 3}


def _interpreter_blocks(k: int, D: int) -> dict:
    # Large tiles (up to 16K elements): the interpreter pays per operation, not per element.
    block_d = min(next_pow2(D), 256)
    return {"BLOCK_K": min(next_pow2(k), max(64, 16384 // block_d)), "BLOCK_D": block_d}


def _prune(configs, named_args, **kwargs):
    # Rows beyond the samples a program walks and columns beyond D only burn lanes.
    k = min(named_args["k"], named_args.get("k_per_split", named_args["k"]))
    D = named_args["D"]
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(8, next_pow2(k))
            and c.kwargs["BLOCK_D"] <= max(64, next_pow2(D))]
    return kept or configs[:1]


def block_tiling(*extra_key: str, pipelined: bool = False) -> Tiling:
    """The one tiling policy of the log-weight family; each kernel adds the flags that change
    its best tile to the autotune key (``pipelined``: a kernel with LOAD_STAGES)."""
    return Tiling(_block_configs(pipelined), key=["B", "k", "D", "d", *extra_key], default=_default_blocks,
                  interpreter=_interpreter_blocks, prune=_prune, data_arg="logits_ptr",
                  tile=lambda meta: meta["BLOCK_K"] * meta["BLOCK_D"])


def latent_block(d: int) -> int:
    return min(next_pow2(d), 64)


def input_strides(x, logits, z, mu, logvar) -> tuple:
    """The 17 strides of the five inputs, in the order the kernels take them."""
    return (*x.stride(), *logits.stride(), *z.stride(), *mu.stride(), *logvar.stride())


MAX_TILE = (64, 256)  # the largest (rows, columns) tile any config of the family uses


def int32_tiles(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, k, C], copied contiguous in the rare case where a tile's offsets from its first
    element (rows x sample stride + columns x column stride) would not fit in int32: the kernels
    address tiles as a 64-bit scalar base plus int32 offsets (a view permuted from [k, B, C]
    with B * C past 2**31 / 64, say)."""
    reach = (MAX_TILE[0] - 1) * abs(t.stride(1)) + (MAX_TILE[1] - 1) * abs(t.stride(2))
    return t if reach < 2**31 else t.contiguous()


_log_weights_forward = Tunable(_log_weights_forward_kernel, block_tiling(pipelined=True))
_log_weights_backward = Tunable(_log_weights_backward_kernel, block_tiling("SPLITS", "NEED_DX"))


def pixel_scale(scale, likelihood: Likelihood, D: int, device) -> torch.Tensor:
    """The [2, D] float32 rows a per-pixel scale's kernels read: s = max(scale, floor) and
    exp(-s) (computed here once instead of per sample); a 1-element stand-in otherwise."""
    if not likelihood.needs_scale:
        return torch.zeros(1, device=device, dtype=torch.float32)
    s = scale.detach().float().clamp(min=likelihood.floor)
    return torch.stack([s, torch.exp(-s)]).contiguous()


def likelihood_launch(likelihood: Likelihood, D: int) -> tuple[tuple, dict]:
    """(runtime numbers, constexprs) of a likelihood-aware launch: the forward's six numbers
    (``Likelihood.kernel_numbers`` and the per-sample constant) and its codes."""
    return (*likelihood.kernel_numbers(), likelihood.constant(D)), likelihood.kernel_args()


def log_weights_forward(x, logits, z, mu, logvar, likelihood: Likelihood = BERNOULLI, scale=None) -> torch.Tensor:
    """log w as a contiguous [B, k] float32 tensor (inputs already checked)."""
    B, k = logits.shape[:2]
    D = x.shape[1]
    d = z.shape[2]
    log_w = torch.empty((B, k), device=logits.device, dtype=torch.float32)
    numbers, codes = likelihood_launch(likelihood, D)
    _log_weights_forward.launch(
        lambda meta: (B, cdiv(k, meta["BLOCK_K"])),
        x, logits, z, mu, logvar, pixel_scale(scale, likelihood, D, logits.device), log_w,
        *input_strides(x, logits, z, mu, logvar), B, k, D, d, *numbers,
        BLOCK_L=latent_block(d), PROD_GROUP=likelihood.prod_group, FAST=not interpreted(), **codes,
        sizes={"k": k, "D": D},
    )
    return log_w


def bound_coefficients(grad_bound, log_w, lse, reduction: Reduction = IWAE) -> torch.Tensor:
    """d loss / d log w [B, k] of the bound: g[b] times the bound's weights (the normalized
    importance weights exp(log_w - lse) for the IWAE bound; ``Reduction.weights``), from what
    the fused forward saved; a group of infinite lse gets zeros."""
    return grad_bound.to(torch.float32)[:, None] * reduction.weights(log_w, lse)


def log_weights_backward(x, logits, z, mu, logvar, coef, need_dx=False, plan: SplitPlan | None = None,
                         likelihood: Likelihood = BERNOULLI, scale=None):
    """Gradients (dx or None, dlogits, dz, dmu, dlogvar, dscale or None), each in its input's
    dtype, for ``coef`` = d loss / d log w [B, k]. ``plan`` overrides the split over k (tests)."""
    B, k, width = logits.shape
    D = x.shape[1]
    d = z.shape[2]
    device = logits.device
    plan = plan or split_plan(B, k, device, SPLIT_QUANTUM)
    grad_logits = torch.empty((B, k, width), device=device, dtype=logits.dtype)
    grad_z = torch.empty((B, k, d), device=device, dtype=z.dtype)
    part_mu = torch.empty((B, plan.splits, d), device=device, dtype=torch.float32)
    part_logvar = torch.empty_like(part_mu)
    part_x = (torch.empty((B, plan.splits, D), device=device, dtype=torch.float32)
              if need_dx else part_mu)
    part_scale = (torch.empty((B, plan.splits, D), device=device, dtype=torch.float32)
                  if likelihood.needs_scale else part_mu)
    coef = coef.to(torch.float32).contiguous()
    fast = not interpreted()
    numbers, codes = likelihood_launch(likelihood, D)
    _log_weights_backward.launch(
        lambda meta: (B, plan.splits),
        x, logits, z, mu, logvar, pixel_scale(scale, likelihood, D, device), coef, grad_logits, grad_z,
        part_mu, part_logvar, part_x, part_scale,
        *input_strides(x, logits, z, mu, logvar), B, k, D, d, plan.per_split, plan.splits, *numbers[:4],
        NEED_DX=need_dx, FAST=fast, TANH_SIGMOID=fast and logits.element_size() == 2,
        LIKELIHOOD=codes["LIKELIHOOD"], SCALE=codes["SCALE"],
        BLOCK_L=latent_block(d), sizes={"k": min(k, plan.per_split), "D": D},
    )
    grad_x = part_x.sum(1).to(x.dtype) if need_dx else None
    grad_scale = None
    if likelihood.needs_scale:  # the floor's clamp passes no gradient
        grad_scale = torch.where(scale < likelihood.floor, 0.0, part_scale.sum((0, 1))).to(scale.dtype)
    return (grad_x, grad_logits, grad_z, part_mu.sum(1).to(mu.dtype),
            part_logvar.sum(1).to(logvar.dtype), grad_scale)


class LogWeightsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, logits, z, mu, logvar, likelihood, scale):
        ctx.save_for_backward(x, logits, z, mu, logvar, scale)
        ctx.likelihood = likelihood
        return log_weights_forward(x, logits, z, mu, logvar, likelihood, scale)

    @staticmethod
    def backward(ctx, grad_log_w):
        *inputs, scale = ctx.saved_tensors
        grads = log_weights_backward(*inputs, grad_log_w, need_dx=ctx.needs_input_grad[0],
                                     likelihood=ctx.likelihood, scale=scale)
        return (*grads[:5], None, grads[5])


def likelihood_only(logits: torch.Tensor) -> tuple:
    """(z, mu, logvar) stand-ins of latent width d = 0: the kernels' own latent loop then adds
    nothing, and log w is the likelihood term alone (the layers' terms come from kernels/latent.py)."""
    B, k = logits.shape[:2]
    z = torch.zeros((B, k, 0), device=logits.device, dtype=torch.float32)
    return z, z[:, 0], z[:, 0]


def prepared_inputs(x, logits, z, mu, logvar, likelihood, scale) -> tuple:
    """(B, k, likelihood as a Likelihood, the kernel's (z, mu, logvar), offset [B, k] or None)
    after the checks every entry point from logits makes (a likelihood the kernels do not
    take, the logistic mixture, is refused by name): the one-layer call as it is; stochastic
    layers (kernels/latent.py) as the likelihood alone (stand-ins of width d = 0) plus their
    terms' [B, k] sum, one launch per layer, as the offset. For B = 0 both are None."""
    likelihood = as_likelihood(likelihood)
    layers = as_layers(z, mu, logvar)
    single = is_single(layers)
    if single:
        B, k = check_bound_inputs(x, logits, *layers[0][:3], for_kernel=True, likelihood=likelihood, scale=scale)[:2]
    else:
        B, k = check_layered_inputs(x, logits, layers, for_kernel=True, likelihood=likelihood, scale=scale)
    likelihood.kernel_args()
    if B == 0:
        return B, k, likelihood, None, None
    if single:
        z, mu, logvar = layers[0][:3]
        return B, k, likelihood, (int32_tiles(z), mu, logvar), None
    return B, k, likelihood, likelihood_only(logits), latent_log_ratio(layers)


def log_weights(x, logits, z, mu=None, logvar=None, *, likelihood=BERNOULLI, scale=None) -> torch.Tensor:
    """log p(x|h) + log p(h) - log q(h|x) for every example and sample: [B, k] float32.

    x [B, D] (the likelihood's data: binary or in [0, 1] for the Bernoulli), logits [B, k, C D]
    the decoder's C output channels (the Bernoulli's logits: C = 1), z [B, k, d] samples of q,
    mu and logvar [B, d] of the diagonal Gaussian q(h|x); ``likelihood`` a ``kernels.Likelihood``
    or its spelling (kernels/likelihood.py), ``scale`` [D] its per-pixel log-scale if it has
    one. Any floating dtypes and strides; accumulation in float32. Differentiable (backward in
    Triton).

    Stochastic layers (kernels/latent.py): ``z`` a sequence of ``kernels.Latent`` (mu and logvar
    None), h1 first, each with its own prior and posterior, per example or per sample; or mu,
    logvar per sample [B, k, d]. log w is then the likelihood kernel's term plus the layers'.
    """
    B, k, likelihood, latent, offset = prepared_inputs(x, logits, z, mu, logvar, likelihood, scale)
    if B == 0:
        return torch.empty((0, k), device=logits.device, dtype=torch.float32)
    log_w = LogWeightsFunction.apply(x, int32_tiles(logits), *latent, likelihood, scale)
    return log_w if offset is None else log_w + offset
