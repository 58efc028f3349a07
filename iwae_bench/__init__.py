"""iwae-bench: importance-weighted bounds, benchmarked and checked against a float64 oracle."""

__version__ = "0.1.0"
