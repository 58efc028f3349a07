"""The IWAE paper's two-stochastic-layer model: its sizes, every objective and estimator on both
backends (fused = torch, values = the float64 reference), the total gradient against float64
autograd, the generalized DReG unbiased and the naive one biased, active units per layer."""

import copy
import math

import pytest
import torch

from iwae_bench import reference
from kernels import Latent
from iwae_bench.training import IWAELoss
from iwae_bench.training.family import as_objective
from iwae_bench.training.model import TwoLayerVAE, active_units_per_layer

from .helpers import assert_close, one_thread, paired_z_scores

D = 6


def _model(seed=0, sharpen=1.0):
    """A tiny two-layer model at a generic point: PyTorch's default draw of every layer (nonzero
    biases; the model's own Glorot init zeroes them, a point where the naive DReG's bias is
    small); ``sharpen`` scales q(h2|h1)'s and p(h1|h2)'s weights, so h2's posterior leans on h1
    (where the naive DReG's dropped term is large)."""
    model = TwoLayerVAE(D, latents=(3, 2), hidden=(8, 6))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
        for p in [*model.q2.parameters(), *model.p1.parameters()]:
            p.mul_(sharpen)
    return model


def _data(batch=2, seed=1):
    return (torch.rand(batch, D, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def test_the_default_sizes_are_the_papers():
    model = TwoLayerVAE()
    widths = lambda seq: [(m.in_features, m.out_features) for m in seq if isinstance(m, torch.nn.Linear)]
    assert widths(model.q1.net) == [(784, 200), (200, 200), (200, 200)]  # x -> 200 -> 200 -> (mu1, logvar1)
    assert widths(model.q2.net) == [(100, 100), (100, 100), (100, 100)]  # h1 -> 100 -> 100 -> (mu2, logvar2)
    assert widths(model.p1.net) == [(50, 100), (100, 100), (100, 200)]  # h2 -> 100 -> 100 -> p(h1|h2)
    assert widths(model.decoder) == [(100, 200), (200, 200), (200, 784)]  # h1 -> 200 -> 200 -> logits
    logits, (h1, h2) = model(torch.zeros(2, 784), 3)
    assert logits.shape == (2, 3, 784) and h1.z.shape == (2, 3, 100) and h2.z.shape == (2, 3, 50)
    assert h1.mu.shape == (2, 100) and h1.prior_mu.shape == (2, 3, 100) and h2.mu.shape == (2, 3, 50)
    assert h2.prior_mu is None and h2.given is h1.z


CASES = [("iwae", "iwae"), ("iwae", "stl"), ("iwae", "dreg"), ("vr:0.5", "dreg"), ("miwae:2x2", "dreg"),
         ("ciwae:0.5", "dreg"), ("piwae:2x2", "iwae"), ("piwae:2x2", "dreg"), ("rws", "wake"), ("rws", "dreg"),
         ("multi_sample_elbo", "stl")]



def test_weights_start_at_glorots_heuristic():
    """The paper's initialization: every linear layer's weights uniform on +-sqrt(6 / (fan_in +
    fan_out)) (variance 2 / (fan_in + fan_out)) and zero biases. PyTorch's default (variance
    1 / (3 fan_in), biases nonzero) fails the variance and the bias checks."""
    torch.manual_seed(0)
    for name, layer in TwoLayerVAE().named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        fan_out, fan_in = layer.weight.shape
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w = layer.weight.double()
        assert w.abs().max() <= bound, name
        n = w.numel()  # the sample variance of n uniforms is within a few 1/sqrt(n) of bound^2 / 3
        assert abs(w.var().item() / (bound ** 2 / 3) - 1) < 6 * (0.8 / n) ** 0.5, name
        assert torch.all(layer.bias == 0), name

@pytest.mark.parametrize("objective, estimator", CASES, ids=[f"{o}-{e}" for o, e in CASES])
def test_every_objective_and_estimator_agrees_on_both_backends(objective, estimator, device):
    """The same draws through IWAELoss on each backend (on the test device): one loss value
    (minus the float64 reference's bound of the model's own outputs) and one gradient for
    every parameter."""
    model, x = _model().to(device), _data().to(device)
    results = {}
    for backend in ("torch", "fused"):
        copy_ = copy.deepcopy(model)
        logits, layers = copy_(x, 4, torch.Generator(device=device).manual_seed(2))
        loss = IWAELoss(objective, backend, estimator=estimator)(x, logits, layers)
        results[backend] = (loss, torch.autograd.grad(loss, list(copy_.parameters())))
        log_w = reference.log_weights(x, logits.detach(), [Latent(*layer[:5]) for layer in layers])
        want = -reference.objective_bound(log_w, as_objective(objective)).mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), results["torch"][1], results["fused"][1]):
        assert_close(b, a, rtol=1e-4, atol=1e-5, what=f"{objective} {estimator} d/d{name}")


