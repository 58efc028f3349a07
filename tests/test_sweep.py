"""`python -m iwae_bench sweep`: the CSV, the report, where runs go, resume, bad flags."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iwae_bench import reference
from iwae_bench.harness.cell import bound_bytes
from iwae_bench.harness.sweep import Grid, ResumeError, check_resume
from iwae_bench.harness.table import COLUMNS, IDENTITY
from iwae_bench.problems import Problem, make_inputs

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--data-dim", "20", "--min-time", "0.01", "--no-progress"]


def _cli(*args, cwd=ROOT, **kwargs):
    # these sweeps run on the CPU, where Triton is interpreted (on a GPU machine too)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "iwae_bench", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, **kwargs)


def _sweep_here(*args) -> None:
    """A sweep in this process: the cells' own tests need no interpreter of their own (the
    command's process runs in the tiny sweep and the resume tests)."""
    from iwae_bench.cli import main

    assert main(["sweep", *args]) == 0


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _key(row) -> tuple:
    return tuple(row[c] for c in IDENTITY)


def test_help_explains_every_flag():
    done = _cli("sweep", "--help")
    assert done.returncode == 0
    for flag in ["--preset", "--k", "--batch", "--latent", "--data-dim", "--variants", "--dtype",
                 "--mode", "--regime", "--objective", "--likelihood", "--layers", "--device", "--out", "--against",
                 "--resume", "--seed", "--min-time", "--no-progress"]:
        assert flag in done.stdout
    assert "results.csv" in done.stdout and "machine.json" in done.stdout
    assert "results/runs/<device>" in done.stdout and "promote" in done.stdout
    help_text = " ".join(done.stdout.split())
    for spelling in ("continuous_bernoulli (cb)", "gaussian:pixel", "gaussian:sigma=S", "(logistic;",
                     ":mix=L", ",floor=F"):
        assert spelling in help_text, spelling


