"""`validate`: the GPU command's phases and its targets table, exercised without a GPU."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd
import torch

from iwae_bench import validate as validate_module
from iwae_bench.harness.sweep import Block, Grid
from iwae_bench.targets import targets_table

ROOT = Path(__file__).resolve().parent.parent


def test_validate_without_cuda_is_one_clear_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "iwae_bench", "validate"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if torch.cuda.is_available():
        return  # a GPU machine runs the real thing (minutes); the no-GPU answer is for CPUs
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "validate needs a CUDA GPU" in lines[0]


def test_kernel_tests_phase_records_the_suite(tmp_path, monkeypatch):
    monkeypatch.setattr(validate_module, "KERNEL_TESTS", ["tests/test_reference.py"])  # no Triton
    passed, summary = validate_module.run_kernel_tests(tmp_path)
    assert passed and "8 passed" in summary
    text = (tmp_path / "tests.txt").read_text()
    assert text.startswith("$ TRITON_INTERPRET=0 IWAE_BENCH_AUTOTUNE=0") and "8 passed" in text


def test_kernel_tests_phase_has_a_time_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(validate_module, "KERNEL_TESTS", ["tests/test_reference.py"])
    passed, summary = validate_module.run_kernel_tests(tmp_path, timeout=0.5)
    assert not passed and summary.startswith("timed out after 0 s")
    assert "timed out" in (tmp_path / "tests.txt").read_text()


PLANTED = """
import time


def test_passes():
    assert 1 + 1 == 2


def test_fails():
    assert 1 + 1 == 3


def test_slow():
    time.sleep(float(__import__("os").environ.get("PLANTED_SLEEP", "0")))