def test_the_fused_head_trains_the_two_layer_model_as_torch_does(device):
    """IWAELoss.from_hidden (the output layer fused into the bound) with DReG: one gradient."""
    model, x = _model().to(device), _data().to(device)
    results = []
    for backend in ("torch", "fused"):
        copy_ = copy.deepcopy(model)
        h, layers = copy_.forward_hidden(x, 4, torch.Generator(device=device).manual_seed(2))
        loss = IWAELoss("iwae", backend, estimator="dreg").from_hidden(x, h, copy_.output_layer, layers)
        results.append(torch.autograd.grad(loss, list(copy_.parameters())))
    for (name, _), a, b in zip(model.named_parameters(), *results):
        assert_close(b, a, rtol=1e-4, atol=1e-5, what=f"head d/d{name}")


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_the_total_gradient_matches_float64_autograd(backend, device):
    """A float64 model's outputs (the same draws twice) through the loss (float32 inside) and
    through the float64 reference: every parameter's gradient."""
    model, x = copy.deepcopy(_model()).double().to(device), _data().double().to(device)
    grads = []
    for loss_of in (lambda logits, layers: IWAELoss("iwae", backend)(x, logits, layers),
                    lambda logits, layers: -reference.iwae_bound(reference.log_weights(
                        x, logits, [Latent(*layer[:5]) for layer in layers])).mean()):
        logits, layers = model(x, 4, torch.Generator(device=device).manual_seed(2))
        grads.append(torch.autograd.grad(loss_of(logits, layers), list(model.parameters())))
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        assert_close(a, b, rtol=1e-4, atol=1e-5, what=f"{backend} d/d{name}")



def _distributions_log_weights(model, x, k, generator):
    """log w of the two-layer model written from torch.distributions, independent of
    kernels/ and of the package's reference: the same draws as ``model(x, k, generator)``."""
    from torch.distributions import Bernoulli, Normal

    def normal(mean, logvar):
        return Normal(mean, torch.exp(0.5 * logvar))

    mu1, logvar1 = model.q1(x)
    h1 = mu1.unsqueeze(1) + torch.exp(0.5 * logvar1).unsqueeze(1) * torch.randn(
        (x.shape[0], k, mu1.shape[-1]), generator=generator, dtype=x.dtype)
    mu2, logvar2 = model.q2(h1)
    h2 = mu2 + torch.exp(0.5 * logvar2) * torch.randn(mu2.shape, generator=generator, dtype=x.dtype)
    prior_mu, prior_logvar = model.p1(h2)
    return (Bernoulli(logits=model.decoder(h1)).log_prob(x.unsqueeze(1)).sum(-1)
            + normal(prior_mu, prior_logvar).log_prob(h1).sum(-1) + Normal(0.0, 1.0).log_prob(h2).sum(-1)
            - normal(mu1.unsqueeze(1), logvar1.unsqueeze(1)).log_prob(h1).sum(-1)
            - normal(mu2, logvar2).log_prob(h2).sum(-1))


@pytest.mark.parametrize("objective, k", [("elbo", 1), ("multi_sample_elbo", 5), ("iwae", 5)])
def test_the_loss_and_gradients_match_torch_distributions(objective, k):
    """The VAE, the k-sample ELBO and the IWAE of the two-layer model against log w from
    torch.distributions (float64 model and data): loss and every parameter's gradient."""
    model, x = copy.deepcopy(_model()).double(), _data(batch=3).double()
    logits, layers = model(x, k, torch.Generator().manual_seed(2))
    loss = IWAELoss(objective, "torch")(x, logits, layers)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    log_w = _distributions_log_weights(model, x, k, torch.Generator().manual_seed(2))
    bound = log_w.mean(dim=1) if objective != "iwae" else torch.logsumexp(log_w, dim=1) - math.log(k)
    assert_close(loss, -bound.mean(), rtol=1e-5, atol=1e-4, what=f"{objective} loss")
    theirs = torch.autograd.grad(-bound.mean(), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), ours, theirs):
        assert_close(a, b, rtol=1e-4, atol=1e-5, what=f"{objective} d/d{name}")

def _naive(layers):
    """Plain DReG on stochastic layers: every posterior's parameters detached outright."""
    return tuple(layer._replace(posterior=None, given=None) for layer in layers)


