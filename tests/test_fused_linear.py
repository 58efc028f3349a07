"""kernels.fused_linear (the decoder's output layer fused into the bound) against float64
autograd of the reference on logits built as h W^T + b in float64."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import kernels
from iwae_bench import reference
from kernels.fused_linear import (_fused_linear_forward, dw_row_plan, fused_linear_backward,
                                  fused_linear_forward, fused_linear_iwae_bound,
                                  fused_linear_log_weights, matmul_tf32)
from kernels.logw import PROD_GROUP, SPLIT_QUANTUM, bound_coefficients
from kernels._common import split_plan

from .helpers import UNIT_ROUNDOFF, assert_close, assert_within_dot_bound, dot_error_scales

# gradients come back in each input's dtype, so each gets its dtype's tolerance (as in
# tests/test_backward.py); the float64 reference is built from the inputs as rounded
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
NAMES = ["x", "h", "weight", "bias", "z", "mu", "logvar"]


def make_head_case(B, k, D, H, d, *, dtype=torch.float32, bias=True, strided_h=False,
                   logit_scale=4.0, seed=0, device="cpu"):
    """x binary [B, D]; h [B, k, H] like a tanh layer's output; weight [D, H] scaled so the
    logits are about N(0, logit_scale^2); bias [D] (or None); z, mu, logvar as in helpers.
    ``strided_h``: h is every other sample of a [B, 2k, H] tensor."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, D, generator=g) < 0.3).float()
    h = torch.tanh(torch.randn(B, 2 * k if strided_h else k, H, generator=g))
    if strided_h:
        h = h[:, ::2]
    weight = torch.randn(D, H, generator=g) * logit_scale / math.sqrt(H)
    b = torch.randn(D, generator=g) if bias else None
    z = torch.randn(B, k, d, generator=g)
    mu = torch.randn(B, d, generator=g) * 0.5
    logvar = torch.randn(B, d, generator=g) * 0.5
    h, weight = h.to(dtype), weight.to(dtype)
    b = b.to(dtype) if b is not None else None
    return tuple(t.to(device) if t is not None else None for t in (x, h, weight, b, z, mu, logvar))


def reference_head_bound(x, h, weight, bias, z, mu, logvar):
    return reference.bound(x, _logits64(h, weight, bias), z, mu, logvar)


def reference_head_log_weights(x, h, weight, bias, z, mu, logvar):
    return reference.log_weights(x, _logits64(h, weight, bias), z, mu, logvar)


def _logits64(h, weight, bias):
    logits = h.double() @ weight.double().t()
    return logits + bias.double() if bias is not None else logits


def _leaves(inputs, dtype=None, x_grad=False):
    out = []
    for name, t in zip(NAMES, inputs):
        if t is None:
            out.append(None)
            continue
        t = t.detach().clone().to(dtype or t.dtype)
        out.append(t.requires_grad_(name != "x" or x_grad))
    return out


def _check_gradients(ours, ref, tol=None, loss_of_log_w=None):
    """Each gradient against float64 within ``tol`` (rtol, atol), by default its dtype's.

    With 16-bit inputs and ``loss_of_log_w`` (the scalar the test backpropagated, as a function
    of the float64 log-weights), h's, the weight's and the bias's gradients are held to the
    error bound of their 16-bit dots instead (``helpers.assert_within_dot_bound``)."""
    scales = _dot_error_scales(ref, loss_of_log_w) if loss_of_log_w is not None else {}
    for name, got, want in zip(NAMES, ours, ref):
        if got is None or not got.requires_grad:
            continue
        assert got.grad is not None and got.grad.dtype == got.dtype, f"d/d{name}"
        if name in scales and got.dtype in UNIT_ROUNDOFF:
            assert_within_dot_bound(got.grad, want.grad, scales[name], what=f"d/d{name}")
            continue
        rtol, atol = tol or GRAD_TOL[got.dtype]
        assert_close(got.grad, want.grad, rtol=rtol, atol=atol, what=f"d/d{name}")


def _dot_error_scales(ref, loss_of_log_w):
    """``helpers.dot_error_scales`` of the head's dots, c = dloss/dlogits from the reference."""
    x, h, weight, bias, z, mu, logvar = (t.detach() if t is not None else None for t in ref)
    return dot_error_scales(lambda logits: loss_of_log_w(reference.log_weights(x, logits, z, mu, logvar)),
                            h, weight, bias)