def test_quick_preset_varies_k_batch_and_latent_width():
    grid = Grid.preset("quick", torch.device("cpu"))
    problems = [p for p, _ in grid.problems()]
    assert {p.latent for p in problems} == {16, 50, 200}
    assert len({p.k for p in problems}) >= 4 and len({p.batch for p in problems}) >= 2
    assert {p.regime for p in problems} == {"realistic", "saturated"}
    assert {p.family for p in problems} == {"bound", "head"}
    head_cells = [cells for p, cells in grid.problems() if p.family == "head"]
    assert {v for cells in head_cells for v, _ in cells} == {"torch", "compile", "triton", "fused_linear"}
    assert grid.reductions and len(grid.identities(torch.device("cpu"))) == grid.size()
    one = Grid.preset("quick", torch.device("cpu"), k=[3], latent=[7])
    assert [(p.k, p.latent, p.batch) for p, _ in one.problems()] == [(3, 7, 4), (3, 7, 32)]
    assert one.reductions == []


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    done = _cli("sweep", *TINY, "--k", "1", "3", "--batch", "2", "--latent", "4",
                "--mode", "forward", "backward", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_tiny_sweep_writes_every_column_and_variant(tiny_sweep):
    rows = _rows(tiny_sweep / "results.csv")
    assert list(rows[0]) == COLUMNS
    assert len(rows) == 6 * 2 * 2  # variants x k x modes
    assert {r["variant"] for r in rows} == {"naive", "blog", "torch", "compile", "triton", "fused"}
    assert len({_key(r) for r in rows}) == len(rows)
    for r in rows:
        assert r["family"] == "bound" and r["seed"] == "0" and r["regime"] == "realistic"
        if r["variant"] in ("triton", "fused"):
            assert r["status"] == "interpreted" and r["gbps"] == "" and float(r["time_ms"]) > 0
        else:
            assert r["status"] in ("ok", "noisy"), r["message"]
            assert float(r["samples_per_s"]) > 0 and float(r["bw_fraction"]) > 0
            assert int(r["time_samples"]) >= 5 and float(r["time_spread"]) >= 1.0
        if r["mode"] == "backward":
            assert r["grad_max_abs_err"] != ""
    assert all(float(r["compile_ms"]) > 0 for r in rows if r["variant"] == "compile")


def test_tiny_sweep_numbers_match_the_reference(tiny_sweep):
    """bound_mean, elbo_mean, the gap and the bytes recomputed from the same seeded inputs."""
    for r in _rows(tiny_sweep / "results.csv"):
        problem = Problem(int(r["batch"]), int(r["k"]), int(r["latent"]), int(r["data_dim"]), r["dtype"])
        inputs = make_inputs(problem)
        log_w = reference.log_weights(*inputs)
        assert int(r["bytes"]) == bound_bytes(inputs, r["mode"])
        assert math.isclose(float(r["elbo_mean"]), reference.elbo(log_w).mean().item(), rel_tol=1e-12)
        if r["variant"] != "naive":
            assert math.isclose(float(r["bound_mean"]), reference.iwae_bound(log_w).mean().item(),
                                abs_tol=1e-3)
            assert float(r["max_abs_err"]) < 1e-3 and float(r["finite_fraction"]) == 1.0
            assert math.isclose(float(r["iwae_elbo_gap"]),
                                (reference.iwae_bound(log_w) - reference.elbo(log_w)).mean().item(), abs_tol=1e-3)


def test_family_cells_are_each_objectives_against_its_float64_value(tmp_path):
    """--objective: every variant that computes the member does, its error against that
    member's float64 value (not the IWAE bound's); blog, which computes the IWAE bound only,
    is left out of the others; the report tables them apart."""
    _sweep_here(*TINY, "--k", "4", "--batch", "2", "--latent", "3", "--mode", "forward",
                "--objective", "iwae", "vr:0.5", "miwae:2x2", "ciwae:0.25", "--out", str(tmp_path))
    rows = _rows(tmp_path / "results.csv")
    by_objective = {}
    for r in rows:
        by_objective.setdefault(r["objective"], set()).add(r["variant"])
    assert by_objective["iwae"] == {"naive", "blog", "torch", "compile", "triton", "fused"}
    for spec in ("vr:0.5", "miwae:2x2", "ciwae:0.25"):
        assert by_objective[spec] == {"naive", "torch", "compile", "triton", "fused"}
    from iwae_bench.training import Objective
    log_w = reference.log_weights(*make_inputs(Problem(2, 4, 3, 20, "float32")))
    for r in rows:
        want = reference.objective_bound(log_w, Objective.parse(r["objective"])).mean().item()
        if r["variant"] != "naive":
            assert float(r["max_abs_err"]) < 1e-4, r
            assert math.isclose(float(r["bound_mean"]), want, abs_tol=1e-4), r
    means = {r["objective"]: float(r["bound_mean"]) for r in rows if r["variant"] == "torch"}
    assert means["iwae"] > means["vr:0.5"] and means["iwae"] > means["miwae:2x2"]
    report = (tmp_path / "report.md").read_text()
    assert "## The family: bound error, forward" in report and "| miwae:2x2 |" in report


def test_a_csv_of_an_earlier_version_reads_its_rows_as_the_bernoulli_iwae_bound(tiny_sweep, tmp_path):
    """CSVs written before the objective, likelihood and layers columns: their rows are the
    one-layer IWAE bound under the Bernoulli, and the report renders them."""
    from iwae_bench.harness.table import read_table
    from iwae_bench.report import render

    rows = _rows(tiny_sweep / "results.csv")
    old = tmp_path / "results.csv"
    with open(old, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c in COLUMNS if c not in ("objective", "likelihood", "layers")],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = read_table(old)
    assert len(table.rows) == len(rows) and not table.problems
    assert {r["objective"] for r in table.rows} == {"iwae"}
    assert {r["likelihood"] for r in table.rows} == {"bernoulli"}
    assert {r["layers"] for r in table.rows} == {1}
    assert "## Bound error: forward, realistic inputs" in render(tmp_path).read_text()


def test_two_layer_cells_are_checked_against_float64(tmp_path):
    """--layers 2: each variant that takes stochastic layers computes the two-layer bound (h1 with
    the per-sample prior p(h1|h2), h2 with the per-sample posterior q(h2|h1)), its value and
    gradients against float64 and its bytes counting every per-sample parameter; blog, which
    has one latent, is a skipped row with the reason; the report tables the block apart."""
    done = _cli("sweep", *TINY, "--k", "4", "--batch", "2", "--latent", "3", "--mode", "backward",
                "--layers", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(tmp_path / "results.csv")
    assert {r["layers"] for r in rows} == {"2"}
    assert {r["variant"] for r in rows} == {"naive", "blog", "torch", "compile", "triton", "fused"}
    problem = Problem(2, 4, 3, 20, layers=2)
    inputs = make_inputs(problem)
    want = reference.bound(inputs.x, inputs.logits, inputs.z).mean().item()
    for r in rows:
        if r["variant"] == "blog":
            assert r["status"] == "skipped" and "computes one stochastic layer" in r["message"], r
            continue
        assert r["status"] in ("ok", "noisy", "interpreted"), r
        assert float(r["max_abs_err"]) < 1e-5 and float(r["grad_max_abs_err"]) < 1e-4, r
        assert math.isclose(float(r["bound_mean"]), want, abs_tol=1e-5), r
        assert int(r["bytes"]) == bound_bytes(inputs, "backward")
    report = (tmp_path / "report.md").read_text()
    for section in ("bound error", "gradient error", "time"):
        assert f"## Two stochastic layers: {section}, backward" in report


def test_quick_presets_have_a_two_layer_block():
    """The two-layer bound at the one-layer main block's shapes, every bound variant (blog to be
    skipped with its reason), no decoder-head cell with two layers."""
    for device, shape in (("cpu", (4, 64, 50)), ("cuda", (256, 1024, 50))):
        block = [(p, todo) for p, todo in Grid.preset("quick", torch.device(device)).problems() if p.layers == 2]
        assert block and all(p.family == "bound" for p, _ in block)
        assert shape in {(p.batch, p.k, p.latent) for p, _ in block}
        assert any(p.layers == 1 and (p.batch, p.k, p.latent) == shape
                   for p, _ in Grid.preset("quick", torch.device(device)).problems())
        assert {v for _, todo in block for v, _ in todo} == {"naive", "blog", "torch", "compile", "triton", "fused"}


def test_quick_presets_have_a_likelihood_block():
    """Each continuous likelihood at B = 4, k = 64, D = 784 on the CPU (bigger on CUDA), every
    variant that takes it (not blog), beside the Bernoulli of the other blocks."""
    for device, cells in (("cpu", {(4, 64, 784)}), ("cuda", {(256, 64, 784), (256, 1024, 784), (20, 64, 784)})):
        grid = Grid.preset("quick", torch.device(device))
        block = [(p, todo) for p, todo in grid.problems() if p.likelihood != "bernoulli"]
        assert {p.likelihood for p, _ in block} == {"gaussian", "continuous_bernoulli", "discretized_logistic"}
        assert {(p.batch, p.k, p.data_dim) for p, _ in block if p.family == "bound"} == cells
        for _, todo in block:
            assert "blog" not in {v for v, _ in todo} and {m for _, m in todo} == {"forward", "backward"}
        assert {p.likelihood for p, _ in grid.problems() if p.objective != "iwae"} == {"bernoulli"}


def test_likelihood_axis_keeps_each_variant_to_the_likelihoods_it_takes():
    grid = Grid.preset("quick", torch.device("cpu"), likelihood=["bernoulli", "discretized_logistic:mix=2", "cb"])
    variants = {p.likelihood: {v for v, _ in todo} for p, todo in grid.problems() if p.k == 8 and p.batch == 4}
    assert variants == {"bernoulli": {"naive", "blog", "torch", "compile", "triton", "fused"},
                        "discretized_logistic:mix=2": {"naive", "torch", "compile"},
                        "continuous_bernoulli": {"naive", "torch", "compile", "triton", "fused"}}


def test_likelihood_cells_are_each_likelihoods_against_its_float64_value(tmp_path):
    """--likelihood: a column of its own; each cell's bound, gradients and bytes under its
    likelihood, against the float64 reference of the same seeded problem; blog only where the
    Bernoulli is; a section per likelihood in the report."""
    _sweep_here(*TINY, "--k", "4", "--batch", "2", "--latent", "3", "--mode", "backward",
                "--variants", "naive", "blog", "torch", "--likelihood", "bernoulli", "gaussian:pixel",
                "logistic:mix=2", "--regime", "saturated", "--out", str(tmp_path))
    rows = _rows(tmp_path / "results.csv")
    cells = {(r["likelihood"], r["regime"], r["variant"]) for r in rows}
    assert len(rows) == len(cells) == 3 + 2 + 2
    assert {lik for lik, _, v in cells if v == "blog"} == {"bernoulli"}
    for r in rows:
        problem = Problem(2, 4, 3, 20, regime=r["regime"], likelihood=r["likelihood"])
        inputs = make_inputs(problem)
        want = reference.bound(*inputs[:5], problem.likelihood_spec, inputs.scale).mean().item()
        assert int(r["bytes"]) == bound_bytes(inputs, "backward")
        if r["variant"] == "torch":
            assert r["status"] in ("ok", "noisy") and float(r["max_abs_err"]) < 1e-3, r
            assert math.isclose(float(r["bound_mean"]), want, abs_tol=1e-3)
            assert float(r["grad_max_abs_err"]) < 1e-3, r
    report = (tmp_path / "report.md").read_text()
    for likelihood in ("gaussian:pixel", "discretized_logistic:mix=2"):
        for section in ("bound error", "gradient error", "time"):
            assert f"## Likelihood {likelihood}: {section}, backward" in report
    assert "## Likelihood bernoulli" not in report


def test_tiny_sweep_writes_report_and_machine(tiny_sweep):
    report = (tiny_sweep / "report.md").read_text()
    for heading in ["## Machine", "## Throughput: forward, float32 logits", "## IWAE bound and ELBO",
                    "## Gradient error: backward, realistic inputs", "## Cells that are not speed measurements"]:
        assert heading in report
    record = json.loads((tiny_sweep / "machine.json").read_text())
    assert record["machine"]["device"] == "cpu" and record["machine"]["torch"]
    assert record["machine"]["triton_interpreted"] is True
    run = record["runs"][0]
    assert run["copy_bandwidth_gbps"] > 0 and run["finished"] and run["grid"]["seed"] == 0
    assert not [p for p in tiny_sweep.rglob("*") if p.name.startswith(".")]


def test_head_cells_carry_flops_and_the_matmul_yardstick(tmp_path):
    _sweep_here(*TINY, "--k", "3", "--batch", "2", "--latent", "4", "--hidden", "16",
                "--variants", "torch", "fused_linear", "--mode", "forward", "backward", "--out", str(tmp_path))
    rows = _rows(tmp_path / "results.csv")
    assert {(r["family"], r["variant"]) for r in rows} == {("head", "torch"), ("head", "fused_linear")}
    matmul = json.loads((tmp_path / "machine.json").read_text())["runs"][0]["matmul_tflops"]["float32"]
    for r in rows:
        flops = 2 * 2 * 3 * 16 * 20 * (1 if r["mode"] == "forward" else 3)
        assert int(r["flops"]) == flops and r["hidden"] == "16"
        assert float(r["max_abs_err"]) < 1e-3
        if r["variant"] == "torch":
            assert math.isclose(float(r["tflops"]), flops / (float(r["time_ms"]) * 1e-3) / 1e12, rel_tol=1e-9)
            assert math.isclose(float(r["flop_fraction"]), float(r["tflops"]) / matmul, rel_tol=1e-3)
            assert int(r["peak_mem_bytes"]) > 0  # the CPU allocation tracker
    # CPU peak memory: the fused head never holds the logits the torch head builds
    peak = {(r["variant"], r["mode"]): int(r["peak_mem_bytes"]) for r in rows}
    assert peak[("fused_linear", "forward")] < 2 * 3 * 20 * 4 <= peak[("torch", "forward")]
    assert "## Which roof binds" in (tmp_path / "report.md").read_text()


def test_runs_go_to_their_own_folder_and_meet_the_reference(tmp_path, monkeypatch, capsys):
    """Without --out a run lands in results/runs/cpu, never in a committed reference; promote
    makes it the reference, and the next run's report compares itself with it. The sweeps in
    their own process, promote in this one."""
    from iwae_bench.cli import main

    args = ["sweep", *TINY, "--k", "2", "--batch", "2", "--latent", "3", "--variants", "torch",
            "--mode", "forward"]
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "results" / "runs" / "cpu"
    assert (run / "results.csv").exists() and not (tmp_path / "results" / "reference").exists()
    monkeypatch.chdir(tmp_path)
    assert main(["promote", "results/runs/cpu"]) == 0
    ref = tmp_path / "results" / "reference" / "cpu"
    assert _rows(ref / "results.csv") == _rows(run / "results.csv")
    assert "## Against" not in (ref / "report.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["promote", "results/runs/cpu"])
    assert exit_info.value.code == 2 and "exists; pass --replace" in capsys.readouterr().err
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 0 and "compared with results/reference/cpu" in done.stdout
    assert "## Against results/reference/cpu" in (run / "report.md").read_text()
    assert _rows(ref / "results.csv")[0]["time_ms"] != ""  # the reference untouched


KILL_ARGS = ["sweep", *TINY, "--k", "1", "2", "3", "--batch", "2", "--latent", "3", "5",
             "--dtype", "float32", "bfloat16", "--variants", "naive", "torch", "fused",
             "--mode", "forward"]


def test_killed_sweep_resumes_with_each_cell_once(tmp_path, capsys):
    """A SIGKILL mid-sweep over a multi-latent, multi-dtype grid; --resume (in this process)
    runs only what is missing: every cell of the grid exactly once, finished rows kept as they were."""
    args = [*KILL_ARGS, "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "iwae_bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv_path = tmp_path / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 9:  # header + 8 rows
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _rows(csv_path)
    total = 3 * 2 * 2 * 3  # k x latent x dtype x variants
    assert 8 <= len(before) < total, "the kill should land mid-sweep"

    _sweep_here(*args[1:], "--resume")
    assert f"{total} cells, {len(before)} already done, {total - len(before)} to run" in capsys.readouterr().out
    rows = _rows(csv_path)
    keys = [_key(r) for r in rows]
    assert len(rows) == total and len(set(keys)) == total
    assert {(r["latent"], r["dtype"]) for r in rows} == {(d, t) for d in ("3", "5") for t in ("float32", "bfloat16")}
    assert rows[:len(before)] == before  # finished rows kept as they were
    runs = json.loads((tmp_path / "machine.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0]["finished"] is None and runs[1]["finished"]


def test_resume_with_another_grid_counts_only_its_cells(tmp_path, capsys):
    """The first sweep in its own process, the resume in this one."""
    from iwae_bench.cli import main

    base = ["sweep", *TINY, "--batch", "2", "--latent", "3", "--variants", "torch", "--mode",
            "forward", "--out", str(tmp_path)]
    assert _cli(*base, "--k", "1", "2", "3").returncode == 0
    first = _rows(tmp_path / "results.csv")
    assert main([*base, "--k", "2", "4", "--resume"]) == 0
    assert "2 cells, 1 already done, 1 to run" in capsys.readouterr().out
    rows = _rows(tmp_path / "results.csv")
    assert rows[:3] == first and [r["k"] for r in rows] == ["1", "2", "3", "4"]


def test_resume_refuses_to_mix_seeds(tmp_path):
    base = ["sweep", *TINY, "--k", "1", "--batch", "2", "--latent", "3", "--variants", "torch",
            "--mode", "forward", "--out", str(tmp_path)]
    assert _cli(*base).returncode == 0
    before = (tmp_path / "results.csv").read_text()
    done = _cli(*base, "--resume", "--seed", "7")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--resume would mix settings in one results.csv: seed 0 there, 7 now" in done.stderr
    assert (tmp_path / "results.csv").read_text() == before


def test_resume_refuses_a_folder_made_with_other_software_or_another_gpu(tmp_path, capsys):
    """The folder's own machine.json is what a resume compares with this machine: edited to
    another torch, Triton or device, the resume stops (exit 2) naming the field, and leaves
    the CSV and the record as they were. The resumes in-process (the first sweep in its own)."""
    from iwae_bench.cli import main

    base = ["sweep", *TINY, "--k", "1", "--batch", "2", "--latent", "3", "--variants", "torch",
            "--mode", "forward", "--out", str(tmp_path)]
    assert _cli(*base).returncode == 0
    made = json.loads((tmp_path / "machine.json").read_text())
    rows = (tmp_path / "results.csv").read_text()
    for field, there in [("torch", "2.0.0"), ("triton", "2.1.0"), ("device_name", "NVIDIA H100 80GB HBM3")]:
        edited = json.dumps({**made, "machine": {**made["machine"], field: there}})
        (tmp_path / "machine.json").write_text(edited)
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--resume"])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, stderr
        assert f"{field} {there!r} there, {made['machine'][field]!r} now" in stderr
        assert stderr.count("\n") == 1, stderr
        assert (tmp_path / "results.csv").read_text() == rows
        assert (tmp_path / "machine.json").read_text() == edited


def test_check_resume_names_every_clash():
    rows = [{"seed": 0, "threads": 2, "device": "cpu"}]
    check_resume(rows, {"torch": "2.13"}, {"seed": 0, "threads": 2, "device": "cpu", "device_name": "x",
                                           "torch": "2.13", "triton": "3"})
    with pytest.raises(ResumeError, match="threads 2 there, 1 now; torch '2.12' there, '2.13' now"):
        check_resume(rows, {"torch": "2.12"}, {"seed": 0, "threads": 1, "device": "cpu",
                                               "device_name": "x", "torch": "2.13", "triton": "3"})


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "argument --k: must be an integer >= 1, got 0"),
    (["--variants", "nope"], "argument --variants: invalid choice: 'nope'"),
    (["--batch", "two"], "argument --batch: expected an integer, got 'two'"),
    (["--min-time", "0"], "argument --min-time: must be a finite number > 0, got 0"),
    (["--min-time", "-1"], "argument --min-time: must be a finite number > 0, got -1"),
    (["--regime", "wild"], "argument --regime: invalid choice: 'wild'"),
    (["--objective", "miwae:8"], "argument --objective: objective 'miwae:8': miwae takes its groups as MxK"),
    (["--objective", "ciwae:2"], "argument --objective: objective 'ciwae:2': beta must lie in [0, 1]"),
    (["--k", "6", "--objective", "miwae:4x4"], "miwae groups M x K = 4 x 4 = 16 samples, but k = 6"),
    (["--likelihood", "poisson"], "argument --likelihood: likelihood 'poisson': likelihood must be one of "
                                  "bernoulli, continuous_bernoulli, gaussian, discretized_logistic, got 'poisson'"),
    (["--likelihood", "gaussian:sigma=0.1", "--regime", "saturated"],
     "regime 'saturated' is a Gaussian's learned variance collapsed onto pixels that are 0"),
    (["--layers", "3"], "argument --layers: invalid choice: 3 (choose from 1, 2)"),
    (["--out", "{file}/sub"], "is not writable"),
    (["--against", "{file}"], "--against {file}: no such folder"),
], ids=["k=0", "unknown-variant", "batch-not-int", "min-time-0", "min-time-negative",
        "unknown-regime", "objective-spelling", "objective-beta", "objective-groups", "likelihood-spelling",
        "likelihood-saturated-fixed", "layers-3", "unwritable-out", "against-missing"])
def test_bad_flags_exit_2_with_one_line(args, message, tmp_path, capsys):
    """In-process (a traceback would fail the test here too); the command's own process exits
    2 in one line in test_resume_refuses_to_mix_seeds."""
    from iwae_bench.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    out = [] if "--out" in args else ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", *[a.format(file=blocker) for a in args], *out])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(file=blocker) in lines[0], stderr


def test_compare_prints_inf_for_a_non_finite_bound():
    done = _cli("compare", "--batch", "2", "--k", "4", "--variants", "naive", "torch")
    assert done.returncode == 0, done.stderr
    naive = next(line for line in done.stdout.splitlines() if line.startswith("naive"))
    torch_line = next(line for line in done.stdout.splitlines() if line.startswith("torch"))
    assert naive.split()[1:] == ["-inf", "inf", "0%"]
    assert float(torch_line.split()[2]) < 1e-3 and torch_line.split()[3] == "100%"


def test_every_flag_of_every_command_has_help():
    from iwae_bench.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
