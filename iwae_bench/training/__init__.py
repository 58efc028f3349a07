"""The training side: the bounds' math behind one ``backend=`` choice (``bounds``), the losses
built on it (``objectives``), the model (``model``) and the noise it samples (``sampling``).
The benchmark calls this package; nothing here imports the benchmark."""

from .bounds import BACKENDS, OBJECTIVES, iwae_bound, log_weights, objective_bound
from .model import BernoulliVAE
from .objectives import IWAELoss

__all__ = ["BACKENDS", "OBJECTIVES", "BernoulliVAE", "IWAELoss", "iwae_bound", "log_weights",
           "objective_bound"]
