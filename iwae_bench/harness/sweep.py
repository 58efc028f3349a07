"""The sweep: a grid of problems x variants x modes, one results row per cell.

    grid -> problem -> inputs -> cell (harness.cell) -> row -> results.csv (harness.table)

A grid is a union of blocks, each a product of axes (k, batch, latent, data_dim, hidden, dtype,
mode, regime, objective, likelihood): the main block sweeps k and B, smaller ones vary the
latent width or the regime at a few (B, k), one runs the decoder-head family (hidden > 0: the
output layer fused into the bound), one the importance-weighted family's objectives and one the
continuous likelihoods, so the default run covers every axis and both families within its
time budget.

Each row is appended and flushed the moment its cell finishes, so a sweep killed at any point
keeps every finished row; ``resume=True`` runs only the grid's cells missing from the CSV,
leaves rows of other cells untouched, and refuses to mix settings (seed, threads, device,
versions) in one CSV.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..problems import Problem, make_inputs
from ..variants import REGISTRY, get
from . import machine
from .shard import Shard
from .cell import (Reference, bound_identity, measure_bound, measure_reduction,
                   reduction_identity, reduction_log_weights)
from .table import CSV_NAME, RowWriter, drop_torn_tail, identity, read_table

MACHINE_NAME = "machine.json"


@dataclass
class Block:
    """One product of axes; a grid is a list of them."""
    k: list[int]
    batch: list[int]
    latent: list[int] = field(default_factory=lambda: [50])
    data_dim: list[int] = field(default_factory=lambda: [784])
    dtype: list[str] = field(default_factory=lambda: ["float32"])
    mode: list[str] = field(default_factory=lambda: ["forward", "backward"])
    regime: list[str] = field(default_factory=lambda: ["realistic"])
    hidden: list[int] = field(default_factory=lambda: [0])  # > 0: the decoder-head family
    objective: list[str] = field(default_factory=lambda: ["iwae"])  # members of the family (family.py)
    likelihood: list[str] = field(default_factory=lambda: ["bernoulli"])  # p(x|h), kernels/likelihood.py
    layers: list[int] = field(default_factory=lambda: [1])  # stochastic layers (problems.py); 2: bound only


# The family's block: one objective of each kind beside the IWAE bound of the main block (the
# same inputs at the same (B, k)), every variant computing it, its error against float64.
FAMILY_BLOCK = ["multi_sample_elbo", "vr:0.5", "miwae:8x8", "ciwae:0.05"]
# The likelihoods' block: each continuous likelihood (the Gaussian with its per-sample variance)
# on gray-level data beside the Bernoulli of the main block, every variant that takes it, its
# error against float64.
LIKELIHOOD_BLOCK = ["gaussian", "continuous_bernoulli", "discretized_logistic"]

# Grids by preset and device type. The CPU quick preset is the README's main job: a couple of
# minutes on 2 cores, most of it torch.compile compiling each cell afresh.
PRESETS = {
    "quick": {
        "cpu": dict(blocks=[Block(k=[1, 8, 64, 512], batch=[4, 32]),
                            Block(k=[64], batch=[32], latent=[16, 200]),
                            Block(k=[8, 64], batch=[4], regime=["saturated"]),
                            Block(k=[8, 64], batch=[4], hidden=[200]),
                            Block(k=[64], batch=[4], objective=FAMILY_BLOCK),
                            Block(k=[64], batch=[4], likelihood=LIKELIHOOD_BLOCK),
                            Block(k=[64], batch=[4], layers=[2])],
                    reductions=[(1024, 64), (8, 5000)]),
        "cuda": dict(blocks=[Block(k=[1, 16, 64, 256, 1024, 5000], batch=[20, 256],
                                   dtype=["float32", "bfloat16"]),
                             Block(k=[256], batch=[256], latent=[16, 200]),
                             Block(k=[64], batch=[20], regime=["saturated"]),
                             Block(k=[64, 1024, 5000], batch=[20], hidden=[200],
                                   dtype=["float32", "bfloat16"]),
                             Block(k=[64, 1024], batch=[256], objective=[o for o in FAMILY_BLOCK if o != "miwae:8x8"]),
                             Block(k=[64], batch=[256], objective=["miwae:8x8"]),  # its groups make k = 64
                             Block(k=[64, 1024], batch=[256], dtype=["float32", "bfloat16"],
                                   likelihood=LIKELIHOOD_BLOCK),
                             Block(k=[64], batch=[20], regime=["saturated"], likelihood=LIKELIHOOD_BLOCK),
                             Block(k=[1024], batch=[20], hidden=[200], likelihood=LIKELIHOOD_BLOCK),
                             Block(k=[64, 1024], batch=[256], dtype=["float32", "bfloat16"], layers=[2])],
                     reductions=[(65536, 16), (64, 5000), (8, 100_000)]),
    },
    "full": {
        "cpu": dict(blocks=[Block(k=[1, 5, 16, 50, 128, 512], batch=[4, 32, 128],
                                  latent=[16, 50, 200], dtype=["float32", "bfloat16"]),
                            Block(k=[8, 64], batch=[4, 32], regime=["saturated"]),
                            Block(k=[8, 64, 512], batch=[4, 32], hidden=[200], dtype=["float32", "bfloat16"])],
                    reductions=[(1024, 64), (64, 5000), (8, 100_000)]),
        "cuda": dict(blocks=[Block(k=[1, 5, 16, 50, 64, 256, 1024, 5000], batch=[20, 128, 1024],
                                   latent=[50, 200], dtype=["float32", "bfloat16"]),
                             Block(k=[64, 1024], batch=[20, 256], regime=["saturated"]),
                             Block(k=[64, 1024, 5000], batch=[20, 256], hidden=[200, 400],
                                   dtype=["float32", "bfloat16"])],
                     reductions=[(65536, 1), (65536, 16), (16384, 1024), (64, 5000), (8, 100_000),
                                 (8, 1_000_000)]),
    },
}
AXES = ("k", "batch", "latent", "data_dim", "dtype", "mode", "regime", "hidden", "objective", "likelihood",
        "layers")


@dataclass
class Grid:
    blocks: list[Block]
    variants: list[str] | None = None  # None: every variant of each family
    seed: int = 0
    # (batch, k) shapes of the reduction alone, run for the variants that have one
    reductions: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def preset(cls, name: str, device: torch.device, variants: list[str] | None = None,
               seed: int = 0, **axes) -> "Grid":
        """The preset's grid; any axis given replaces it by one block: the axes given, the
        preset's main block for the rest (and no reduction cells)."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
        values = PRESETS[name]["cuda" if device.type == "cuda" else "cpu"]
        blocks, reductions = list(values["blocks"]), list(values["reductions"])
        given = {axis: value for axis, value in axes.items() if value is not None}
        unknown = set(given) - set(AXES)
        if unknown:
            raise ValueError(f"unknown grid axes {sorted(unknown)}; the axes are {', '.join(AXES)}")
        if given:
            blocks, reductions = [Block(**{**asdict(blocks[0]), **given})], []
        return cls(blocks, list(variants) if variants else None, seed, reductions)

    def variants_for(self, family: str) -> list[str]:
        """The grid's variants of one family (registry order)."""
        names = REGISTRY[family]
        return list(names) if self.variants is None else [v for v in names if v in self.variants]

    def problems(self) -> list[tuple[Problem, list[tuple[str, str]]]]:
        """Each problem once, with its (variant, mode) cells, in grid order."""
        cells: dict[Problem, list[tuple[str, str]]] = {}
        for block in self.blocks:
            for layers, likelihood, dtype, regime, latent, data_dim, hidden, objective, batch, k in itertools.product(
                    block.layers, block.likelihood, block.dtype, block.regime, block.latent, block.data_dim,
                    block.hidden, block.objective, block.batch, block.k):
                if layers > 1 and hidden:
                    continue  # the two-layer case is the bound family's (a head problem has one layer)
                problem = Problem(batch, k, latent, data_dim, dtype, self.seed, regime, hidden, objective,
                                  likelihood, layers)
                todo = cells.setdefault(problem, [])
                todo += [(v, m) for m in block.mode for v in self.variants_for(problem.family)
                         if (v, m) not in todo and self.runs(get(v, problem.family), problem)]
        return [(problem, todo) for problem, todo in cells.items() if todo]

    @staticmethod
    def runs(variant, problem: Problem) -> bool:
        """Whether ``variant`` computes ``problem``: its objective under its likelihood (a
        variant with one stochastic layer stays in a two-layer problem's cells, written as
        skipped with its reason)."""
        return variant.computes(problem.spec) and variant.takes(problem.likelihood_spec)

    def reduction_variants(self) -> list[str]:
        return self.variants_for("reduction")

    def work(self) -> list[tuple]:
        """The sweep's work list, in order: ("bound", problem, its (variant, mode) cells) per
        problem, then ("reduction", (batch, k), variants) per shape. A shard takes every N-th
        item: a problem's inputs and float64 reference are built by one shard only."""
        return ([("bound", problem, cells) for problem, cells in self.problems()]
                + [("reduction", shape, self.reduction_variants()) for shape in self.reductions])

    def identities(self, device: torch.device, items: list[tuple] | None = None) -> set[tuple]:
        keys = set()
        for family, what, cells in self.work() if items is None else items:
            if family == "bound":
                keys |= {identity(bound_identity(v, what, m, device)) for v, m in cells}
            else:
                keys |= {identity(reduction_identity(v, *what, device, self.seed)) for v in cells}
        return keys

    def size(self) -> int:
        return len(self.identities(torch.device("cpu")))

    @classmethod
    def from_dict(cls, data: dict) -> "Grid":
        """The grid a machine.json run entry recorded (``asdict`` of it)."""
        return cls([Block(**block) for block in data["blocks"]], data["variants"], data["seed"],
                   [tuple(shape) for shape in data["reductions"]])


