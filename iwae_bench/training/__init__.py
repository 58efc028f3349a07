"""The training side: the bounds' math behind one ``backend=`` choice (``bounds``), the family
of objectives and their estimators (``family``), the losses built on them (``objectives``), the
model (``model``) and the noise it samples (``sampling``). The benchmark calls this package;
nothing here imports the benchmark."""

from .bounds import BACKENDS, OBJECTIVES, iwae_bound, log_weights, objective_bound
from .family import ESTIMATORS, Objective
from .model import BernoulliVAE, TwoLayerVAE
from .objectives import IWAELoss

__all__ = ["BACKENDS", "ESTIMATORS", "OBJECTIVES", "BernoulliVAE", "IWAELoss", "Objective", "TwoLayerVAE",
           "iwae_bound", "log_weights", "objective_bound"]
