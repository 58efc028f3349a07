"""Batched log-weights of a Bernoulli-decoder VAE, broadcast over k samples without repeats.

For example b and sample i (h = z[b, i], logits l = logits[b, i]):

    log w[b, i] = log p(x|h) + log p(h) - log q(h|x)
                = sum_D [x * l - softplus(l)]
                + sum_d 0.5 * [(h - mu)^2 * exp(-logvar) + logvar - h^2]

(the 2 pi terms of the two Gaussians cancel). x * logsigmoid(l) + (1 - x) * logsigmoid(-l)
equals x * l - softplus(l) for any finite l and any x, binary or in [0, 1], with no clamping, and

    softplus(l) = max(l, 0) + log(1 + exp(-|l|)).

The last term costs an exp and a log per element, and those, not the bytes, bound the kernel
once the logits are 16-bit. Each factor 1 + exp(-|l|) lies in (1, 2], so a lane multiplies up
to PROD_GROUP of them in float32 (at most 2**64) and takes one log per group: one exp per
element instead of exp + log.

Infinite logits follow one rule (the float64 reference and the torch backend follow it too):
log sigmoid(+inf) = 0 and log sigmoid(-inf) = -inf, with 0 * inf = 0, so a pixel whose logit
is infinite adds 0 where x is on the logit's side (x = 1 for +inf, x = 0 for -inf) and -inf
otherwise (x in (0, 1) included); a NaN logit gives NaN. The fast formula above turns those
0 * inf cases into NaN, so a block whose sum came out NaN is summed again, exactly, in a
second loop that runs only then (``_bernoulli_exact``): the hot loop pays nothing for the rule.

Memory: a program owns one example b and BLOCK_K samples. It streams their logits in
[BLOCK_K, BLOCK_D] tiles, reading each element once, while x[b, D-block] is loaded once per
tile and broadcast over the BLOCK_K rows (x, mu and logvar are never repeated over k). The
sums live in a 2-D accumulator reduced once at the end, not once per tile.

Backward, for c[b, i] = d loss / d log w[b, i] (given, or for the bound g[b] times the
normalized importance weight exp(log w[b, i] - lse[b])):

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

from ._common import (SplitPlan, Tiling, Tunable, cdiv, check_bound_inputs, next_pow2,
                      split_plan)

PROD_GROUP = 64  # factors in (1, 2] multiplied before one log: product <= 2**64
SPLIT_QUANTUM = 256  # samples per split are a multiple of this, so any BLOCK_K <= 256 tiles it


@triton.jit
def _row_block(ptr, b64, stride_b, offs, stride_c, mask):
    """One example's values at columns ``offs`` (x, mu or logvar): [BLOCK] float32, 0 where masked."""
    return tl.load(ptr + b64 * stride_b + offs * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sample_tile(ptr, b64, rows64, offs, stride_b, stride_k, stride_c, mask):
    """The samples ``rows64`` of one example at columns ``offs`` (logits or z):
    [BLOCK_K, BLOCK] float32, 0 where masked."""
    return tl.load(ptr + b64 * stride_b + rows64[:, None] * stride_k + offs[None, :] * stride_c,
                   mask=mask, other=0.0).to(tl.float32)


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
def _log_weight_block(
    b, offs_k, mask_k,
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    D, d,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PROD_GROUP: tl.constexpr,
):
    """log w for example ``b`` and the samples ``offs_k`` -> [BLOCK_K] float32 (masked rows: junk)."""
    b64 = b.to(tl.int64)
    rows64 = offs_k.to(tl.int64)

    # log p(x|h): acc holds x*l - max(l, 0) minus the logs of finished groups of
    # (1 + exp(-|l|)) factors; tail_prod holds the factors of the group in progress.
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    tail_prod = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
    for i in range(0, tl.cdiv(D, BLOCK_D)):
        offs_d = i * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = mask_k[:, None] & mask_d[None, :]
        x_block = _row_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d)
        logit_block = _sample_tile(logits_ptr, b64, rows64, offs_d, stride_lb, stride_lk, stride_ld, mask)
        acc += x_block[None, :] * logit_block - tl.maximum(logit_block, 0.0)
        # masked lanes multiply by exactly 1
        tail_prod *= 1.0 + tl.where(mask, tl.exp(-tl.abs(logit_block)), 0.0)
        if i % PROD_GROUP == PROD_GROUP - 1:
            acc -= tl.log(tail_prod)
            tail_prod = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
    acc -= tl.log(tail_prod)
    log_px = tl.sum(acc, axis=1)

    # Infinite logits made 0 * inf = NaN above: sum those rows again with the exact rule.
    if tl.max(tl.where(log_px != log_px, 1, 0), axis=0) > 0:
        exact = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask = mask_k[:, None] & mask_d[None, :]
            exact += _bernoulli_exact(_row_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d),
                                      _sample_tile(logits_ptr, b64, rows64, offs_d, stride_lb,
                                                   stride_lk, stride_ld, mask), mask)
        log_px = tl.where(log_px != log_px, tl.sum(exact, axis=1), log_px)

    # log p(h) - log q(h|x): mu, logvar and exp(-logvar) once per latent block, broadcast
    # over the BLOCK_K samples; masked lanes load zeros and add exactly 0.
    latent = tl.zeros([BLOCK_K, BLOCK_L], tl.float32)
    for j0 in range(0, d, BLOCK_L):
        offs_l = j0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < d
        mu_block = _row_block(mu_ptr, b64, stride_mb, offs_l, stride_md, mask_l)
        logvar_block = _row_block(logvar_ptr, b64, stride_vb, offs_l, stride_vd, mask_l)
        z_block = _sample_tile(z_ptr, b64, rows64, offs_l, stride_zb, stride_zk, stride_zd,
                               mask_k[:, None] & mask_l[None, :])
        inv_var = tl.exp(-logvar_block)
        diff = z_block - mu_block[None, :]
        latent += 0.5 * (diff * diff * inv_var[None, :] + logvar_block[None, :] - z_block * z_block)
    return log_px + tl.sum(latent, axis=1)


