"""Sharding the work lists for the launchers people use (--shard, torchrun, SLURM arrays) and
merging the shards back: the merged run equals the unsharded one."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iwae_bench.cli import main
from iwae_bench.harness.shard import Shard, from_environment, parse, resolve
from iwae_bench.harness.table import IDENTITY

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
CELLS = ["--device", "cpu", "--k", "1", "3", "--batch", "2", "--latent", "3", "5", "--data-dim", "12",
         "--variants", "torch", "fused", "--mode", "forward", "--no-progress"]
GRID = [*CELLS, "--min-time", "0.01"]


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "iwae_bench", *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, **kwargs)


def _merge(capsys, *args) -> str:
    """``merge ARGS`` in this process (no interpreter to start): its output, or SystemExit."""
    assert main(["merge", *map(str, args)]) == 0
    return capsys.readouterr().out


def _rows(path: Path) -> dict:
    with open(path, newline="") as f:
        return {tuple(r[c] for c in IDENTITY): r for r in csv.DictReader(f)}


# --------------------------------------------------------------------------- the shard


def test_parse_and_take():
    assert parse("1/3") == Shard(1, 3)
    items = list(range(10))
    parts = [Shard(i, 3).take(items) for i in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(parts, [])) == items  # disjoint, and the whole list
    assert Shard(2, 5).name == "shard-002-of-005"
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="shard must be I/N"):
            parse(bad)


def test_the_launchers_environment():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert from_environment(torchrun) == Shard(3, 4, "torchrun", 1)
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
    assert from_environment(slurm) == Shard(2, 4, "slurm")
    assert from_environment({"RANK": "0", "WORLD_SIZE": "1"}) is None  # one process: no split
    assert from_environment({}) is None
    assert resolve("1/2", torchrun) == Shard(1, 2)  # the flag wins over the launcher
    assert resolve(None, slurm) == Shard(2, 4, "slurm")
    stepped = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "16", "SLURM_ARRAY_TASK_MIN": "0",
               "SLURM_ARRAY_TASK_STEP": "2"}  # --array=0-30:2
    assert from_environment(stepped) == Shard(3, 16, "slurm")
    with pytest.raises(ValueError, match="--shard I/3"):  # --array=1,5,7: no even spacing
        from_environment({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3",
                          "SLURM_ARRAY_TASK_MIN": "1"})


def test_a_torchrun_rank_runs_on_its_own_gpu_and_makes_it_current(monkeypatch):
    # Triton launches on the current CUDA device, and do_bench times there: a rank that only
    # put its tensors on cuda:LOCAL_RANK would launch its kernels on cuda:0.
    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    rank = Shard(5, 8, "torchrun", local_rank=5)
    assert rank.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert rank.device(torch.device("cpu")) == torch.device("cpu") and len(current) == 1
    assert Shard(1, 2).device(torch.device("cuda")) == torch.device("cuda")  # no launcher: as given


# --------------------------------------------------------------------------- the sweep


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    done = _cli("sweep", *GRID, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return _rows(out / "results.csv")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A folder holding the two shard folders of the GRID sweep, not merged."""
    out = tmp_path_factory.mktemp("parts")
    for i in range(2):
        done = _cli("sweep", *GRID, "--out", str(out), "--shard", f"{i}/2")
        assert done.returncode == 0, done.stderr
        assert "combine the shards with: python -m iwae_bench merge" in done.stdout
    return out


def _same_cells(merged: dict, whole: dict):
    assert set(merged) == set(whole)
    for key, row in whole.items():
        assert merged[key]["bound_mean"] == row["bound_mean"], key
        assert merged[key]["max_abs_err"] == row["max_abs_err"], key


