"""The report from a results CSV alone: its sections and plots, noisy cells, bad CSVs, and the
comparison with another results folder. The CSVs here are written by the table's writer from
known rows, so every expectation is a known value."""

import html
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

import iwae_bench.report
from iwae_bench.harness.table import RowWriter
from iwae_bench.report import facet_plot, headline_plot, load, render

ROOT = Path(__file__).resolve().parent.parent


def _row(variant, k, time_ms, *, mode="forward", latent=50, batch=4, regime="realistic",
         status="ok", family="bound", err=1e-6, grad_err=None, spread=1.1, bound=-150.0):
    return {"family": family, "variant": variant, "device": "cpu", "dtype": "float32", "k": k,
            "batch": batch, "latent": 0 if family == "reduction" else latent,
            "data_dim": 0 if family == "reduction" else 784, "hidden": 0, "mode": mode, "regime": regime,
            "seed": 0, "time_ms": time_ms, "time_ms_p20": time_ms / spread ** 0.5,
            "time_ms_p80": time_ms * spread ** 0.5, "time_samples": 7, "time_spread": spread,
            "samples_per_s": batch * k / (time_ms * 1e-3), "bytes": 1000 * k, "gbps": 1.0,
            "copy_gbps": 10.0, "bw_fraction": 0.1, "bound_mean": bound, "elbo_mean": bound - 2,
            "max_abs_err": err, "grad_max_abs_err": grad_err, "finite_fraction": 1.0,
            "iwae_elbo_gap": 2.0, "threads": 2, "status": status, "message": ""}


def _rows():
    rows = []
    for variant, scale in (("naive", 3.0), ("blog", 2.5), ("torch", 2.0), ("compile", 1.0)):
        for k in (1, 8, 64):
            rows.append(_row(variant, k, scale * k, err=float("inf") if variant == "naive" else 1e-6))
            rows.append(_row(variant, k, 2 * scale * k, mode="backward", grad_err=1e-5))
    for variant in ("triton", "fused"):
        for k in (1, 8, 64):
            rows.append(_row(variant, k, 500.0, status="interpreted"))
    rows.append(_row("torch", 64, 300.0, latent=16, batch=4))
    rows.append(_row("torch", 64, 900.0, latent=200, batch=4, status="noisy", spread=3.0))
    rows.append(_row("blog", 8, 10.0, regime="saturated", err=70.0, grad_err=1.0))
    rows.append(_row("torch", 8, 10.0, regime="saturated", err=1e-5, grad_err=1e-6))
    for k in (1, 64):
        rows.append(_row("torch", k, 0.1 * k, family="reduction", batch=256))
    return rows


