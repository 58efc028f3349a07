"""Gradient estimators (iwae, stl, dreg) against float64 surrogates written from their
definitions, their (un)biasedness over many paired draws, and the analytic-KL ELBO."""

import copy
import math

import pytest
import torch

from iwae_bench.training import BernoulliVAE, IWAELoss
from iwae_bench.training.bounds import gaussian_kl, objective_bound

from .helpers import assert_close, one_thread, paired_z_scores

D, LATENT, HIDDEN = 6, 2, 8


def _model(seed=0):
    torch.manual_seed(seed)
    return BernoulliVAE(data_dim=D, latent=LATENT, hidden=HIDDEN)


def _data(batch=3, seed=1):
    return (torch.rand(batch, D, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def _forward(model, x, eps):
    """What a training step feeds the loss: z reparameterized from eps, logits = decoder(z)."""
    mu, logvar = model.encode(x)
    z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    return model.decoder(z), z, mu, logvar


def _log_w64(x, logits, z, mu, logvar):
    """float64 log-weights written from the definition (Bernoulli x Gaussian prior / posterior)."""
    x = x.unsqueeze(1)
    log_px = (x * torch.nn.functional.logsigmoid(logits) + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    log_pz = (-0.5 * z * z - 0.5 * math.log(2 * math.pi)).sum(-1)
    mu, logvar = mu.unsqueeze(1), logvar.unsqueeze(1)
    log_qz = (-0.5 * (z - mu) ** 2 / torch.exp(logvar) - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(-1)
    return log_px + log_pz - log_qz


def _surrogate_grads(model, x, eps, objective, estimator):
    """Every parameter's gradient in float64 from the explicit surrogate losses."""
    model = copy.deepcopy(model).double()
    x, eps = x.double(), eps.double()
    params = list(model.parameters())
    logits, z, mu, logvar = _forward(model, x, eps)
    k = eps.shape[1]

    def reduce(log_w):
        if objective == "iwae":
            return torch.logsumexp(log_w, 1) - math.log(k)
        return log_w.mean(1)

    if estimator == "iwae":
        loss = -reduce(_log_w64(x, logits, z, mu, logvar)).mean()
        return torch.autograd.grad(loss, params)
    if estimator == "stl":
        loss = -reduce(_log_w64(x, logits, z, mu.detach(), logvar.detach())).mean()
        return torch.autograd.grad(loss, params)
    # dreg: the decoder from -L_k with z detached; the encoder from
    # -sum_i stopgrad(w~_i^2) log w_i, log q's mu and logvar detached
    decoder = set(model.decoder.parameters())
    detached = z.detach()
    decoder_loss = -reduce(_log_w64(x, model.decoder(detached), detached, mu.detach(), logvar.detach())).mean()
    log_w = _log_w64(x, logits, z, mu.detach(), logvar.detach())
    weights = torch.softmax(log_w.detach(), dim=1)
    encoder_loss = -(weights ** 2 * log_w).sum(1).mean()
    grads = []
    for p in params:
        loss = decoder_loss if p in decoder else encoder_loss
        grads.append(torch.autograd.grad(loss, p, retain_graph=True, allow_unused=True)[0])
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def _loss_grads(model, x, eps, objective, estimator, backend):
    model = copy.deepcopy(model)
    loss = IWAELoss(objective, backend, estimator=estimator)(x, *_forward(model, x, eps))
    return torch.autograd.grad(loss, list(model.parameters())), loss


CASES = [("iwae", "iwae"), ("iwae", "stl"), ("iwae", "dreg"), ("multi_sample_elbo", "iwae"),
         ("multi_sample_elbo", "stl"), ("elbo", "stl")]


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("objective, estimator", CASES, ids=[f"{o}-{e}" for o, e in CASES])
def test_every_parameter_gradient_matches_the_float64_surrogate(objective, estimator, backend, device):
    """Ours on the test device (the fused kernels compiled on a GPU), the surrogate in float64
    on the CPU."""
    model, x = _model(), _data()
    k = 1 if objective == "elbo" else 5
    eps = torch.randn(x.shape[0], k, LATENT, generator=torch.Generator().manual_seed(2))
    on_device = copy.deepcopy(model).to(device)
    ours, loss = _loss_grads(on_device, x.to(device), eps.to(device), objective, estimator, backend)
    want = _surrogate_grads(model, x, eps, objective, estimator)
    for (name, _), got, expected in zip(model.named_parameters(), ours, want):
        assert_close(got.cpu(), expected, rtol=1e-4, atol=2e-5, what=f"{backend} {estimator} d/d{name}")
    # the value does not depend on the estimator
    plain = IWAELoss(objective, backend)(x.to(device), *_forward(on_device, x.to(device), eps.to(device)))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def _group_mean_gradients(objective, estimators, k, groups=300, draws=16):
    """For each group of ``draws`` paired draws (every estimator sees the same eps), the mean
    gradient of each estimator, flattened: {estimator: [groups, parameters]}. The batch holds
    the draws (x repeated), so one backward gives the group mean."""
    model, x = _model(), _data(batch=2)
    x_rep = x.repeat(draws, 1)
    gen = torch.Generator().manual_seed(3)
    out = {e: [] for e in estimators}
    with one_thread():
        for _ in range(groups):
            eps = torch.randn(x_rep.shape[0], k, LATENT, generator=gen)
            for estimator in estimators:
                grads, _ = _loss_grads(model, x_rep, eps, objective, estimator, "torch")
                out[estimator].append(torch.cat([g.flatten() for g in grads]).double())
    return {e: torch.stack(v) for e, v in out.items()}


def test_dreg_is_unbiased_and_stl_is_biased_on_the_iwae_bound():
    grads = _group_mean_gradients("iwae", ["iwae", "stl", "dreg"], k=5)
    dreg = paired_z_scores(grads["dreg"], grads["iwae"])
    assert dreg.max() < 4.5, f"dreg departs from the total gradient: max z = {dreg.max():.1f}"
    stl = paired_z_scores(grads["stl"], grads["iwae"])
    assert stl.max() > 8, f"stl should be visibly biased on the IWAE bound: max z = {stl.max():.1f}"


def test_stl_is_unbiased_on_the_multi_sample_elbo():
    grads = _group_mean_gradients("multi_sample_elbo", ["iwae", "stl"], k=5)
    stl = paired_z_scores(grads["stl"], grads["iwae"])
    assert stl.max() < 4.5, f"stl departs from the total gradient: max z = {stl.max():.1f}"


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_analytic_kl_elbo_is_the_expectation_of_the_sampled_one(backend, device):
    """E_q[log p(z) - log q(z)] = -KL(q || p): over many samples the sampled ELBO's mean
    approaches the analytic one within a few standard errors; their log-likelihood parts agree."""
    g = torch.Generator().manual_seed(4)
    B, k = 3, 4000
    x = (torch.rand(B, D, generator=g) < 0.4).float()
    mu, logvar = torch.randn(B, LATENT, generator=g), torch.randn(B, LATENT, generator=g) * 0.3
    z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * torch.randn(B, k, LATENT, generator=g)
    logits = torch.randn(B, k, D, generator=g)
    on_device = [t.to(device) for t in (x, logits, z, mu, logvar)]
    sampled = objective_bound(*on_device, "multi_sample_elbo", backend).cpu()
    analytic = objective_bound(*on_device, "multi_sample_elbo", backend, kl="analytic").cpu()
    log_w = _log_w64(x.double(), logits.double(), z.double(), mu.double(), logvar.double())
    se = log_w.std(1) / math.sqrt(k)
    assert ((sampled.double() - analytic.double()).abs() < 4 * se).all()
    want_kl = 0.5 * (torch.exp(logvar) + mu ** 2 - 1 - logvar).sum(-1)
    assert_close(gaussian_kl(mu, logvar), want_kl, what="KL")
    # log p(z) - log q(z) at the samples (2 pi cancels); log w less it is log p(x|z)
    z64, mu64, logvar64 = z.double(), mu.double()[:, None], logvar.double()[:, None]
    latent = (-0.5 * z64 ** 2 + 0.5 * (z64 - mu64) ** 2 / torch.exp(logvar64) + 0.5 * logvar64).sum(-1)
    assert_close(analytic, (log_w - latent).mean(1) - want_kl.double(), what="analytic ELBO")


@pytest.mark.parametrize("kwargs, message", [
    ({"estimator": "reinforce"}, "estimator must be one of iwae, stl, dreg, wake, got 'reinforce'"),
    ({"kl": "closed"}, "kl must be one of sampled, analytic, got 'closed'"),
    ({"objective": "iwae", "kl": "analytic"}, "kl='analytic' applies to the ELBOs"),
    ({"objective": "multi_sample_elbo", "estimator": "dreg"}, "estimator 'dreg' reweights an importance-weighted bound"),
    ({"objective": "elbo", "estimator": "stl", "kl": "analytic"}, "with kl='analytic' there is none to drop"),
], ids=["unknown-estimator", "unknown-kl", "analytic-iwae", "dreg-elbo", "stl-analytic"])
def test_choices_that_do_not_apply_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IWAELoss(**{"objective": "iwae", **kwargs})