CASES = [
    # B, k, D, H, d, options
    pytest.param(3, 5, 37, 21, 4, {}, id="k=5-D=37-H=21"),
    pytest.param(2, 3, 784, 24, 6, {}, id="D=784-H=24"),
    pytest.param(3, 1, 50, 20, 3, {}, id="k=1"),
    pytest.param(2, 13, 40, 30, 5, {"bias": False}, id="k=13-no-bias"),
    pytest.param(3, 9, 40, 24, 5, {"dtype": torch.bfloat16}, id="bfloat16"),
    pytest.param(2, 6, 33, 20, 3, {"dtype": torch.float16}, id="float16"),
    pytest.param(3, 7, 33, 18, 4, {"strided_h": True}, id="strided-h"),
]


@pytest.mark.parametrize("B, k, D, H, d, options", CASES)
def test_bound_and_gradients_match_float64(B, k, D, H, d, options, device):
    inputs = make_head_case(B, k, D, H, d, device=device, **options)
    ours = _leaves(inputs)
    got = fused_linear_iwae_bound(*ours)
    assert got.dtype == torch.float32 and got.shape == (B,)
    ref = _leaves(inputs, torch.float64)
    want = reference_head_bound(*ref)
    assert_close(got, want, what="bound")
    weights = torch.randn(B, device=device)
    (got * weights).sum().backward()
    (want * weights.double()).sum().backward()
    _check_gradients(ours, ref, loss_of_log_w=lambda log_w: (reference.iwae_bound(log_w) * weights.double()).sum())


