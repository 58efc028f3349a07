"""pytest-benchmark runs that feed the same reports as the sweep.

The benchmarks in ``tests/benchmarks`` take their shapes and their ``extra_info`` from here, and
``rows_from_json`` turns pytest-benchmark's JSON back into sweep rows, so one report renders
either. Shapes scale with the device: the real ones on CUDA, small ones on CPU (where Triton
runs under the interpreter, once per benchmark, and is marked as such).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import machine
from .problems import Problem
import kernels

from .sweep import (COLUMNS, Reference, bound_accuracy, min_bytes, reduction_accuracy,
                    reduction_bytes, reduction_head, row_head, speed_columns)

# (batch, k, latent) at D = 784
BOUND_SHAPES = {
    "cuda": [(1024, 64, 50), (20, 5000, 50), (256, 16, 200), (128, 256, 50)],
    "cpu": [(8, 16, 50), (32, 64, 50), (4, 512, 16)],
}
BOUND_DTYPES = {"cuda": ["float32", "bfloat16"], "cpu": ["float32"]}
# (batch, k) of the reduction alone
REDUCTION_SHAPES = {
    "cuda": [(65536, 1), (65536, 16), (16384, 1024), (64, 5000), (8, 100_000), (8, 1_000_000)],
    "cpu": [(4096, 1), (1024, 64), (8, 5000)],
}


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not kernels.interpreted() else "cpu")


def bound_problems(device: torch.device) -> list[Problem]:
    kind = device.type
    return [Problem(b, k, d, 784, dtype) for dtype in BOUND_DTYPES[kind] for b, k, d in BOUND_SHAPES[kind]]


def bound_extra_info(variant: str, problem: Problem, inputs, mode: str, device: torch.device,
                     bound: torch.Tensor, ref: Reference, interpreted: bool, copy_gbps: float) -> dict:
    """What a report row needs besides the timing: the cell's identity, bytes and accuracy."""
    return {**row_head(variant, problem, mode, device), "bytes": min_bytes(inputs, mode),
            "copy_gbps": copy_gbps, **bound_accuracy(bound, ref), "interpreted": interpreted}


def reduction_extra_info(variant: str, log_w: torch.Tensor, device: torch.device,
                         bound: torch.Tensor, interpreted: bool, copy_gbps: float) -> dict:
    """Rows of the reduction alone use mode 'reduction', latent 0 and data_dim 0."""
    from . import reference

    return {**reduction_head(variant, log_w, device), "bytes": reduction_bytes(log_w),
            "copy_gbps": copy_gbps, **reduction_accuracy(bound, reference.iwae_bound(log_w)),
            "interpreted": interpreted}


def add_speed(extra_info: dict, median_s: float | None) -> None:
    """GB/s from the measured median (absent when benchmarking was disabled)."""
    if median_s and not extra_info.get("interpreted"):
        extra_info["gbps"] = speed_columns(1, extra_info["bytes"], median_s, None)["gbps"]


def rows_from_json(path: Path) -> tuple[list[dict], dict]:
    """Sweep rows and a machine record from a ``--benchmark-json`` file."""
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info, stats = bench.get("extra_info", {}), bench.get("stats") or {}
        if "variant" not in info:
            continue  # not one of ours
        row = {key: info.get(key) for key in COLUMNS if key in info}
        median = stats.get("median")
        samples = stats.get("data")
        if median:
            row["time_ms"] = median * 1e3
            if samples:
                ordered = sorted(samples)
                row["time_ms_p20"] = _quantile(ordered, 0.2) * 1e3
                row["time_ms_p80"] = _quantile(ordered, 0.8) * 1e3
        if info.get("interpreted"):
            row["status"], row["message"] = "interpreted", "Triton interpreter on CPU: not a speed"
        elif median:
            row["status"] = "ok"
            row.update(speed_columns(info["batch"] * info["k"], info["bytes"], median,
                                     info.get("copy_gbps")))
        else:
            row["status"], row["message"] = "error", "no timing in the JSON (benchmarks disabled?)"
        row["message"] = (row.get("message") or "") + f" [pytest: {bench.get('name')}]"
        rows.append(row)
    machine_info = data.get("machine_info", {})
    copy = next((r.get("copy_gbps") for r in rows if r.get("copy_gbps")), None)
    record = {"machine": machine_info.get("iwae_bench") or machine_info,
              "runs": [{"command": f"pytest-benchmark JSON {Path(path).name}",
                        "started": data.get("datetime"), "finished": data.get("datetime"),
                        "copy_bandwidth_gbps": copy if copy is not None else float("nan"),
                        "commit": (data.get("commit_info") or {}).get("id")}]}
    return rows, record


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def write_from_json(json_path: Path, out: Path) -> Path:
    """results.csv and machine.json in ``out`` from pytest-benchmark's JSON; returns the CSV."""
    from .sweep import RowWriter

    rows, record = rows_from_json(json_path)
    if not rows:
        raise ValueError(f"{json_path} holds no iwae-bench benchmarks (no extra_info.variant)")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    tmp = out / "results.csv.tmp"
    tmp.unlink(missing_ok=True)
    writer = RowWriter(tmp)
    for row in rows:
        writer.write(row)
    writer.close()
    tmp.replace(csv_path)
    machine.write_json_atomic(out / "machine.json", record)
    return csv_path
