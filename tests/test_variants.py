"""The five registered variants against the float64 reference, and bad input everywhere."""

import pytest
import torch

import kernels
from iwae_bench import reference, variants
from iwae_bench.problems import Problem, make_inputs

from .helpers import assert_close, make_case

STABLE = ["torch", "compile", "triton", "fused"]


def test_registry_holds_the_five_variants():
    assert list(variants.VARIANTS) == ["naive", "torch", "compile", "triton", "fused"]
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        variants.get("nope")


@pytest.mark.parametrize("name", STABLE)
@pytest.mark.parametrize("problem", [
    Problem(batch=4, k=16, latent=8),
    Problem(batch=3, k=7, latent=50, dtype="bfloat16"),
], ids=["realistic-f32", "realistic-bf16"])
def test_stable_variants_match_reference(name, problem, device):
    inputs = make_inputs(problem, device)
    got = variants.get(name)(*inputs)
    assert got.dtype == torch.float32 and got.shape == (problem.batch,)
    assert_close(got, reference.bound(*inputs), what=name)


@pytest.mark.parametrize("name", ["torch", "triton", "fused"])
def test_stable_variants_on_adversarial_inputs(name, device):
    for options in ({"logit_scale": 60.0}, {"noncontiguous": True}, {"binary": False}):
        inputs = make_case(3, 9, 50, 4, device=device, **options)
        assert_close(variants.get(name)(*inputs), reference.bound(*inputs), what=f"{name} {options}")


def test_naive_equals_reference_where_finite(device):
    # small D and mild logits: the weights stay inside float32's range and BCE's clamp
    inputs = make_case(4, 10, 8, 3, logit_scale=2.0, device=device)
    got = variants.get("naive")(*inputs)
    assert torch.isfinite(got).all()
    assert_close(got, reference.bound(*inputs), what="naive")


def test_naive_underflows_at_realistic_scale(device):
    inputs = make_inputs(Problem(batch=4, k=16, latent=50), device)
    want = reference.bound(*inputs)
    assert torch.isfinite(want).all() and (want < -110).all()  # exp(-110) < float32's tiniest
    got = variants.get("naive")(*inputs)
    assert (got == float("-inf")).all()
    assert torch.isfinite(variants.get("torch")(*inputs)).all()


# --------------------------------------------------------------------------- bad input

ENTRY_POINTS = {
    "kernels.log_weights": kernels.log_weights,
    "kernels.fused_iwae_bound": kernels.fused_iwae_bound,
    **{f"variant {n}": variants.get(n) for n in variants.VARIANTS},
}


def _good():
    return dict(zip(["x", "logits", "z", "mu", "logvar"], make_case(3, 4, 10, 2)))


def _with(**changes):
    inputs = _good()
    inputs.update(changes)
    return inputs


BAD_INPUTS = [
    pytest.param(_with(logits=torch.zeros(3, 10)), ValueError, r"logits must have shape \[B, k, D\] \(3 dims\), got shape \[3, 10\]", id="logits-2d"),
    pytest.param(_with(x=torch.zeros(4, 10)), ValueError, r"x must have shape \[3, 10\] .* got \[4, 10\]", id="x-batch"),
    pytest.param(_with(x=torch.zeros(3, 11)), ValueError, r"x must have shape \[3, 10\] .* got \[3, 11\]", id="x-data-dim"),
    pytest.param(_with(z=torch.zeros(3, 5, 2)), ValueError, r"z must have shape \[3, 4, 2\] .* got \[3, 5, 2\]", id="z-k"),
    pytest.param(_with(mu=torch.zeros(3, 3)), ValueError, r"mu must have shape \[3, 2\] .* got \[3, 3\]", id="mu-latent"),
    pytest.param(_with(logvar=torch.zeros(2)), ValueError, r"logvar must have shape \[B, d\] \(2 dims\), got shape \[2\]", id="logvar-1d"),
    pytest.param(_with(logits=torch.zeros(3, 4, 10, dtype=torch.int64)), TypeError, r"logits must be a floating tensor .* got torch.int64", id="logits-int"),
    pytest.param(_with(x=torch.zeros(3, 10, dtype=torch.bool)), TypeError, r"x must be a floating tensor .* got torch.bool", id="x-bool"),
    pytest.param(_with(mu=[[0.0, 0.0]] * 3), TypeError, r"mu must be a torch.Tensor, got list", id="mu-list"),
    pytest.param(_with(logits=torch.zeros(3, 0, 10), z=torch.zeros(3, 0, 2)), ValueError, r"k must be >= 1: logits has shape \[3, 0, 10\]", id="k-0"),
    pytest.param(_with(z=torch.zeros(3, 4, 2, device="meta")), ValueError, r"all inputs must be on one device, got .*z on meta", id="device-mismatch"),
]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=str)
@pytest.mark.parametrize("inputs, error, message", BAD_INPUTS)
def test_bad_input_names_the_argument(entry, inputs, error, message):
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](**inputs)


def test_bad_log_weights_for_the_reduction():
    with pytest.raises(ValueError, match=r"k must be >= 1: log_w has shape \[4, 0\]"):
        kernels.iwae_bound(torch.zeros(4, 0))
    with pytest.raises(TypeError, match=r"log_w must be a floating tensor .* got torch.int32"):
        kernels.iwae_bound(torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"t must have at least one dimension"):
        kernels.logsumexp(torch.tensor(1.0))
