"""pytest-benchmark runs that feed the same reports as the sweep.

The benchmarks in ``tests/benchmarks`` take their shapes and their ``extra_info`` from here
(the row a sweep cell would write, less its timing), and ``rows_from_json`` turns
pytest-benchmark's JSON back into results rows, so one report renders either. Shapes vary k at
a fixed batch, so the report draws curves, and scale with the device: the real ones on CUDA,
small ones on CPU, where Triton runs under the interpreter once per benchmark and is named
so: its benchmarks' names end in ``-interpreted`` and their group starts with ``interpreted:``,
so ``pytest-benchmark compare`` never lines them up beside real speeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import kernels

from .files import atomic_path
from .harness.cell import (Reference, bound_accuracy, bound_bytes, bound_identity, head_flops,
                           reduction_accuracy, reduction_bytes, reduction_identity, speed_columns,
                           timing_columns)
from .harness.machine import MachineRecord
from .harness.table import COLUMNS, RowWriter
from .harness.timing import Timing
from .problems import Problem
from .variants import Variant

# (batch, k, latent) at D = 784: k varies at each batch
BOUND_SHAPES = {
    "cuda": [(20, 1, 50), (20, 64, 50), (20, 1024, 50), (20, 5000, 50), (256, 16, 50), (256, 256, 50)],
    "cpu": [(8, 1, 50), (8, 16, 50), (8, 128, 50)],
}
BOUND_DTYPES = {"cuda": ["float32", "bfloat16"], "cpu": ["float32"]}
# (batch, k, hidden) of the decoder head at D = 784, d = 50
HEAD_SHAPES = {"cuda": [(20, 64, 200), (20, 1024, 200), (20, 5000, 200)], "cpu": [(4, 8, 200), (4, 64, 200)]}
# (batch, k) of the reduction alone
REDUCTION_SHAPES = {
    "cuda": [(16384, 1), (16384, 64), (16384, 1024), (8, 100_000), (8, 1_000_000)],
    "cpu": [(256, 1), (256, 64), (256, 4096)],
}
INTERPRETED_SUFFIX = "-interpreted"


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not kernels.interpreted() else "cpu")


def bound_problems(device: torch.device) -> list[Problem]:
    kind = device.type
    return [Problem(b, k, d, 784, dtype) for dtype in BOUND_DTYPES[kind] for b, k, d in BOUND_SHAPES[kind]]


def head_problems(device: torch.device) -> list[Problem]:
    kind = device.type
    return [Problem(b, k, 50, 784, dtype, hidden=h) for dtype in BOUND_DTYPES[kind] for b, k, h in HEAD_SHAPES[kind]]


def is_interpreted(variant: Variant) -> bool:
    return variant.uses_triton and kernels.interpreted()


def variant_id(variant: Variant) -> str:
    """The variant's part of a benchmark's name: interpreted runs say so where users read."""
    return variant.name + (INTERPRETED_SUFFIX if is_interpreted(variant) else "")


def group(variant: Variant, shape: str) -> str:
    return ("interpreted: " if is_interpreted(variant) else "") + shape


def bound_extra_info(variant: Variant, problem: Problem, inputs, mode: str, device: torch.device,
                     bound: torch.Tensor, ref: Reference, copy_gbps: float | None) -> dict:
    """What a report row needs besides the timing: the cell's identity, bytes and accuracy."""
    return {**bound_identity(variant.name, problem, mode, device), "bytes": bound_bytes(inputs, mode),
            "flops": head_flops(inputs, mode), "copy_gbps": copy_gbps, **bound_accuracy(bound, ref),
            "interpreted": is_interpreted(variant)}


def reduction_extra_info(variant: Variant, log_w: torch.Tensor, device: torch.device,
                         bound: torch.Tensor, copy_gbps: float | None) -> dict:
    from . import reference

    batch, k = log_w.shape
    return {**reduction_identity(variant.name, batch, k, device, 0), "bytes": reduction_bytes(log_w),
            "copy_gbps": copy_gbps, **reduction_accuracy(bound, reference.iwae_bound(log_w)),
            "interpreted": is_interpreted(variant)}


def row_from_benchmark(bench: dict) -> dict | None:
    """One results row from one benchmark of the JSON; None for benchmarks that are not ours."""
    info, stats = bench.get("extra_info", {}), bench.get("stats") or {}
    if "variant" not in info:
        return None
    row = {key: info.get(key) for key in COLUMNS if key in info}
    samples = stats.get("data")
    notes = [f"pytest: {bench.get('name')}"]
    if info.get("interpreted"):
        row["status"] = "interpreted"
        notes.insert(0, "Triton interpreter on CPU: not a speed")
    elif samples:
        timing = Timing.from_samples([s * 1e3 for s in samples])
        row.update(timing_columns(timing))
        row.update(speed_columns(info["batch"] * info["k"], info["bytes"], timing.median_ms * 1e-3,
                                 info.get("copy_gbps"), info.get("flops")))
        row["status"] = "noisy" if timing.noisy else "ok"
        if timing.noisy:
            notes.insert(0, f"noisy timing: p80/p20 = {timing.spread:.2f} over {timing.samples} samples")
    else:
        row["status"] = "error"
        notes.insert(0, "no timing in the JSON (benchmarks disabled?)")
    row["message"] = "; ".join(notes)
    return row


def rows_from_json(path: Path) -> tuple[list[dict], MachineRecord]:
    """Results rows and a machine record from a ``--benchmark-json`` file."""
    data = json.loads(Path(path).read_text())
    rows = [row for row in map(row_from_benchmark, data.get("benchmarks", [])) if row is not None]
    machine_info = data.get("machine_info", {})
    copy = next((r.get("copy_gbps") for r in rows if r.get("copy_gbps")), None)
    record = MachineRecord(Path(path).parent / "machine.json", machine_info.get("iwae_bench") or machine_info,
                           [{"command": f"pytest-benchmark JSON {Path(path).name}",
                             "started": data.get("datetime"), "finished": data.get("datetime"),
                             "copy_bandwidth_gbps": copy,
                             "commit": (data.get("commit_info") or {}).get("id")}])
    return rows, record


def write_from_json(json_path: Path, out: Path) -> Path:
    """results.csv and machine.json in ``out`` from pytest-benchmark's JSON; returns the CSV."""
    rows, record = rows_from_json(json_path)
    if not rows:
        raise ValueError(f"{json_path} holds no iwae-bench benchmarks (no extra_info.variant)")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    with atomic_path(csv_path) as tmp, RowWriter(tmp) as writer:
        for row in rows:
            writer.write(row)
    record.path = out / "machine.json"
    record.write()
    return csv_path