def _write(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with RowWriter(folder / "results.csv") as writer:
        for row in rows:
            writer.write(row)
    return folder


def test_report_sections_plots_and_noisy_cells(tmp_path):
    out = _write(tmp_path / "run", _rows())
    text = render(out).read_text()
    timed = sum(r["status"] in ("ok", "noisy") for r in _rows())
    assert text.splitlines()[2].startswith(f"{len(_rows())} cells from `results.csv`; 1 of {timed} "
                                           "timed cells are noisy")
    for heading in ["## Machine", "## Headline", "## Throughput: forward, float32 logits",
                    "## Latent width: forward, float32", "## IWAE bound and ELBO",
                    "## Throughput: the reduction alone on [B, k] float32 log-weights",
                    "## Bound error: forward, realistic inputs", "## Gradient error: backward, realistic inputs",
                    "## Saturated logits: where code on probabilities breaks", "## Noisy cells",
                    "## Cells that are not speed measurements"]:
        assert heading in text, heading
    assert "IWAE-ELBO gap in nats" in text and "d=0" not in text
    # the latent table holds the three widths at B=4, k=64
    latent_table = text.split("## Latent width: forward, float32")[1].split("##")[0]
    assert all(f"| 4 | 64 | {d} |" in latent_table for d in (16, 50, 200))
    # the gradient-error section is the gradients' (1e-5 here), not the backward cells' bound error (1e-6)
    gradient = text.split("## Gradient error: backward, realistic inputs")[1].split("##")[0]
    assert "1e-05" in gradient and "1e-06" not in gradient
    # the saturated table: blog's errors beside torch's
    saturated = text.split("## Saturated logits")[1].split("##")[0]
    assert "| blog | 70 | 1 |" in saturated and "| torch | 1e-05 | 1e-06 |" in saturated
    for name in ["headline", "throughput_forward_float32", "latent_forward_float32", "bounds",
                 "error_bound_realistic_forward", "grad_error_bound_realistic_backward",
                 "throughput_reduction_float32", "error_bound_saturated_forward"]:
        image = matplotlib.image.imread(out / "plots" / f"{name}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100, name
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and "<code>results.csv</code>" in html
    assert "`" not in html  # every backtick became <code>
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_report_compares_with_another_run(tmp_path):
    reference = _write(tmp_path / "reference", _rows())
    faster = [dict(r, time_ms=r["time_ms"] / 2) for r in _rows()]
    out = _write(tmp_path / "run", faster[:-1])  # one cell fewer
    text = render(out, against=reference).read_text()
    section = text.split(f"## Against {reference}")[1]
    assert f"{len(_rows()) - 1} cells in both runs, 0 only in this one, 1 only in the reference" in section
    assert "| torch |" in section and "| 0.5 |" in section  # median time ratio this / reference
    assert (out / "plots" / "against_reference.png").exists()


def test_report_has_a_section_per_likelihood(tmp_path):
    """The continuous likelihoods' rows get their own sections, by likelihood and mode; the
    Bernoulli's plots and tables hold none of them."""
    rows = [_row("torch", k, 2.0 * k) for k in (1, 64)]
    for likelihood, err in (("gaussian", 0.625), ("discretized_logistic:mix=3", 0.375)):
        for regime in ("realistic", "saturated"):
            rows += [dict(_row("naive", 64, 9.0, regime=regime, err=err), likelihood=likelihood),
                     dict(_row("torch", 64, 7.0, regime=regime, err=3.5e-05), likelihood=likelihood),
                     dict(_row("torch", 64, 14.0, mode="backward", regime=regime, err=3.5e-05, grad_err=4.5e-06),
                          likelihood=likelihood)]
    text = render(_write(tmp_path / "run", rows)).read_text()
    for likelihood, err in (("gaussian", "0.625"), ("discretized_logistic:mix=3", "0.375")):
        section = text.split(f"## Likelihood {likelihood}: bound error, forward")[1].split("##")[0]
        assert f"| realistic | 4 | 64 | {err} | 3.5e-05 |" in section and f"| saturated | 4 | 64 | {err} | 3.5e-05 |" in section
        gradient = text.split(f"## Likelihood {likelihood}: gradient error, backward")[1].split("##")[0]
        assert "| realistic | 4 | 64 | 4.5e-06 |" in gradient
        assert f"## Likelihood {likelihood}: time, forward" in text
    bernoulli = text.split("## Likelihood")[0]
    assert "0.625" not in bernoulli and "3.5e-05" not in bernoulli and "4.5e-06" not in bernoulli
    assert "## Likelihood bernoulli" not in text
    assert text.index("## Likelihood discretized_logistic:mix=3") < text.index("## Likelihood gaussian")


def _record_figures(monkeypatch) -> dict[str, list[tuple[str, int, str]]]:
    """Every figure the report saves, by file name: [(panel title, how many points it draws, its x
    label)]. A point is a finite marker of a data line; reference lines (axhline) have no markers."""
    figures = {}
    save = iwae_bench.report.save_figure

    def recording(fig, path):
        figures[Path(path).name] = [
            (ax.get_title(), sum(math.isfinite(x) and math.isfinite(y) for line in ax.get_lines()
                                 if line.get_marker() not in (None, "None", "")
                                 for x, y in zip(line.get_xdata(), line.get_ydata())), ax.get_xlabel())
            for ax in fig.axes]
        save(fig, path)

    monkeypatch.setattr(iwae_bench.report, "save_figure", recording)
    return figures


def test_facet_grid_draws_only_the_panels_with_data(tmp_path, monkeypatch):
    # the grid B in {4, 32} x d in {16, 50, 200} ran 4 of its 6 (B, d) pairs
    pairs = [(4, 50), (32, 16), (32, 50), (32, 200)]
    rows = [_row(variant, k, 1.0 + k, batch=batch, latent=latent)
            for batch, latent in pairs for variant in ("torch", "compile") for k in (1, 8)]
    frame, _ = load(_write(tmp_path, rows) / "results.csv")
    figures = _record_figures(monkeypatch)
    assert facet_plot(frame, "samples_per_s", "samples / s", "throughput", tmp_path / "grid.png")
    panels = figures["grid.png"]
    assert sorted(title for title, *_ in panels) == sorted(f"B={b}, d={d}" for b, d in pairs)
    assert all(points == 4 for _, points, _ in panels), panels  # 2 variants x 2 k in each
    assert (tmp_path / "grid.png").exists()


def test_headline_draws_no_throughput_panel_when_nothing_was_timed(tmp_path, monkeypatch):
    rows = [_row(variant, k, 500.0, status="interpreted") for variant in ("triton", "fused") for k in (1, 8)]
    frame, _ = load(_write(tmp_path, rows) / "results.csv")
    figures = _record_figures(monkeypatch)
    assert headline_plot(frame, tmp_path / "headline.png")
    assert [title for title, *_ in figures["headline.png"]] == [
        "error against the float64 reference, cpu, B=4, d=50, float32"]
    assert figures["headline.png"][0][1] == 4


@pytest.fixture(scope="module")
def holey(tmp_path_factory):
    """One report, and its figures, over a grid with holes (B=32 ran only d=50) and saturated
    cells in both modes."""
    rows = _rows() + [_row("torch", 8, 5.0, batch=32),
                      _row("torch", 8, 10.0, mode="backward", regime="saturated", err=1e-5, grad_err=1e-6)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        figures = _record_figures(monkeypatch)
        out = render(_write(tmp_path_factory.mktemp("holey"), rows)).parent
    return out, figures


def test_no_plot_of_the_report_has_an_empty_panel(holey):
    _, figures = holey
    assert len(figures) > 15 and "throughput_forward_float32.png" in figures
    grid = figures["throughput_forward_float32.png"]
    assert [title for title, *_ in grid] == ["B=4, d=16", "B=4, d=50", "B=4, d=200", "B=32, d=50"]
    # the k axis is labelled under each column's lowest panel: B=32 has none under d=50 and d=200
    assert [bool(xlabel) for *_, xlabel in grid] == [False, True, True, True]
    empty = [(name, title) for name, panels in figures.items() for title, points, _ in panels if not points]
    assert not empty


def test_report_puts_forward_before_backward(holey):
    text = (holey[0] / "report.md").read_text()
    headings = re.findall(r"^## (.*)$", text, re.M)
    backward = [h for h in headings if "backward" in h]
    paired = [h for h in backward if h.replace("backward", "forward") in headings]
    assert len(paired) == 6, headings  # throughput, speedup, bandwidth; bound error x2, gradient error
    for heading in paired:
        assert headings.index(heading.replace("backward", "forward")) < headings.index(heading), heading
    saturated = text.split("## Saturated logits")[1].split("##")[0]
    header = next(line for line in saturated.splitlines() if line.startswith("| variant"))
    assert header.index("(forward)") < header.index("(backward)"), header


def test_report_opens_with_contents_that_link_every_section(holey):
    out = holey[0]
    text, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert text.index("Contents:") < text.index("## Machine")
    sections = [(anchor, html.unescape(title)) for anchor, title in re.findall(r'<h2 id="([^"]+)">(.*?)</h2>', page)]
    assert len(sections) == len(re.findall(r"^## ", text, re.M)) > 20
    contents = page.split("<ul>", 1)[1].split("</ul>", 1)[0]
    entries = re.findall(r"<li>(.*?)</li>", contents, re.S)
    links = [link for entry in entries for link in re.findall(r'href="#([^"]+)"', entry)]
    assert links == [anchor for anchor, _ in sections]  # each section once, in order, to an id that exists
    for anchor, title in sections:  # the line linking a section names it
        entry = html.unescape(re.sub(r"<[^>]+>", "", next(e for e in entries if f'href="#{anchor}"' in e)))
        kind, _, subject = title.partition(": ")
        assert kind in entry and subject in entry, (title, entry)
    assert len(entries) < len(sections)  # neighbours on one subject share a line


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "iwae_bench", *args], capture_output=True, text=True,
                          env=env, cwd=cwd)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty: no header line"),
    (bytes(range(256)) * 4, "is not a text CSV"),
    (b"a,b,c\n1,2,3\n", "is not a results CSV of this version: its header lacks family"),
], ids=["empty", "random-bytes", "other-csv"])
def test_report_on_a_bad_csv_is_one_line(tmp_path, content, message, capsys):
    (tmp_path / "results.csv").write_bytes(content)
    stderr = _refused(capsys, "report", str(tmp_path))
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr


