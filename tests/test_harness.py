"""The harness's pieces: bytes per cell, noisy timings, the results table's writer and reader."""

import torch

from iwae_bench.harness import cell, table
from iwae_bench.harness.timing import Timing
from iwae_bench.problems import Problem, make_inputs
from iwae_bench.variants import get

# --------------------------------------------------------------------------- bytes


def test_bound_bytes_by_hand():
    """B=4, k=8, D=10, d=3: x 40, logits 320, z 96, mu 12, logvar 12 elements."""
    f32 = make_inputs(Problem(4, 8, 3, 10, "float32"))
    bf16 = make_inputs(Problem(4, 8, 3, 10, "bfloat16"))
    # forward: every input once (4 bytes each, logits 2 in bf16) + the [4] float32 bound
    assert cell.bound_bytes(f32, "forward") == (40 + 320 + 96 + 12 + 12) * 4 + 16 == 1936
    assert cell.bound_bytes(bf16, "forward") == (40 + 96 + 12 + 12) * 4 + 320 * 2 + 16 == 1296
    # backward: + the incoming [4] gradient, + gradients of logits, z, mu, logvar (in their dtypes)
    assert cell.bound_bytes(f32, "backward") == 1936 + 16 + (320 + 96 + 12 + 12) * 4 == 3712
    assert cell.bound_bytes(bf16, "backward") == 1296 + 16 + 320 * 2 + (96 + 12 + 12) * 4 == 2432


def test_head_bytes_and_flops_by_hand():
    """B=2, k=3, D=10, d=4, H=5: x 20, h 30, weight 50, bias 10, z 24, mu 8, logvar 8 elements."""
    f32 = make_inputs(Problem(2, 3, 4, 10, "float32", hidden=5))
    bf16 = make_inputs(Problem(2, 3, 4, 10, "bfloat16", hidden=5))
    assert cell.bound_bytes(f32, "forward") == (20 + 30 + 50 + 10 + 24 + 8 + 8) * 4 + 8 == 608
    assert cell.bound_bytes(bf16, "forward") == (20 + 24 + 8 + 8) * 4 + (30 + 50 + 10) * 2 + 8 == 428
    # backward: + incoming [2] gradient + gradients of h, weight, bias (bf16) and z, mu, logvar
    assert cell.bound_bytes(bf16, "backward") == 428 + 8 + (30 + 50 + 10) * 2 + (24 + 8 + 8) * 4 == 776
    assert cell.head_flops(f32, "forward") == 2 * 2 * 3 * 5 * 10 == 600
    assert cell.head_flops(f32, "backward") == 3 * 600
    assert cell.head_flops(make_inputs(Problem(2, 3, 4, 10)), "forward") is None


def test_head_reference_sums_shared_gradients_over_slices(monkeypatch):
    """The head's weight and bias gradients sum over every example: with the batch cut into
    slices the reference must add the slices' parts before comparing. Exact float64 gradients
    give zero error; an error planted in one weight entry is reported at its size."""
    inputs = make_inputs(Problem(5, 3, 2, 12, hidden=4))
    monkeypatch.setattr(cell.Reference, "CHUNK_ELEMENTS", 2 * 3 * 12)  # two examples per slice
    ref = cell.Reference(inputs)
    from iwae_bench import reference

    leaves = [t.double().requires_grad_() for t in inputs[1:7]]
    h, weight, bias, z, mu, logvar = leaves
    total = reference.bound(inputs.x, h @ weight.T + bias, z, mu, logvar).sum()
    exact = torch.autograd.grad(total, leaves)
    assert ref.grad_max_abs_err(exact) < 1e-12
    planted = list(exact)
    planted[1] = planted[1].clone()
    planted[1][3, 2] += 0.25
    assert abs(ref.grad_max_abs_err(planted) - 0.25) < 1e-12


