"""``python -m iwae_bench merge SHARD_DIR... --out DIR``: shards back into one results folder.

Each shard (``--shard I/N``, torchrun or a SLURM array task) wrote its own folder. Merging
refuses shards that disagree on a setting that changes the numbers (naming it), keeps every row
once, reports the work no shard finished, records every machine the rows came from, and renders
the report. Three kinds of folder merge, told apart by their files: a sweep (results.csv), the
MNIST experiment (summary.csv) and the SNR benchmark (snr.csv).
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .files import read_json, write_csv
from .harness.machine import MachineRecord, command_line


class MergeError(ValueError):
    """Shards that cannot be merged; the message names the folders and the setting."""


@dataclass
class Kind:
    name: str
    marker: str                                    # the file that identifies the folder
    tables: dict[str, tuple[str, ...]]             # CSV file -> its key columns
    settings: Callable[[dict], dict]               # a shard's last run entry -> settings to agree on
    expected: Callable[[dict, list[dict]], set]    # settings, merged marker rows -> keys of all the work
    render: Callable[[Path], Path]
    copy: tuple[str, ...] = ()                     # sub-folders whose files are copied over


def _shard_count(run: dict) -> int:
    return (run.get("shard") or {}).get("count", 1)


def _sweep_expected(settings: dict, rows: list[dict]) -> set:
    import torch

    from .harness.sweep import Grid

    devices = {r["device"] for r in rows} or {"cpu"}
    grid = Grid.from_dict(settings["grid"])
    return set().union(*(grid.identities(torch.device(d)) for d in devices))


def _sweep_render(out: Path) -> Path:
    from .report import render

    return render(out)


def _experiment_expected(settings: dict, rows: list[dict]) -> set:
    return {(r["objective"], str(r["k"]), r["estimator"], str(r["seed"])) for r in settings["runs"]}


def _experiment_render(out: Path) -> Path:
    from .experiments.mnist_report import render_experiment

    return render_experiment(out)


def _snr_expected(settings: dict, rows: list[dict]) -> set:
    from .experiments.snr import expected_keys

    return expected_keys(settings)


def _snr_render(out: Path) -> Path:
    from .experiments.snr_report import render_snr

    return render_snr(out)


def _sweep_settings(run: dict) -> dict:
    return {"grid": run.get("grid"), "min_time": run.get("min_time"), "shards": _shard_count(run)}


def _experiment_settings(run: dict) -> dict:
    return {"schedule": run.get("schedule"), "backend": run.get("backend"), "runs": run.get("runs"),
            "data_seed": run.get("data_seed"), "shards": _shard_count(run)}


def _snr_settings(run: dict) -> dict:
    return {**(run.get("settings") or {}), "shards": _shard_count(run)}


KINDS = [
    Kind("sweep", "results.csv", {"results.csv": ()}, _sweep_settings, _sweep_expected, _sweep_render),
    Kind("experiment", "summary.csv",
         {"summary.csv": ("objective", "k", "estimator", "seed"),
          "lk_curve.csv": ("objective", "k_train", "estimator", "seed", "k_eval")},
         _experiment_settings, _experiment_expected, _experiment_render, copy=("runs", "checkpoints")),
    Kind("snr", "snr.csv", {"snr.csv": ("k", "estimator", "group")}, _snr_settings, _snr_expected, _snr_render),
]


def _kind_of(folder: Path) -> Kind:
    for kind in KINDS:
        if (folder / kind.marker).is_file():
            return kind
    raise MergeError(f"{folder}: no results.csv, summary.csv or snr.csv: not a shard of a sweep, "
                     "an experiment or an SNR run")


def _read(path: Path, kind: Kind) -> tuple[list[str], list[dict]]:
    """Columns and rows of one shard's CSV (a sweep's through the table contract)."""
    if kind.name == "sweep":
        from .harness.table import COLUMNS, drop_torn_tail, read_table

        drop_torn_tail(path)
        return COLUMNS, read_table(path).rows
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _key(kind: Kind, table: str, row: dict) -> tuple:
    if kind.name == "sweep":
        from .harness.table import identity

        return identity(row)
    return tuple(str(row[c]) for c in kind.tables[table])


def merge(folders: list[Path], out: Path, log=print) -> dict:
    """Merge shard folders into ``out``; returns {"rows", "duplicates", "missing", "report"}."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise MergeError("no shard folders given")
    kinds = {f: _kind_of(f) for f in folders}
    names = {k.name for k in kinds.values()}
    if len(names) > 1:
        listed = ", ".join(f"{f} ({k.name})" for f, k in kinds.items())
        raise MergeError(f"the folders are not shards of one kind of run: {listed}")
    kind = kinds[folders[0]]
    records = {f: read_json(f / "machine.json") for f in folders}
    settings = {}
    for folder, record in records.items():
        runs = record.get("runs") or []
        if not runs:
            raise MergeError(f"{folder}: no runs in machine.json, so nothing says how it was made")
        settings[folder] = kind.settings(runs[-1])
    first = folders[0]
    for folder in folders[1:]:
        clash = _first_difference(settings[first], settings[folder])
        if clash is not None:
            name, mine, theirs = clash
            raise MergeError(f"shards disagree on {name}: {first} has {mine!r}, {folder} has {theirs!r}; "
                             "merge only shards of one run")

    out.mkdir(parents=True, exist_ok=True)
    totals = {"rows": 0, "duplicates": 0}
    merged_marker: list[dict] = []
    for table in kind.tables:
        columns, rows, seen = [], [], set()
        for folder in folders:
            shard_columns, shard_rows = _read(folder / table, kind)
            columns = columns or shard_columns
            for row in shard_rows:
                key = _key(kind, table, row)
                if key in seen:
                    totals["duplicates"] += 1
                    continue
                seen.add(key)
                rows.append(row)
        if table == kind.marker:
            merged_marker, totals["rows"] = rows, len(rows)
        if rows:
            _write_table(out / table, kind, columns, rows)
    for sub in kind.copy:
        for folder in folders:
            for path in sorted((folder / sub).glob("*")) if (folder / sub).is_dir() else []:
                target = out / sub / path.name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)

    done = {_key(kind, kind.marker, row) for row in merged_marker}
    missing = sorted(kind.expected(settings[first], merged_marker) - done)
    record = MachineRecord(out / "machine.json", records[first].get("machine", {}),
                           [{**run, "folder": str(folder)} for folder in folders
                            for run in records[folder].get("runs", [])])
    record.machines = [{"folder": str(folder), **records[folder].get("machine", {})} for folder in folders]
    entry = record.start_run(command=command_line(), merge={"kind": kind.name, "shards": [str(f) for f in folders],
                                                           "rows": totals["rows"], "duplicates": totals["duplicates"]},
                             missing_cells=[" ".join(map(str, key)) for key in missing])
    record.finish(entry)
    report = kind.render(out) if merged_marker else None
    return {**totals, "missing": missing, "report": report, "kind": kind.name}


def _first_difference(a, b, path: str = ""):
    """(dotted name, a's value, b's value) of the first setting where two shards differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for name in list(a) + [n for n in b if n not in a]:
            found = _first_difference(a.get(name), b.get(name), f"{path}.{name}" if path else name)
            if found is not None:
                return found
        return None
    return None if a == b else (path, a, b)


def _write_table(path: Path, kind: Kind, columns: list[str], rows: list[dict]) -> None:
    if kind.name == "sweep":
        from .files import atomic_path
        from .harness.table import RowWriter

        with atomic_path(path) as tmp, RowWriter(tmp) as writer:
            for row in rows:
                writer.write(row)
    else:
        write_csv(path, rows, columns)
