"""The importance-weighted family (training/family.py): every objective's value against the
float64 reference written from its paper, the identities between members, every parameter's
gradient for every estimator on both backends against float64 surrogates written from the
definitions, DReG's unbiasedness (with a wrong weight shown to fail), RWS's wake-phi against a
posterior known by quadrature, the kernels' group and split paths, and the refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import kernels
from iwae_bench import reference
from iwae_bench.training import IWAELoss, Objective
from iwae_bench.training.bounds import head_objective_bound, objective_bound
from iwae_bench.training.family import torch_reduce
from kernels.fused_bound import fused_iwae_forward
from kernels.fused_linear import fused_linear_forward
from kernels.lse import logsumexp_forward

from .helpers import assert_close, paired_z_scores
from .test_estimators import LATENT, _data, _forward, _group_mean_gradients, _log_w64, _model

VALUE_CASES = ["iwae", "multi_sample_elbo", "vr:0.5", "vr:-0.5", "vr:1", "vr:2", "miwae:3x4",
               "miwae:4x3", "miwae:12x1", "ciwae:0.3", "piwae:3x4", "rws"]


def _inputs(B=3, k=12, D=37, d=5, seed=0, scale=3.0, device="cpu"):
    """x, logits, z, mu, logvar drawn on the CPU (the same numbers everywhere), then moved to
    the test device (the kernels compiled on a GPU, interpreted on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, D, generator=g) < 0.5).float()
    mu, logvar = torch.randn(B, d, generator=g), 0.3 * torch.randn(B, d, generator=g)
    z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * torch.randn(B, k, d, generator=g)
    return tuple(t.to(device) for t in (x, scale * torch.randn(B, k, D, generator=g), z, mu, logvar))


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("spec", VALUE_CASES)
def test_every_objective_value_matches_its_float64_definition(spec, backend, device):
    objective = Objective.parse(spec)
    inputs = _inputs(device=device)
    want = reference.objective_bound(reference.log_weights(*inputs), objective)
    assert_close(objective_bound(*inputs, objective, backend), want, what=f"{spec} {backend}")


@pytest.mark.parametrize("spec", VALUE_CASES)
def test_a_group_of_no_weight_is_minus_inf_with_a_finite_gradient_on_both_backends(spec, device):
    """An example whose log-weights are all -inf (and one whose second group is): its bound is
    -inf, never NaN, and its gradient finite, the same from torch_reduce (the torch backend)
    as from the reduction kernel and from the fused bound; the finite examples' gradients are
    the float64 reference's."""
    objective = Objective.parse(spec)
    reduction = objective.value(12)
    log_w = 5.0 * torch.randn(3, 12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    log_w[1] = -math.inf
    log_w[2, 4:8] = -math.inf  # VR with alpha > 1 weighs w^(1 - alpha): there one zero weight is enough
    ours = log_w.float().requires_grad_()
    value = torch_reduce(ours, reduction)
    value.sum().backward()
    kernel_w = log_w.float().to(device).requires_grad_()
    kernel_value = kernels.iwae_bound(kernel_w, reduction)
    kernel_value.sum().backward()
    assert value[1] == -math.inf and kernel_value[1].item() == -math.inf
    want = reference.objective_bound(log_w[[0, 2]], objective if spec != "piwae:3x4" else Objective())
    assert_close(value[[0, 2]], want, what=f"{spec} rows 0 and 2 (a -inf group)")
    assert_close(kernel_value.cpu()[[0, 2]], want, what=f"{spec} kernel rows 0 and 2 (a -inf group)")
    assert torch.isfinite(ours.grad).all(), ours.grad
    assert_close(ours.grad, kernel_w.grad.cpu(), rtol=1e-5, atol=1e-6, what=f"{spec} torch vs kernel gradient")
    reference64 = log_w[[0]].clone().requires_grad_()
    reference.objective_bound(reference64, objective if spec != "piwae:3x4" else Objective()).sum().backward()
    assert_close(ours.grad[0], reference64.grad[0], rtol=1e-5, atol=1e-6, what=f"{spec} finite row's gradient")
    # the fused bound from the inputs: an example whose every pixel is certain and wrong
    x, logits, z, mu, logvar = _inputs(device=device)
    logits[1] = math.inf * (1 - 2 * x[1])
    grads = []
    for backend in ("torch", "fused"):
        live = logits.clone().requires_grad_()
        bound = objective_bound(x, live, z, mu, logvar, objective, backend)
        bound.sum().backward()
        assert bound[1].item() == -math.inf and torch.isfinite(live.grad).all(), f"{spec} {backend}"
        grads.append(live.grad.cpu())
    assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6, what=f"{spec} fused vs torch gradient")