def test_likelihood_bytes_by_hand():
    """What each likelihood reads: C channels of the decoder output, a per-pixel scale [D].
    B=4, k=8, D=10, d=3: logits 2 x 320 for gaussian (a log-variance channel), 320 and a [10]
    scale for gaussian:pixel (whose gradient backward writes too), 320 for a fixed variance."""
    plain = 40 + 96 + 12 + 12  # x, z, mu, logvar
    sample = make_inputs(Problem(4, 8, 3, 10, likelihood="gaussian"))
    pixel = make_inputs(Problem(4, 8, 3, 10, likelihood="gaussian:pixel"))
    fixed = make_inputs(Problem(4, 8, 3, 10, likelihood="gaussian:sigma=0.1"))
    assert cell.bound_bytes(sample, "forward") == (plain + 640) * 4 + 16
    assert cell.bound_bytes(pixel, "forward") == (plain + 320 + 10) * 4 + 16
    assert cell.bound_bytes(pixel, "backward") == (plain + 320 + 10) * 4 + 32 + (320 + 10 + 96 + 12 + 12) * 4
    assert cell.bound_bytes(fixed, "forward") == (plain + 320) * 4 + 16
    head = make_inputs(Problem(2, 3, 4, 10, hidden=5, likelihood="discretized_logistic"))  # weight [20, 5]
    assert cell.bound_bytes(head, "forward") == (20 + 30 + 100 + 20 + 24 + 8 + 8) * 4 + 8
    assert cell.head_flops(head, "forward") == 2 * 2 * 3 * 5 * 20


def test_two_layer_bytes_by_hand():
    """Two stochastic layers, B=2, k=3, d=4, D=10: x 20, logits 60; h1 (8 wide) z 48, q(h1|x)'s
    mu and logvar 16 each, p(h1|h2)'s per-sample mean and log-variance 48 each; h2 z 24 and
    q(h2|h1)'s per-sample mu and logvar 24 each: read once, their gradients written once."""
    inputs = make_inputs(Problem(2, 3, 4, 10, layers=2))
    latent = 48 + 16 + 16 + 48 + 48 + 24 + 24 + 24
    assert cell.bound_bytes(inputs, "forward") == (20 + 60 + latent) * 4 + 8
    assert cell.bound_bytes(inputs, "backward") == (20 + 60 + latent) * 4 + 16 + (60 + latent) * 4


def test_reference_slices_the_layers(monkeypatch):
    """The float64 reference of a two-layer problem, built over slices of the batch, is the
    whole batch's; its gradient check names every layer's tensors in the order the cell's
    leaves have (a planted error in h2's per-sample posterior mean is reported at its size)."""
    from iwae_bench import reference
    from iwae_bench.problems import named_tensors, with_tensors

    inputs = make_inputs(Problem(5, 3, 2, 12, layers=2))
    monkeypatch.setattr(cell.Reference, "CHUNK_ELEMENTS", 2 * 3 * 12)  # two examples per slice
    ref = cell.Reference(inputs)
    assert torch.equal(ref.bound, reference.bound(inputs.x, inputs.logits, inputs.z))
    leaves = {name: t.double().requires_grad_() for name, t in list(named_tensors(inputs).items())[1:]}
    given = with_tensors(inputs, leaves)
    exact = torch.autograd.grad(reference.bound(given.x, given.logits, given.z).sum(), list(leaves.values()))
    assert ref.grad_max_abs_err(exact) < 1e-12
    planted = list(exact)
    where = list(leaves).index("layers[1].mu")
    planted[where] = planted[where].clone()
    planted[where][3, 1, 0] += 0.25
    assert abs(ref.grad_max_abs_err(planted) - 0.25) < 1e-12


def test_reference_sums_the_scale_gradient_over_slices(monkeypatch):
    """A per-pixel scale is every example's: its float64 gradient is summed over the slices."""
    problem = Problem(5, 3, 2, 12, likelihood="discretized_logistic:pixel")
    inputs = make_inputs(problem)
    monkeypatch.setattr(cell.Reference, "CHUNK_ELEMENTS", 2 * 3 * 12)  # two examples per slice
    ref = cell.Reference(inputs, likelihood=problem.likelihood_spec)
    from iwae_bench import reference

    leaves = [t.double().requires_grad_() for t in inputs[1:]]
    total = reference.bound(inputs.x, *leaves[:4], problem.likelihood_spec, leaves[4]).sum()
    exact = torch.autograd.grad(total, leaves)
    assert ref.grad_max_abs_err(exact) < 1e-12
    planted = list(exact)
    planted[4] = planted[4].clone()
    planted[4][7] += 0.25
    assert abs(ref.grad_max_abs_err(planted) - 0.25) < 1e-12


