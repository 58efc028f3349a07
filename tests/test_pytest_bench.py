"""pytest-benchmark's JSON turned into the results CSV, plots and report; interpreted runs named."""

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


def _bench(name, samples, **info):
    extra = {"family": "bound", "variant": "fused", "device": "cuda", "dtype": "float32", "k": 64,
             "batch": 1024, "latent": 50, "data_dim": 784, "mode": "forward", "regime": "realistic",
             "seed": 0, "bytes": 200_000_000, "copy_gbps": 2000.0, "max_abs_err": 1e-5,
             "interpreted": False, **info}
    return {"name": name, "extra_info": extra, "stats": {"median": None, "data": samples}}


def test_rows_from_json_known_values(tmp_path):
    data = {"datetime": "2026-11-25T00:00:00", "machine_info": {"iwae_bench": {"device": "cuda"}},
            "commit_info": {"id": "abc"},
            "benchmarks": [_bench("test_bound[fused]", [0.0019, 0.002, 0.002, 0.002, 0.0021]),
                           _bench("test_bound[torch]", [0.001, 0.002, 0.003, 0.004, 0.005], variant="torch"),
                           {"name": "test_other", "extra_info": {}, "stats": {"median": 1.0}}]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    rows, record = rows_from_json(path)
    assert len(rows) == 2  # benchmarks without our extra_info are not ours
    steady, spread = rows
    assert steady["time_ms"] == pytest.approx(2.0)
    assert steady["gbps"] == pytest.approx(100.0)            # 2e8 bytes / 2 ms
    assert steady["bw_fraction"] == pytest.approx(0.05)      # of 2000 GB/s
    assert steady["samples_per_s"] == pytest.approx(1024 * 64 / 0.002)
    assert steady["time_samples"] == 5 and steady["status"] == "ok"
    # numpy's linear percentiles of 1..5 ms: p20 = 1.8, p80 = 4.2, so p80/p20 = 2.33 > 1.5
    assert spread["time_ms_p20"] == pytest.approx(1.8) and spread["time_ms_p80"] == pytest.approx(4.2)
    assert spread["status"] == "noisy" and "p80/p20 = 2.33" in spread["message"]
    assert record.machine == {"device": "cuda"} and record.runs[0]["commit"] == "abc"


def test_benchmark_json_becomes_a_report_and_names_interpreted_runs(tmp_path):
    # the CPU shapes, Triton interpreted (on a GPU machine too): a check of the plumbing. The
    # inner pytest is not an xdist worker even when this one is (pytest-benchmark would turn
    # timing off where it sees PYTEST_XDIST_WORKER)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
           "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    out_json = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/benchmarks/test_bench_reduction.py", "-k", "torch or triton",
         "--benchmark-only", "--benchmark-min-rounds=2", "--benchmark-max-time=0.02",
         f"--benchmark-json={out_json}"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    benchmarks = json.loads(out_json.read_text())["benchmarks"]
    for bench in benchmarks:
        interpreted = bench["extra_info"]["variant"] == "triton"
        assert ("-interpreted" in bench["name"]) == interpreted, bench["name"]
        assert bench["group"].startswith("interpreted: ") == interpreted, bench["group"]
    report_dir = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "iwae_bench", "report", "--from-pytest-benchmark",
                           str(out_json), str(report_dir)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open(report_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"torch", "triton"} and len(rows) == 6
    assert sorted({int(r["k"]) for r in rows}) == [1, 64, 4096]  # a curve, not one point
    for r in rows:
        assert r["family"] == "reduction" and float(r["max_abs_err"]) < 1e-3
        if r["variant"] == "torch":
            assert r["status"] in ("ok", "noisy") and float(r["gbps"]) > 0
            assert math.isclose(float(r["gbps"]), int(r["bytes"]) / (float(r["time_ms"]) * 1e-3) / 1e9,
                                rel_tol=1e-9)
        else:
            assert r["status"] == "interpreted" and r["gbps"] == ""
    assert (report_dir / "plots" / "throughput_reduction_float32.png").exists()
    report = (report_dir / "report.md").read_text()
    assert "## Throughput: the reduction alone on [B, k] float32 log-weights" in report
    assert "d=0" not in report and "float32 logits" not in report
    machine = json.loads((report_dir / "machine.json").read_text())
    assert machine["machine"]["torch"] and machine["runs"][0]["copy_bandwidth_gbps"] > 0
