"""`validate`: the GPU command's phases and its targets table, exercised without a GPU."""

import os
import subprocess
import sys
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


def test_kernel_tests_need_nothing_a_bare_gpu_image_lacks():
    """The GPU image has torch, triton, pandas, matplotlib, pytest and pytest-benchmark only."""
    for path in validate_module.KERNEL_TESTS:
        text = (ROOT / path).read_text()
        for extra in ("scipy", "hypothesis", "mlxtend", "tqdm"):
            assert f"import {extra}" not in text and f"from {extra}" not in text, (path, extra)


def test_validate_phases_write_the_results_folder(tmp_path):
    grid = Grid([Block(k=[5], batch=[2], latent=[3], data_dim=[12], mode=["forward"])],
                variants=["torch", "fused"], reductions=[(4, 300)])
    status = validate_module.validate(torch.device("cpu"), tmp_path, with_tests=False, grid=grid,
                                      progress=False, log=lambda *a: None)
    assert status == 0
    rows = pd.read_csv(tmp_path / "results.csv")
    # two variants of the bound; the reduction only for torch ("fused" has nothing to fuse there)
    assert set(rows["family"]) == {"bound", "reduction"} and len(rows) == 2 + 1
    assert (tmp_path / "report.md").exists() and (tmp_path / "plots" / "headline.png").exists()
    assert "GPU targets" not in (tmp_path / "report.md").read_text()  # a CPU run claims none


def _row(variant, mode, dtype, batch, k, time_ms, bw=None, status="ok", peak=None):
    reduction = mode == "reduction"
    return {"family": "reduction" if reduction else "bound", "variant": variant, "device": "cuda",
            "mode": "forward" if reduction else mode, "regime": "realistic", "dtype": dtype,
            "batch": batch, "k": k, "latent": 0 if reduction else 50, "data_dim": 0 if reduction else 784,
            "time_ms": time_ms, "bw_fraction": bw, "status": status, "peak_mem_bytes": peak}


def test_targets_table_against_known_measurements():
    frame = pd.DataFrame([
        _row("compile", "forward", "float32", 1024, 64, 3.0),
        _row("fused", "forward", "float32", 1024, 64, 1.5, bw=0.90, peak=1024 * 64 * 8),
        _row("compile", "forward", "bfloat16", 1024, 64, 2.0),
        _row("fused", "forward", "bfloat16", 1024, 64, 1.0, bw=0.70),
        _row("fused", "backward", "float32", 8, 100_000, None, status="oom"),
        _row("compile", "reduction", "float32", 16384, 1024, 1.0),
        _row("triton", "reduction", "float32", 16384, 1024, 0.8, bw=0.85),
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
    assert len(table) == 8