@pytest.mark.parametrize("spec", ["vr:0.5", "miwae:3x4", "ciwae:0.3", "multi_sample_elbo"])
def test_the_two_kernel_reduction_computes_the_family(spec, device):
    """kernels.iwae_bound(log_w, reduction): the triton variant's last step, value and gradient."""
    objective = Objective.parse(spec)
    log_w64 = reference.log_weights(*_inputs(device=device)).requires_grad_()
    want = reference.objective_bound(log_w64, objective)
    log_w = log_w64.detach().float().requires_grad_()
    got = kernels.iwae_bound(log_w, objective.value(12))
    assert_close(got, want, what=spec)
    got.sum().backward()
    assert_close(log_w.grad, torch.autograd.grad(want.sum(), log_w64)[0], rtol=1e-5, atol=1e-6,
                 what=f"{spec} d/d log w")


@pytest.mark.parametrize("spec", ["vr:0.5", "miwae:3x4", "ciwae:0.3"])
def test_the_fused_head_computes_the_family(spec, device):
    objective = Objective.parse(spec)
    x, _, z, mu, logvar = _inputs(device=device)
    g = torch.Generator().manual_seed(5)
    h, weight, bias = (t.to(device) for t in (torch.randn(3, 12, 8, generator=g), torch.randn(37, 8, generator=g),
                                              torch.randn(37, generator=g)))
    logits64 = torch.nn.functional.linear(h.double(), weight.double(), bias.double())
    want = reference.objective_bound(reference.log_weights(x, logits64, z, mu, logvar), objective)
    assert_close(head_objective_bound(x, h, weight, bias, z, mu, logvar, objective, "fused"), want, what=spec)


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_identities_between_members(backend, device):
    inputs = _inputs(seed=1, device=device)
    bound = lambda spec: objective_bound(*inputs, spec, backend)  # noqa: E731
    iwae, elbo = bound("iwae"), bound("multi_sample_elbo")
    # the same reduction, so the same bits
    assert torch.equal(bound("vr:0"), iwae)
    assert torch.equal(bound("miwae:1x12"), iwae)
    assert torch.equal(bound("ciwae:0"), iwae)
    assert torch.equal(bound("vr:1"), elbo)
    assert torch.equal(bound("ciwae:1"), elbo)
    # one-sample groups: a logsumexp of one value is that value (sums in another order)
    assert_close(bound("miwae:12x1"), elbo, rtol=1e-6, atol=1e-5, what="MIWAE(k, 1) vs ELBO")
    # VR is non-increasing in alpha on the same samples, and L_k >= ELBO
    alphas = [-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 2.0]
    values = torch.stack([bound(f"vr:{a}") for a in alphas])
    assert (values[1:] <= values[:-1] + 1e-4).all(), values
    assert (values[0] > values[-1] + 1.0).all()  # and not flat


# --------------------------------------------------------------------------- gradients


def _dreg_weight(spec: Objective, log_w):
    """omega_i from the issue's list (the definitions, not the kernels' algebra), float64."""
    k = log_w.shape[1]
    soft = torch.softmax(log_w, dim=1)
    if spec.name == "iwae":
        return soft ** 2
    if spec.name == "vr":
        a = spec.alpha
        soft_a = torch.softmax((1 - a) * log_w, dim=1)
        return a * soft_a + (1 - a) * soft_a ** 2
    if spec.name in ("miwae", "piwae"):
        M, K = spec.groups(k)
        within = torch.softmax(log_w.unflatten(1, (M, K)), dim=2).flatten(1)
        return within ** 2 / M
    if spec.name == "ciwae":
        return spec.beta / k + (1 - spec.beta) * soft ** 2
    if spec.name == "rws":
        return soft - soft ** 2
    raise AssertionError(spec)