def _refused(capsys, *args) -> str:
    """The command in this process (a traceback fails the test here too; the report command's own
    process runs in the test below): exit status 2, and its stderr."""
    from iwae_bench.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_report_skips_garbage_and_torn_lines_and_says_so(tmp_path):
    out = _write(tmp_path, _rows())
    with open(out / "results.csv", "a") as f:
        f.write("this is not,a row\n")
        f.write("bound,torch,cpu,float32,3")  # a torn last row
    done = _cli("report", str(out))
    assert done.returncode == 0, done.stderr
    text = (out / "report.md").read_text()
    n = len(_rows())
    assert f"2 malformed lines of the CSV were skipped: line {n + 2}: 2 fields" in text
    assert f"line {n + 3}: 5 fields" in text
    assert text.count("| this is not") == 0 and f"{n} cells from" in text


def test_report_of_a_missing_folder_is_one_line_and_creates_nothing(tmp_path, capsys):
    assert "no such folder" in _refused(capsys, "report", str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()


def test_machine_section_lists_each_machine_and_each_runs_commit(tmp_path):
    """A merged folder's machine.json: the report's Machine section names every machine its
    rows came from and the commit each run recorded."""
    import json

    out = _write(tmp_path / "run", _rows())
    shard = {"device_name": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc"}
    (out / "machine.json").write_text(json.dumps({
        "machine": {**shard, "device": "cuda"},
        "machines": [{"folder": "shard-0", **shard}, {"folder": "shard-1", **shard, "commit": "def"}],
        "runs": [{"command": "python -m iwae_bench sweep --shard 0/2", "commit": "abc", "started": "t0",
                  "finished": "t1"}]}))
    text = render(out).read_text()
    assert "folder shard-1, device_name NVIDIA H200, torch 2.11.0, triton 3.6.0, commit def" in text
    assert "started t0, finished t1, commit abc" in text
