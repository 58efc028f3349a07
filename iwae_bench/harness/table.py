"""The results table: results.csv's column contract, its row writer and its validating reader.

One row per cell. The identity columns say everything that changes a cell's numbers (which
variant, on which problem, in which mode, from which seed); the rest are what was measured.
``RowWriter`` appends and flushes each row the moment its cell finishes, so a sweep killed at
any point keeps every finished row. ``read_table`` checks every line against the contract:
a malformed line is reported by its line number and skipped, never rendered as data.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

CSV_NAME = "results.csv"

FAMILIES = ("bound", "reduction", "head")
MODES = ("forward", "backward")
STATUSES = ("ok", "noisy", "interpreted", "fallback", "oom", "error", "skipped")
# statuses whose time is a speed measurement (noisy ones are, with a warning)
TIMED = ("ok", "noisy")

# identity: what a cell is; a resumed sweep skips a cell whose identity is already in the CSV
IDENTITY = ["family", "variant", "device", "dtype", "k", "batch", "latent", "data_dim", "hidden",
            "mode", "regime", "objective", "likelihood", "layers", "seed"]
# identity columns that CSVs of earlier versions lack, and the value their rows had
ADDED = {"objective": "iwae", "likelihood": "bernoulli", "layers": 1}
MEASURED = [
    "time_ms", "time_ms_p20", "time_ms_p80", "time_samples", "time_spread", "samples_per_s",
    "bytes", "gbps", "copy_gbps", "bw_fraction", "flops", "tflops", "matmul_tflops",
    "flop_fraction", "peak_mem_bytes", "bound_mean", "elbo_mean",
    "max_abs_err", "grad_max_abs_err", "finite_fraction", "iwae_elbo_gap", "compile_ms",
    "threads", "status", "message",
]
COLUMNS = IDENTITY + MEASURED
INT_COLUMNS = {"k", "batch", "latent", "data_dim", "hidden", "layers", "seed", "time_samples", "bytes",
               "flops", "peak_mem_bytes", "threads"}
TEXT_COLUMNS = {"family", "variant", "device", "dtype", "mode", "regime", "objective", "likelihood", "status",
                "message"}
CHOICES = {"family": FAMILIES, "mode": MODES, "status": STATUSES, "device": ("cpu", "cuda")}
REQUIRED = set(IDENTITY) | {"status"}


class TableError(ValueError):
    """A results CSV that cannot be read at all (missing, empty, not text, wrong header)."""


def identity(row: dict) -> tuple:
    return tuple(str(row[name]) for name in IDENTITY)


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


class RowWriter:
    """Appends rows to the CSV, each flushed to disk as soon as it is written."""

    def __init__(self, path: Path):
        fresh = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="raise")
        if fresh:
            self.writer.writeheader()
            self._flush()

    def write(self, row: dict) -> None:
        self.writer.writerow({name: _format(row.get(name)) for name in COLUMNS})
        self._flush()

    def _flush(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline (it is not a finished row)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _parse(column: str, text: str):
    """A typed value from a CSV field, or ValueError saying why not."""
    if text == "":
        if column in ADDED:  # a row written without it (by an earlier version) had this value
            return ADDED[column]
        if column in REQUIRED:
            raise ValueError(f"{column} is empty")
        return None
    if column in TEXT_COLUMNS:
        if column in CHOICES and text not in CHOICES[column]:
            raise ValueError(f"{column} {text!r} is not one of {', '.join(CHOICES[column])}")
        return text
    if column in INT_COLUMNS:
        return int(text)
    return float(text)  # accepts inf, -inf and nan as written


@dataclass
class Table:
    rows: list[dict]
    problems: list[str]  # one line per skipped line: "line N: why"


def read_table(path: Path) -> Table:
    """Every valid row of a results CSV, typed; malformed lines listed by number and skipped.

    Raises TableError (one clear line) when the file cannot be a results CSV at all.
    """
    path = Path(path)
    if not path.is_file():
        raise TableError(f"no results CSV at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TableError(f"{path} is not a text CSV (it does not decode as UTF-8)") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise TableError(f"{path} is empty: no header line")
    header = next(csv.reader([lines[0]]))
    missing = [c for c in COLUMNS if c not in header and c not in ADDED]
    if missing:
        raise TableError(f"{path} is not a results CSV of this version: its header lacks "
                         f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    rows, problems = [], []
    reader = csv.reader(lines[1:])
    for number, fields in enumerate(reader, start=2):
        if not fields or not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            problems.append(f"line {number}: {len(fields)} fields, expected {len(header)}")
            continue
        try:
            rows.append({**ADDED, **{c: _parse(c, v) for c, v in zip(header, fields) if c in COLUMNS}})
        except ValueError as error:
            problems.append(f"line {number}: {error}")
    return Table(rows, problems)