def _group_mean_gradients(model, x, estimators, k=5, groups=300, draws=16):
    """Per group of ``draws`` paired draws (each estimator sees the same noise), the mean
    gradient of each: {estimator: [groups, parameters]}; "naive" is DReG on ``_naive`` layers."""
    x_rep = x.repeat(draws, 1)
    gen = torch.Generator().manual_seed(3)
    params = list(model.parameters())
    out = {e: [] for e in estimators}
    with one_thread():
        for _ in range(groups):
            state = gen.get_state()
            for estimator in estimators:
                gen.set_state(state)
                logits, layers = model(x_rep, k, gen)
                if estimator == "naive":
                    layers = _naive(layers)
                loss = IWAELoss("iwae", "torch", estimator="dreg" if estimator == "naive" else estimator)(
                    x_rep, logits, layers)
                out[estimator].append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double())
    return {e: torch.stack(v) for e, v in out.items()}


def test_generalized_dreg_is_unbiased_and_naive_dreg_is_biased():
    """Measured at 300 groups of 16 draws, k = 5, q(h2|h1) and p(h1|h2) weights x3: the
    generalized DReG's largest z-score over 252 parameters 2.8 (none above 4); the naive
    one's 13.0 (103 above 4)."""
    grads = _group_mean_gradients(_model(sharpen=3.0), _data(), ["iwae", "dreg", "naive"])
    general = paired_z_scores(grads["dreg"], grads["iwae"])
    assert general.max() < 4.5, f"generalized dreg departs from the total gradient: max z = {general.max():.1f}"
    naive = paired_z_scores(grads["naive"], grads["iwae"])
    assert naive.max() > 8, f"naive dreg should be visibly biased: max z = {naive.max():.1f}"


def test_piwae_total_gradient_is_miwae_for_the_encoder_and_iwae_for_the_decoder():
    """PIWAE with the total gradient, exactly (no sampling error): the encoder's gradient is the
    MIWAE bound's, the decoder's the IWAE bound's, both by float64 autograd of the reference;
    checks the score surrogate of q(h2|h1) (its parameters from the detached h1)."""
    model, x = copy.deepcopy(_model()).double(), _data().double()
    encoder = {id(p) for p in [*model.q1.parameters(), *model.q2.parameters()]}
    params = list(model.parameters())

    def grads(loss_of):
        logits, layers = model(x, 4, torch.Generator().manual_seed(2))
        return torch.autograd.grad(loss_of(logits, layers), params)

    def reference_loss(bound):
        return lambda logits, layers: -bound(reference.log_weights(
            x, logits, [Latent(*layer[:5]) for layer in layers])).mean()

    ours = grads(lambda logits, layers: IWAELoss("piwae:2x2", "torch")(x, logits, layers))
    miwae = grads(reference_loss(lambda log_w: reference.miwae_bound(log_w, 2, 2)))
    iwae = grads(reference_loss(reference.iwae_bound))
    for (name, p), got, enc, dec in zip(model.named_parameters(), ours, miwae, iwae):
        assert_close(got, enc if id(p) in encoder else dec, rtol=1e-4, atol=1e-5, what=f"piwae d/d{name}")


def _units_model(h1_active: int, h1_logvar: float) -> TwoLayerVAE:
    """A model whose q1 mean moves with x in its first ``h1_active`` units only (posterior
    log-variance ``h1_logvar``) and whose q2 mean reads h1 in unit 0 only."""
    torch.manual_seed(0)
    model = TwoLayerVAE(D, latents=(4, 3), hidden=(8, 6))
    with torch.no_grad():
        for q, active, logvar in ((model.q1, h1_active, h1_logvar), (model.q2, 1, -8.0)):
            last = q.net[-1]
            d = last.out_features // 2
            last.weight.zero_()
            last.bias.zero_()
            last.weight[:active] = 3.0 * torch.randn(active, last.in_features)
            last.bias[d:] = logvar
    return model


def test_active_units_per_layer():
    """Units whose posterior mean moves with x: h1's first two, h2's first (reading h1). With
    no h1 unit active, h2's mean E_q(h1|x)[mu2(h1)] does not move with x however widely h1 is
    drawn (a single draw of h1 would make it look active)."""
    x = (torch.rand(200, D, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    assert active_units_per_layer(_units_model(2, -8.0), x, generator=torch.Generator().manual_seed(5)) == [2, 1]
    assert active_units_per_layer(_units_model(0, 1.0), x, samples=4096,
                                  generator=torch.Generator().manual_seed(5)) == [0, 0]


def test_the_two_layer_model_trains():
    torch.manual_seed(0)
    x = _data(batch=16, seed=6)
    model = TwoLayerVAE(D, latents=(3, 2), hidden=(16, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = IWAELoss("iwae", "torch", estimator="dreg")
    gen = torch.Generator().manual_seed(7)
    losses = []
    with one_thread():
        for _ in range(60):
            loss = loss_fn(x, *model(x, 5, gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