def too_large_for_cpu(problem: Problem, modes: list[str]) -> str | None:
    """On CPU an allocation past the RAM does not raise, the OOM killer ends the process; so
    cells whose eager variants would need over 40% of the RAM are skipped with a reason."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    temporaries = 10 if "backward" in modes else 6  # [B*k, D] float32 tensors alive at once
    need = problem.batch * problem.k * problem.data_dim * 4 * temporaries
    if need > 0.4 * ram:
        return f"needs about {need / 2**30:.1f} GiB of {ram / 2**30:.1f} GiB RAM"
    return None


class ResumeError(ValueError):
    """A resume that would mix settings in one results CSV."""


def check_resume(rows: list[dict], earlier_machine: dict, settings: dict) -> None:
    """Refuse to resume when the rows already written (or their machine record) were made
    with other settings than this run's: the message names each one."""
    clashes = []
    for name in ("seed", "threads", "device"):
        earlier = sorted({str(r[name]) for r in rows if r.get(name) is not None})
        if earlier and earlier != [str(settings[name])]:
            clashes.append(f"{name} {', '.join(earlier)} there, {settings[name]} now")
    before = earlier_machine
    for name in ("device_name", "torch", "triton"):
        if before.get(name) is not None and before.get(name) != settings[name]:
            clashes.append(f"{name} {before[name]!r} there, {settings[name]!r} now")
    if clashes:
        raise ResumeError("--resume would mix settings in one results.csv: " + "; ".join(clashes)
                          + ". Run without --resume (the earlier CSV is kept as results.prev.csv), "
                            "into another --out, or with the same settings.")