def test_two_shards_merge_into_the_unsharded_run(tmp_path, parts, unsharded):
    shard_rows = [_rows(parts / f"shard-00{i}-of-002" / "results.csv") for i in range(2)]
    assert shard_rows[0] and shard_rows[1] and not set(shard_rows[0]) & set(shard_rows[1])  # disjoint work
    done = _cli("merge", str(parts / "shard-000-of-002"), str(parts / "shard-001-of-002"),
                "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    _same_cells(_rows(tmp_path / "results.csv"), unsharded)
    record = json.loads((tmp_path / "machine.json").read_text())
    assert len(record["machines"]) == 2 and record["runs"][-1]["missing_cells"] == []
    assert {r["shard"]["index"] for r in record["runs"] if r.get("shard")} == {0, 1}
    assert (tmp_path / "report.md").exists()


def test_torchrun_shards_and_rank_zero_merges(tmp_path, unsharded):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    command = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
    done = subprocess.run([*command, "--nproc-per-node", "2", "--master-port", "29533", "-m", "iwae_bench",
                           "sweep", *GRID, "--out", str(tmp_path)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "shard-000-of-002").is_dir() and (tmp_path / "shard-001-of-002").is_dir()
    _same_cells(_rows(tmp_path / "results.csv"), unsharded)
    sources = {r["shard"]["source"] for r in json.loads((tmp_path / "machine.json").read_text())["runs"]
               if r.get("shard")}
    assert sources == {"torchrun"}


def test_a_killed_shard_resumes_and_a_missing_one_is_reported(tmp_path, unsharded, capsys):
    args = ["sweep", *CELLS, "--min-time", "0.3", "--out", str(tmp_path), "--shard", "0/2"]
    proc = subprocess.Popen([sys.executable, "-m", "iwae_bench", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv_path = tmp_path / "shard-000-of-002" / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (csv_path.exists() and len(csv_path.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _rows(csv_path)
    assert 1 <= len(before) < 4
    done = _cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert len(_rows(csv_path)) == 4 and set(before) <= set(_rows(csv_path))
    merged = _merge(capsys, tmp_path / "shard-000-of-002", "--out", tmp_path / "merged")
    assert "4 cells missing" in merged  # shard 1 never ran
    record = json.loads((tmp_path / "merged" / "machine.json").read_text())
    assert len(record["runs"][-1]["missing_cells"]) == 4
    assert "## Cells not measured" in (tmp_path / "merged" / "report.md").read_text()


def test_merging_shards_of_different_runs_names_the_setting(tmp_path, parts, capsys):
    """The first shard of the seed-0 GRID beside a second run at seed 7; merged in-process."""
    assert _cli("sweep", *GRID, "--seed", "7", "--out", str(tmp_path), "--shard", "1/2").returncode == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(parts / "shard-000-of-002"), str(tmp_path / "shard-001-of-002"),
              "--out", str(tmp_path / "merged")])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "shards disagree on grid.seed" in stderr and "has 0" in stderr and "has 7" in stderr
    assert not (tmp_path / "merged" / "results.csv").exists()


def _machines(folder: Path) -> list:
    return json.loads((folder / "machine.json").read_text())["machines"]


def test_a_folder_of_shards_and_a_merged_folder_merge_like_the_shards(tmp_path, parts, unsharded, capsys):
    shards = [str(parts / f"shard-00{i}-of-002") for i in range(2)]
    assert "merged 2 sweep folders" in _merge(capsys, parts, "--out", tmp_path / "merged")  # descends
    _same_cells(_rows(tmp_path / "merged" / "results.csv"), unsharded)
    assert [m["folder"] for m in _machines(tmp_path / "merged")] == shards

    # what rank 0 writes (its shard folders inside), or an earlier merge: merging it again is
    # merging its shards again
    shutil.copytree(parts / "shard-001-of-002", tmp_path / "merged" / "shard-001-of-002")
    out = _merge(capsys, tmp_path / "merged", "--out", tmp_path / "again")
    assert "is a merged folder: taking its rows, not its 1 shard folders" in out
    assert "merged 1 sweep folder " in out
    _same_cells(_rows(tmp_path / "again" / "results.csv"), unsharded)
    record = json.loads((tmp_path / "again" / "machine.json").read_text())
    assert [m["folder"] for m in record["machines"]] == shards  # the shards' machines, not the merge's
    assert record["runs"][-1]["missing_cells"] == []
    assert sorted(r["folder"] for r in record["runs"] if r.get("shard")) == shards

    # beside one of its own shards: that shard's rows, machine and runs are there once
    out = _merge(capsys, tmp_path / "merged", shards[0], "--out", tmp_path / "both")
    assert "8 rows, 4 duplicates dropped" in out
    _same_cells(_rows(tmp_path / "both" / "results.csv"), unsharded)
    assert [m["folder"] for m in _machines(tmp_path / "both")] == shards


def test_a_shard_folder_without_rows_is_left_out_and_its_cells_reported(tmp_path, parts, capsys):
    shutil.copytree(parts / "shard-000-of-002", tmp_path / "shard-000-of-002")
    (tmp_path / "shard-001-of-002").mkdir()  # started, killed before its first row
    out = _merge(capsys, tmp_path, "--out", tmp_path)
    assert "shard-001-of-002: no rows yet, left out" in out and "4 cells missing" in out


def _folder(path: Path, files: dict) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


SNR_RECORD = json.dumps({"runs": [{"settings": {"k": [1], "estimators": ["iwae"]}}]})
BAD_INPUTS = {
    "missing": (lambda tmp, parts: [tmp / "nope"], "nope: no such folder"),
    "a-file": (lambda tmp, parts: [parts / "shard-000-of-002" / "results.csv"], "results.csv: not a folder"),
    "empty": (lambda tmp, parts: [_folder(tmp / "empty", {})],
              "empty: no results.csv, summary.csv or snr.csv, nor shard folders holding one"),
    "unknown-kind": (lambda tmp, parts: [_folder(tmp / "prof", {"profile.csv": "a\n1\n"})],
                     "prof: no results.csv, summary.csv or snr.csv"),
    "two-kinds": (lambda tmp, parts: [parts / "shard-000-of-002",
                                      _folder(tmp / "snr", {"snr.csv": "k\n1\n", "machine.json": SNR_RECORD})],
                  "the folders are not shards of one kind of run"),
    "no-run": (lambda tmp, parts: [_folder(tmp / "bare", {"results.csv": (parts / "shard-000-of-002" /
                                                                         "results.csv").read_text()})],
               "bare: no sweep run in machine.json"),
    "no-key-column": (lambda tmp, parts: [_folder(tmp / "snr", {"snr.csv": "k,snr\n1,2\n",
                                                                "machine.json": SNR_RECORD})],
                      "snr.csv: no estimator, group column"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_merge_inputs_give_one_clear_line_and_status_2(case, tmp_path, parts, capsys):
    make, message = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_:
        main(["merge", *map(str, make(tmp_path, parts)), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert list((tmp_path / "out").iterdir()) == []


# --------------------------------------------------------------------------- the experiment


def test_experiment_shards_merge_with_every_run_once(tmp_path, capsys):
    common = ["experiment", "--epochs", "1", "--train-size", "40", "--test-size", "4", "--eval-k", "64",
              "--backend", "torch", "--seeds", "2", "--out", str(tmp_path)]
    for i in range(2):
        done = _cli(*common, "--shard", f"{i}/2", timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _merge(capsys, tmp_path / "shard-000-of-002", tmp_path / "shard-001-of-002", "--out", tmp_path)
    with open(tmp_path / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    keys = {(r["objective"], r["k"], r["estimator"], r["seed"]) for r in summary}
    assert len(summary) == len(keys) == 10  # five models x two seeds, each once
    assert {r["seed"] for r in summary} == {"0", "1"}
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 10
    report = (tmp_path / "report.md").read_text()
    assert "2 training seeds per model" in report and "Seed to seed" in report

    # the merged folder merges again: every row, checkpoint and machine of its shards
    assert "merged 1 experiment folder " in _merge(capsys, tmp_path, "--out", tmp_path / "again")
    with open(tmp_path / "again" / "summary.csv", newline="") as f:
        assert list(csv.DictReader(f)) == summary
    assert len(list((tmp_path / "again" / "checkpoints").glob("*.pt"))) == 10
    assert len(_machines(tmp_path / "again")) == 2


# --------------------------------------------------------------------------- the SNR benchmark


def test_snr_shards_merge_into_the_unsharded_run(tmp_path, capsys):
    common = ["snr", "--k", "1", "2", "3", "--estimators", "iwae", "dreg", "--draws", "3",
              "--resamples", "20", "--batch", "2", "--hidden", "8", "--latent", "2"]
    assert _cli(*common, "--out", str(tmp_path / "whole"), timeout=600).returncode == 0
    for i in range(2):
        done = _cli(*common, "--out", str(tmp_path / "parts"), "--shard", f"{i}/2", timeout=600)
        assert done.returncode == 0, done.stderr
    done = _cli("merge", *(str(tmp_path / "parts" / f"shard-00{i}-of-002") for i in range(2)),
                "--out", str(tmp_path / "parts"))
    assert done.returncode == 0, done.stderr

    def snr(folder):
        with open(folder / "snr.csv", newline="") as f:
            return {(r["k"], r["estimator"], r["group"]): r["snr_mean"] for r in csv.DictReader(f)}

    assert snr(tmp_path / "parts") == snr(tmp_path / "whole")  # the same numbers, each once
    assert (tmp_path / "parts" / "report.md").exists()
    assert "merged 1 snr folder " in _merge(capsys, tmp_path / "parts", "--out", tmp_path / "again")
    assert snr(tmp_path / "again") == snr(tmp_path / "whole")
    assert len(_machines(tmp_path / "again")) == 2