def _bound64(spec: Objective, log_w, encoder: bool):
    """The bound a network trains on, float64: PIWAE's encoder MIWAE, its decoder (and RWS's)
    the IWAE bound, every other member its own value."""
    if spec.name == "piwae" and encoder:
        return reference.miwae_bound(log_w, *spec.groups(log_w.shape[1]))
    return reference.objective_bound(log_w, spec)


def _surrogate_grads(model, x, eps, spec: Objective, estimator, shift=None):
    """Every parameter's gradient in float64 from explicit surrogates: the decoder's from its
    bound with z detached, the encoder's from the estimator's definition."""
    model = copy.deepcopy(model).double()
    x, eps = x.double(), eps.double()
    logits, z, mu, logvar = _forward(model, x, eps)
    if shift is not None:
        logits = logits + shift.double()
    decoder = set(model.decoder.parameters())
    zd = z.detach()
    dec_logits = model.decoder(zd) + (shift.double() if shift is not None else 0.0)
    decoder_loss = -_bound64(spec, _log_w64(x, dec_logits, zd, mu.detach(), logvar.detach()), False).mean()
    if estimator == "iwae":  # the total gradient of the encoder's bound
        encoder_loss = -_bound64(spec, _log_w64(x, logits, z, mu, logvar), True).mean()
    elif estimator == "stl":
        encoder_loss = -_bound64(spec, _log_w64(x, logits, z, mu.detach(), logvar.detach()), True).mean()
    elif estimator == "wake":  # sum_i w~_i grad log q(z_i | x), z_i fixed
        log_w = _log_w64(x, logits, z, mu, logvar).detach()
        log_q = (-0.5 * (zd - mu[:, None]) ** 2 / torch.exp(logvar[:, None]) - 0.5 * logvar[:, None]).sum(-1)
        encoder_loss = -(torch.softmax(log_w, 1) * log_q).sum(1).mean()
    else:  # dreg: sum_i stopgrad(omega_i) log w_i, log q's mu and logvar fixed
        log_w = _log_w64(x, logits, z, mu.detach(), logvar.detach())
        encoder_loss = -(_dreg_weight(spec, log_w.detach()) * log_w).sum(1).mean()
    grads = []
    for p in model.parameters():
        loss = decoder_loss if p in decoder else encoder_loss
        grads.append(torch.autograd.grad(loss, p, retain_graph=True, allow_unused=True)[0])
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, model.parameters())]


def _loss_grads(model, x, eps, spec, estimator, backend, shift=None, device="cpu"):
    """The loss's gradients with a copy of the model and the inputs on ``device``."""
    model = copy.deepcopy(model).to(device)
    x, eps = x.to(device), eps.to(device)
    logits, z, mu, logvar = _forward(model, x, eps)
    if shift is not None:
        logits = logits + shift.to(device)
    loss = IWAELoss(spec, backend, estimator=estimator)(x, logits, z, mu, logvar)
    return [g.cpu() for g in torch.autograd.grad(loss, list(model.parameters()))], loss.cpu()


