"""The sweep: a grid of problems x variants x modes, one CSV row per cell.

    problem spec -> inputs -> variant -> (bound, time, memory) row -> CSV -> report

The harness, not the variants, owns timing, memory and accuracy. Each row is appended and
flushed the moment its cell finishes, so a sweep killed at any point keeps every finished row;
``resume=True`` skips the cells already in the CSV and runs only what is missing.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import machine, reference
from .problems import Problem, make_inputs
from .timing import Timing, peak_extra_memory, time_call
import kernels

from .variants import REDUCTIONS, VARIANTS, get, reset_compiled

COLUMNS = [
    "variant", "device", "dtype", "k", "batch", "latent", "data_dim", "mode",
    "time_ms", "time_ms_p20", "time_ms_p80", "samples_per_s", "bytes", "gbps", "copy_gbps",
    "bw_fraction", "peak_mem_bytes", "bound_mean", "elbo_mean", "max_abs_err", "grad_max_abs_err",
    "finite_fraction", "iwae_elbo_gap", "compile_ms", "threads", "status", "message",
]
KEY = ("variant", "device", "dtype", "k", "batch", "latent", "data_dim", "mode")
CSV_NAME = "results.csv"
MACHINE_NAME = "machine.json"

# Grids by preset and device type. The CPU quick preset is the README's main job: about two
# minutes on 2 cores, most of it torch.compile compiling each cell afresh.
PRESETS = {
    "quick": {
        "cpu": dict(k=[1, 8, 64, 512], batch=[4, 32], latent=[50], data_dim=[784],
                    dtype=["float32"], mode=["forward", "backward"]),
        "cuda": dict(k=[1, 16, 64, 256, 1024, 5000], batch=[20, 256], latent=[50], data_dim=[784],
                     dtype=["float32", "bfloat16"], mode=["forward", "backward"]),
    },
    "full": {
        "cpu": dict(k=[1, 5, 16, 50, 128, 512], batch=[4, 32, 128], latent=[16, 50, 200],
                    data_dim=[784], dtype=["float32", "bfloat16"], mode=["forward", "backward"]),
        "cuda": dict(k=[1, 5, 16, 50, 64, 256, 1024, 5000], batch=[20, 128, 1024],
                     latent=[50, 200], data_dim=[784], dtype=["float32", "bfloat16"],
                     mode=["forward", "backward"]),
    },
}


@dataclass
class Grid:
    k: list[int]
    batch: list[int]
    latent: list[int]
    data_dim: list[int]
    dtype: list[str]
    mode: list[str]
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seed: int = 0
    # (batch, k) pairs to run instead of the product batch x k (GPU grids whose product
    # would hold a cell of tens of GB)
    shapes: list[tuple[int, int]] | None = None
    # (batch, k) shapes of the reduction alone, run for the variants that have one
    reductions: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def preset(cls, name: str, device: torch.device, **overrides) -> "Grid":
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
        values = dict(PRESETS[name]["cuda" if device.type == "cuda" else "cpu"])
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def batch_k(self) -> list[tuple[int, int]]:
        return list(self.shapes) if self.shapes else list(itertools.product(self.batch, self.k))

    def problems(self) -> Iterator[Problem]:
        for dtype, latent, data_dim, (batch, k) in itertools.product(
                self.dtype, self.latent, self.data_dim, self.batch_k()):
            yield Problem(batch, k, latent, data_dim, dtype, self.seed)

    def reduction_variants(self) -> list[str]:
        return [v for v in self.variants if v in REDUCTIONS]

    def size(self) -> int:
        return (len(self.batch_k()) * len(self.latent) * len(self.data_dim) * len(self.dtype)
                * len(self.mode) * len(self.variants)
                + len(self.reductions) * len(self.reduction_variants()))


# --------------------------------------------------------------------------- bytes


def min_bytes(inputs, mode: str) -> int:
    """The fewest bytes a cell must move: every input read once and the bound written once;
    for forward + backward also the incoming gradient read and every input gradient
    (logits, z, mu, logvar) written once."""
    x, logits, z, mu, logvar = inputs
    read = sum(t.numel() * t.element_size() for t in inputs)
    out = x.shape[0] * 4
    if mode == "forward":
        return read + out
    grads = sum(t.numel() * t.element_size() for t in (logits, z, mu, logvar))
    return read + 2 * out + grads


# --------------------------------------------------------------------------- one cell


class Reference:
    """float64 values for one problem's inputs, shared by all its variants and modes.

    Computed over slices of the batch (each example's bound depends on its own row only), so
    a float64 copy of the largest cells' logits never has to exist whole.
    """

    CHUNK_ELEMENTS = 1 << 25  # float64 logits elements per slice

    def __init__(self, inputs):
        self.inputs = inputs
        log_w = torch.cat([reference.log_weights(*part) for part in self._slices()])
        self.bound = reference.iwae_bound(log_w)
        self.elbo = reference.elbo(log_w)

    def _slices(self) -> Iterator[tuple]:
        B, k, D = self.inputs.logits.shape
        rows = max(1, self.CHUNK_ELEMENTS // (k * D))
        for start in range(0, B, rows):
            yield tuple(t[start:start + rows] for t in self.inputs)

    def grad_max_abs_err(self, grads) -> float:
        """Largest error of d sum(L_k) / d (logits, z, mu, logvar) against float64 autograd."""
        worst, start = 0.0, 0
        for x, *rest in self._slices():
            leaves = [t.detach().double().requires_grad_() for t in rest]
            want = torch.autograd.grad(reference.bound(x, *leaves).sum(), leaves)
            stop = start + x.shape[0]
            worst = max(worst, *(_max_abs_err(g[start:stop], w) for g, w in zip(grads, want)))
            start = stop
        return worst


def bound_accuracy(bound: torch.Tensor, ref: Reference) -> dict:
    """The accuracy columns of a bound row: its mean, the float64 ELBO, the largest error,
    the finite fraction and the IWAE-ELBO gap (this bound minus the float64 L_1)."""
    bound = bound.detach()
    return {
        "bound_mean": bound.double().mean().item(),
        "elbo_mean": ref.elbo.mean().item(),
        "max_abs_err": _max_abs_err(bound, ref.bound),
        "finite_fraction": torch.isfinite(bound).double().mean().item(),
        "iwae_elbo_gap": (bound.double().cpu() - ref.elbo.cpu()).mean().item(),
    }


def reduction_accuracy(bound: torch.Tensor, want: torch.Tensor) -> dict:
    """The accuracy columns of a reduction row, against the float64 iwae_bound ``want``."""
    bound = bound.detach()
    return {"bound_mean": bound.double().mean().item(), "max_abs_err": _max_abs_err(bound, want),
            "finite_fraction": torch.isfinite(bound).double().mean().item()}


def _max_abs_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| where want is finite; inf if got is not finite there."""
    want = want.to(got.device)
    finite = torch.isfinite(want)
    if not finite.any():
        return float("nan")
    diff = (got.double()[finite] - want[finite]).abs()
    return float("inf") if not torch.isfinite(diff).all() else diff.max().item()


def too_large_for_cpu(problem: Problem, mode: str) -> str | None:
    """On CPU an allocation past the RAM does not raise, the OOM killer ends the process; so
    cells whose eager variants would need over 40% of the RAM are skipped with a reason."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    temporaries = 6 if mode == "forward" else 10  # [B*k, D] float32 tensors alive at once
    need = problem.batch * problem.k * problem.data_dim * 4 * temporaries
    if need > 0.4 * ram:
        return f"needs about {need / 2**30:.1f} GiB of {ram / 2**30:.1f} GiB RAM"
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def speed_columns(samples: int, nbytes: int, seconds: float, copy_gbps: float | None) -> dict:
    """samples_per_s, gbps and bw_fraction of a cell from its median time."""
    gbps = nbytes / seconds / 1e9
    return {"samples_per_s": samples / seconds, "gbps": gbps,
            "bw_fraction": gbps / copy_gbps if copy_gbps else None}


def _run_cell(row: dict, call, check, device: torch.device, *, is_compile: bool,
              interpreted: bool, samples: int, copy_gbps: float, min_time: float) -> dict:
    """The harness's part of every cell: one first call (compiles; its output is checked by
    ``check`` -> accuracy columns), then timing, peak memory and speed. Fills ``row``; a
    failure becomes the row's status (oom or error), never an exception."""
    try:
        if is_compile:
            reset_compiled()  # a fresh compile per cell: no recompile limit, no silent eager
        start = time.perf_counter()
        first = call()
        _synchronize(device)
        first_ms = (time.perf_counter() - start) * 1e3
        status, message = "ok", ""
        if is_compile:
            row["compile_ms"] = round(first_ms, 3)
            if _compiled_graphs() == 0:
                status, message = "fallback", "torch.compile captured no graph: this ran eager"
        row.update(check(first))
        if interpreted:
            timing = Timing(first_ms, first_ms, first_ms)  # the one call above
            status, message = "interpreted", "Triton interpreter on CPU: a correctness run, not a speed"
        else:
            timing = time_call(call, device, min_run_time=min_time)
            row["peak_mem_bytes"] = peak_extra_memory(call, device)
        row.update({"time_ms": timing.median_ms, "time_ms_p20": timing.p20_ms,
                    "time_ms_p80": timing.p80_ms})
        if status == "ok":
            row.update(speed_columns(samples, row["bytes"], timing.median_ms * 1e-3, copy_gbps))
        row.update({"status": status, "message": message})
    except Exception as error:  # one failing cell must not stop the sweep
        row.update({"status": "oom" if _is_oom(error) else "error",
                    "message": " ".join(f"{type(error).__name__}: {error}".split())[:300]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def measure(variant_name: str, problem: Problem, inputs, ref: Reference, mode: str,
            device: torch.device, copy_gbps: float, min_time: float = 0.2) -> dict:
    """Run one cell of the bound and return its CSV row (failures included, as a status)."""
    variant = get(variant_name)
    row = {**row_head(variant_name, problem, mode, device), "copy_gbps": round(copy_gbps, 3),
           "bytes": min_bytes(inputs, mode)}
    if mode == "forward":
        def call():
            return variant(*inputs), None
    else:
        x, *rest = inputs
        leaves = [t.detach().requires_grad_() for t in rest]

        def call():
            bound = variant(x, *leaves)
            return bound, torch.autograd.grad(bound.sum(), leaves)

    def check(first):
        bound, grads = first
        columns = bound_accuracy(bound, ref)
        if grads is not None:
            columns["grad_max_abs_err"] = ref.grad_max_abs_err(grads)
        return columns

    return _run_cell(row, call, check, device, is_compile=variant_name == "compile",
                     interpreted=variant.uses_triton and kernels.interpreted(),
                     samples=problem.batch * problem.k, copy_gbps=copy_gbps, min_time=min_time)


def reduction_log_weights(batch: int, k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[B, k] float32 log-weights at realistic scale (about -150 nats, spread of 10)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, k, generator=gen, device=device) * 10 - 150


def measure_reduction(name: str, log_w: torch.Tensor, device: torch.device, copy_gbps: float,
                      min_time: float = 0.2) -> dict:
    """One cell of the reduction alone (mode 'reduction', latent and data_dim 0)."""
    batch, k = log_w.shape
    reduce = REDUCTIONS[name]
    row = {**reduction_head(name, log_w, device), "copy_gbps": round(copy_gbps, 3),
           "bytes": reduction_bytes(log_w)}
    want = reference.iwae_bound(log_w)
    return _run_cell(row, lambda: reduce(log_w), lambda bound: reduction_accuracy(bound, want),
                     device, is_compile=name == "compile",
                     interpreted=name == "triton" and kernels.interpreted(), samples=batch * k,
                     copy_gbps=copy_gbps, min_time=min_time)


def row_head(variant_name: str, problem: Problem, mode: str, device: torch.device) -> dict:
    """The identity columns of a bound cell (the CSV key, plus the thread count)."""
    return {"variant": variant_name, "device": device.type, "dtype": problem.dtype, "k": problem.k,
            "batch": problem.batch, "latent": problem.latent, "data_dim": problem.data_dim,
            "mode": mode, "threads": torch.get_num_threads()}


def reduction_head(variant_name: str, log_w: torch.Tensor, device: torch.device) -> dict:
    """The identity columns of a reduction cell: mode 'reduction', latent and data_dim 0."""
    batch, k = log_w.shape
    return {"variant": variant_name, "device": device.type,
            "dtype": str(log_w.dtype).removeprefix("torch."), "k": k, "batch": batch,
            "latent": 0, "data_dim": 0, "mode": "reduction", "threads": torch.get_num_threads()}


def reduction_bytes(log_w: torch.Tensor) -> int:
    """The fewest bytes of the reduction alone: log_w read once, the [B] bound written once."""
    return log_w.numel() * log_w.element_size() + log_w.shape[0] * 4


# --------------------------------------------------------------------------- the CSV


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def _key(row: dict) -> tuple:
    return tuple(str(row[name]) for name in KEY)


def read_done(path: Path) -> set[tuple]:
    """Keys of the rows already in the CSV; a last line cut off by a kill is dropped first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    with open(path, newline="") as f:
        return {_key(row) for row in csv.DictReader(f)}


class RowWriter:
    """Appends rows to the CSV, each flushed to disk as soon as it is written."""

    def __init__(self, path: Path):
        fresh = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="raise")
        if fresh:
            self.writer.writeheader()
            self._flush()

    def write(self, row: dict) -> None:
        self.writer.writerow({name: _format(row.get(name)) for name in COLUMNS})
        self._flush()

    def _flush(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


# --------------------------------------------------------------------------- the sweep


def run_sweep(grid: Grid, device: torch.device, out: Path, resume: bool = False,
              progress: bool | None = None, min_time: float = 0.2, log=print) -> Path:
    """Run ``grid`` on ``device`` into ``out``; return the CSV path. Report left to the caller."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / CSV_NAME
    if csv_path.exists() and not resume:
        previous = out / "results.prev.csv"
        os.replace(csv_path, previous)
        log(f"moved the earlier {csv_path} to {previous} (pass --resume to continue a run instead)")
    done = read_done(csv_path) if resume else set()

    log(f"measuring {device.type} copy bandwidth ...")
    copy_gbps = machine.copy_bandwidth_gbps(device)
    machine_path = out / MACHINE_NAME
    record = _load_json(machine_path) if resume else {}
    run_info = {"command": machine.command_line(), "started": machine.now(),
                "copy_bandwidth_gbps": copy_gbps, "grid": grid.__dict__, "finished": None}
    record = {"machine": machine.describe(device), "runs": [*record.get("runs", []), run_info]}
    machine.write_json_atomic(machine_path, record)

    todo = grid.size() - len(done)
    log(f"{grid.size()} cells, {len(done)} already done, {todo} to run; copy {copy_gbps:.1f} GB/s")
    bar = _progress_bar(grid.size(), len(done), progress)
    writer = RowWriter(csv_path)
    try:
        for problem in grid.problems():
            cells = [(v, m) for m in grid.mode for v in grid.variants
                     if _key(row_head(v, problem, m, device)) not in done]
            if not cells:
                continue
            reason = too_large_for_cpu(problem, "backward" if "backward" in grid.mode else "forward") \
                if device.type == "cpu" else None
            if reason:
                for variant_name, mode in cells:
                    writer.write({**row_head(variant_name, problem, mode, device),
                                  "status": "skipped", "message": reason})
                    bar.update()
                continue
            inputs = make_inputs(problem, device)
            ref = Reference(inputs)
            for variant_name, mode in cells:
                bar.set_description(f"{variant_name} {mode} B={problem.batch} k={problem.k} d={problem.latent}")
                writer.write(measure(variant_name, problem, inputs, ref, mode, device, copy_gbps,
                                     min_time))
                bar.update()
            del inputs, ref
        for batch, k in grid.reductions:
            log_w = reduction_log_weights(batch, k, device, grid.seed)
            names = [v for v in grid.reduction_variants()
                     if _key(reduction_head(v, log_w, device)) not in done]
            for name in names:
                bar.set_description(f"{name} reduction B={batch} k={k}")
                writer.write(measure_reduction(name, log_w, device, copy_gbps, min_time))
                bar.update()
            del log_w
    finally:
        writer.close()
        bar.close()
    run_info["finished"] = machine.now()
    machine.write_json_atomic(machine_path, record)
    return csv_path


class _NoBar:
    """Stands in for tqdm where it is not installed (a bare GPU image): no bar, same calls."""

    def update(self, n: int = 1) -> None: ...

    def set_description(self, text: str) -> None: ...

    def close(self) -> None: ...


def _progress_bar(total: int, initial: int, progress: bool | None):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    # tqdm's disable=None: a bar with ETA on a terminal, nothing in a CI log
    return tqdm(total=total, initial=initial, unit="cell", dynamic_ncols=True,
                disable=None if progress is None else not progress)


def _load_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}

