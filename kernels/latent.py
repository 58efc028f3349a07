"""The latent side of the log-weights for any chain of stochastic layers, in Triton.

One stochastic layer l adds to log w[b, i] (z = its sample z_l[b, i], diagonal Gaussians):

    log p(z) - log q(z) = sum_d 0.5 [(z - m_q)^2 exp(-v_q) + v_q - (z - m_p)^2 exp(-v_p) - v_p]

(the 2 pi terms cancel). Each of the four parameters (m_q, v_q of the posterior, m_p, v_p of
the prior) is per example [B, d] (q(h1|x): the same for all k samples), per sample [B, k, d]
(q(h2|h1) and p(h1|h2): one per sample) or, for the prior, absent (0: the standard normal).
The two-layer model of Burda et al. sums two such terms:

    log w = log p(x|h1) + [log p(h1|h2) - log q(h1|x)] + [log p(h2) - log q(h2|h1)]

``Latent`` holds one layer. The one-layer call of every entry point (z, mu, logvar with
[B, d] parameters and a standard normal prior) keeps its own path inside the log-weight kernels
(kernels/logw.py), unchanged; any other set of layers goes through ``latent_log_ratio`` here,
one launch per layer, whose [B, k] sum the log-weight, fused-bound and fused-head kernels add
to their likelihood term (their own latent loop then runs over d = 0 columns).

Memory: a forward program owns one example and BLOCK_K samples and walks the latent width in
BLOCK_L columns. A per-sample parameter is read like z, one [BLOCK_K, BLOCK_L] tile per block;
a per-example one is read once per column block as a [1, BLOCK_L] row and broadcast over the
samples (its exp(-v) taken once, not per sample); nothing is repeated over k in memory.

Backward, for c[b, i] = d loss / d log w[b, i], with s_q = (z - m_q) exp(-v_q) and
s_p = (z - m_p) exp(-v_p):

    d/dz   = c (s_q - s_p)
    d/dm_q = -c s_q              d/dv_q = c 0.5 (1 - (z - m_q) s_q)
    d/dm_p =  c s_p              d/dv_p = -c 0.5 (1 - (z - m_p) s_p)

per sample for z and the per-sample parameters (written once), summed over the k samples in
registers for a per-example one. A backward program owns one example (all its samples), so the
sums need no partials; a GPU with fewer examples than SMs leaves some idle (training batches
fill it).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from ._common import (Tiling, Tunable, cdiv, check_channels, check_devices, check_float_tensor, check_inputs,
                      check_scale, next_pow2, shape_str)
from ._math import exp_neg_

ABSENT, PER_EXAMPLE, PER_SAMPLE = 0, 1, 2  # how a parameter is laid out: its KIND in the kernels
PARAMS = ("mu", "logvar", "prior_mu", "prior_logvar")


class Latent(NamedTuple):
    """One stochastic layer's term log p(z) - log q(z) of the log-weights.

    z [B, k, d] the layer's samples; mu, logvar the posterior q's, each [B, d] (per example)
    or [B, k, d] (per sample); prior_mu, prior_logvar the prior p's, each [B, d], [B, k, d] or
    None (mean 0, log-variance 0: both None is the standard normal)."""

    z: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    prior_mu: torch.Tensor | None = None
    prior_logvar: torch.Tensor | None = None


def as_layers(z, mu=None, logvar=None) -> tuple[Latent, ...]:
    """The stochastic layers of a call: (Latent(z, mu, logvar),) for the one-layer call with
    tensors, or ``z`` itself, a sequence of ``Latent`` (then mu and logvar must be None). A
    named tuple that begins with Latent's five fields (training/model.py's ``Layer``) is read
    as the Latent of those five."""
    if isinstance(z, torch.Tensor):
        return (Latent(z, mu, logvar),)
    if mu is not None or logvar is not None:
        raise ValueError("mu and logvar must be None when z is a sequence of stochastic layers (kernels.Latent): "
                         "each layer carries its own")
    layers = tuple(z) if isinstance(z, (list, tuple)) and not hasattr(z, "_fields") else (z,)
    if not layers or not all(getattr(layer, "_fields", ())[:5] == Latent._fields for layer in layers):
        raise TypeError(f"z must be a tensor [B, k, d] or a non-empty sequence of kernels.Latent, got {z!r:.80}")
    return tuple(layer if type(layer) is Latent else Latent(*layer[:5]) for layer in layers)


def is_single(layers: Sequence[Latent]) -> bool:
    """True for the one-layer case every kernel has always taken: one layer, a tensor z with
    [B, d] posterior parameters (or anything the old checks should name) and a standard normal prior."""
    if len(layers) != 1:
        return False
    layer = layers[0]
    per_sample = any(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (layer.mu, layer.logvar))
    return layer.prior_mu is None and layer.prior_logvar is None and not per_sample


def param_kind(t: torch.Tensor | None) -> int:
    return ABSENT if t is None else (PER_SAMPLE if t.dim() == 3 else PER_EXAMPLE)


def check_layers(layers: Sequence[Latent], B: int, k: int, others: dict, for_kernel: bool = False) -> None:
    """Each layer's z [B, k, d_l] and parameters [B, d_l] or [B, k, d_l] (the posterior's
    required), floating, on the device of ``others`` (the rest of the call's tensors); a
    ValueError names the argument, e.g. ``layers[1].prior_mu``."""
    tensors = dict(others)
    for l, layer in enumerate(layers):
        name = f"layers[{l}]"
        check_float_tensor(f"{name}.z", layer.z, 3, "[B, k, d]")
        d = layer.z.shape[2]
        if list(layer.z.shape[:2]) != [B, k] or d < 1:
            raise ValueError(f"{name}.z must have shape [{B}, {k}, d] with d >= 1 (B, k of the logits), "
                             f"got {shape_str(layer.z)}")
        tensors[f"{name}.z"] = layer.z
        for p in PARAMS:
            t = getattr(layer, p)
            if t is None and not p.startswith("prior"):
                raise ValueError(f"{name}.{p} is required: the posterior q's parameters, [B, d] or [B, k, d]")
            if t is None:
                continue
            check_float_tensor(f"{name}.{p}", t)
            if list(t.shape) not in ([B, d], [B, k, d]):
                raise ValueError(f"{name}.{p} must have shape [{B}, {d}] (per example) or [{B}, {k}, {d}] "
                                 f"(per sample) to match {name}.z {shape_str(layer.z)}; got {shape_str(t)}")
            tensors[f"{name}.{p}"] = t
    check_devices(tensors, for_kernel)


LOGITS_LAYOUT = {"x": ("B", "D"), "logits": ("B", "k", "D")}


def check_layered_inputs(x, logits, layers: Sequence[Latent], *, for_kernel: bool = False, likelihood=None,
                         scale=None) -> tuple[int, int]:
    """Validate x [B, D], logits [B, k, C D], ``scale`` and the layers (``check_layers``), the
    way ``check_bound_inputs`` does the one-layer call; return (B, k)."""
    tensors = {"x": x, "logits": check_channels("logits", logits, x, likelihood)}
    sizes = check_inputs(tensors, LOGITS_LAYOUT, {"B": ("logits", "x"), "k": ("logits",), "D": ("logits", "x")},
                         ("x", "logits"))
    if sizes["k"] < 1 or sizes["D"] < 1:
        raise ValueError(f"logits must have k >= 1 and D >= 1, got shape {shape_str(logits)}")
    check_scale(scale, sizes["D"], likelihood, tensors)
    check_layers(layers, sizes["B"], sizes["k"], tensors, for_kernel)
    return sizes["B"], sizes["k"]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _param(ptr, base, row_off, cols, stride_d, mask, mask_l, KIND: tl.constexpr):
    """A parameter's values at the block: per sample a [BLOCK_K, BLOCK_L] tile (read like z),
    per example a [1, BLOCK_L] row (read once, broadcast), absent zeros. Masked lanes are 0."""
    if KIND == 2:
        return tl.load(ptr + base + row_off + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    elif KIND == 1:
        return tl.load(ptr + base + cols[None, :] * stride_d, mask=mask_l[None, :], other=0.0).to(tl.float32)
    else:
        return (cols[None, :] * 0).to(tl.float32)


@triton.jit
def _layer_block(z_ptr, qm_ptr, qv_ptr, pm_ptr, pv_ptr, stride_zb, stride_zk, stride_zd, s_qm_b, s_qm_k, s_qm_d,
                 s_qv_b, s_qv_k, s_qv_d, s_pm_b, s_pm_k, s_pm_d, s_pv_b, s_pv_k, s_pv_d, b64, k0, rows, cols,
                 mask, mask_l, QM: tl.constexpr, QV: tl.constexpr, PM: tl.constexpr, PV: tl.constexpr):
    """(z - m_q, z - m_p, exp(-v_q), exp(-v_p), v_q, v_p) at the block of samples k0 + rows,
    columns cols (``_param``: a per-example parameter's exp taken once per row, not per sample)."""
    z = _param(z_ptr, b64 * stride_zb + k0 * stride_zk, rows[:, None] * stride_zk, cols, stride_zd, mask, mask_l, 2)
    qm = _param(qm_ptr, b64 * s_qm_b + k0 * s_qm_k, rows[:, None] * s_qm_k, cols, s_qm_d, mask, mask_l, QM)
    qv = _param(qv_ptr, b64 * s_qv_b + k0 * s_qv_k, rows[:, None] * s_qv_k, cols, s_qv_d, mask, mask_l, QV)
    pm = _param(pm_ptr, b64 * s_pm_b + k0 * s_pm_k, rows[:, None] * s_pm_k, cols, s_pm_d, mask, mask_l, PM)
    pv = _param(pv_ptr, b64 * s_pv_b + k0 * s_pv_k, rows[:, None] * s_pv_k, cols, s_pv_d, mask, mask_l, PV)
    return z - qm, z - pm, exp_neg_(qv), exp_neg_(pv), qv, pv


@triton.jit
def _latent_forward_kernel(
    z_ptr, qm_ptr, qv_ptr, pm_ptr, pv_ptr, out_ptr,
    stride_zb, stride_zk, stride_zd, s_qm_b, s_qm_k, s_qm_d, s_qv_b, s_qv_k, s_qv_d,
    s_pm_b, s_pm_k, s_pm_d, s_pv_b, s_pv_k, s_pv_d, k, d,
    QM: tl.constexpr, QV: tl.constexpr, PM: tl.constexpr, PV: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # grid (B, cdiv(k, BLOCK_K)): out[b, k0 .. k0 + BLOCK_K] of a contiguous [B, k] float32.
    b64 = tl.program_id(0).to(tl.int64)
    k0 = (tl.program_id(1) * BLOCK_K).to(tl.int64)
    rows = tl.arange(0, BLOCK_K)
    mask_k = k0 + rows < k
    cols0 = tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_K, BLOCK_L], tl.float32)
    for j0 in range(0, d, BLOCK_L):
        cols = j0 + cols0
        mask_l = cols < d
        mask = mask_k[:, None] & mask_l[None, :]
        dq, dp, inv_q, inv_p, qv, pv = _layer_block(
            z_ptr, qm_ptr, qv_ptr, pm_ptr, pv_ptr, stride_zb, stride_zk, stride_zd, s_qm_b, s_qm_k, s_qm_d,
            s_qv_b, s_qv_k, s_qv_d, s_pm_b, s_pm_k, s_pm_d, s_pv_b, s_pv_k, s_pv_d, b64, k0, rows, cols, mask,
            mask_l, QM, QV, PM, PV)
        term = 0.5 * (dq * dq * inv_q + qv - dp * dp * inv_p - pv)
        acc += tl.where(mask, term, 0.0)
    tl.store(out_ptr + b64 * k + k0 + rows, tl.sum(acc, axis=1), mask=mask_k)


@triton.jit
def _param_grad(ptr, acc, g, out_off, mask, KIND: tl.constexpr):
    """A parameter's gradient for the block: per sample stored (contiguous [B, k, d]), per
    example added to the [BLOCK_L] sum over samples ``acc`` (returned)."""
    if KIND == 2:
        tl.store(ptr + out_off, g, mask=mask)
    elif KIND == 1:
        acc += tl.sum(tl.where(mask, g, 0.0), axis=0)
    return acc


@triton.jit
def _latent_backward_kernel(
    z_ptr, qm_ptr, qv_ptr, pm_ptr, pv_ptr, coef_ptr, gz_ptr, gqm_ptr, gqv_ptr, gpm_ptr, gpv_ptr,
    stride_zb, stride_zk, stride_zd, s_qm_b, s_qm_k, s_qm_d, s_qv_b, s_qv_k, s_qv_d,
    s_pm_b, s_pm_k, s_pm_d, s_pv_b, s_pv_k, s_pv_d, k, d,
    QM: tl.constexpr, QV: tl.constexpr, PM: tl.constexpr, PV: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
):
    # grid (B,): example b, all its samples. Gradients are contiguous float32: [B, k, d] for z
    # and per-sample parameters, [B, d] for per-example ones; c is a contiguous [B, k] float32.
    b64 = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_K)
    cols0 = tl.arange(0, BLOCK_L)
    for j0 in range(0, d, BLOCK_L):
        cols = j0 + cols0
        mask_l = cols < d
        acc_qm = tl.zeros([BLOCK_L], tl.float32)
        acc_qv = tl.zeros([BLOCK_L], tl.float32)
        acc_pm = tl.zeros([BLOCK_L], tl.float32)
        acc_pv = tl.zeros([BLOCK_L], tl.float32)
        for k_start in range(0, k, BLOCK_K):
            k0 = tl.cast(k_start, tl.int64)
            mask_k = k0 + rows < k
            mask = mask_k[:, None] & mask_l[None, :]
            c = tl.load(coef_ptr + b64 * k + k0 + rows, mask=mask_k, other=0.0)[:, None]
            dq, dp, inv_q, inv_p, qv, pv = _layer_block(
                z_ptr, qm_ptr, qv_ptr, pm_ptr, pv_ptr, stride_zb, stride_zk, stride_zd, s_qm_b, s_qm_k, s_qm_d,
                s_qv_b, s_qv_k, s_qv_d, s_pm_b, s_pm_k, s_pm_d, s_pv_b, s_pv_k, s_pv_d, b64, k0, rows, cols, mask,
                mask_l, QM, QV, PM, PV)
            s_q = dq * inv_q
            s_p = dp * inv_p
            out_off = (b64 * k + k0 + rows[:, None]) * d + cols[None, :]
            tl.store(gz_ptr + out_off, c * (s_q - s_p), mask=mask)
            acc_qm = _param_grad(gqm_ptr, acc_qm, -c * s_q, out_off, mask, QM)
            acc_qv = _param_grad(gqv_ptr, acc_qv, c * 0.5 * (1.0 - dq * s_q), out_off, mask, QV)
            acc_pm = _param_grad(gpm_ptr, acc_pm, c * s_p, out_off, mask, PM)
            acc_pv = _param_grad(gpv_ptr, acc_pv, -c * 0.5 * (1.0 - dp * s_p), out_off, mask, PV)
        row_off = b64 * d + cols
        if QM == 1:
            tl.store(gqm_ptr + row_off, acc_qm, mask=mask_l)
        if QV == 1:
            tl.store(gqv_ptr + row_off, acc_qv, mask=mask_l)
        if PM == 1:
            tl.store(gpm_ptr + row_off, acc_pm, mask=mask_l)
        if PV == 1:
            tl.store(gpv_ptr + row_off, acc_pv, mask=mask_l)