def test_reduction_bytes_by_hand():
    assert cell.reduction_bytes(torch.zeros(5, 7)) == 5 * 7 * 4 + 5 * 4 == 160
    assert cell.reduction_bytes(torch.zeros(5, 7, dtype=torch.bfloat16)) == 5 * 7 * 2 + 5 * 4 == 90


# --------------------------------------------------------------------------- noise


def _fake_timings(monkeypatch, timings):
    calls = []

    def fake(fn, device, min_run_time=0.2):
        calls.append(min_run_time)
        return timings[min(len(calls), len(timings)) - 1]

    monkeypatch.setattr(cell, "time_call", fake)
    return calls


def _measure(min_time=0.05):
    problem = Problem(2, 3, 2, 6)
    inputs = make_inputs(problem)
    return cell.measure_bound(get("torch"), problem, inputs, cell.Reference(inputs), "forward",
                              torch.device("cpu"), copy_gbps=10.0, min_time=min_time)


def test_steady_timing_is_measured_once(monkeypatch):
    calls = _fake_timings(monkeypatch, [Timing(2.0, 1.9, 2.1, 9)])
    row = _measure()
    assert len(calls) == 1 and row["status"] == "ok" and row["message"] == ""
    assert row["time_samples"] == 9 and abs(row["time_spread"] - 2.1 / 1.9) < 1e-12


def test_noisy_timing_is_measured_again_and_kept_if_steady(monkeypatch):
    calls = _fake_timings(monkeypatch, [Timing(5.0, 2.0, 20.0, 5), Timing(2.0, 1.9, 2.1, 7)])
    row = _measure()
    assert len(calls) == 2 and row["status"] == "ok" and row["time_ms"] == 2.0


def test_still_noisy_timing_is_marked(monkeypatch):
    calls = _fake_timings(monkeypatch, [Timing(5.0, 2.0, 20.0, 5), Timing(4.0, 2.0, 8.0, 6)])
    row = _measure()
    assert len(calls) == 2 and row["status"] == "noisy"
    assert row["time_ms"] == 4.0 and row["time_spread"] == 4.0 and row["time_samples"] == 6
    assert "p80/p20 = 4.00 over 6 samples after a second measurement" in row["message"]
    assert row["samples_per_s"] == 2 * 3 / 4e-3  # noisy cells keep their speed columns


def test_cpu_timing_takes_enough_samples_of_a_slow_call():
    """A call slower than the whole time budget still gets MIN_SAMPLES samples."""
    import time

    from iwae_bench.harness.timing import MIN_SAMPLES, time_call

    timing = time_call(lambda: time.sleep(0.02), torch.device("cpu"), min_run_time=0.01)
    assert timing.samples >= MIN_SAMPLES and timing.median_ms >= 20.0


# --------------------------------------------------------------------------- the table


def _row(**changes):
    problem = Problem(2, 3, 4, 5)
    return {**cell.bound_identity("torch", problem, "forward", torch.device("cpu")),
            "time_ms": 1.5, "status": "ok", "message": "", **changes}


def test_rows_are_readable_before_the_writer_closes(tmp_path):
    path = tmp_path / "results.csv"
    writer = table.RowWriter(path)
    writer.write(_row())
    # another process (a report, a resumed sweep) reads the file while the writer is open
    rows = table.read_table(path).rows
    assert len(rows) == 1 and rows[0]["time_ms"] == 1.5 and rows[0]["k"] == 3
    writer.write(_row(k=4))
    assert [r["k"] for r in table.read_table(path).rows] == [3, 4]
    writer.close()


def test_reader_skips_malformed_lines_by_number(tmp_path):
    path = tmp_path / "results.csv"
    with table.RowWriter(path) as writer:
        writer.write(_row())
        writer.write(_row(k=5))
    with open(path, "a") as f:
        f.write("garbage,line\n")                                   # line 4: too few fields
        f.write(",".join(["x"] * len(table.COLUMNS)) + "\n")        # line 5: family 'x'
        good = path.read_text().splitlines()[1].split(",")
        good[table.COLUMNS.index("k")] = "three"
        f.write(",".join(good) + "\n")                              # line 6: k not an integer
        good[table.COLUMNS.index("k")] = "3"
        good[table.COLUMNS.index("status")] = ""
        f.write(",".join(good) + "\n")                              # line 7: status empty
    result = table.read_table(path)
    assert [r["k"] for r in result.rows] == [3, 5]
    assert [p.split(":")[0] for p in result.problems] == ["line 4", "line 5", "line 6", "line 7"]
    assert "2 fields, expected" in result.problems[0]
    assert "family 'x' is not one of bound, reduction" in result.problems[1]
    assert "status is empty" in result.problems[3]


