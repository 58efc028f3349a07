"""The training loss: any objective of the family with any estimator that applies, one
argument apart (training/family.py has the math and the derivations).

    loss = IWAELoss("iwae")(x, logits, z, mu, logvar)                    the IWAE bound
    loss = IWAELoss("vr", alpha=0.5, estimator="dreg")(...)              VR-alpha with DReG
    loss = IWAELoss("miwae", M=8, K=8)(...), IWAELoss("piwae:8x8")(...)  groups of the k samples
    loss = IWAELoss("rws")(...)                                          wake-theta + wake-phi

The loss is minus the batch mean of the objective's value (PIWAE and RWS: the IWAE bound over
all samples), whatever the estimator; only the gradients differ:

    iwae   the total gradient of the encoder's bound, through z_i and through q's own
           parameters (mu and logvar inside log q)
    stl    "sticking the landing" (Roeder, Wu & Duvenaud 2017): log q with mu and logvar held
           fixed, so the score-function term is dropped. Unbiased on the ELBOs; biased on the
           importance-weighted bounds with k > 1 (Tucker et al. 2019)
    dreg   doubly reparameterized (Tucker, Lawson, Gu & Maddison 2019): the score term moved
           onto the path through z_i, weight omega_i per sample (family.py derives each)
    wake   RWS's wake-phi: sum_i w~_i grad log q(z_i|x), z_i held fixed (objective "rws" only)

How: the decoder's surrogate (its bound, or PIWAE's linear form in log w; log q's parameters
held fixed unless the estimator is the plain total gradient) gives the decoder its exact
gradient (PIWAE's: to 2^-50 of a floored group's own, family.py); a hook on z multiplies the
gradient arriving at each z_i by the ratio of the encoder's weight to the surrogate's
(``kernels.reweight`` on the fused backend), and a score surrogate adds the q-parameter term
where the estimator keeps one. Exact under these conditions: ``z`` is the reparameterized
sample that fed the decoder (``logits = decoder(z)``), each sample's logits depend on its own
z_i only (no batch norm across samples), z reaches the encoder's parameters only through mu and
logvar, z is used by nothing else in the loss, and the loss is backpropagated once per forward.
The weights are constants of the forward pass (no gradient flows through them).

``backend="torch"`` computes everything with stable PyTorch, ``backend="fused"`` with the
Triton kernels (the bound, its backward and the reweighting in Triton), so training code
switches with one argument.
"""

from __future__ import annotations

import torch

import kernels

from kernels.latent import Latent, as_layers

from .bounds import (BACKENDS, KLS, as_likelihood, check_analytic, check_choice, gaussian_kl, head_log_weights,
                     head_reduced_bound, layer_log_ratio, log_likelihood, log_weights, reduced_bound,
                     torch_reduce)
from .family import ESTIMATORS, as_objective, check_estimator, default_estimator