def test_realistic_head_is_float32_accurate_in_every_lane(device):
    """The decoder head at MNIST scale (D = 784, H = 200: a ragged last D-tile, log-weights
    near -700): within 2e-3 nats of float64, absolute, like the logits path. Caught: the
    padded lanes (logit -65504) visited after a lane's running sum is non-zero (0.02 nats)."""
    from iwae_bench.problems import Problem, make_inputs

    x, h, weight, bias, z, mu, logvar = make_inputs(Problem(4, 64, 50, 784, "float32", 0, "realistic", 200),
                                                    torch.device(device))[:7]
    want = reference_head_log_weights(*_leaves((x, h, weight, bias, z, mu, logvar), torch.float64))
    got = fused_linear_log_weights(x, h, weight, bias, z, mu, logvar)
    assert_close(got, want, rtol=0.0, atol=2e-3, what="log_w")
    assert_close(fused_linear_iwae_bound(x, h, weight, bias, z, mu, logvar), reference.iwae_bound(want),
                 rtol=0.0, atol=2e-3, what="bound")


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["exact", "tf32"])
def test_float32_follows_torchs_tf32_switch(allow_tf32, device):
    """float32 h and W: tensor-core TF32 dots when torch.backends.cuda.matmul.allow_tf32 is on,
    the exact path when off; 16-bit inputs always take the tensor cores. On a GPU (the compiled
    suite) this checks the TF32 numbers against float64 within TF32's rounding (10-bit
    mantissas: logits off by ~1e-3, the bound by a fraction of a nat over D = 784); on a CPU
    the interpreter computes either in float32."""
    from kernels.fused_linear import _dot_options

    with matmul_tf32(allow_tf32):
        inputs = make_head_case(2, 5, 784, 64, 4, device=device)
        assert _dot_options(inputs[1], inputs[2])["INPUT_PRECISION"] == ("tf32" if allow_tf32 else "ieee")
        half = make_head_case(2, 5, 784, 64, 4, dtype=torch.bfloat16, device=device)
        assert _dot_options(half[1], half[2])["INPUT_PRECISION"] == "tf32"
        ours, ref = _leaves(inputs), _leaves(inputs, torch.float64)
        got, want = fused_linear_iwae_bound(*ours), reference_head_bound(*ref)
        rtol, atol = (1e-3, 0.5) if allow_tf32 else (2e-5, 2e-3)
        assert_close(got, want, rtol=rtol, atol=atol, what="bound")
        got.sum().backward()
        want.sum().backward()
        for name, a, b in zip(NAMES, ours, ref):
            if a is not None and a.requires_grad:
                tol = (2e-2, 2e-2) if allow_tf32 else GRAD_TOL[torch.float32]
                assert_close(a.grad, b.grad, rtol=tol[0], atol=tol[1], what=f"d/d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_log_weights_and_their_gradients_match_float64(dtype, device):
    """The log-weights entry point (the multi-sample ELBO is their mean), x's gradient included."""
    B, k = 3, 11
    inputs = make_head_case(B, k, 45, 26, 4, dtype=dtype, device=device)
    ours = _leaves(inputs, x_grad=True)
    got = fused_linear_log_weights(*ours)
    assert got.dtype == torch.float32 and got.shape == (B, k)
    ref = _leaves(inputs, torch.float64, x_grad=True)
    want = reference_head_log_weights(*ref)
    assert_close(got, want, what="log_w")
    assert_close(got.mean(1), reference.elbo(want), what="multi-sample ELBO")
    weights = torch.randn(B, k, device=device)
    (got * weights).sum().backward()
    (want * weights.double()).sum().backward()
    _check_gradients(ours, ref, loss_of_log_w=lambda log_w: (log_w * weights.double()).sum())


def test_split_paths_match_float64(device):
    """Forced splits everywhere: k split over three forward programs per example (partials
    combined by the last ticket), the dh kernel over two splits of two sample blocks each
    (its dx partials stored by the first block, added by the second), the dW kernel over
    three row ranges that cut across examples; run twice (tickets back to zero)."""
    B, k, D, H, d = 2, 200, 40, 20, 3
    inputs = make_head_case(B, k, D, H, d, device=device)
    ref = _leaves(inputs, torch.float64, x_grad=True)
    want = reference_head_bound(*ref)
    weights = torch.randn(B, device=device)
    (want * weights.double()).sum().backward()
    for _ in range(2):
        bound, lse, log_w = fused_linear_forward(*inputs, save_log_w=True, splits=3)
        assert_close(bound, want, what="bound")
        assert_close(log_w, reference_head_log_weights(*inputs), what="saved log_w")
        coef = bound_coefficients(weights, log_w, lse)
        grads = fused_linear_backward(*inputs, coef, plan=split_plan(B, k, device, SPLIT_QUANTUM, 2),
                                      row_plan=dw_row_plan(B * k, D, device, splits=3))
        for name, got, leaf in zip(NAMES, grads, ref):
            assert_close(got, leaf.grad, *GRAD_TOL[torch.float32], what=f"d/d{name}")


def _flush_case(device):
    """D = 40 000 pixels, logits near 0 (std about 0.18): factors 1 + exp(-|l|) near 2, so one
    lane's product over its D-tiles passes 2**128 (float32 overflows) well before the last
    tile. Checked here for the widest D-tile any tiling of the forward uses (the interpreter's;
    a narrower tile's lane multiplies the factors of several of these lanes, so more)."""
    B, k, D, H, d = 1, 3, 40_000, 16, 3
    x, h, weight, bias, z, mu, logvar = make_head_case(B, k, D, H, d, logit_scale=0.25, device=device)
    inputs = (x, h, weight, bias * 0.1, z, mu, logvar)
    tiling = _fused_linear_forward.tiling
    widest = max([config.kwargs["BLOCK_D"] for config in tiling.configs]
                 + [tiling.interpreter(rows=k, D=D, H=H, elem=4, precision="ieee")["BLOCK_D"]])
    assert math.ceil(D / widest) > 2 * PROD_GROUP  # three groups, the last one partial
    logits = _logits64(*inputs[1:4])
    padded = torch.nn.functional.pad(logits, (0, -D % widest), value=math.inf)  # factor 1
    lane_bits = torch.log2(1 + torch.exp(-padded.abs())).unflatten(-1, (-1, widest)).sum(-2)
    assert lane_bits.min() > 128, "the test needs products that overflow float32 unflushed"
    return inputs


@pytest.mark.parametrize("entry, reference_fn, grad_tol", [
    (fused_linear_log_weights, reference_head_log_weights, None),
    (fused_linear_iwae_bound, reference_head_bound, (2e-3, 1e-4)),
], ids=["log_weights", "iwae_bound"])
def test_product_groups_flush_past_the_group_length(entry, reference_fn, grad_tol, device):
    """More than 2 PROD_GROUP D-tiles (``_flush_case``): each lane's product of factors is
    flushed (one log) and restarted twice, the last group partial. Unflushed, the product
    overflows and log w is -inf; a group's log dropped or counted twice moves log w by
    thousands of nats; one lane's factor lost, by about 0.6 nats: the forward is held to
    1e-6 relative (0.03 nats at log w near -3.2e4). The backward kernels take no products
    (one sigmoid per logit) but rebuild the same tiles (dh sums over them, dW has one program
    per tile), and for the bound take the weights exp(log w - lse) from the forward: float32
    resolves log w and lse near -3.2e4 to about 1e-3 nats, so those gradients only to about
    1e-3 relative (``grad_tol``)."""
    inputs = _flush_case(device)
    ours = _leaves(inputs, x_grad=True)
    got = entry(*ours)
    ref = _leaves(inputs, torch.float64, x_grad=True)
    want = reference_fn(*ref)
    assert_close(got, want, rtol=1e-6, what=entry.__name__)
    weights = torch.randn(got.shape, device=device)
    (got * weights).sum().backward()
    (want * weights.double()).sum().backward()
    _check_gradients(ours, ref, grad_tol)


def test_product_groups_flush_in_every_split_of_k(device):
    """The same flush with k split over two forward programs per example (the split path
    shares the D loop; its partial logsumexps are combined by the last program)."""
    inputs = _flush_case(device)
    bound, _, log_w = fused_linear_forward(*inputs, save_log_w=True, splits=2)
    assert_close(log_w, reference_head_log_weights(*inputs), rtol=1e-6, what="log_w")
    assert_close(bound, reference_head_bound(*inputs), rtol=1e-6, what="bound")


def test_infinite_bias_follows_the_rule(device):
    """An infinite bias makes that pixel's logit infinite for every sample: on x's side it adds
    0, off it the sample (so the example) is -inf. Values as the reference; gradients finite,
    zero for the -inf examples, and the reference's on the finite ones."""
    inputs = list(make_head_case(4, 5, 20, 16, 3, device=device))
    x, bias = inputs[0], inputs[3]
    bias[0], bias[1] = float("inf"), float("-inf")
    x[:, 0] = torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)  # +inf logit: on x = 1's side
    x[:, 1] = torch.tensor([0.0, 0.0, 1.0, 0.0], device=device)  # -inf logit: on x = 0's side
    want = reference_head_bound(*inputs)
    assert torch.isfinite(want[[0, 3]]).all() and (want[[1, 2]] == float("-inf")).all()
    assert_close(fused_linear_log_weights(*inputs), reference_head_log_weights(*inputs), what="log_w")
    ours = _leaves(inputs)
    got = fused_linear_iwae_bound(*ours)
    assert_close(got, want, what="bound")
    torch.autograd.backward(got, torch.tensor([1.0, 0.0, 0.0, 1.0], device=device))
    finite = [0, 3]
    ref = _leaves([t[finite] if name in ("x", "h", "z", "mu", "logvar") else t
                   for name, t in zip(NAMES, inputs)], torch.float64)
    reference_head_bound(*ref).sum().backward()
    for name, got_t, want_t in zip(NAMES, ours, ref):
        if name == "x":
            continue
        assert torch.isfinite(got_t.grad).all(), f"d/d{name}"
        per_example = name in ("h", "z", "mu", "logvar")
        if per_example:
            assert (got_t.grad[[1, 2]] == 0).all(), f"d/d{name} of a -inf example"
        assert_close(got_t.grad[finite] if per_example else got_t.grad, want_t.grad,
                     *GRAD_TOL[torch.float32], what=f"d/d{name}")


