"""``python -m iwae_bench validate``: everything a lent GPU should prove, in one command that fits
a short rental (10 minutes a command, a handful of files brought back).

Phases, each runnable alone (``--phases``):

1. ``tests``: the kernel, variant, training and estimator tests compiled (interpreter off) on
   the device, one pytest process per file in parallel, with a timeout; output in tests.txt
   (and tests/<file>.txt as they run);
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
import re
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
                "tests/test_fused_linear.py", "tests/test_likelihood_kernels.py", "tests/test_family.py",
                "tests/test_likelihood_head.py", "tests/test_layers.py", "tests/test_two_layer.py"]


def gpu_grid() -> Grid:
    """The targets' shapes at D = 784, d = 50: (1024, 64) and (20, 5000) as measured when the
    targets were set, (256, 256) between them, and (8, 100000) which must stream; the decoder
    head at (20, 5000) with H = 200."""
    shapes = [(1024, 64), (20, 5000), (256, 256), (8, 100_000)]
    head = Block(k=[5000], batch=[20], hidden=[200], dtype=["float32", "bfloat16"])  # the decoder head
    return Grid([Block(k=[k], batch=[b], dtype=["float32", "bfloat16"]) for b, k in shapes] + [head],
                reductions=list(REDUCTION_SHAPES["cuda"]))


VERBOSE_OUTCOME = re.compile(r"::\S.* (PASSED|FAILED|ERROR)(?:\s+\[\s*\d+%\])?\s*$")


def run_kernel_tests(out: Path, timeout: float | None = None, workers: int | None = None) -> tuple[bool, str]:
    """The kernel and variant tests with the real compiler on the device; output to tests.txt.

    Compiled, the suite is bound by Triton's compiler (each parametrization builds its own
    kernels: 2-5 s a test on an H200's host, over 330 s for the whole list in one process), so
    each file runs in its own pytest process, ``workers`` at a time (default: half the CPU
    threads, at most 8), sharing Triton's cache. Each process writes its verbose output
    straight to a file, so a timeout keeps every line a file got to (which tests passed,
    which failed) instead of losing the end-of-run summary."""
    files = list(KERNEL_TESTS)
    workers = workers or max(1, min(8, (os.cpu_count() or 2) // 2))
    env = {**os.environ, "TRITON_INTERPRET": "0", "IWAE_BENCH_AUTOTUNE": "0"}
    parts = out / "tests"
    parts.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    pending, running, results = list(files), {}, {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                path = pending.pop(0)
                log_path = parts / (Path(path).stem + ".txt")
                handle = open(log_path, "w")
                command = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-rf", "-p", "no:cacheprovider", path]
                running[path] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle,
                                                  stderr=subprocess.STDOUT, text=True), handle, log_path)
            for path, (proc, handle, log_path) in list(running.items()):
                if proc.poll() is not None:
                    handle.close()
                    results[path] = (proc.returncode, log_path)
                    del running[path]
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for path, (proc, handle, log_path) in running.items():  # past the deadline: stop them
            proc.kill()
            proc.wait()
            handle.close()
            results[path] = (None, log_path)
    return _summarize_tests(out, files, results, pending, timeout)


def _summarize_tests(out: Path, files, results, never_started, timeout) -> tuple[bool, str]:
    """tests.txt: the command, then each file's output; the summary counts passed and failed
    tests over the files and names the files the timeout cut or never started."""
    counts, cut, failed_files, sections = {"passed": 0, "failed": 0, "error": 0}, [], [], []
    for path in files:
        if path not in results:
            continue
        code, log_path = results[path]
        text = log_path.read_text(errors="replace")
        sections.append(f"===== {path} (exit {code if code is not None else 'killed at the time limit'})\n{text}")
        for line in text.splitlines():  # verbose lines: "tests/x.py::name[id] PASSED   [ 10%]"
            found = VERBOSE_OUTCOME.search(line)
            if found and not line.startswith(("FAILED ", "ERROR ")):  # not -rf's summary lines
                counts[found.group(1).lower()] += 1
        if code is None:
            cut.append(path)
        elif code != 0:
            failed_files.append(path)
    summary = f"{counts['passed']} passed, {counts['failed']} failed"
    if counts["error"]:
        summary += f", {counts['error']} errors"
    if failed_files:
        summary += f" (failing files: {', '.join(Path(f).name for f in failed_files)})"
    if cut or never_started:
        limit = f"{timeout:.0f}" if timeout is not None else "?"
        summary = (f"timed out after {limit} s (the rest of the budget went to the sweep): {summary}; "
                   f"cut: {', '.join(Path(f).name for f in cut) or 'none'}; "
                   f"not started: {', '.join(Path(f).name for f in never_started) or 'none'}")
    passed = not (cut or never_started or failed_files) and counts["failed"] == 0 and counts["error"] == 0
    header = (f"$ TRITON_INTERPRET=0 IWAE_BENCH_AUTOTUNE=0 python -m pytest -v --tb=short -rf <file>, one process "
              f"per file: {' '.join(files)}\n\n")
    write_text(out / "tests.txt", header + "\n".join(sections) + f"\n{summary}\n")
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
    if "tests" in phases:  # a resumed run without the tests keeps the earlier run's verdict
        write_text(out / "tests-summary.txt", f"{'passed' if passed else 'FAILED'}: {summary}\n")
    # finished before the report renders it (else the report lists this run as interrupted)
    record.finish(run, seconds=round(time.monotonic() - start, 1))
    if "report" in phases and (out / "results.csv").exists():
        from .report import render

        began = time.monotonic()
        report = render(out)
        timings["report"] = round(time.monotonic() - began, 1)
        log(f"[report] {report} ({timings['report']:.0f} s)")
        record.finish(run, seconds=round(time.monotonic() - start, 1))  # with the report's time
    if archive_to is not None:
        log(f"[archive] {archive(out, archive_to)}")
    if not passed:
        log(f"correctness suite FAILED: {summary}")
    return 0 if passed else 1


def _done(out: Path) -> set[tuple]:
    from .harness.table import identity, read_table

    path = out / "results.csv"
    return {identity(row) for row in read_table(path).rows} if path.exists() else set()
