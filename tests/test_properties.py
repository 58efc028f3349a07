"""Property tests (hypothesis): the kernels agree with the float64 reference on arbitrary small
shapes and values, special values included."""

import math

import pytest
import torch

pytest.importorskip("hypothesis")  # a test extra (CI has it); a bare GPU image may not
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kernels
from iwae_bench import reference

from .helpers import assert_close

SPECIAL = st.sampled_from([float("-inf"), float("inf"), float("nan")])
FINITE = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@st.composite
def log_weight_rows(draw):
    rows = draw(st.integers(1, 5))
    k = draw(st.integers(1, 70))
    values = draw(st.lists(st.one_of(FINITE, FINITE, FINITE, SPECIAL), min_size=rows * k,
                           max_size=rows * k))
    return torch.tensor(values, dtype=torch.float32).view(rows, k)


@settings(max_examples=60, deadline=None)
@given(log_w=log_weight_rows())
def test_iwae_bound_matches_reference_on_any_values(log_w, device):
    want = reference.iwae_bound(log_w)
    log_w = log_w.to(device)
    assert_close(kernels.iwae_bound(log_w), want, what="iwae_bound")
    assert_close(kernels.logsumexp(log_w), torch.logsumexp(log_w.double(), -1), what="logsumexp")


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), k=st.integers(1, 40), D=st.integers(1, 70), d=st.integers(1, 9),
       scale=st.floats(0.1, 60.0), seed=st.integers(0, 2**16), binary=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_bound_matches_reference_on_any_shape(B, k, D, d, scale, seed, binary, dtype, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, D, generator=g)
    if binary:
        x = (x < 0.5).float()
    logits = (torch.randn(B, k, D, generator=g) * scale).clamp(-60, 60).to(dtype)
    z = torch.randn(B, k, d, generator=g)
    mu = torch.randn(B, d, generator=g)
    logvar = torch.randn(B, d, generator=g) * 0.5
    want_w = reference.log_weights(x, logits, z, mu, logvar)
    x, logits, z, mu, logvar = (t.to(device) for t in (x, logits, z, mu, logvar))
    assert_close(kernels.log_weights(x, logits, z, mu, logvar), want_w, what="log_w")
    got = kernels.fused_iwae_bound(x, logits, z, mu, logvar)
    assert_close(got, reference.iwae_bound(want_w), what="bound")
    got = got.cpu()
    assert (got.double() >= reference.elbo(want_w) - 1e-3 * (1 + want_w.abs().max())).all()
    assert math.isfinite(got.sum().item())
