"""Batched log-weights of a Bernoulli-decoder VAE, broadcast over k samples without repeats.

For example b and sample i (h = z[b, i], logits l = logits[b, i]):

    log w[b, i] = log p(x|h) + log p(h) - log q(h|x)
                = sum_D [x * l - softplus(l)]
                + sum_d 0.5 * [(h - mu)^2 * exp(-logvar) + logvar - h^2]

(the 2 pi terms of the two Gaussians cancel). x * logsigmoid(l) + (1 - x) * logsigmoid(-l)
equals x * l - softplus(l) for any x, binary or in [0, 1], with no clamping, and

    softplus(l) = max(l, 0) + log(1 + exp(-|l|)).

The last term costs an exp and a log per element, and those, not the bytes, bound the kernel
once the logits are 16-bit. Each factor 1 + exp(-|l|) lies in (1, 2], so a lane multiplies up
to PROD_GROUP of them in float32 (at most 2**64) and takes one log per group: one exp per
element instead of exp + log.

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

The elementwise gradients are written once; the sums over k are written per k-block into
small [B, k/BLOCK_K, d] (and [B, k/BLOCK_K, D] for x) partials and added up on the host, which
keeps the result deterministic (no float atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Tunable, cdiv, check_bound_inputs, interpreted, next_pow2

PROD_GROUP = 64  # factors in (1, 2] multiplied before one log: product <= 2**64


@triton.jit
def _data_tiles(b64, rows64, mask_k, d0, x_ptr, logits_ptr,
                stride_xb, stride_xd, stride_lb, stride_lk, stride_ld, D, BLOCK_D: tl.constexpr):
    """Columns d0 .. d0+BLOCK_D of x[b] ([BLOCK_D]) and of the samples' logits ([BLOCK_K, BLOCK_D]),
    as float32; masked lanes hold 0. x is read once and broadcast over the samples."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = mask_k[:, None] & mask_d[None, :]
    x_block = tl.load(x_ptr + b64 * stride_xb + offs_d * stride_xd, mask=mask_d,
                      other=0.0).to(tl.float32)
    logit_block = tl.load(logits_ptr + b64 * stride_lb + rows64[:, None] * stride_lk
                          + offs_d[None, :] * stride_ld, mask=mask, other=0.0).to(tl.float32)
    return offs_d, mask_d, mask, x_block, logit_block


