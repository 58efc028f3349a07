"""The published numbers the experiments are compared with: one table, read everywhere.

Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders" (ICLR 2016), Table 1, MNIST,
one stochastic layer (784-200-200-50): test NLL in nats (the k = 5000 IWAE estimate) and
active units, with the full 60 000-image training set and the 3280-epoch schedule. The
paper's "VAE" rows with k > 1 are the k-sample ELBO.
"""

from __future__ import annotations

# (objective, k) -> (test NLL, active units)
PAPER_TABLE1 = {("elbo", 1): (86.76, 19), ("multi_sample_elbo", 5): (86.47, 20),
                ("multi_sample_elbo", 50): (86.35, 20), ("iwae", 5): (85.54, 22),
                ("iwae", 50): (84.78, 25)}
PAPER_TRAIN_IMAGES = 60_000
PAPER_EPOCHS = 3280


def _entry(objective: str, k: int, estimator: str) -> tuple:
    # the paper trained every model with the total gradient ("iwae"): no STL or DReG numbers
    return PAPER_TABLE1.get((objective, k), (None, None)) if estimator == "iwae" else (None, None)


def paper_nll(objective: str, k: int, estimator: str = "iwae") -> float | None:
    return _entry(objective, k, estimator)[0]


def paper_active_units(objective: str, k: int, estimator: str = "iwae") -> int | None:
    return _entry(objective, k, estimator)[1]