# --------------------------------------------------------------------------- host side


def _default_blocks(k: int, d: int) -> dict:
    return {"BLOCK_K": min(next_pow2(k), 16), "BLOCK_L": min(next_pow2(d), 64), "num_warps": 4}


def _interpreter_blocks(k: int, d: int) -> dict:
    # the interpreter pays per operation, not per element: larger tiles there
    return {"BLOCK_K": min(next_pow2(k), 64), "BLOCK_L": min(next_pow2(d), 64)}


def _prune(configs, named_args, **kwargs):
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= max(8, next_pow2(named_args["k"]))]
    return kept or configs[:1]


TILING = Tiling([triton.Config({"BLOCK_K": bk, "BLOCK_L": bl}, num_warps=w) for bk, bl, w in
                 ((8, 64, 2), (16, 64, 4), (32, 64, 4), (32, 32, 4), (64, 32, 8))],
                key=["k", "d", "QM", "QV", "PM", "PV"], default=_default_blocks, interpreter=_interpreter_blocks,
                prune=_prune, data_arg="z_ptr", tile=lambda meta: meta["BLOCK_K"] * meta["BLOCK_L"])
_latent_forward = Tunable(_latent_forward_kernel, TILING)
_latent_backward = Tunable(_latent_backward_kernel, TILING)