"""


def test_kernel_tests_run_a_process_per_file_and_name_the_failing_file(tmp_path, monkeypatch):
    planted = tmp_path / "test_planted.py"
    planted.write_text(PLANTED)
    monkeypatch.setattr(validate_module, "KERNEL_TESTS", ["tests/test_reference.py", str(planted)])
    passed, summary = validate_module.run_kernel_tests(tmp_path / "out", workers=2)
    assert not passed and summary == "10 passed, 1 failed (failing files: test_planted.py)"
    text = (tmp_path / "out" / "tests.txt").read_text()
    assert "test_planted.py::test_fails FAILED" in text and "assert 1 + 1 == 3" in text  # -v and the traceback
    assert (tmp_path / "out" / "tests" / "test_reference.txt").exists()


def test_a_timeout_keeps_the_lines_a_file_got_to(tmp_path, monkeypatch):
    """The process killed at the limit leaves its finished tests in the record."""
    planted = tmp_path / "test_planted.py"
    planted.write_text(PLANTED)
    monkeypatch.setenv("PLANTED_SLEEP", "60")
    monkeypatch.setattr(validate_module, "KERNEL_TESTS", [str(planted), "tests/test_reference.py"])
    began = time.monotonic()
    passed, summary = validate_module.run_kernel_tests(tmp_path / "out", timeout=8, workers=1)
    assert time.monotonic() - began < 30
    assert not passed and summary.startswith("timed out after 8 s")
    assert "cut: test_planted.py" in summary and "not started: test_reference.py" in summary
    text = (tmp_path / "out" / "tests.txt").read_text()
    assert "test_planted.py::test_passes PASSED" in text and "killed at the time limit" in text


def test_kernel_tests_need_nothing_a_bare_gpu_image_lacks():
    """The GPU image has torch, triton, pandas, matplotlib, pytest and pytest-benchmark only."""
    for path in validate_module.KERNEL_TESTS:
        text = (ROOT / path).read_text()
        for extra in ("scipy", "hypothesis", "mlxtend", "tqdm", "markdown_it"):
            assert f"import {extra}" not in text and f"from {extra}" not in text, (path, extra)


GRID = dict(blocks=[Block(k=[5, 7], batch=[2], latent=[3], data_dim=[12], mode=["forward"])],
            variants=["torch", "fused"], reductions=[(4, 300)])


def test_validate_phases_write_the_results_folder_and_one_archive(tmp_path):
    out = tmp_path / "gpu"
    status = validate_module.validate(torch.device("cpu"), out, phases=("sweep", "report"),
                                      grid=Grid(**GRID), archive_to=tmp_path / "gpu.tar.gz",
                                      progress=False, log=lambda *a: None)
    assert status == 0
    rows = pd.read_csv(out / "results.csv")
    # two variants of the bound at two k; the reduction only for torch ("fused" has nothing to fuse)
    assert set(rows["family"]) == {"bound", "reduction"} and len(rows) == 4 + 1
    assert (out / "report.md").exists() and (out / "plots" / "headline.png").exists()
    report = (out / "report.md").read_text()
    assert "GPU targets" not in report and "Cells not measured" not in report
    record = json.loads((out / "machine.json").read_text())
    phases = record["runs"][-1]["validate"]
    assert phases["phases"] == ["sweep", "report"] and set(phases["phase_seconds"]) == {"sweep", "report"}
    assert record["runs"][-1]["missing_cells"] == [] and record["runs"][-1]["finished"]
    assert "triton_autotune" in record["machine"]
    with tarfile.open(tmp_path / "gpu.tar.gz") as tar:
        names = tar.getnames()
    assert "gpu/results.csv" in names and "gpu/report.md" in names and "gpu/machine.json" in names


def test_budget_stops_new_cells_and_resume_finishes_them(tmp_path):
    """A budget already spent when the sweep starts: no cell runs, every cell is listed as
    left out (in machine.json and the report); --resume with time to spare runs them all."""
    out = tmp_path / "gpu"
    validate_module.validate(torch.device("cpu"), out, phases=("sweep",), budget=1.0,
                             grid=Grid(**GRID), progress=False, log=lambda *a: None)
    record = json.loads((out / "machine.json").read_text())
    assert len(record["runs"][-1]["missing_cells"]) == 5
    sweep_run = record["runs"][-2]
    assert sweep_run["stopped_at_deadline"] is True
    validate_module.validate(torch.device("cpu"), out, phases=("sweep", "report"), resume=True,
                             grid=Grid(**GRID), progress=False, log=lambda *a: None)
    assert len(pd.read_csv(out / "results.csv")) == 5
    assert json.loads((out / "machine.json").read_text())["runs"][-1]["missing_cells"] == []


def test_report_lists_the_cells_left_out(tmp_path):
    out = tmp_path / "gpu"
    validate_module.validate(torch.device("cpu"), out, phases=("sweep",), grid=Grid(**GRID),
                             progress=False, log=lambda *a: None)
    record = json.loads((out / "machine.json").read_text())
    record["runs"][-1]["missing_cells"] = ["bound fused cpu float32 9 2 3 12 forward realistic 0"]
    (out / "machine.json").write_text(json.dumps(record))
    from iwae_bench.report import render

    text = render(out).read_text()
    assert "## Cells not measured" in text and "validate's budget ran out" in text
    assert "bound fused cpu float32 9 2 3 12 forward realistic 0" in text


def _row(variant, mode, dtype, batch, k, time_ms, bw=None, status="ok", peak=None, hidden=0):
    reduction = mode == "reduction"
    family = "reduction" if reduction else "head" if hidden else "bound"
    return {"family": family, "variant": variant, "device": "cuda",
            "mode": "forward" if reduction else mode, "regime": "realistic", "dtype": dtype,
            "batch": batch, "k": k, "latent": 0 if reduction else 50, "data_dim": 0 if reduction else 784,
            "hidden": hidden, "time_ms": time_ms, "bw_fraction": bw, "status": status, "peak_mem_bytes": peak}


def test_targets_table_against_known_measurements():
    frame = pd.DataFrame([
        _row("compile", "forward", "float32", 1024, 64, 3.0),
        _row("fused", "forward", "float32", 1024, 64, 1.5, bw=0.90, peak=1024 * 64 * 8),
        _row("compile", "forward", "bfloat16", 1024, 64, 2.0),
        _row("fused", "forward", "bfloat16", 1024, 64, 1.0, bw=0.70),
        _row("fused", "backward", "float32", 8, 100_000, None, status="oom"),
        _row("compile", "reduction", "float32", 16384, 1024, 1.0),
        _row("triton", "reduction", "float32", 16384, 1024, 0.8, bw=0.85),
        _row("triton", "forward", "bfloat16", 20, 5000, 30.0, hidden=200),
        _row("fused_linear", "forward", "bfloat16", 20, 5000, 9.0, hidden=200, peak=20 * 5000 * 8),
        _row("triton", "backward", "bfloat16", 20, 5000, 40.0, hidden=200),
        _row("fused_linear", "backward", "bfloat16", 20, 5000, 25.0, hidden=200),
    ])
    table = targets_table(frame).set_index(["target", "cell"])
    f32 = "forward float32 B=1024 k=64 d=50"
    bf16 = "forward bfloat16 B=1024 k=64 d=50"
    assert table.loc[("fused: fraction of copy bandwidth", f32), "met"] == "yes"     # 0.90 >= 0.85
    assert table.loc[("fused: speedup over torch.compile", f32), "measured"] == 2.0  # 3.0 / 1.5
    assert table.loc[("fused: speedup over torch.compile", f32), "met"] == "yes"     # >= 1.5
    assert table.loc[("fused: peak extra memory O(B*k)", f32), "met"] == "yes"
    assert table.loc[("fused: fraction of copy bandwidth", bf16), "met"] == "no"     # 0.70 < 0.75
    assert table.loc[("fused: speedup over torch.compile", bf16), "met"] == "no"     # 2.0 < 2.5
    assert table.loc[("fused runs", "backward float32 B=8 k=100000 d=50"), "measured"] == "oom"
    red = "reduction B=16384 k=1024"
    assert table.loc[("iwae_bound: at least as fast as torch.compile", red), "met"] == "yes"
    assert table.loc[("iwae_bound: fraction of copy bandwidth", red), "met"] == "yes"
    head = "head forward bfloat16 B=20 k=5000 H=200"
    assert table.loc[("fused_linear: speedup over matmul + fused bound", head), "measured"] == 30.0 / 9.0
    assert table.loc[("fused_linear: speedup over matmul + fused bound", head), "met"] == "yes"  # >= 3
    back = "head backward bfloat16 B=20 k=5000 H=200"
    assert table.loc[("fused_linear: speedup over matmul + fused bound", back), "met"] == "no"   # 1.6 < 2
    assert table.loc[("fused_linear: peak extra memory O(B*k)", head), "met"] == "yes"
    assert len(table) == 8 + 3
