"""A tiny IWAE trains through the fused kernels exactly as through PyTorch."""

import pytest
import torch

from iwae_bench.training import BernoulliVAE, IWAELoss, objective_bound

from iwae_bench import reference

from .helpers import assert_close, make_case


def _data(n=16, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(4, D, generator=g) < 0.4).float()
    picks = prototypes[torch.randint(0, 4, (n,), generator=g)]
    flips = (torch.rand(n, D, generator=g) < 0.05).float()
    return (picks + flips) % 2


def _train(objective, backend, k, steps=12, device="cpu", estimator="iwae", head=False):
    """Loss trajectory of a tiny VAE trained on the logits or, with ``head``, through
    IWAELoss.from_hidden (the decoder's output layer fused into the bound on the fused backend)."""
    torch.manual_seed(0)
    x = _data().to(device)
    model = BernoulliVAE(data_dim=x.shape[1], latent=4, hidden=32).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = IWAELoss(objective, backend, estimator=estimator)
    noise = torch.Generator(device=device).manual_seed(1)
    losses = []
    for _ in range(steps):
        if head:
            h, z, mu, logvar = model.forward_hidden(x, k, generator=noise)
            loss = loss_fn.from_hidden(x, h, model.output_layer, z, mu, logvar)
        else:
            loss = loss_fn(x, *model(x, k, generator=noise))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("objective, k", [("iwae", 5), ("multi_sample_elbo", 5), ("elbo", 1)])
def test_fused_training_matches_torch(objective, k, device):
    """12 Adam steps, the losses within 1e-5 (they differ by float32 rounding, about 1e-7): a
    gradient off by a tenth of mu in (z - mu) / var parts the trajectories from the second step."""
    fused = _train(objective, "fused", k, device=device)
    torch_ = _train(objective, "torch", k, device=device)
    assert fused[-5:].mean() < fused[:5].mean() - 2.0, f"loss did not fall: {fused.tolist()}"
    assert_close(fused, torch_, rtol=1e-5, atol=1e-5, what=f"{objective} loss trajectory")


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_each_objective_equals_its_definition(backend, device):
    """Against the float64 reference, on both backends: the IWAE bound is the logsumexp minus
    log k, the k-sample ELBO the mean of log w (and they differ: L_1 < L_k here), the VAE's
    ELBO the one log-weight. The loss is minus the batch mean, gradients included."""
    inputs = make_case(4, 8, 20, 3, device=device)
    log_w = reference.log_weights(*inputs)
    iwae = objective_bound(*inputs, objective="iwae", backend=backend)
    msel = objective_bound(*inputs, objective="multi_sample_elbo", backend=backend)
    assert_close(iwae, reference.iwae_bound(log_w), what="iwae")
    assert_close(msel, reference.elbo(log_w), what="multi_sample_elbo")
    assert (iwae > msel + 1e-3).all()
    one = tuple(t[:, :1] if t.dim() == 3 else t for t in inputs)
    assert_close(objective_bound(*one, objective="elbo", backend=backend),
                 reference.log_weights(*one)[:, 0], what="elbo")
    for objective, want_fn in (("iwae", reference.iwae_bound), ("multi_sample_elbo", reference.elbo)):
        x, *rest = inputs
        ours = [t.clone().requires_grad_() for t in rest]
        IWAELoss(objective, backend)(x, *ours).backward()
        ref = [t.double().requires_grad_() for t in rest]
        (-want_fn(reference.log_weights(x, *ref)).mean()).backward()
        for name, got, want in zip(["logits", "z", "mu", "logvar"], ours, ref):
            assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, what=f"{objective} d/d{name}")


# the family through the head: the mean mixed in (ciwae), groups and the PIWAE rescaling at z,
# the wake-phi score term (the head's values for vr and miwae: tests/test_family.py)
HEAD_CASES = [("iwae", "iwae", 5), ("iwae", "dreg", 5), ("multi_sample_elbo", "stl", 5),
              ("ciwae:0.3", "dreg", 6), ("piwae:2x3", "dreg", 6), ("rws", "wake", 6)]


@pytest.mark.parametrize("objective, estimator, k", HEAD_CASES, ids=[f"{o}-{e}" for o, e, _ in HEAD_CASES])
def test_training_through_the_fused_head_matches_the_logits(objective, estimator, k, device):
    """The fused head (logits never stored) trains exactly as torch on the logits, for every
    member of the family and its estimators (they act at z, which reaches the encoder through dh)."""
    on_logits = _train(objective, "torch", k, 12, device, estimator)
    fused_head = _train(objective, "fused", k, 12, device, estimator, head=True)
    torch_head = _train(objective, "torch", k, 12, device, estimator, head=True)
    assert_close(torch_head, on_logits, rtol=1e-6, atol=1e-6, what="torch head vs logits")
    assert_close(fused_head, on_logits, rtol=1e-4, atol=1e-4, what=f"fused head {objective} {estimator}")
    assert fused_head[-3:].mean() < fused_head[:3].mean()


def test_objective_choices_are_checked():
    inputs = make_case(2, 3, 5, 2)
    with pytest.raises(ValueError, match="objective 'elbo' is the one-sample VAE bound and needs k = 1, got k = 3"):
        objective_bound(*inputs, objective="elbo")
    with pytest.raises(ValueError, match="objective must be one of elbo, multi_sample_elbo, iwae, vr, miwae, ciwae, piwae, rws, got 'vae'"):
        IWAELoss("vae")
    with pytest.raises(ValueError, match="backend must be one of torch, fused, got 'cuda'"):
        IWAELoss("iwae", backend="cuda")
