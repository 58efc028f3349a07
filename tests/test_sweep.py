"""`python -m iwae_bench sweep` and `report`: the CSV, the plots, the report, resume, bad flags."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from iwae_bench import reference
from iwae_bench.problems import Problem, make_inputs
from iwae_bench.sweep import COLUMNS, KEY, min_bytes

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, **kwargs):
    # these sweeps run on the CPU, where Triton is interpreted (on a GPU machine too)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "iwae_bench", *args], capture_output=True,
                          text=True, env=env, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_help_explains_every_flag():
    done = _cli("sweep", "--help")
    assert done.returncode == 0
    for flag in ["--preset", "--k", "--batch", "--latent", "--data-dim", "--variants", "--dtype",
                 "--mode", "--device", "--out", "--resume"]:
        assert flag in done.stdout
    assert "results.csv" in done.stdout and "machine.json" in done.stdout


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    done = _cli("sweep", "--device", "cpu", "--k", "1", "3", "--batch", "2", "--latent", "4",
                "--data-dim", "20", "--mode", "forward", "backward", "--min-time", "0.01",
                "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_tiny_sweep_writes_every_column_and_variant(tiny_sweep):
    rows = _rows(tiny_sweep / "results.csv")
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 5 * 2 * 2  # variants x k x modes
    assert {r["variant"] for r in rows} == {"naive", "torch", "compile", "triton", "fused"}
    by_key = {tuple(r[c] for c in KEY): r for r in rows}
    assert len(by_key) == len(rows)
    for r in rows:
        if r["variant"] in ("triton", "fused"):
            assert r["status"] == "interpreted" and r["gbps"] == "" and float(r["time_ms"]) > 0
        else:
            assert r["status"] == "ok", r["message"]
            assert float(r["samples_per_s"]) > 0 and float(r["bw_fraction"]) > 0
        if r["mode"] == "backward":
            assert r["grad_max_abs_err"] != ""
    compile_rows = [r for r in rows if r["variant"] == "compile"]
    assert all(float(r["compile_ms"]) > 0 for r in compile_rows)


def test_tiny_sweep_numbers_match_the_reference(tiny_sweep):
    """bound_mean, elbo_mean, the gap and the bytes recomputed from the same seeded inputs."""
    for r in _rows(tiny_sweep / "results.csv"):
        problem = Problem(int(r["batch"]), int(r["k"]), int(r["latent"]), int(r["data_dim"]), r["dtype"])
        inputs = make_inputs(problem)
        log_w = reference.log_weights(*inputs)
        assert int(r["bytes"]) == min_bytes(inputs, r["mode"])
        assert math.isclose(float(r["elbo_mean"]), reference.elbo(log_w).mean().item(), rel_tol=1e-12)
        if r["variant"] != "naive":
            assert math.isclose(float(r["bound_mean"]), reference.iwae_bound(log_w).mean().item(),
                                abs_tol=1e-3)
            assert float(r["max_abs_err"]) < 1e-3 and float(r["finite_fraction"]) == 1.0
            assert math.isclose(float(r["iwae_elbo_gap"]),
                                (reference.iwae_bound(log_w) - reference.elbo(log_w)).mean().item(), abs_tol=1e-3)


def test_tiny_sweep_writes_plots_report_and_machine(tiny_sweep):
    pngs = sorted((tiny_sweep / "plots").glob("*.png"))
    names = {p.stem for p in pngs}
    assert {"headline", "bounds", "error_forward", "error_backward", "throughput_forward_float32",
            "speedup_backward_float32", "bandwidth_forward_float32"} <= names
    for png in pngs:
        image = matplotlib.image.imread(png)
        assert image.shape[0] > 100 and image.shape[1] > 100
    report = (tiny_sweep / "report.md").read_text()
    for heading in ["## Machine", "## Throughput: forward, float32", "## IWAE bound and ELBO",
                    "## Error against the reference: backward", "## Cells that are not speed measurements"]:
        assert heading in report
    assert "interpreted" in report
    assert (tiny_sweep / "report.html").read_text().startswith("<!doctype html>")
    record = json.loads((tiny_sweep / "machine.json").read_text())
    assert record["machine"]["device"] == "cpu" and record["machine"]["torch"]
    assert record["runs"][0]["copy_bandwidth_gbps"] > 0 and record["runs"][0]["finished"]
    assert not list(tiny_sweep.glob("*.tmp"))


def test_report_renders_from_the_csv_alone(tiny_sweep, tmp_path):
    (tmp_path / "results.csv").write_bytes((tiny_sweep / "results.csv").read_bytes())
    done = _cli("report", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plots" / "headline.png").exists()
    report = (tmp_path / "report.md").read_text()
    assert "## Throughput: forward, float32" in report


def test_killed_sweep_resumes_with_each_cell_once(tmp_path):
    args = ["sweep", "--device", "cpu", "--k", "1", "2", "3", "4", "5", "6", "--batch", "2",
            "--latent", "3", "--data-dim", "10", "--variants", "naive", "torch", "fused",
            "--mode", "forward", "--min-time", "0.3", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "iwae_bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv_path = tmp_path / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 4:  # header + 3 rows
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _rows(csv_path)
    assert 3 <= len(before) < 18, "the kill should land mid-sweep"

    done = _cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    rows = _rows(csv_path)
    keys = [tuple(r[c] for c in KEY) for r in rows]
    assert len(rows) == 18 and len(set(keys)) == 18
    assert rows[:len(before)] == before  # finished rows kept as they were
    runs = json.loads((tmp_path / "machine.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0]["finished"] is None and runs[1]["finished"]


def test_resume_drops_a_row_cut_off_mid_write(tmp_path):
    from iwae_bench.sweep import read_done

    path = tmp_path / "results.csv"
    path.write_text(",".join(COLUMNS) + "\n" + "torch,cpu,float32,1,2,3,10,forward," + "1," * 5 + "\nnaive,cpu,flo")
    done = read_done(path)
    assert done == {("torch", "cpu", "float32", "1", "2", "3", "10", "forward")}
    assert path.read_text().endswith("\n")


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "argument --k: must be an integer >= 1, got 0"),
    (["--variants", "nope"], "argument --variants: invalid choice: 'nope'"),
    (["--batch", "two"], "argument --batch: expected an integer, got 'two'"),
    (["--out", "{file}/sub"], "is not writable"),
], ids=["k=0", "unknown-variant", "batch-not-int", "unwritable-out"])
def test_bad_flags_exit_2_with_one_line(args, message, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _cli("sweep", *[a.format(file=blocker) for a in args])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_report_of_a_missing_csv_is_one_line(tmp_path):
    done = _cli("report", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "no sweep CSV" in done.stderr and "Traceback" not in done.stderr