def test_torn_tail_is_dropped(tmp_path):
    path = tmp_path / "results.csv"
    with table.RowWriter(path) as writer:
        writer.write(_row())
    with open(path, "a") as f:
        f.write("bound,torch,cpu,flo")
    table.drop_torn_tail(path)
    assert path.read_text().endswith("\n") and len(table.read_table(path).rows) == 1


def test_a_resumed_record_keeps_its_runs_and_a_merged_folders_machines(tmp_path):
    """machine.json opened again with resume: the earlier runs and, for a merged folder, the list
    of machines its rows came from stay; a new run is added after them, with its commit; an
    older entry without one takes the commit of the machine record it was read with, and a
    report's "Made by" pairs the first command with its own commit. Without resume the record
    starts empty."""
    import json

    from iwae_bench.harness.machine import MachineRecord, git_commit, made_by, missing_cells, same_machine

    path = tmp_path / "machine.json"
    record = MachineRecord.open(path, torch.device("cpu"))
    record.machines = [{**record.machine, "folder": "shard-0"}, {**record.machine, "folder": "shard-1"}]
    record.finish(record.start_run(command="first"))
    record.runs.insert(0, {"command": "older"})  # an entry written before runs recorded their commit
    record.machine = {**record.machine, "commit": "abc"}  # by a process at commit abc
    record.write()
    again = MachineRecord.open(path, torch.device("cpu"), resume=True)
    again.finish(again.start_run(command="second"))
    saved = json.loads(path.read_text())
    assert [run["command"] for run in saved["runs"]] == ["older", "first", "second"]
    assert [run["commit"] for run in saved["runs"]] == ["abc", git_commit(), git_commit()]
    assert saved["machines"] == record.machines
    run, machine = made_by(saved)
    assert run["command"] == "older" and machine["commit"] == "abc" and machine["folder"] == "shard-0"
    assert MachineRecord.open(path, torch.device("cpu")).as_dict()["runs"] == []

    # a folder one machine trained and this one went on with: both listed, the report names the first
    alone = tmp_path / "alone.json"
    first = MachineRecord.open(alone, torch.device("cpu"))
    first.finish(first.start_run(command="trained"))
    same = MachineRecord.open(alone, torch.device("cpu"), resume=True)
    assert same.machines == [] and "machines" not in same.as_dict()  # the same machine: no list
    first.machine = {**first.machine, "device_name": "Intel(R) Xeon(R) Processor", "commit": "abc"}
    first.runs[0].pop("commit")
    first.write()
    other = MachineRecord.open(alone, torch.device("cpu"), resume=True)
    other.finish(other.start_run(command="updated"))
    saved = json.loads(alone.read_text())
    assert [m["device_name"] for m in saved["machines"]] == ["Intel(R) Xeon(R) Processor", saved["machine"]["device_name"]]
    run, machine = made_by(saved)
    assert run["command"] == "trained" and machine["device_name"] == "Intel(R) Xeon(R) Processor" and machine["commit"] == "abc"
    assert saved["runs"][0]["commit_from"] == "machine" and "commit_from" not in saved["runs"][1]  # a guess, marked
    run, machine = made_by(saved, index=-1)
    assert run["command"] == "updated" and machine["device_name"] == saved["machine"]["device_name"]
    assert made_by({})[1]["commit"] == "?"
    # the last entry speaks for the folder: an earlier partial merge that a later run completed is not missing
    assert missing_cells({}) == [] and missing_cells({"runs": [{"missing_cells": ["a"]}, {}]}) == []
    assert missing_cells({"runs": [{}, {"missing_cells": ["a", "b"]}]}) == ["a", "b"]
    assert not same_machine({"hostname": "a"}, {"device": "cpu"})  # nothing to tell them apart by: not the same
