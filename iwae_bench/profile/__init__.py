"""Compile-only kernel profiles: what the compiler emits for an H100, read as numbers.

A proxy from the compiler's output, not a measurement; see :mod:`iwae_bench.profile.sass`.
"""

from .sass import (Compiled, LoopProfile, Occupancy, PerElement, analyze, bytes_in_flight_per_sm,
                   compile_for_target, find_loops, occupancy, parse_sass, per_element)

__all__ = [
    "Compiled", "LoopProfile", "Occupancy", "PerElement", "analyze", "bytes_in_flight_per_sm",
    "compile_for_target", "find_loops", "occupancy", "parse_sass", "per_element",
]
