"""pytest-benchmark's JSON turned into the sweep's CSV, plots and report."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iwae_bench.pytest_bench import rows_from_json

ROOT = Path(__file__).resolve().parent.parent


def test_rows_from_json_known_values(tmp_path):
    info = {"variant": "fused", "device": "cuda", "dtype": "float32", "k": 64, "batch": 1024,
            "latent": 50, "data_dim": 784, "mode": "forward", "bytes": 200_000_000,
            "copy_gbps": 2000.0, "max_abs_err": 1e-5, "interpreted": False}
    data = {"datetime": "2026-11-25T00:00:00", "machine_info": {"iwae_bench": {"device": "cuda"}},
            "commit_info": {"id": "abc"},
            "benchmarks": [{"name": "test_bound[fused]", "extra_info": info,
                            "stats": {"median": 0.002, "data": [0.001, 0.002, 0.002, 0.003, 0.004, 0.005]}},
                           {"name": "test_other", "extra_info": {}, "stats": {"median": 1.0}}]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    rows, record = rows_from_json(path)
    assert len(rows) == 1  # benchmarks without our extra_info are not ours
    row = rows[0]
    assert row["time_ms"] == pytest.approx(2.0)
    assert row["gbps"] == pytest.approx(100.0)            # 2e8 bytes / 2 ms
    assert row["bw_fraction"] == pytest.approx(0.05)      # of 2000 GB/s
    assert row["samples_per_s"] == pytest.approx(1024 * 64 / 0.002)
    assert row["time_ms_p20"] == pytest.approx(2.0) and row["time_ms_p80"] == pytest.approx(4.0)
    assert row["status"] == "ok"
    assert record["machine"] == {"device": "cuda"} and record["runs"][0]["commit"] == "abc"


def test_benchmark_json_becomes_a_report(tmp_path):
    # the CPU shapes, Triton interpreted (on a GPU machine too): a check of the plumbing
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    out_json = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/benchmarks/test_bench_reduction.py", "-k", "torch or triton",
         "--benchmark-only", "--benchmark-min-rounds=2", "--benchmark-max-time=0.02",
         f"--benchmark-json={out_json}"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report_dir = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "iwae_bench", "report", "--from-pytest-benchmark",
                           str(out_json), str(report_dir)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open(report_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"torch", "triton"} and len(rows) == 6
    for r in rows:
        assert r["mode"] == "reduction" and float(r["max_abs_err"]) < 1e-3
        if r["variant"] == "torch":
            assert r["status"] == "ok" and float(r["gbps"]) > 0
            assert math.isclose(float(r["gbps"]), int(r["bytes"]) / (float(r["time_ms"]) * 1e-3) / 1e9,
                                rel_tol=1e-9)
        else:
            assert r["status"] == "interpreted"
    assert (report_dir / "plots" / "throughput_reduction_float32.png").exists()
    assert "## Throughput: reduction, float32" in (report_dir / "report.md").read_text()
    machine = json.loads((report_dir / "machine.json").read_text())
    assert machine["machine"]["torch"] and machine["runs"][0]["copy_bandwidth_gbps"] > 0