@triton.jit
def _log_weights_forward_kernel(
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr, log_w_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    B, k, D, d,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PROD_GROUP: tl.constexpr,
):
    # grid (B, cdiv(k, BLOCK_K)); writes log_w[b, offs_k] of a contiguous [B, k] float32.
    # (B is an argument only so the autotuner's key can see it.)
    b = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    log_w = _log_weight_block(
        b, offs_k, mask_k, x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr,
        stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
        stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
        D, d, BLOCK_K, BLOCK_D, BLOCK_L, PROD_GROUP,
    )
    tl.store(log_w_ptr + b.to(tl.int64) * k + offs_k, log_w, mask=mask_k)


@triton.jit
def _sample_coef(b, offs_k, mask_k, grad_ptr, log_w_ptr, lse_ptr, k, FROM_BOUND: tl.constexpr):
    """c[b, offs_k] = d loss / d log w: read as given, or g[b] * exp(log_w - lse[b]) for the bound.

    A -inf log-weight gets weight 0; a row whose lse is -inf (all weights -inf) gets zeros.
    """
    offs = b.to(tl.int64) * k + offs_k
    if FROM_BOUND:
        g = tl.load(grad_ptr + b)
        lse = tl.load(lse_ptr + b)
        log_w = tl.load(log_w_ptr + offs, mask=mask_k, other=float("-inf"))
        weight = tl.where(lse == float("-inf"), 0.0, tl.exp(log_w - lse))
        coef = tl.where(mask_k, g * weight, 0.0)
    else:
        coef = tl.load(grad_ptr + offs, mask=mask_k, other=0.0)
    return coef