def _launch_args(layer: Latent) -> tuple[tuple, tuple, dict]:
    """(the four parameters, their 12 strides as (b, k, d) with k = 0 per example and all 0
    when absent, their KIND constexprs); an absent one is stood in for by z (never read)."""
    params, strides, kinds = [], [], {}
    for name, code in zip(PARAMS, ("QM", "QV", "PM", "PV")):
        t = getattr(layer, name)
        kinds[code] = param_kind(t)
        params.append(layer.z if t is None else t)
        if t is None:
            strides += [0, 0, 0]
        elif t.dim() == 2:
            strides += [t.stride(0), 0, t.stride(1)]
        else:
            strides += list(t.stride())
    return tuple(params), tuple(strides), kinds


def latent_forward(layer: Latent) -> torch.Tensor:
    """log p(z) - log q(z) [B, k] float32 of one layer (inputs already checked)."""
    z = layer.z
    B, k, d = z.shape
    out = torch.empty((B, k), device=z.device, dtype=torch.float32)
    params, strides, kinds = _launch_args(layer)
    _latent_forward.launch(lambda meta: (B, cdiv(k, meta["BLOCK_K"])), z, *params, out, *z.stride(), *strides,
                           k, d, **kinds, sizes={"k": k, "d": d})
    return out


def latent_backward(layer: Latent, coef: torch.Tensor) -> tuple:
    """Gradients of (z, mu, logvar, prior_mu, prior_logvar), each in its input's dtype (None
    for an absent prior parameter), for ``coef`` = d loss / d (log p - log q) [B, k]."""
    z = layer.z
    B, k, d = z.shape
    params, strides, kinds = _launch_args(layer)
    grads = [torch.empty((B, k, d), device=z.device, dtype=torch.float32)]
    for name in PARAMS:
        t = getattr(layer, name)
        grads.append(torch.empty(tuple(t.shape) if t is not None else (1,), device=z.device, dtype=torch.float32))
    _latent_backward.launch(lambda meta: (B,), z, *params, coef.to(torch.float32).contiguous(), *grads,
                            *z.stride(), *strides, k, d, **kinds, sizes={"k": k, "d": d})
    return tuple(None if t is None else g.to(t.dtype) for g, t in zip(grads, layer))


class LatentRatioFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, mu, logvar, prior_mu, prior_logvar):
        layer = Latent(z, mu, logvar, prior_mu, prior_logvar)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in layer))
        ctx.absent = tuple(t is None for t in layer)
        return latent_forward(layer)

    @staticmethod
    def backward(ctx, coef):
        saved = [None if gone else t for t, gone in zip(ctx.saved_tensors, ctx.absent)]
        return latent_backward(Latent(*saved), coef)


def latent_log_ratio(layers: Sequence[Latent]) -> torch.Tensor:
    """sum over the layers of log p(z) - log q(z), [B, k] float32, one launch per layer
    (layers already checked). Differentiable (backward in Triton)."""
    total = None
    for layer in layers:
        term = LatentRatioFunction.apply(*layer)
        total = term if total is None else total + term
    return total