GRAD_CASES = [("vr:0.5", "iwae"), ("vr:0.5", "stl"), ("vr:0.5", "dreg"), ("vr:-0.5", "dreg"),
              ("miwae:2x3", "iwae"), ("miwae:2x3", "stl"), ("miwae:2x3", "dreg"),
              ("ciwae:0.3", "iwae"), ("ciwae:0.3", "stl"), ("ciwae:0.3", "dreg"),
              ("piwae:2x3", "iwae"), ("piwae:2x3", "stl"), ("piwae:2x3", "dreg"),
              ("rws", "wake"), ("rws", "dreg")]


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("spec, estimator", GRAD_CASES, ids=[f"{s}-{e}" for s, e in GRAD_CASES])
def test_every_parameter_gradient_matches_the_float64_surrogate(spec, estimator, backend, device):
    model, x = _model(), _data()
    spec = Objective.parse(spec)
    eps = torch.randn(x.shape[0], 6, LATENT, generator=torch.Generator().manual_seed(2))
    ours, loss = _loss_grads(model, x, eps, spec, estimator, backend, device=device)
    want = _surrogate_grads(model, x, eps, spec, estimator)
    for (name, _), got, expected in zip(model.named_parameters(), ours, want):
        assert_close(got, expected, rtol=1e-4, atol=2e-5, what=f"{backend} {spec.label} {estimator} d/d{name}")
    # the value is the objective's, whatever the estimator
    logits, z, mu, logvar = _forward(copy.deepcopy(model), x, eps)
    value = reference.objective_bound(_log_w64(x.double(), logits.double(), z.double(), mu.double(),
                                                logvar.double()), spec)
    assert loss.item() == pytest.approx(-value.mean().item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("spec, estimator", GRAD_CASES, ids=[f"{s}-{e}" for s, e in GRAD_CASES])
def test_every_gradient_holds_when_half_the_samples_sit_300_nats_below(spec, estimator, backend, device):
    """The same float64 check with samples 3-5 of each example pushed far below samples 0-2
    (every pixel's logit 60 nats against its x): weights float32 cannot hold must not turn a
    gradient into NaN or drop a term that matters (PIWAE's encoder did, once)."""
    model, x = _model(), _data()
    spec = Objective.parse(spec)
    eps = torch.randn(x.shape[0], 6, LATENT, generator=torch.Generator().manual_seed(2))
    shift = torch.zeros(x.shape[0], 6, x.shape[1])
    shift[:, 3:] = -60.0 * (2 * x[:, None] - 1)
    logits, z, mu, logvar = _forward(copy.deepcopy(model), x, eps)
    log_w = _log_w64(x.double(), (logits + shift).double(), z.double(), mu.double(), logvar.double())
    assert (log_w[:, :3].min(1).values - log_w[:, 3:].max(1).values > 300).all()  # the premise
    ours, _ = _loss_grads(model, x, eps, spec, estimator, backend, shift, device)
    want = _surrogate_grads(model, x, eps, spec, estimator, shift)
    for (name, _), got, expected in zip(model.named_parameters(), ours, want):
        assert_close(got, expected, rtol=1e-4, atol=2e-5, what=f"{backend} {spec.label} {estimator} d/d{name}")


def test_piwae_decoder_weights_are_the_iwae_weights_floored_per_group():
    """c_i = w~_g,i max(rho_g, 2^-50): the IWAE's weight w~_i for a group 10 nats below the
    best, and w~_g,i 2^-50 for one 60 nats below (rho_g = e^-60 is under the floor)."""
    log_w = torch.tensor([[0.0, -1.0, -2.0, -10.0, -11.0, -12.0, -60.0, -61.0, -62.0]], dtype=torch.float64)
    coef = Objective.parse("piwae:3x3").decoder_weights(log_w.float()).double()
    iwae = torch.softmax(log_w, dim=1)
    within = torch.softmax(log_w.view(1, 3, 3), dim=2).view(1, 9)
    assert_close(coef[:, :6], iwae[:, :6], rtol=1e-6, atol=0, what="groups above the floor")
    assert_close(coef[:, 6:], within[:, 6:] * 2.0 ** -50, rtol=1e-6, atol=0, what="the floored group")


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_piwae_loss_on_examples_of_no_weight_has_finite_gradients_alike_on_both_backends(estimator, device):
    """PIWAE's own weights (the floored decoder coefficients, the hook, the score surrogate) on
    an example whose every sample has weight 0 and one whose second group has: the loss is
    +inf, never NaN, every gradient finite, and the two backends agree."""
    model, x = _model(), _data()
    eps = torch.randn(x.shape[0], 6, LATENT, generator=torch.Generator().manual_seed(2))
    shift = torch.zeros(x.shape[0], 6, x.shape[1])
    shift[1] = -math.inf * (2 * x[1] - 1)  # every pixel certain and wrong: log w = -inf
    shift[2, 3:] = -math.inf * (2 * x[2] - 1)
    results = [_loss_grads(model, x, eps, "piwae:2x3", estimator, backend, shift, device)
               for backend in ("torch", "fused")]
    for grads, loss in results:
        assert loss.item() == math.inf and all(torch.isfinite(g).all() for g in grads)
    for (name, _), torch_grad, fused_grad in zip(model.named_parameters(), results[0][0], results[1][0]):
        assert_close(fused_grad, torch_grad, rtol=1e-4, atol=2e-5, what=f"piwae {estimator} d/d{name}")


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_piwae_gradients_are_exact_when_a_group_sits_35_nats_below(estimator, backend, device):
    """PIWAE's encoder weights MIWAE's groups equally while its decoder weighs them as the IWAE
    does: a group far below the best has a tiny IWAE weight but an encoder gradient as large as
    any group's (the test above puts it 300 nats below, where float32 cannot hold the weight:
    a NaN in epoch 3 on MNIST before the decoder's weights were floored per group)."""
    model, x = _model(), _data()
    spec = Objective.parse("piwae:2x3")
    eps = torch.randn(x.shape[0], 6, LATENT, generator=torch.Generator().manual_seed(2))
    # the second group's samples: every pixel's logit pushed against its x (per sample)
    shift = torch.zeros(x.shape[0], 6, x.shape[1])
    shift[:, 3:] = -7.0 * (2 * x[:, None] - 1)
    ours, _ = _loss_grads(model, x, eps, spec, estimator, backend, shift, device)
    want = _surrogate_grads(model, x, eps, spec, estimator, shift)
    logits, z, mu, logvar = _forward(copy.deepcopy(model), x, eps)
    log_w = _log_w64(x.double(), (logits + shift).double(), z.double(), mu.double(), logvar.double())
    below = torch.logsumexp(log_w[:, :3], 1) - torch.logsumexp(log_w[:, 3:], 1)
    assert (below > 35).all(), below  # the premise: the second group far below the first
    for (name, _), got, expected in zip(model.named_parameters(), ours, want):
        assert_close(got, expected, rtol=1e-4, atol=2e-5, what=f"{backend} piwae {estimator} d/d{name}")


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_piwae_through_the_fused_head_matches_the_float64_surrogate(estimator, backend, device):
    """IWAELoss.from_hidden (the output layer fused into the bound on the fused backend) feeds
    PIWAE's decoder weights through the head's own log-weights: wide draws (eps scaled 15x)
    and a scaled output layer put the two groups of an example tens of nats apart."""
    model, x = _model(), _data()
    with torch.no_grad():
        model.output_layer.weight.mul_(10.0)
    spec = Objective.parse("piwae:2x3")
    eps = 15.0 * torch.randn(x.shape[0], 6, LATENT, generator=torch.Generator().manual_seed(2))
    want = _surrogate_grads(model, x, eps, spec, estimator)
    logits, z, mu, logvar = _forward(copy.deepcopy(model), x, eps)
    log_w = _log_w64(x.double(), logits.double(), z.double(), mu.double(), logvar.double())
    groups = torch.logsumexp(log_w.view(-1, 2, 3), 2)
    assert ((groups[:, 0] - groups[:, 1]).abs() > 40).any(), groups  # the premise: groups far apart
    mine = copy.deepcopy(model).to(device)
    mu, logvar = mine.encode(x.to(device))
    z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps.to(device)
    loss = IWAELoss(spec, backend, estimator=estimator).from_hidden(x.to(device), mine.decode_hidden(z),
                                                                    mine.output_layer, z, mu, logvar)
    ours = torch.autograd.grad(loss, list(mine.parameters()))
    for (name, _), got, expected in zip(model.named_parameters(), ours, want):
        assert_close(got.cpu(), expected, rtol=1e-4, atol=2e-5, what=f"{backend} head piwae {estimator} d/d{name}")


# --------------------------------------------------------------------------- unbiasedness


UNBIASED = [("vr:0.5", "iwae"), ("miwae:2x3", "iwae"), ("ciwae:0.3", "iwae"), ("piwae:2x3", "iwae"),
            ("rws", "wake")]


@pytest.mark.parametrize("spec, reference_estimator", UNBIASED, ids=[s for s, _ in UNBIASED])
def test_each_dreg_form_is_unbiased(spec, reference_estimator):
    grads = _group_mean_gradients(Objective.parse(spec), [reference_estimator, "dreg"], k=6)
    z = paired_z_scores(grads["dreg"], grads[reference_estimator])
    assert z.max() < 4.5, f"{spec} dreg departs from {reference_estimator}: max z = {z.max():.1f}"


def test_a_wrong_dreg_weight_fails_the_unbiasedness_test(monkeypatch):
    """The same test has the power to see a wrong weight: w~ in place of w~^2 (f = 1 on the
    IWAE surrogate's gradient at z) is STL, biased on the IWAE bound."""
    from iwae_bench.training import family
    from kernels.reweight import ReweightForm

    right = family.Objective.encoder_terms

    def wrong(self, estimator, log_w):
        form, offset, score = right(self, estimator, log_w)
        return (ReweightForm(c=1.0, a=0.0) if estimator == "dreg" else form), offset, score

    monkeypatch.setattr(family.Objective, "encoder_terms", wrong)
    grads = _group_mean_gradients("iwae", ["iwae", "dreg"], k=6)
    z = paired_z_scores(grads["dreg"], grads["iwae"])
    assert z.max() > 8, f"a wrong DReG weight should be visibly biased: max z = {z.max():.1f}"


# --------------------------------------------------------------------------- RWS wake-phi


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_rws_wake_phi_converges_to_the_exact_posterior_gradient(backend, device):
    """One-dimensional latent, Bernoulli pixels with logits a z + c: p(z | x) by quadrature on
    a grid. Wake-phi's expectation is E_p[d log q(z) / d (mu, logvar)] (the gradient of
    -KL(p || q)); the self-normalized estimate converges to it as k grows."""
    a, c = torch.tensor([1.5, -2.0, 0.7, 1.0]), torch.tensor([0.2, -0.3, 0.5, -1.0])
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    mu, logvar = torch.tensor([[0.3]]), torch.tensor([[-0.4]])
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    logits_grid = a.double() * grid[:, None] + c.double()
    log_joint = (-0.5 * grid ** 2 + (x.double() * torch.nn.functional.logsigmoid(logits_grid)
                                     + (1 - x.double()) * torch.nn.functional.logsigmoid(-logits_grid)).sum(1))
    post = torch.softmax(log_joint, 0)
    var = math.exp(logvar.item())
    want = torch.tensor([(post * (grid - mu.item()) / var).sum().item(),
                         (post * 0.5 * ((grid - mu.item()) ** 2 / var - 1.0)).sum().item()])

    def estimate(k, repeats, seed):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(repeats, k, 1, generator=g).to(device)
        m = mu.repeat(repeats, 1).to(device).requires_grad_()
        lv = logvar.repeat(repeats, 1).to(device).requires_grad_()
        z = m[:, None] + torch.exp(0.5 * lv)[:, None] * noise
        logits = a.to(device) * z + c.to(device)
        loss = IWAELoss("rws", backend)(x.repeat(repeats, 1).to(device), logits, z, m, lv)
        dm, dlv = torch.autograd.grad(loss, [m, lv])
        return -repeats * torch.stack([dm.mean(), dlv.mean()]).cpu()  # loss = -mean over the batch

    close = estimate(2000, 8, 0)
    far = estimate(2, 8, 0)
    assert_close(close, want, rtol=0.0, atol=0.05, what="wake-phi at k = 2000")
    assert (close - want).abs().max() < 0.3 * (far - want).abs().max()


# --------------------------------------------------------------------------- kernel paths


def test_groups_straddling_splits_in_the_fused_kernels(device):
    """Each group split over k (K = 600 in three splits) with the mean mixed in (beta) and a
    scale: the split epilogue combines logsumexps and plain sums per group."""
    inputs = _inputs(B=2, k=1200, D=20, d=3, seed=3, scale=1.0, device=device)
    reduction = kernels.Reduction(scale=0.7, groups=2, beta=0.25)
    log_w64 = reference.log_weights(*inputs)
    grouped = log_w64.unflatten(1, (2, 600))
    want = (0.75 * (torch.logsumexp(0.7 * grouped, 2) - math.log(600)) / 0.7 + 0.25 * grouped.mean(2)).mean(1)
    bound, lse, _ = fused_iwae_forward(*inputs, splits=3, reduction=reduction)
    assert_close(bound, want, what="fused bound, split groups")
    assert_close(lse, torch.logsumexp(0.7 * grouped, 2).flatten(), what="per-group lse")
    x, _, z, mu, logvar = inputs
    g = torch.Generator().manual_seed(6)
    h, weight = torch.randn(2, 1200, 8, generator=g).to(device), 0.3 * torch.randn(20, 8, generator=g).to(device)
    head_log_w = reference.log_weights(x, torch.nn.functional.linear(h.double(), weight.double()), z, mu, logvar)
    head_grouped = head_log_w.unflatten(1, (2, 600))
    head_want = (0.75 * (torch.logsumexp(0.7 * head_grouped, 2) - math.log(600)) / 0.7
                 + 0.25 * head_grouped.mean(2)).mean(1)
    head_bound = fused_linear_forward(x, h, weight, None, z, mu, logvar, splits=3, reduction=reduction)[0]
    assert_close(head_bound, head_want, what="fused head, split groups")
    out, _ = logsumexp_forward(log_w64.float().view(4, 600), math.log(600), splits=3, reduction=reduction)
    assert_close(out.view(2, 2).mean(1), want, what="two-kernel reduction, split rows")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "miwae", "M": 4}, "M = 4 groups do not divide k = 6"),
    ({"objective": "miwae", "K": 4}, "group size K = 4 does not divide k = 6"),
    ({"objective": "piwae", "M": 2, "K": 2}, "M x K = 2 x 2 = 4 samples, but k = 6"),
    ({"objective": "ciwae", "beta": 0.5, "kl": "analytic"}, "kl='analytic' applies to the ELBOs"),
], ids=["M-divides", "K-divides", "MxK-is-k", "analytic-ciwae"])
def test_group_and_kl_refusals_name_the_argument(kwargs, message):
    model, x = _model(), _data()
    eps = torch.randn(x.shape[0], 6, LATENT)
    with pytest.raises(ValueError, match=message):
        IWAELoss(**kwargs)(x, *_forward(model, x, eps))


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "vr", "alpha": float("nan")}, "alpha must be a finite number"),
    ({"objective": "vr", "alpha": float("inf")}, "alpha must be a finite number"),
    ({"objective": "ciwae", "beta": 1.5}, r"beta must lie in \[0, 1\]"),
    ({"objective": "ciwae", "beta": float("nan")}, "beta must be a finite number"),
    ({"objective": "ciwae"}, "needs beta"),
    ({"objective": "miwae"}, "needs its groups"),
    ({"objective": "miwae", "M": 0}, "M must be an integer >= 1"),
    ({"objective": "miwae", "K": 2.5}, "K must be an integer >= 1"),
    ({"objective": "iwae", "alpha": 0.5}, "objective 'iwae' takes no parameter"),
    ({"objective": "multi_sample_elbo", "estimator": "dreg"}, "DReG reduces to 'stl'"),
    ({"objective": "rws", "estimator": "stl"}, "objective 'rws' trains its encoder by wake-phi"),
    ({"objective": "iwae", "estimator": "wake"}, "it goes with objective='rws'"),
    ({"objective": "mvae"}, "objective must be one of"),
    ({"objective": "miwae:8"}, "miwae takes its groups as MxK"),
], ids=["alpha-nan", "alpha-inf", "beta-range", "beta-nan", "beta-missing", "groups-missing", "M-zero",
        "K-float", "iwae-alpha", "dreg-elbo", "stl-rws", "wake-iwae", "unknown", "bad-spelling"])
