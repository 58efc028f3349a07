"""``python -m iwae_bench merge SHARD_DIR... --out DIR``: shards back into one results folder.

Each shard (``--shard I/N``, torchrun or a SLURM array task) wrote its own folder. Merging
refuses shards that disagree on a setting that changes the numbers (naming it), keeps every row
once, reports the work no shard finished, records every machine the rows came from, and renders
the report. Three kinds of folder merge, told apart by their files: a sweep (results.csv), the
MNIST experiment (summary.csv) and the SNR benchmark (snr.csv).

A merged folder merges like the shards it came from: its rows are all there, its machine.json
lists every machine and keeps every shard's run entries (the settings are read from the last of
those, not from the merge's own entry). A folder with no results file but ``shard-I-of-N``
folders in it stands for those folders.
"""

from __future__ import annotations

import csv
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .files import read_json, write_csv
from .harness.machine import MachineRecord, command_line, with_commit


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
    made: str                                      # the run entry's field that says how the rows were made
    copy: tuple[str, ...] = ()                     # sub-folders whose files are copied over
    defaults: tuple[tuple[str, str], ...] = ()     # (column, value) for rows from before that column


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
    return {(r["objective"], str(r["k"]), r["estimator"], str(r["seed"]), r.get("likelihood", "bernoulli"),
             str(r.get("layers", 1))) for r in settings["runs"]}


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
    Kind("sweep", "results.csv", {"results.csv": ()}, _sweep_settings, _sweep_expected, _sweep_render,
         "grid"),
    Kind("experiment", "summary.csv",
         {"summary.csv": ("objective", "k", "estimator", "seed", "likelihood", "layers"),
          "lk_curve.csv": ("objective", "k_train", "estimator", "seed", "likelihood", "layers", "k_eval"),
          "collapse.csv": ("epoch",)},
         _experiment_settings, _experiment_expected, _experiment_render, "runs", copy=("runs", "checkpoints"),
         defaults=(("likelihood", "bernoulli"), ("layers", "1"))),
    Kind("snr", "snr.csv", {"snr.csv": ("k", "estimator", "group")}, _snr_settings, _snr_expected, _snr_render,
         "settings"),
]


SHARD_FOLDER = re.compile(r"shard-\d+-of-\d+")


def _kind_of(folder: Path) -> Kind | None:
    return next((kind for kind in KINDS if (folder / kind.marker).is_file()), None)


def _folders(paths: list[Path], log) -> list[Path]:
    """The folders to merge: each results folder given (a shard's, a whole run's or a merged
    one), and in place of a folder with no results file its ``shard-I-of-N`` folders that have
    one (``merge OUT`` for ``merge OUT/shard-*``; a shard that wrote nothing yet is left out,
    its cells reported missing)."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise MergeError(f"{path}: {'not a folder' if path.exists() else 'no such folder'}")
        shards = sorted(p for p in path.iterdir() if p.is_dir() and SHARD_FOLDER.fullmatch(p.name))
        if _kind_of(path) is not None:
            if shards:
                log(f"{path} is a merged folder: taking its rows, not its {len(shards)} shard folders "
                    f"(pass {path}/shard-* to merge those afresh)")
            found.append(path)
            continue
        with_rows = [shard for shard in shards if _kind_of(shard) is not None]
        if not with_rows:
            raise MergeError(f"{path}: no results.csv, summary.csv or snr.csv, nor shard folders holding one: "
                             "pass the folders of a sweep's, an experiment's or an SNR run's shards")
        for shard in sorted(set(shards) - set(with_rows)):
            log(f"{shard}: no rows yet, left out")
        found += with_rows
    return found


def _made(folder: Path, record: dict, kind: Kind) -> dict:
    """The last run entry of a folder that made its rows (a merge's or validate's own entry
    says nothing of the settings, the shard runs it carries do)."""
    runs = [run for run in record.get("runs") or []
            if isinstance(run, dict) and isinstance(run.get(kind.made), (dict, list))]
    if not runs:
        raise MergeError(f"{folder}: no {kind.name} run in machine.json (no run entry with {kind.made!r}), "
                         "so nothing says how its rows were made")
    return runs[-1]


def _machines(folder: Path, record: dict) -> list[dict]:
    """Every machine a folder's rows came from: a merged folder's list, else its own machine."""
    return [{"folder": str(folder), **machine} for machine in record.get("machines") or [record.get("machine", {})]]


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
        columns, rows = list(reader.fieldnames or []), list(reader)
    missing = {column: value for column, value in kind.defaults if column not in columns}
    columns += list(missing)
    rows = [{**row, **missing} for row in rows]
    lacking = [c for c in kind.tables[path.name] if c not in columns]
    if rows and lacking:
        raise MergeError(f"{path}: no {', '.join(lacking)} column, which every {path.name} of a "
                         f"{kind.name} run has")
    return columns, rows


def _key(kind: Kind, table: str, row: dict) -> tuple:
    if kind.name == "sweep":
        from .harness.table import identity

        return identity(row)
    return tuple(str(row[c]) for c in kind.tables[table])


def merge(folders: list[Path], out: Path, log=print) -> dict:
    """Merge shard folders into ``out``; returns {"rows", "duplicates", "missing", "report", "kind",
    "folders"}."""
    if not folders:
        raise MergeError("no shard folders given")
    folders = _folders(folders, log)
    kinds = {f: _kind_of(f) for f in folders}
    names = {k.name for k in kinds.values()}
    if len(names) > 1:
        listed = ", ".join(f"{f} ({k.name})" for f, k in kinds.items())
        raise MergeError(f"the folders are not shards of one kind of run: {listed}")
    kind = kinds[folders[0]]
    records = {f: read_json(f / "machine.json") for f in folders}
    settings = {folder: kind.settings(_made(folder, record, kind)) for folder, record in records.items()}
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
            columns += [c for c in shard_columns if c not in columns]  # a newer shard's too
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
                           _once([{"folder": str(folder), **with_commit(run, records[folder].get("machine", {}))}
                                  for folder in folders for run in records[folder].get("runs", [])]))
    record.machines = _once([machine for folder in folders for machine in _machines(folder, records[folder])])
    entry = record.start_run(command=command_line(), merge={"kind": kind.name, "shards": [str(f) for f in folders],
                                                           "rows": totals["rows"], "duplicates": totals["duplicates"]},
                             missing_cells=[" ".join(map(str, key)) for key in missing])
    record.finish(entry)
    report = kind.render(out) if merged_marker else None
    return {**totals, "missing": missing, "report": report, "kind": kind.name, "folders": folders}


def _once(entries: list[dict]) -> list[dict]:
    """Each entry once, in order: a merged folder merged beside one of its own shards carries
    that shard's machine and runs twice."""
    return [entry for i, entry in enumerate(entries) if entry not in entries[:i]]


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