@triton.jit
def _latent_tiles(b64, rows64, mask_k, j0, z_ptr, mu_ptr, logvar_ptr,
                  stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
                  d, BLOCK_L: tl.constexpr):
    """Latent columns j0 .. j0+BLOCK_L: mu[b], logvar[b] ([BLOCK_L], read once and broadcast)
    and the samples' z ([BLOCK_K, BLOCK_L]), as float32; masked lanes hold 0."""
    offs_l = j0 + tl.arange(0, BLOCK_L)
    mask_l = offs_l < d
    mask = mask_k[:, None] & mask_l[None, :]
    mu_block = tl.load(mu_ptr + b64 * stride_mb + offs_l * stride_md, mask=mask_l,
                       other=0.0).to(tl.float32)
    logvar_block = tl.load(logvar_ptr + b64 * stride_vb + offs_l * stride_vd, mask=mask_l,
                           other=0.0).to(tl.float32)
    z_block = tl.load(z_ptr + b64 * stride_zb + rows64[:, None] * stride_zk
                      + offs_l[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
    return offs_l, mask_l, mask, z_block, mu_block, logvar_block


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
        offs_d, mask_d, mask, x_block, logit_block = _data_tiles(
            b64, rows64, mask_k, i * BLOCK_D, x_ptr, logits_ptr,
            stride_xb, stride_xd, stride_lb, stride_lk, stride_ld, D, BLOCK_D)
        acc += x_block[None, :] * logit_block - tl.maximum(logit_block, 0.0)
        # masked lanes multiply by exactly 1
        tail_prod *= 1.0 + tl.where(mask, tl.exp(-tl.abs(logit_block)), 0.0)
        if i % PROD_GROUP == PROD_GROUP - 1:
            acc -= tl.log(tail_prod)
            tail_prod = tl.full([BLOCK_K, BLOCK_D], 1.0, tl.float32)
    acc -= tl.log(tail_prod)
    log_px = tl.sum(acc, axis=1)

    # log p(h) - log q(h|x): mu, logvar and exp(-logvar) once per latent block, broadcast
    # over the BLOCK_K samples; masked lanes load zeros and add exactly 0.
    latent = tl.zeros([BLOCK_K, BLOCK_L], tl.float32)
    for j0 in range(0, d, BLOCK_L):
        offs_l, mask_l, mask, z_block, mu_block, logvar_block = _latent_tiles(
            b64, rows64, mask_k, j0, z_ptr, mu_ptr, logvar_ptr,
            stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd, d, BLOCK_L)
        inv_var = tl.exp(-logvar_block)
        diff = z_block - mu_block[None, :]
        latent += 0.5 * (diff * diff * inv_var[None, :] + logvar_block[None, :] - z_block * z_block)
    return log_px + tl.sum(latent, axis=1)


@triton.jit
def _log_weights_forward_kernel(
    x_ptr, logits_ptr, z_ptr, mu_ptr, logvar_ptr, log_w_ptr,
    stride_xb, stride_xd, stride_lb, stride_lk, stride_ld,
    stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd,
    k, D, d,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PROD_GROUP: tl.constexpr,
):
    # grid (B, cdiv(k, BLOCK_K)); writes log_w[b, offs_k] of a contiguous [B, k] float32.
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
    k, D, d,
    FROM_BOUND: tl.constexpr, NEED_DX: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # grid (B, cdiv(k, BLOCK_K)): one example, BLOCK_K samples. Logits and z are read once;
    # their gradients (contiguous [B, k, D] and [B, k, d]) written once; x, mu, logvar are
    # loaded once per tile and broadcast over the samples, as in the forward.
    b = tl.program_id(0)
    k_block = tl.program_id(1)
    n_k_blocks = tl.num_programs(1)
    offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < k
    coef = _sample_coef(b, offs_k, mask_k, grad_ptr, log_w_ptr, lse_ptr, k, FROM_BOUND)
    b64 = b.to(tl.int64)
    rows64 = offs_k.to(tl.int64)
    part_row = b64 * n_k_blocks + k_block  # this program's row of the [B, n_k_blocks, .] partials

    grad_logit_rows = grad_logits_ptr + (b64 * k + rows64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d, mask_d, mask, x_block, logit_block = _data_tiles(
            b64, rows64, mask_k, d0, x_ptr, logits_ptr,
            stride_xb, stride_xd, stride_lb, stride_lk, stride_ld, D, BLOCK_D)
        grad_block = coef[:, None] * (x_block[None, :] - tl.sigmoid(logit_block))
        tl.store(grad_logit_rows + offs_d[None, :],
                 grad_block.to(grad_logits_ptr.dtype.element_ty), mask=mask)
        if NEED_DX:
            # a sample of weight 0 adds nothing, even where its logit is infinite
            weighted = tl.where(coef[:, None] == 0.0, 0.0, coef[:, None] * logit_block)
            tl.store(part_x_ptr + part_row * D + offs_d, tl.sum(weighted, axis=0), mask=mask_d)

    grad_z_rows = grad_z_ptr + (b64 * k + rows64)[:, None] * d
    for j0 in range(0, d, BLOCK_L):
        offs_l, mask_l, mask, z_block, mu_block, logvar_block = _latent_tiles(
            b64, rows64, mask_k, j0, z_ptr, mu_ptr, logvar_ptr,
            stride_zb, stride_zk, stride_zd, stride_mb, stride_md, stride_vb, stride_vd, d, BLOCK_L)
        inv_var = tl.exp(-logvar_block)
        diff = z_block - mu_block[None, :]
        scaled = diff * inv_var[None, :]  # (z - mu) / var
        tl.store(grad_z_rows + offs_l[None, :],
                 (coef[:, None] * (scaled - z_block)).to(grad_z_ptr.dtype.element_ty), mask=mask)
        tl.store(part_mu_ptr + part_row * d + offs_l, -tl.sum(coef[:, None] * scaled, axis=0),
                 mask=mask_l)
        tl.store(part_logvar_ptr + part_row * d + offs_l,
                 tl.sum(coef[:, None] * 0.5 * (1.0 - diff * scaled), axis=0), mask=mask_l)


def block_configs():
    """Tile shapes for the log-weight block, shared by this kernel and the fused bound: a few
    [BLOCK_K, BLOCK_D] areas of 2-4K elements, rows traded against columns."""
    shapes = [(8, 256, 4), (16, 128, 4), (32, 64, 4), (16, 256, 8), (32, 128, 8), (64, 64, 8)]
    return [triton.Config({"BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=3)
            for bk, bd, w in shapes]


# launched without autotuning (IWAE_BENCH_AUTOTUNE=0) on a GPU
DEFAULT_BLOCKS = {"BLOCK_K": 16, "BLOCK_D": 128, "num_warps": 4, "num_stages": 3}


def prune_block_configs(configs, named_args, **kwargs):
    # Rows beyond k (per split) and columns beyond D only burn lanes.
    k, D = named_args["k"], named_args["D"]
    kept = [c for c in configs
            if c.kwargs["BLOCK_K"] <= max(8, next_pow2(k)) and c.kwargs["BLOCK_D"] <= max(64, next_pow2(D))]
    return kept or configs[:1]


def interpreter_blocks(k: int, D: int) -> dict:
    # Large tiles (up to 16K elements): the interpreter pays per operation, not per element.
    block_d = min(next_pow2(D), 256)
    return {"BLOCK_K": min(next_pow2(k), max(64, 16384 // block_d)), "BLOCK_D": block_d}


def latent_block(d: int) -> int:
    return min(next_pow2(d), 64)


def input_strides(x, logits, z, mu, logvar) -> tuple:
    """The 17 strides of the five inputs, in the order the kernels take them."""
    return (*x.stride(), *logits.stride(), *z.stride(), *mu.stride(), *logvar.stride())


_log_weights_forward = Tunable(_log_weights_forward_kernel, block_configs(), key=["k", "D", "d"],
                               prune=prune_block_configs)


def log_weights_forward(x, logits, z, mu, logvar) -> torch.Tensor:
    """log w as a contiguous [B, k] float32 tensor (inputs already checked)."""
    B, k, D = logits.shape
    d = z.shape[2]
    log_w = torch.empty((B, k), device=logits.device, dtype=torch.float32)
    _log_weights_forward.launch(
        lambda meta: (B, cdiv(k, meta["BLOCK_K"])),
        x, logits, z, mu, logvar, log_w, *input_strides(x, logits, z, mu, logvar),
        k, D, d, BLOCK_L=latent_block(d), PROD_GROUP=PROD_GROUP,
        interpreter_meta=interpreter_blocks(k, D), default_meta=DEFAULT_BLOCKS,
    )
    return log_w


def log_weights_backward(x, logits, z, mu, logvar, grad, log_w=None, lse=None, need_dx=False):
    """Gradients (dx or None, dlogits, dz, dmu, dlogvar), each in its input's dtype.

    ``grad`` is d loss / d log w [B, k]; or, with ``log_w`` [B, k] and ``lse`` [B] saved by
    the fused forward, d loss / d bound [B].
    """
    B, k, D = logits.shape
    d = z.shape[2]
    device = logits.device
    from_bound = log_w is not None
    blocks = interpreter_blocks(k, D) if interpreted() else {"BLOCK_K": 16, "BLOCK_D": 128}
    n_k_blocks = cdiv(k, blocks["BLOCK_K"])
    grad_logits = torch.empty((B, k, D), device=device, dtype=logits.dtype)
    grad_z = torch.empty((B, k, d), device=device, dtype=z.dtype)
    part_mu = torch.empty((B, n_k_blocks, d), device=device, dtype=torch.float32)
    part_logvar = torch.empty_like(part_mu)
    part_x = (torch.empty((B, n_k_blocks, D), device=device, dtype=torch.float32)
              if need_dx else part_mu)
    grad = grad.to(torch.float32).contiguous()
    _log_weights_backward_kernel[(B, n_k_blocks)](
        x, logits, z, mu, logvar, grad,
        log_w if from_bound else grad, lse if from_bound else grad,
        grad_logits, grad_z, part_mu, part_logvar, part_x,
        *input_strides(x, logits, z, mu, logvar), k, D, d,
        FROM_BOUND=from_bound, NEED_DX=need_dx, BLOCK_L=latent_block(d), **blocks,
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
    B = check_bound_inputs(x, logits, z, mu, logvar)[0]
    if B == 0:
        return torch.empty((0, logits.shape[1]), device=logits.device, dtype=torch.float32)
    return LogWeightsFunction.apply(x, logits, z, mu, logvar)
