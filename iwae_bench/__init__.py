"""iwae-bench: importance-weighted bounds, benchmarked and checked against a float64 oracle.

    iwae_bench.training      the bounds behind one backend= choice, IWAELoss, BernoulliVAE
    iwae_bench.variants      the benchmark's variants (naive ... fused) behind one registry
    iwae_bench.harness       one cell, the results table, the sweep, timing, the machine record
    iwae_bench.experiments   MNIST training and evaluation
"""

__version__ = "0.2.0"