def run_sweep(grid: Grid, device: torch.device, out: Path, resume: bool = False,
              progress: bool | None = None, min_time: float = 0.2, log=print,
              deadline: float | None = None, shard: Shard | None = None) -> Path:
    """Run ``grid`` on ``device`` into ``out``; return the CSV path. Report left to the caller.
    ``deadline`` (a ``time.monotonic()`` value): no new cell starts after it; the cells left
    are for a later ``resume``. ``shard``: run only its part of the grid's work list."""
    items = shard.take(grid.work()) if shard is not None else grid.work()
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / CSV_NAME
    record = machine.MachineRecord.open(out / MACHINE_NAME, device, resume=resume)
    done: set[tuple] = set()
    if resume and csv_path.exists():
        drop_torn_tail(csv_path)
        rows = read_table(csv_path).rows
        settings = {"seed": grid.seed, "threads": torch.get_num_threads(), "device": device.type,
                    **{name: record.machine[name] for name in ("device_name", "torch", "triton")}}
        check_resume(rows, record.earlier_machine, settings)
        done = {identity(r) for r in rows}
    elif csv_path.exists():
        previous = out / "results.prev.csv"
        os.replace(csv_path, previous)
        log(f"moved the earlier {csv_path} to {previous} (pass --resume to continue a run instead)")

    wanted = grid.identities(device, items)
    already = len(wanted & done)
    log(f"measuring {device.type} copy bandwidth ...")
    copy_gbps = round(machine.copy_bandwidth_gbps(device), 3)
    head_dtypes = sorted({p.dtype for family, p, _ in items if family == "bound" and p.hidden})
    matmul = {dtype: round(machine.matmul_tflops(device, dtype), 4) for dtype in head_dtypes}
    run = record.start_run(copy_bandwidth_gbps=copy_gbps, matmul_tflops=matmul or None,
                           grid=asdict(grid), min_time=min_time,
                           shard=shard.as_dict() if shard is not None else None)
    log(f"{len(wanted)} cells, {already} already done, {len(wanted) - already} to run; "
        f"copy {copy_gbps:.1f} GB/s")
    bar = _progress_bar(len(wanted), already, progress)

    def out_of_time() -> bool:
        if deadline is not None and time.monotonic() > deadline:
            run["stopped_at_deadline"] = True
            return True
        return False

    try:
        with RowWriter(csv_path) as writer:
            for family, what, cells in items:
                if family == "bound":
                    _run_problem(what, cells, device, writer, bar, done, copy_gbps, min_time, out_of_time,
                                 matmul.get(what.dtype))
                else:
                    _run_reduction(what, cells, grid.seed, device, writer, bar, done, copy_gbps,
                                   min_time, out_of_time)
    finally:
        bar.close()
    if run.get("stopped_at_deadline"):
        log("stopped at the deadline: rerun with --resume for the cells left")
    record.finish(run)
    return csv_path