class IWAELoss(torch.nn.Module):
    """Negative mean bound over the batch: ``loss = IWAELoss("iwae")(x, logits, z, mu, logvar)``.

    x [B, D]; logits [B, k, D] from the decoder at the samples z [B, k, d] drawn (with the
    reparameterization) from q = N(mu, exp(logvar)) of the encoder; mu, logvar [B, d].
    ``objective``: a name of training/family.py with its parameters as keywords (``alpha``;
    ``M`` and/or ``K``; ``beta``), a spelling such as ``"vr:0.5"`` or ``"miwae:8x8"``, or an
    ``Objective``. ``estimator``: "iwae" (the total gradient; the default), "stl", "dreg" or,
    for "rws", "wake" (its default). ``kl``: "sampled" or "analytic" (the ELBOs only). The loss
    value does not depend on the estimator, only its gradients do. ``likelihood``: the decoder's
    p(x|h) (``kernels.Likelihood`` or its spelling, kernels/likelihood.py): logits then hold its
    C channels, [B, k, C D], and a per-pixel scale comes as ``scale=`` [D] at the call.

    Stochastic layers: ``z`` a sequence of layers (``kernels.Latent``, or training/model.py's
    ``Layer``, which also says how q(h2|h1)'s parameters were made), mu and logvar None:
    ``loss(x, *TwoLayerVAE(...)(x, k))``. Each layer's z is hooked as the one z is; family.py
    derives what "q's parameters held fixed" means there (the generalized DReG).
    """

    def __init__(self, objective="iwae", backend: str = "fused", *, estimator: str | None = None,
                 kl: str = "sampled", alpha=None, M=None, K=None, beta=None, likelihood="bernoulli"):
        super().__init__()
        self.likelihood = as_likelihood(likelihood)
        self.spec = as_objective(objective, alpha=alpha, M=M, K=K, beta=beta)
        estimator = default_estimator(self.spec) if estimator is None else estimator
        check_choice("backend", backend, BACKENDS)
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("kl", kl, KLS)
        check_estimator(self.spec, estimator, kl)
        self.objective = self.spec.name
        self.backend = backend
        self.estimator = estimator
        self.kl = kl

    def forward(self, x, logits, z, mu=None, logvar=None, scale=None) -> torch.Tensor:
        self._check_k(logits.shape[1] if isinstance(logits, torch.Tensor) and logits.dim() == 3 else None)
        lik = {"likelihood": self.likelihood, "scale": scale}
        if self.kl == "analytic":
            check_analytic(as_layers(z, mu, logvar))
            bound = (log_likelihood(x, logits, z, mu, logvar, self.backend, **lik).mean(dim=1)
                     - gaussian_kl(mu, logvar))
            return self._mean(x, bound)
        return self._loss(x, z, mu, logvar, lambda latent, reduction, with_log_w: reduced_bound(
            x, logits, *latent, reduction, self.backend, with_log_w, **lik),
            lambda latent: log_weights(x, logits, *latent, self.backend, **lik))

    def from_hidden(self, x, h, linear: torch.nn.Linear, z, mu=None, logvar=None, scale=None) -> torch.Tensor:
        """The same loss from the decoder's last hidden layer h [B, k, H] and its output layer
        ``linear`` (logits = linear(h)): with ``backend="fused"`` the logits are built on chip
        and never stored, forward or backward (``kernels.fused_linear_iwae_bound``); h and the
        layer's weight share one dtype. The estimators act on the gradient at z as before."""
        if self.kl == "analytic":
            raise ValueError("from_hidden takes kl='sampled' only; kl='analytic' needs the logits")
        self._check_k(h.shape[1] if isinstance(h, torch.Tensor) and h.dim() == 3 else None)
        weight, bias = linear.weight, linear.bias
        lik = {"likelihood": self.likelihood, "scale": scale}
        return self._loss(x, z, mu, logvar, lambda latent, reduction, with_log_w: head_reduced_bound(
            x, h, weight, bias, *latent, reduction, self.backend, with_log_w, **lik),
            lambda latent: head_log_weights(x, h, weight, bias, *latent, self.backend, **lik))

    def _check_k(self, k) -> None:
        if k is not None:
            self.spec.check(k, self.estimator, self.kl)

    def _loss(self, x, z, mu, logvar, bound, weights) -> torch.Tensor:
        """-mean bound; ``bound((z, mu, logvar), reduction, with_log_w)`` computes the reduction's
        bound (and the detached log w) from the rest of the inputs, ``weights((z, mu, logvar))``
        the differentiable log w (PIWAE's decoder surrogate); z may be a sequence of stochastic
        layers (mu, logvar None): ``held`` and ``score_terms`` treat each."""
        single = isinstance(z, torch.Tensor)
        samples = [z] if single else [layer.z for layer in z]
        reduction = self.spec.value(samples[0].shape[1])
        if self.estimator == "iwae" and self.spec.name not in ("piwae", "rws"):
            return self._mean(x, bound((z, mu, logvar), reduction, False))
        # q's parameters held fixed in the decoder's surrogate; the encoder's terms added after
        latent = (z, mu.detach(), logvar.detach()) if single else ([held(layer) for layer in z], None, None)
        if self.spec.name == "piwae":  # the IWAE bound's value, its gradient c_i on each log w_i
            live = weights(latent)
            log_w = live.detach()
            coef = self.spec.decoder_weights(log_w)
            surrogate = (coef * live.masked_fill(coef == 0, 0.0)).sum(1)
            value = torch_reduce(log_w, reduction) + (surrogate - surrogate.detach())
        else:
            value, log_w = bound(latent, reduction, True)
        form, offset, score = self.spec.encoder_terms(self.estimator, log_w)
        if form is not None:
            for sample in samples:
                if sample.requires_grad:
                    sample.register_hook(self._reweighter(log_w, offset, form))
        if score is not None:
            surrogate = (score * score_terms(z, mu, logvar)).sum(1)
            value = value + (surrogate - surrogate.detach())
        return self._mean(x, value)

    def _reweighter(self, log_w, offset, form):
        """The hook on z: the gradient at each z_i times f_i (``kernels.reweight``'s form)."""
        if self.backend == "fused":
            return lambda g: kernels.reweight(g, log_w, offset, form)
        factor = form.factor(log_w, offset)
        return lambda g: g * factor.unsqueeze(-1).to(g.dtype)

    @staticmethod
    def _mean(x, bound) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 0:
            raise ValueError("IWAELoss needs a batch of at least one example: x has shape "
                             f"[{', '.join(map(str, x.shape))}] (the mean over no examples is undefined)")
        return -bound.mean()

    def extra_repr(self) -> str:
        return (f"objective={self.spec.label!r}, backend={self.backend!r}, "
                f"estimator={self.estimator!r}, kl={self.kl!r}, likelihood={self.likelihood.label!r}")


def held(layer) -> Latent:
    """A stochastic layer with q's parameters held fixed: for a posterior that depends on another
    layer's sample (``Layer.posterior``: q(h2|h1)) recomputed by that module with its weights
    detached, so the gradient still reaches the sample it is given (h1: a path term of d log w /
    d h1, the generalized DReG's); otherwise mu and logvar detached (q(h1|x)). The prior's
    parameters (the decoder's) stay live."""
    posterior = getattr(layer, "posterior", None)
    if posterior is None:
        mu, logvar = layer.mu.detach(), layer.logvar.detach()
    else:
        weights = {name: p.detach() for name, p in posterior.named_parameters()}
        mu, logvar = torch.func.functional_call(posterior, weights, (layer.given,))
    return Latent(layer.z, mu, logvar, layer.prior_mu, layer.prior_logvar)


def score_terms(z, mu, logvar) -> torch.Tensor:
    """log r(z) [B, k] with every sample held fixed and q's weights live, whose gradient is the
    score term d log q / d phi |z: per stochastic layer (one for a tensor z) log p - log q with
    z detached, a ``Layer.posterior``'s parameters recomputed from its detached given sample;
    the prior is taken as the standard normal, a constant here."""
    total = None
    for layer in ([Latent(z, mu, logvar)] if isinstance(z, torch.Tensor) else z):
        posterior = getattr(layer, "posterior", None)
        mu, logvar = (layer.mu, layer.logvar) if posterior is None else posterior(layer.given.detach())
        term = layer_log_ratio(Latent(layer.z.detach(), mu, logvar))
        total = term if total is None else total + term
    return total