class _Allocations(TorchDispatchMode):
    """The element count of every tensor an operation creates while active."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_no_tensor_of_the_logits_size_is_ever_allocated(device):
    """Forward and backward of both entry points allocate nothing of B k D elements or more.
    B k D is larger than every legitimate buffer here: h and its gradient (B k H), W and its
    gradient and partials (D H), log_w and c (B k). The same probe sees the logits of the
    unfused path (h W^T + b, then kernels.fused_iwae_bound)."""
    B, k, D, H, d = 2, 64, 96, 16, 3
    inputs = make_head_case(B, k, D, H, d, device=device)
    limit = B * k * D
    for fn in (fused_linear_iwae_bound, fused_linear_log_weights):
        leaves = _leaves(inputs)
        with _Allocations() as seen:
            fn(*leaves).sum().backward()
        assert max(seen.sizes) < limit, \
            f"{fn.__name__}: a tensor of {max(seen.sizes)} >= B k D = {limit} elements"
        assert B * k * H in seen.sizes  # d/dh: the probe does see the backward's allocations
    x, h, weight, bias, z, mu, logvar = _leaves(inputs)
    with _Allocations() as seen:
        kernels.fused_iwae_bound(x, h @ weight.t() + bias, z, mu, logvar).sum().backward()
    assert max(seen.sizes) >= limit


def test_what_the_forward_keeps_for_the_backward_is_the_inputs_and_o_of_b_k(device):
    """Beside its inputs (the same tensors, not copies) the bound keeps log w [B, k] and lse
    [B]; the log-weights keep the inputs alone. A saved [B, k, H] or [B, k, D] tensor fails."""
    B, k, D, H, d = 2, 8, 24, 16, 3
    for fn, extra in ((fused_linear_iwae_bound, [B * k, B]), (fused_linear_log_weights, [])):
        leaves = _leaves(make_head_case(B, k, D, H, d, device=device))
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = fn(*leaves)
        inputs = {t.data_ptr() for t in leaves}
        others = sorted(t.numel() for t in kept if t.data_ptr() not in inputs)
        assert others == sorted(extra), f"{fn.__name__} keeps tensors of {others} elements"
        assert len(kept) == len(leaves) + len(extra)
        out.sum().backward()  # and the backward runs from what was kept


def _new(inputs, *shape):
    return torch.randn(*shape, device=inputs["x"].device)


@pytest.mark.parametrize("change, match", [
    (lambda t: {**t, "weight": _new(t, 41, 20)}, r"weight must have shape \[40, 20\] \(D, H\)"),
    (lambda t: {**t, "weight": _new(t, 40, 21)}, r"weight must have shape \[40, 20\] \(D, H\)"),
    (lambda t: {**t, "bias": _new(t, 39)}, r"bias must have shape \[40\] \(D\)"),
    (lambda t: {**t, "bias": _new(t, 1, 40)}, r"bias must have shape \[D\]"),
    (lambda t: {**t, "h": t["h"].bfloat16()}, r"weight must have h's dtype torch.bfloat16"),
    (lambda t: {**t, "h": t["h"].double(), "weight": t["weight"].double()},
     r"h must be float32, bfloat16 or float16"),
    (lambda t: {**t, "h": t["h"][:, :0], "z": t["z"][:, :0]}, r"k must be >= 1: h has shape \[2, 0, 20\]"),
    (lambda t: {**t, "x": _new(t, 2, 41)}, r"x must have shape \[2, 40\] \(B, D\)"),
], ids=["weight-D", "weight-H", "bias-D", "bias-2d", "dtypes-differ", "float64-h", "k=0", "x-D"])
def test_bad_input_names_the_argument(change, match, device):
    inputs = dict(zip(NAMES, make_head_case(2, 3, 40, 20, 4, device=device)))
    inputs = change(inputs)
    for fn in (fused_linear_iwae_bound, fused_linear_log_weights):
        with pytest.raises((ValueError, TypeError), match=match):
            fn(*inputs.values())


def test_backward_is_bitwise_deterministic(device):
    """dW and db are partial sums in a fixed order, reduced by one fixed-shape sum: two
    backward runs give the same bits (here over three row ranges, so the sum is real)."""
    B, k, D, H, d = 3, 40, 50, 24, 3
    inputs = make_head_case(B, k, D, H, d, device=device)
    bound, lse, log_w = fused_linear_forward(*inputs, save_log_w=True)
    coef = bound_coefficients(torch.randn(B, device=device), log_w, lse)
    runs = [fused_linear_backward(*inputs, coef, row_plan=dw_row_plan(B * k, D, device, splits=3))
            for _ in range(2)]
    for name, first, second in zip(NAMES, *runs):
        assert torch.equal(first, second), f"d/d{name} differs between two runs"