def test_parameters_that_do_not_apply_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IWAELoss(**kwargs)


def test_spellings_read_back():
    for spec in VALUE_CASES:
        assert Objective.parse(spec).label == Objective.parse(Objective.parse(spec).label).label
    assert Objective.parse("miwae:8x8") == Objective("miwae", M=8, K=8)
    assert not Objective.parse("vr:-0.5").lower_bound and Objective.parse("vr:0.5").lower_bound


def test_torch_reduce_is_the_reductions_definition():
    """The torch backend's form against the reference on log w directly (float64 in, float64 out)."""
    log_w = reference.log_weights(*_inputs(seed=4))
    for spec in VALUE_CASES:
        objective = Objective.parse(spec)
        assert_close(torch_reduce(log_w, objective.value(12)), reference.objective_bound(log_w, objective),
                     rtol=1e-12, atol=1e-9, what=spec)


def test_more_groups_than_a_launch_grid_holds_is_refused_naming_groups():
    """The groups are the bound kernels' third grid axis (at most 65535 programs)."""
    k = 65536
    inputs = (torch.empty(1, 3, device="meta"), torch.empty(1, k, 3, device="meta"),
              torch.empty(1, k, 2, device="meta"), torch.empty(1, 2, device="meta"), torch.empty(1, 2, device="meta"))
    with pytest.raises(ValueError, match="groups = 65536 is more than a launch grid's 65535"):
        fused_iwae_forward(*inputs, reduction=kernels.Reduction(groups=k))
