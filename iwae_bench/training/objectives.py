"""Training objectives and their gradient estimators, one argument apart.

Objectives (the loss is minus the batch mean of the bound, whatever the estimator):

    elbo               k = 1:  log w                      (the VAE)
    multi_sample_elbo  any k:  mean_i log w_i             ("average of logs")
    iwae               any k:  logsumexp_i log w_i - log k ("log of average", the IWAE)

Estimators of the gradient, for z_i = mu + exp(logvar / 2) eps_i and w~ = softmax_k(log w):

    iwae   the total gradient: sum_i w~_i grad log w_i, through z_i and through q's own
           parameters (mu and logvar inside log q).
    stl    "sticking the landing" (Roeder, Wu & Duvenaud 2017): log q(z_i | x) evaluated with
           mu and logvar held fixed, so the score-function term is dropped; the decoder's
           gradient is unchanged. Unbiased on the ELBOs; on the IWAE bound with k > 1 it is
           biased (Tucker et al. 2019).
    dreg   doubly reparameterized (Tucker, Lawson, Gu & Maddison 2019), IWAE bound only: the
           decoder's gradient as in iwae; the encoder's sum_i w~_i^2 (d log w_i / d z_i)
           (d z_i / d phi), again with log q's mu and logvar held fixed. Implemented as the
           stl surrogate plus a hook on z that multiplies the gradient arriving at each z_i
           (through the decoder and through log p(z) - log q(z) alike) by w~_i once more.

DReG is exact under these conditions: ``z`` is the reparameterized sample that fed the decoder
(``logits = decoder(z)``) and reaches the encoder's parameters only through mu and logvar; z
is used by nothing else in the loss; and the loss is backpropagated once per forward. The
extra weights are constants of the forward pass (no gradient flows through them).

``backend="torch"`` computes everything with stable PyTorch, ``backend="fused"`` with the
Triton kernels (the bound's backward and DReG's reweighting in Triton), so training code
switches with one argument.
"""

from __future__ import annotations

import torch

from .bounds import (BACKENDS, KLS, OBJECTIVES, check_choice, head_iwae_bound_with_weights,
                     head_objective_bound, iwae_bound_with_weights, objective_bound)

ESTIMATORS = ("iwae", "stl", "dreg")


class IWAELoss(torch.nn.Module):
    """Negative mean bound over the batch: ``loss = IWAELoss("iwae")(x, logits, z, mu, logvar)``.

    x [B, D]; logits [B, k, D] from the decoder at the samples z [B, k, d] drawn (with the
    reparameterization) from q = N(mu, exp(logvar)) of the encoder; mu, logvar [B, d].
    ``estimator``: "iwae" (the total gradient), "stl" or "dreg" (see the module docstring);
    ``kl``: "sampled" or "analytic" (the ELBOs only). The loss value does not depend on the
    estimator, only its gradients do.
    """

    def __init__(self, objective: str = "iwae", backend: str = "fused", *, estimator: str = "iwae",
                 kl: str = "sampled"):
        super().__init__()
        check_choice("objective", objective, OBJECTIVES)
        check_choice("backend", backend, BACKENDS)
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("kl", kl, KLS)
        if kl == "analytic" and objective == "iwae":
            raise ValueError("kl='analytic' applies to the ELBOs (elbo, multi_sample_elbo): the IWAE "
                             "bound has no KL term to take in closed form; use kl='sampled'")
        if estimator == "dreg" and objective != "iwae":
            raise ValueError(f"estimator 'dreg' reweights the IWAE bound's gradient; objective "
                             f"{objective!r} weighs every sample equally, where DReG reduces to "
                             "'stl': use estimator='stl'")
        if estimator == "stl" and kl == "analytic":
            raise ValueError("estimator 'stl' drops the score term of the sampled log q; with "
                             "kl='analytic' there is none to drop: use estimator='iwae'")
        self.objective = objective
        self.backend = backend
        self.estimator = estimator
        self.kl = kl

    def forward(self, x, logits, z, mu, logvar) -> torch.Tensor:
        return self._loss(
            x, z, mu, logvar,
            lambda mu, logvar, kl: objective_bound(x, logits, z, mu, logvar, self.objective, self.backend, kl),
            lambda mu, logvar: iwae_bound_with_weights(x, logits, z, mu, logvar, self.backend))

    def from_hidden(self, x, h, linear: torch.nn.Linear, z, mu, logvar) -> torch.Tensor:
        """The same loss from the decoder's last hidden layer h [B, k, H] and its output layer
        ``linear`` (logits = linear(h)): with ``backend="fused"`` the logits are built on chip
        and never stored, forward or backward (``kernels.fused_linear_iwae_bound``); h and the
        layer's weight share one dtype. The estimators act on the gradient at z as before."""
        if self.kl == "analytic":
            raise ValueError("from_hidden takes kl='sampled' only; kl='analytic' needs the logits")
        weight, bias = linear.weight, linear.bias
        return self._loss(
            x, z, mu, logvar,
            lambda mu, logvar, kl: head_objective_bound(x, h, weight, bias, z, mu, logvar,
                                                        self.objective, self.backend),
            lambda mu, logvar: head_iwae_bound_with_weights(x, h, weight, bias, z, mu, logvar, self.backend))

    def _loss(self, x, z, mu, logvar, bound, weighted) -> torch.Tensor:
        """-mean bound; ``bound(mu, logvar, kl)`` and ``weighted(mu, logvar)`` compute it (the
        latter with DReG's reweighting) from the rest of the inputs."""
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 0:
            raise ValueError("IWAELoss needs a batch of at least one example: x has shape "
                             f"[{', '.join(map(str, x.shape))}] (the mean over no examples is undefined)")
        if self.estimator == "iwae":
            value = bound(mu, logvar, self.kl)
        elif self.estimator == "stl":  # log q with q's parameters held fixed; z keeps its path
            value = bound(mu.detach(), logvar.detach(), "sampled")
        else:  # dreg: the stl surrogate, and the gradient at each z_i reweighted once more
            value, reweight = weighted(mu.detach(), logvar.detach())
            if z.requires_grad:
                z.register_hook(reweight)
        return -value.mean()

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, backend={self.backend!r}, "
                f"estimator={self.estimator!r}, kl={self.kl!r}")