def _run_problem(problem: Problem, cells, device, writer, bar, done, copy_gbps, min_time, out_of_time,
                 matmul_tflops=None):
    """The cells of one problem not yet done: inputs and float64 reference built once."""
    cells = [(v, m) for v, m in cells if identity(bound_identity(v, problem, m, device)) not in done]
    if not cells or out_of_time():
        return
    reason = too_large_for_cpu(problem, [m for _, m in cells]) if device.type == "cpu" else None
    if reason:
        for variant, mode in cells:
            writer.write({**bound_identity(variant, problem, mode, device),
                          "status": "skipped", "message": reason})
            bar.update()
        return
    refused = {v: get(v, problem.family).refuses_layers(problem.layers) for v, _ in cells}
    for variant, mode in [(v, m) for v, m in cells if refused[v]]:
        writer.write({**bound_identity(variant, problem, mode, device), "status": "skipped",
                      "message": refused[variant]})
        bar.update()
    cells = [(v, m) for v, m in cells if not refused[v]]
    if not cells:
        return
    inputs = make_inputs(problem, device)
    ref = Reference(inputs, problem.spec, problem.likelihood_spec)
    for variant, mode in cells:
        if out_of_time():
            break
        bar.set_description(f"{variant} {mode} B={problem.batch} k={problem.k} d={problem.latent} "
                            + (f"H={problem.hidden}" if problem.hidden else problem.regime)
                            + ("" if problem.objective == "iwae" else f" {problem.objective}")
                            + ("" if problem.likelihood == "bernoulli" else f" {problem.likelihood}")
                            + ("" if problem.layers == 1 else f" {problem.layers} layers"))
        writer.write(measure_bound(get(variant, problem.family), problem, inputs, ref, mode, device,
                                   copy_gbps, min_time, matmul_tflops))
        bar.update()


def _run_reduction(shape, variants, seed, device, writer, bar, done, copy_gbps, min_time, out_of_time):
    """The reduction cells of one (batch, k) not yet done, on one set of log-weights."""
    batch, k = shape
    names = [v for v in variants if identity(reduction_identity(v, batch, k, device, seed)) not in done]
    if not names or out_of_time():
        return
    log_w = reduction_log_weights(batch, k, device, seed)
    for name in names:
        if out_of_time():
            break
        bar.set_description(f"{name} reduction B={batch} k={k}")
        writer.write(measure_reduction(get(name, "reduction"), log_w, device, copy_gbps, min_time, seed))
        bar.update()


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
