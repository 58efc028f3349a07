"""Writing result files so that a reader never sees half of one.

Every file the suite writes whole (JSON records, reports, plots, summary CSVs) goes through
``atomic_path``: the content is written to a temporary file beside the target and renamed over
it only once complete, so an interrupted run leaves the old file or the new one, never a torn
one. (The sweep's results.csv is the exception by design: it is appended to row by row, each
row flushed, so a killed sweep keeps every finished row; see ``harness.table``.)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure
    delete it. The temporary name keeps the suffix (matplotlib picks the format from it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """The JSON object in ``path``, or {} when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    """A whole CSV (header from ``columns`` or the first row's keys)."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
