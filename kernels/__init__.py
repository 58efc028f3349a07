"""Triton kernels for importance-weighted bounds.

    logsumexp(t)                              [..., K] -> [...]
    iwae_bound(log_w)                         [..., k] -> [...]   logsumexp - log k
    Likelihood.parse("gaussian:sample")      p(x|h): bernoulli (default), continuous_bernoulli,
                                              gaussian, discretized_logistic, as the keyword
                                              ``likelihood=`` of every entry point below; the
                                              logits then hold its C channels, [B, k, C D]
    Reduction(scale, groups, beta)            the bound's epilogue: the whole family (VR-alpha,
                                              MIWAE, CIWAE, the ELBOs) as a keyword of the
                                              iwae_bound / fused_* entry points
    log_weights(x, logits, z, mu, logvar)     -> [B, k]
    Latent(z, mu, logvar, prior_mu, prior_logvar)  one stochastic layer (kernels/latent.py):
                                              a sequence of them in z's place (mu, logvar None)
                                              gives every entry point several layers,
                                              parameters per example or per sample
    fused_iwae_bound(x, logits, z, mu, logvar) -> [B]             one kernel, no [B, k, D] temp
    fused_iwae_bound_with_weights(...)   -> (bound, log_w, lse)   the same, and the weights' logs
    reweight(g, log_w, lse)              -> g * exp(log_w - lse)  per sample (DReG's extra factor)
    fused_linear_iwae_bound(x, h, weight, bias, z, mu, logvar) -> [B]   the decoder's output
                                           layer fused in: logits built on chip, never stored
    fused_linear_log_weights(x, h, weight, bias, z, mu, logvar) -> [B, k]

All return float32 whatever the input float dtype. Without CUDA the kernels run under the
Triton interpreter on CPU tensors: importing this package sets ``TRITON_INTERPRET=1`` when no
GPU is visible and the variable is unset (it must be set before Triton decorates a kernel).
"""

import os as _os

import torch as _torch

from ._common import interpreted  # noqa: E402  (imports torch only, not triton)

if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"
if interpreted():
    import warnings as _warnings

    # The interpreter evaluates masked lanes and all -inf rows in numpy (log(0), exp(-inf)
    # - (-inf)) and discards them by design; numpy's warnings about it are noise.
    _warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")

from ._common import IWAE, Reduction, check_bound_inputs  # noqa: E402
from .likelihood import BERNOULLI, Likelihood  # noqa: E402
from .latent import Latent  # noqa: E402
from .fused_bound import fused_iwae_bound, fused_iwae_bound_with_weights  # noqa: E402
from .fused_linear import (fused_linear_iwae_bound, fused_linear_iwae_bound_with_weights,  # noqa: E402
                           fused_linear_log_weights)
from .logw import log_weights  # noqa: E402
from .lse import iwae_bound, logsumexp  # noqa: E402
from .reweight import reweight  # noqa: E402

__all__ = ["logsumexp", "iwae_bound", "log_weights", "fused_iwae_bound",
           "fused_iwae_bound_with_weights", "fused_linear_iwae_bound", "fused_linear_iwae_bound_with_weights", "fused_linear_log_weights",
           "reweight", "check_bound_inputs", "interpreted", "Reduction", "IWAE", "Likelihood", "BERNOULLI", "Latent"]
