"""``python -m iwae_bench validate``: everything a lent GPU should prove, in one command that fits
a short rental (10 minutes a command, a handful of files brought back).

Phases, each runnable alone (``--phases``):

1. ``tests``: the kernel, variant, training and estimator tests compiled (interpreter off) on
   the device, with a timeout; output in tests.txt;
2. ``sweep``: the copy bandwidth (the yardstick), then the GPU grid: forward and forward +
   backward, float32 and bfloat16 logits, the targets' shapes, the reduction alone up to
   k = 10**6; no new cell starts once the budget is spent (the CSV stays resumable);
3. ``report``: plots and a report with the targets beside what was measured, and the cells
   the budget left out.

``--budget`` (seconds, default 510) bounds the whole command so that it ends inside 9
minutes with the report and the archive; ``--archive PATH`` packs the results folder into one
file. machine.json records each phase's time and whether autotuning was on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from .files import atomic_path, write_text
from .harness import machine
from .harness.sweep import Block, Grid, run_sweep
from .pytest_bench import REDUCTION_SHAPES

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("tests", "sweep", "report")
DEFAULT_BUDGET = 510.0
TESTS_SHARE = 0.4      # of the budget, at most, for the compiled test suite
REPORT_RESERVE = 25.0  # seconds kept for the report and the archive
# The tests that exercise kernels and variants on the device. They need only torch, triton and
# pytest, which a bare GPU image has (the oracle's scipy cross-check and the CPU harness tests
# stay with CI).
KERNEL_TESTS = ["tests/test_logsumexp.py", "tests/test_log_weights.py", "tests/test_backward.py",
                "tests/test_variants.py", "tests/test_training.py", "tests/test_estimators.py",
                "tests/test_fused_linear.py", "tests/test_likelihood_kernels.py"]


def gpu_grid() -> Grid:
    """The targets' shapes at D = 784, d = 50: (1024, 64) and (20, 5000) as measured when the
    targets were set, (256, 256) between them, and (8, 100000) which must stream; the decoder
    head at (20, 5000) with H = 200."""
    shapes = [(1024, 64), (20, 5000), (256, 256), (8, 100_000)]
    head = Block(k=[5000], batch=[20], hidden=[200], dtype=["float32", "bfloat16"])  # the decoder head
    return Grid([Block(k=[k], batch=[b], dtype=["float32", "bfloat16"]) for b, k in shapes] + [head],
                reductions=list(REDUCTION_SHAPES["cuda"]))


def run_kernel_tests(out: Path, timeout: float | None = None) -> tuple[bool, str]:
    """The kernel and variant tests with the real compiler on the device; output to tests.txt."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS]
    env = {**os.environ, "TRITON_INTERPRET": "0", "IWAE_BENCH_AUTOTUNE": "0"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        text, passed = done.stdout + done.stderr, done.returncode == 0
        lines = [line for line in text.strip().splitlines() if line.strip()]
        summary = lines[-1] if lines else f"pytest exited {done.returncode}"
    except subprocess.TimeoutExpired as expired:
        text = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        passed, summary = False, f"timed out after {timeout:.0f} s (the rest of the budget went to the sweep)"
    write_text(out / "tests.txt", f"$ TRITON_INTERPRET=0 IWAE_BENCH_AUTOTUNE=0 {' '.join(command[1:])}\n\n"
                                  f"{text}\n{summary}\n")
    return passed, summary


def archive(folder: Path, path: Path) -> Path:
    """One .tar.gz of the results folder (what a rental brings back), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path


def validate(device: torch.device, out: Path, phases=PHASES, budget: float = DEFAULT_BUDGET,
             resume: bool = False, grid: Grid | None = None, archive_to: Path | None = None,
             progress: bool | None = None, log=print) -> int:
    """Run the phases within ``budget`` seconds; 0 when the suite passed or was not run
    (targets are reported, not enforced)."""
    if device.type != "cuda" and grid is None:
        raise ValueError("validate needs a CUDA GPU, and torch sees none: run it on a GPU machine "
                         "(on CPU, 'python -m pytest' and 'python -m iwae_bench sweep' are the checks)")
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"phases must be among {', '.join(PHASES)}, got {sorted(unknown)}")
    start = time.monotonic()
    deadline = start + budget
    out.mkdir(parents=True, exist_ok=True)
    timings, passed, summary, missing = {}, True, "not run", []
    if "tests" in phases:
        began = time.monotonic()
        log(f"[tests] correctness suite compiled on {machine.device_name(device)} ...")
        passed, summary = run_kernel_tests(out, timeout=max(30.0, TESTS_SHARE * budget))
        timings["tests"] = round(time.monotonic() - began, 1)
        log(f"        {summary} ({timings['tests']:.0f} s; output in {out / 'tests.txt'})")
    if "sweep" in phases:
        began = time.monotonic()
        log("[sweep] copy bandwidth and the GPU grid ...")
        grid = grid or gpu_grid()
        run_sweep(grid, device, out, resume=resume, progress=progress, log=log,
                  deadline=deadline - REPORT_RESERVE)
        missing = sorted(grid.identities(device) - _done(out))
        timings["sweep"] = round(time.monotonic() - began, 1)
        log(f"        {timings['sweep']:.0f} s; {len(missing)} cells left for a --resume")
    record = machine.MachineRecord.open(out / "machine.json", device, resume=True)
    run = record.start_run(validate={"phases": list(phases), "budget_s": budget, "phase_seconds": timings,
                                     "tests": summary if "tests" in phases else "not run"},
                           missing_cells=[" ".join(cell) for cell in missing])
    if "report" in phases and (out / "results.csv").exists():
        from .report import render

        began = time.monotonic()
        report = render(out)
        timings["report"] = round(time.monotonic() - began, 1)
        log(f"[report] {report} ({timings['report']:.0f} s)")
    write_text(out / "tests-summary.txt", f"{'passed' if passed else 'FAILED'}: {summary}\n")
    record.finish(run, seconds=round(time.monotonic() - start, 1))
    if archive_to is not None:
        log(f"[archive] {archive(out, archive_to)}")
    if not passed:
        log(f"correctness suite FAILED: {summary}")
    return 0 if passed else 1


def _done(out: Path) -> set[tuple]:
    from .harness.table import identity, read_table

    path = out / "results.csv"
    return {identity(row) for row in read_table(path).rows} if path.exists() else set()