@triton.jit
def _log_weights_backward_kernel(
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr,
    grad_ptr, log_w_ptr, lse_ptr,
    grad_logits_ptr, grad_z_ptr, part_mu_ptr, part_logvar_ptr, part_x_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    B, k, D, d, k_per_split, SPLITS,
    FROM_BOUND: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # grid (B, SPLITS): example b, samples [k_start, k_stop). Logits and z are read once and
    # their gradients (contiguous [B, k, D] and [B, k, d]) written once; x, mu and logvar are
    # loaded once per column block and broadcast over the samples.
    b = tl.program_id(0)
    split = tl.program_id(1)
    b64 = b.to(tl.int64)
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, k)
    part_row = b64 * SPLITS + split  # this program's row of the [B, SPLITS, .] partials

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x_block = _row_block(x_ptr, b64, stride_xb, offs_d, stride_xd, mask_d)
        x_sum = tl.zeros([BLOCK_D], tl.float32)  # sum_i c_i l_i over this split's samples
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_stop
            rows64 = offs_k.to(tl.int64)
            mask = mask_k[:, None] & mask_d[None, :]
            coef = _sample_coef(b, offs_k, mask_k, grad_ptr, log_w_ptr, lse_ptr, k, FROM_BOUND)
            logit_block = _sample_tile(logits_ptr, b64, rows64, offs_d, stride_lb, stride_lk,
                                       stride_ld, mask)
            grad_block = coef[:, None] * (x_block[None, :] - tl.sigmoid(logit_block))
            tl.store(grad_logits_ptr + (b64 * k + rows64)[:, None] * D + offs_d[None, :],
                     grad_block.to(grad_logits_ptr.dtype.element_ty), mask=mask)
            if NEED_DX:
                # a sample of weight 0 adds nothing, even where its logit is infinite
                x_sum += tl.sum(tl.where(coef[:, None] == 0.0, 0.0, coef[:, None] * logit_block), axis=0)
        if NEED_DX:
            tl.store(part_x_ptr + part_row * D + offs_d, x_sum, mask=mask_d)

    for j0 in range(0, d, BLOCK_L):
        offs_l = j0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < d
        mu_block = _row_block(mu_ptr, b64, stride_mb, offs_l, stride_md, mask_l)
        logvar_block = _row_block(logvar_ptr, b64, stride_vb, offs_l, stride_vd, mask_l)
        inv_var = tl.exp(-logvar_block)
        mu_sum = tl.zeros([BLOCK_L], tl.float32)
        logvar_sum = tl.zeros([BLOCK_L], tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_stop
            rows64 = offs_k.to(tl.int64)
            mask = mask_k[:, None] & mask_l[None, :]
            coef = _sample_coef(b, offs_k, mask_k, grad_ptr, log_w_ptr, lse_ptr, k, FROM_BOUND)
            z_block = _sample_tile(z_ptr, b64, rows64, offs_l, stride_zb, stride_zk, stride_zd, mask)
            diff = z_block - mu_block[None, :]
            scaled = diff * inv_var[None, :]  # (z - mu) / var
            tl.store(grad_z_ptr + (b64 * k + rows64)[:, None] * d + offs_l[None, :],
                     (coef[:, None] * (scaled - z_block)).to(grad_z_ptr.dtype.element_ty), mask=mask)
            mu_sum -= tl.sum(coef[:, None] * scaled, axis=0)
            logvar_sum += tl.sum(coef[:, None] * 0.5 * (1.0 - diff * scaled), axis=0)
        tl.store(part_mu_ptr + part_row * d + offs_l, mu_sum, mask=mask_l)
        tl.store(part_logvar_ptr + part_row * d + offs_l, logvar_sum, mask=mask_l)


# --------------------------------------------------------------------------- tiling


def _block_configs():
    """Tile shapes of the log-weight family (forward, fused forward, backward): a few
    [BLOCK_K, BLOCK_D] areas of 2-4K elements, rows traded against columns."""
    shapes = [(8, 256, 4), (16, 128, 4), (32, 64, 4), (16, 256, 8), (32, 128, 8), (64, 64, 8)]
    return [triton.Config({"BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=3)
            for bk, bd, w in shapes]


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


def block_tiling(*extra_key: str) -> Tiling:
    """The one tiling policy of the log-weight family; each kernel adds the flags that change
    its best tile to the autotune key."""
    return Tiling(_block_configs(), key=["B", "k", "D", "d", *extra_key], default=_default_blocks,
                  interpreter=_interpreter_blocks, prune=_prune)


def latent_block(d: int) -> int:
    return min(next_pow2(d), 64)


def input_strides(x, logits, z, mu, logvar) -> tuple:
    """The 17 strides of the five inputs, in the order the kernels take them."""
    return (*x.stride(), *logits.stride(), *z.stride(), *mu.stride(), *logvar.stride())


_log_weights_forward = Tunable(_log_weights_forward_kernel, block_tiling())
_log_weights_backward = Tunable(_log_weights_backward_kernel,
                                block_tiling("SPLITS", "FROM_BOUND", "NEED_DX"))


def log_weights_forward(x, logits, z, mu, logvar) -> torch.Tensor:
    """log w as a contiguous [B, k] float32 tensor (inputs already checked)."""
    B, k, D = logits.shape
    d = z.shape[2]
    log_w = torch.empty((B, k), device=logits.device, dtype=torch.float32)
    _log_weights_forward.launch(
        lambda meta: (B, cdiv(k, meta["BLOCK_K"])),
        x, logits, z, mu, logvar, log_w, *input_strides(x, logits, z, mu, logvar),
        B, k, D, d, BLOCK_L=latent_block(d), PROD_GROUP=PROD_GROUP, sizes={"k": k, "D": D},
    )
    return log_w


def log_weights_backward(x, logits, z, mu, logvar, grad, log_w=None, lse=None, need_dx=False,
                         plan: SplitPlan | None = None):
    """Gradients (dx or None, dlogits, dz, dmu, dlogvar), each in its input's dtype.

    ``grad`` is d loss / d log w [B, k]; or, with ``log_w`` [B, k] and ``lse`` [B] saved by
    the fused forward, d loss / d bound [B]. ``plan`` overrides the split over k (tests).
    """
    B, k, D = logits.shape
    d = z.shape[2]
    device = logits.device
    from_bound = log_w is not None
    plan = plan or split_plan(B, k, device, SPLIT_QUANTUM)
    grad_logits = torch.empty((B, k, D), device=device, dtype=logits.dtype)
    grad_z = torch.empty((B, k, d), device=device, dtype=z.dtype)
    part_mu = torch.empty((B, plan.splits, d), device=device, dtype=torch.float32)
    part_logvar = torch.empty_like(part_mu)
    part_x = (torch.empty((B, plan.splits, D), device=device, dtype=torch.float32)
              if need_dx else part_mu)
    grad = grad.to(torch.float32).contiguous()
    _log_weights_backward.launch(
        lambda meta: (B, plan.splits),
        x, logits, z, mu, logvar, grad,
        log_w if from_bound else grad, lse if from_bound else grad,
        grad_logits, grad_z, part_mu, part_logvar, part_x,
        *input_strides(x, logits, z, mu, logvar), B, k, D, d, plan.per_split, plan.splits,
        FROM_BOUND=from_bound, NEED_DX=need_dx, BLOCK_L=latent_block(d),
        sizes={"k": min(k, plan.per_split), "D": D},
    )
    grad_x = part_x.sum(1).to(x.dtype) if need_dx else None
    return (grad_x, grad_logits, grad_z, part_mu.sum(1).to(mu.dtype),
            part_logvar.sum(1).to(logvar.dtype))


class LogWeightsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, logits, z, mu, logvar):
        ctx.save_for_backward(x, logits, z, mu, logvar)
        return log_weights_forward(x, logits, z, mu, logvar)

    @staticmethod
    def backward(ctx, grad_log_w):
        return log_weights_backward(*ctx.saved_tensors, grad_log_w, need_dx=ctx.needs_input_grad[0])


def log_weights(x, logits, z, mu, logvar) -> torch.Tensor:
    """log p(x|h) + log p(h) - log q(h|x) for every example and sample: [B, k] float32.

    x [B, D] (binary or in [0, 1]), logits [B, k, D] of the Bernoulli decoder, z [B, k, d]
    samples of q, mu and logvar [B, d] of the diagonal Gaussian q(h|x). Any floating dtypes
    and strides; accumulation in float32. Differentiable (backward in Triton).
    """
    B = check_bound_inputs(x, logits, z, mu, logvar, for_kernel=True)[0]
    if B == 0:
        return torch.empty((0, logits.shape[1]), device=logits.device, dtype=torch.float32)
    return LogWeightsFunction.apply(x, logits, z, mu, logvar)
