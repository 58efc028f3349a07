"""Gradients of the Triton kernels against float64 autograd of the reference."""

import pytest
import torch

import kernels
from iwae_bench import reference, variants

from .helpers import assert_close, make_case

# The logits gradient comes back in the logits' dtype, so its tolerance is that dtype's.
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
NAMES = ["x", "logits", "z", "mu", "logvar"]

CASES = [
    pytest.param(3, 1, 784, 50, {}, id="k=1-D=784-d=50"),
    pytest.param(4, 37, 30, 1, {}, id="k=37-d=1"),
    pytest.param(2, 1100, 24, 6, {}, id="k=1100"),
    pytest.param(3, 19, 784, 50, {"logit_scale": 20.0, "binary": False}, id="D=784-continuous-x"),
    pytest.param(3, 9, 40, 5, {"dtype": torch.float16}, id="float16-logits"),
    pytest.param(3, 9, 40, 5, {"dtype": torch.bfloat16}, id="bfloat16-logits"),
    pytest.param(3, 11, 33, 7, {"noncontiguous": True}, id="noncontiguous"),
]


def _leaves(inputs, dtype_of=None):
    return [t.detach().clone().to(dtype_of or t.dtype).requires_grad_() for t in inputs]


def _check_grads(fn, ref_fn, inputs, weights):
    """loss = sum(weights * fn(inputs)): every output element's gradient enters with its own weight."""
    ours = _leaves(inputs)
    (fn(*ours) * weights).sum().backward()
    ref = _leaves(inputs, torch.float64)
    (ref_fn(*ref) * weights.double()).sum().backward()
    for name, got, want in zip(NAMES, ours, ref):
        assert got.grad.dtype == got.dtype, f"d/d{name} dtype {got.grad.dtype} != {got.dtype}"
        rtol, atol = GRAD_TOL[got.dtype] if name == "logits" else GRAD_TOL[torch.float32]
        assert_close(got.grad, want.grad, rtol=rtol, atol=atol, what=f"d/d{name}")


@pytest.mark.parametrize("B, k, D, d, options", CASES)
def test_fused_bound_gradients(B, k, D, d, options, device):
    inputs = make_case(B, k, D, d, device=device, **options)
    _check_grads(kernels.fused_iwae_bound, reference.bound, inputs, torch.randn(B, device=device))


@pytest.mark.parametrize("B, k, D, d, options", CASES)
def test_log_weights_gradients(B, k, D, d, options, device):
    inputs = make_case(B, k, D, d, device=device, **options)
    _check_grads(kernels.log_weights, reference.log_weights, inputs, torch.randn(B, k, device=device))


def test_triton_variant_chains_both_backwards(device):
    inputs = make_case(3, 25, 50, 4, device=device)
    _check_grads(variants.get("triton"), reference.bound, inputs, torch.randn(3, device=device))


@pytest.mark.parametrize("shape", [(5, 1), (4, 37), (2, 3000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_reduction_gradients(shape, dtype, device):
    log_w = (torch.randn(shape, device=device) * 5 - 100).to(dtype).requires_grad_()
    weights = torch.randn(shape[:-1], device=device)
    (kernels.iwae_bound(log_w) * weights).sum().backward()
    ref = log_w.detach().double().requires_grad_()
    (reference.iwae_bound(ref) * weights.double()).sum().backward()
    assert log_w.grad.dtype == dtype
    assert_close(log_w.grad, ref.grad, *GRAD_TOL[dtype], what="d/dlog_w")


def test_minus_inf_weight_gets_zero_gradient(device):
    """A sample whose log-weight is -inf (logit -inf at an on pixel) weighs nothing: its
    gradients are 0 and every other gradient is finite and matches the reference."""
    x, logits, z, mu, logvar = make_case(3, 6, 10, 3, device=device)
    x[:, 0] = 1.0
    logits[1, 2, 0] = float("-inf")
    inputs = (x, logits, z, mu, logvar)
    assert reference.log_weights(*inputs)[1, 2] == float("-inf")
    ours = _leaves(inputs)
    kernels.fused_iwae_bound(*ours).sum().backward()
    for t in ours:
        assert torch.isfinite(t.grad).all()
    assert (ours[1].grad[1, 2] == 0).all() and (ours[2].grad[1, 2] == 0).all()
    ref = _leaves(inputs, torch.float64)
    reference.bound(*ref).sum().backward()
    for name, got, want in zip(NAMES, ours, ref):
        finite = torch.isfinite(want.grad)
        assert_close(got.grad[finite], want.grad[finite], *GRAD_TOL[torch.float32], what=f"d/d{name}")
    log_w = torch.tensor([[-torch.inf, 0.0, -1.0], [-torch.inf] * 3], device=device, requires_grad=True)
    kernels.iwae_bound(log_w).sum().backward()
    assert log_w.grad[0, 0] == 0 and torch.isfinite(log_w.grad).all()
    assert (log_w.grad[1] == 0).all()  # no weights to give: zeros, not NaN
