"""Plots and a comparison report, rendered from a sweep's CSV alone (plus its machine.json).

Nothing in the report is typed by hand: every number is a cell of ``results.csv`` or a field of
``machine.json``, and every plot is drawn from the table printed under it.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

VARIANT_ORDER = ["naive", "torch", "compile", "triton", "fused"]
STYLE = {"naive": ("tab:gray", "x"), "torch": ("tab:blue", "o"), "compile": ("tab:orange", "s"),
         "triton": ("tab:green", "^"), "fused": ("tab:red", "D")}
NUMERIC = ["k", "batch", "latent", "data_dim", "time_ms", "time_ms_p20", "time_ms_p80",
           "samples_per_s", "bytes", "gbps", "copy_gbps", "bw_fraction", "peak_mem_bytes",
           "bound_mean", "elbo_mean", "max_abs_err", "grad_max_abs_err", "finite_fraction",
           "iwae_elbo_gap", "compile_ms", "threads"]


def load(csv_path: Path) -> pd.DataFrame:
    frame = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    for column in NUMERIC:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["status"] = frame["status"].fillna("")
    frame["message"] = frame["message"].fillna("")
    return frame


# --------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _facet_grid(frame: pd.DataFrame, draw, ylabel: str, title: str, path: Path) -> None:
    """One panel per (batch, latent) of ``frame``; ``draw(ax, panel_rows)`` fills each panel."""
    batches = sorted(frame["batch"].unique())
    latents = sorted(frame["latent"].unique())
    fig, axes = plt.subplots(len(batches), len(latents), squeeze=False, sharex=True,
                             figsize=(4.2 * len(latents) + 1, 3.2 * len(batches) + 0.6))
    for i, batch in enumerate(batches):
        for j, latent in enumerate(latents):
            ax = axes[i][j]
            draw(ax, frame[(frame["batch"] == batch) & (frame["latent"] == latent)])
            _log_x(ax)
            ax.set_title(f"B={batch}, d={latent}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(batches) - 1:
                ax.set_xlabel("k (samples per example)")
            if j == 0:
                ax.set_ylabel(ylabel)
    legend = {}
    for ax in axes.flat:  # every label once, whichever panel drew it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        axes[0][-1].legend(legend.values(), legend.keys(), fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    _save(fig, path)


def facet_plot(frame: pd.DataFrame, metric: str, ylabel: str, title: str, path: Path,
               logy: bool = True, reference_line: float | None = None,
               non_finite_at: float | None = None) -> bool:
    """``metric`` against k, one line per variant, one panel per (batch, latent)."""
    frame = frame.dropna(subset=[metric])
    if frame.empty:
        return False

    def draw(ax, panel):
        present = set(panel["variant"])
        for variant in [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER)):
            line = panel[panel["variant"] == variant].sort_values("k")
            color, marker = STYLE.get(variant, (None, "."))
            ax.plot(line["k"], line[metric], marker=marker, color=color, label=variant)
        if reference_line is not None:
            ax.axhline(reference_line, color="black", lw=0.8, ls="--")
        if non_finite_at is not None:
            _mark_non_finite(ax, non_finite_at)
        if logy:
            ax.set_yscale("log")

    _facet_grid(frame, draw, ylabel, title, path)
    return True


def bounds_plot(frame: pd.DataFrame, path: Path) -> bool:
    """L_k (the IWAE bound, from the torch variant, or any ok one) and the ELBO against k."""
    rows = frame[(frame["mode"] == "forward") & frame["bound_mean"].notna()
                 & frame["status"].isin(["ok", "interpreted"])]
    if rows.empty:
        return False
    rows = rows[rows["variant"] == ("torch" if "torch" in set(rows["variant"]) else rows["variant"].iloc[0])]
    rows = rows[rows["dtype"] == rows["dtype"].iloc[0]]

    def draw(ax, panel):
        panel = panel.sort_values("k")
        ax.plot(panel["k"], panel["bound_mean"], marker="o", label="IWAE bound L_k")
        ax.plot(panel["k"], panel["elbo_mean"], marker="s", label="ELBO (mean of log w)")
        ax.fill_between(panel["k"], panel["elbo_mean"], panel["bound_mean"], alpha=0.15)

    _facet_grid(rows, draw, "nats per example",
                f"IWAE bound vs ELBO on the same samples ({rows['dtype'].iloc[0]} logits)", path)
    return True


def error_frame(frame: pd.DataFrame, column: str = "max_abs_err") -> tuple[pd.DataFrame, float]:
    """Errors with inf replaced by a marker value two decades above the finite ones, so a
    non-finite result shows on the plot (on a dashed line labelled as such); returns the marker."""
    rows = frame[frame[column].notna()].copy()
    finite = rows.loc[rows[column].apply(math.isfinite), column]
    top = 10.0 ** (math.ceil(math.log10(max(finite.max(), 1e-12))) + 2) if not finite.empty else 1.0
    rows[column] = rows[column].apply(lambda v: top if not math.isfinite(v) else max(v, 1e-12))
    return rows, top


def _mark_non_finite(ax, top: float) -> None:
    ax.axhline(top, color="gray", lw=0.8, ls=":")
    ax.text(0.02, top, " non-finite result", transform=ax.get_yaxis_transform(), va="bottom",
            fontsize=7, color="gray")


def _log_x(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def headline_plot(frame: pd.DataFrame, path: Path) -> bool:
    """Throughput and error against k for the forward bound at the largest batch."""
    forward = frame[(frame["mode"] == "forward")]
    if forward.empty:
        return False
    dtype = "float32" if "float32" in set(forward["dtype"]) else forward["dtype"].iloc[0]
    forward = forward[(forward["dtype"] == dtype)]
    batch, latent = forward["batch"].max(), sorted(forward["latent"].unique())[len(forward["latent"].unique()) // 2]
    panel = forward[(forward["batch"] == batch) & (forward["latent"] == latent)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    speed = panel[panel["status"] == "ok"]
    errors, top = error_frame(panel)
    for variant in VARIANT_ORDER:
        color, marker = STYLE[variant]
        line = speed[speed["variant"] == variant].sort_values("k")
        if not line.empty:
            left.plot(line["k"], line["samples_per_s"], marker=marker, color=color, label=variant)
        line = errors[errors["variant"] == variant].sort_values("k")
        if not line.empty:
            right.plot(line["k"], line["max_abs_err"], marker=marker, color=color, label=variant)
    device = panel["device"].iloc[0]
    left.set(yscale="log", xlabel="k", ylabel="samples (B*k) per second",
             title=f"throughput, {device}, B={batch}, d={latent}, {dtype}")
    right.set(yscale="log", xlabel="k", ylabel="max |bound - float64 reference|",
              title="error against the float64 reference")
    _mark_non_finite(right, top)
    for ax in (left, right):
        _log_x(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return True


# --------------------------------------------------------------------------- tables


def with_speedup(part: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """``part`` with a speedup_vs_<baseline> column: baseline time / time, per cell."""
    cell = ["batch", "latent", "k"]
    base = part[part["variant"] == baseline].set_index(cell)["time_ms"].rename("baseline_ms")
    ratio = part.join(base, on=cell)
    ratio[f"speedup_vs_{baseline}"] = ratio["baseline_ms"] / ratio["time_ms"]
    return ratio


def pivot(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    rows = frame.dropna(subset=[metric])
    if rows.empty:
        return rows
    table = rows.pivot_table(index=["batch", "latent", "k"], columns="variant", values=metric,
                             aggfunc="first")
    return table[[v for v in VARIANT_ORDER if v in table.columns]
                 + [v for v in table.columns if v not in VARIANT_ORDER]]


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "_no rows_\n"
    flat = table.reset_index()
    head = "| " + " | ".join(map(str, flat.columns)) + " |"
    rule = "|" + "---|" * len(flat.columns)
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in flat.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


# --------------------------------------------------------------------------- the report


def render(out: Path, csv_path: Path | None = None) -> Path:
    """Write plots, report.md and report.html into ``out`` from its CSV; return report.md."""
    csv_path = csv_path or out / "results.csv"
    if not csv_path.exists():
        raise FileNotFoundError(f"no sweep CSV at {csv_path}")
    frame = load(csv_path)
    machine_path = csv_path.parent / "machine.json"
    record = json.loads(machine_path.read_text()) if machine_path.exists() else {}
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str | None, str, pd.DataFrame | None]] = []  # title, image, text, table

    if (frame["device"] == "cuda").any():
        from .targets import targets_table

        table = targets_table(frame)
        met = int((table["met"] == "yes").sum())
        sections.append(("GPU targets", None,
                         f"{met} of {len(table)} targets met. Each row: a cell of the CSV, what it "
                         "measured, and the goal (fraction of the copy bandwidth, speedup over "
                         "torch.compile on the same inputs, or peak extra bytes).",
                         table.set_index(["target", "cell"])))
        measured = frame[(frame["device"] == "cuda") & (frame["status"] == "ok")]
        for (mode, dtype), part in sorted(measured.groupby(["mode", "dtype"])):
            if "compile" in set(part["variant"]):
                sections.append((f"Every variant against torch.compile: {mode}, {dtype}", None,
                                 "Speedup over torch.compile on the same cell (time of compile / "
                                 "time of the variant); the fraction of copy bandwidth is in the "
                                 "bandwidth section.", pivot(with_speedup(part, "compile"), "speedup_vs_compile")))
    if headline_plot(frame, plots / "headline.png"):
        sections.append(("Headline", "plots/headline.png",
                         "Throughput of the forward bound (measured variants only) and each variant's "
                         "error against the float64 reference, at the largest batch.", None))
    speed = frame[frame["status"] == "ok"]
    for (mode, dtype), part in sorted(speed.groupby(["mode", "dtype"])):
        tag = f"{mode}_{dtype}"
        if facet_plot(part, "samples_per_s", "samples / s", f"throughput, {mode}, {dtype} logits",
                      plots / f"throughput_{tag}.png"):
            sections.append((f"Throughput: {mode}, {dtype}", f"plots/throughput_{tag}.png",
                             "Samples (B*k) per second against k. Table: median time of one call, ms.",
                             pivot(part, "time_ms")))
        if "torch" in set(part["variant"]):
            ratio = with_speedup(part, "torch")
            if facet_plot(ratio, "speedup_vs_torch", "speedup over torch", f"speedup over eager torch, {mode}, {dtype}",
                          plots / f"speedup_{tag}.png", reference_line=1.0):
                sections.append((f"Speedup over torch: {mode}, {dtype}", f"plots/speedup_{tag}.png",
                                 "Time of the torch variant divided by each variant's time.",
                                 pivot(ratio, "speedup_vs_torch")))
        if facet_plot(part, "bw_fraction", "fraction of copy bandwidth", f"fraction of measured copy bandwidth, {mode}, {dtype}",
                      plots / f"bandwidth_{tag}.png", logy=False, reference_line=1.0):
            sections.append((f"Fraction of copy bandwidth: {mode}, {dtype}", f"plots/bandwidth_{tag}.png",
                             "Fewest bytes the cell must move over its time, divided by the copy bandwidth "
                             "measured in the same run.", pivot(part, "bw_fraction")))
        if facet_plot(part, "peak_mem_bytes", "peak extra bytes", f"peak memory, {mode}, {dtype}",
                      plots / f"memory_{tag}.png"):
            sections.append((f"Peak memory: {mode}, {dtype}", f"plots/memory_{tag}.png",
                             "Bytes allocated at the peak of one call beyond what was allocated before it.",
                             pivot(part, "peak_mem_bytes")))
    if speed["peak_mem_bytes"].dropna().empty:
        sections.append(("Peak memory", None, "Not measured: the CPU has no allocator statistics that "
                         "can be reset per call, so the column is empty rather than guessed.", None))
    if bounds_plot(frame, plots / "bounds.png"):
        sections.append(("IWAE bound and ELBO", "plots/bounds.png",
                         "Mean L_k and mean ELBO (float64) of each cell's inputs against k: the gap "
                         "the importance weights close.", pivot(frame[frame["mode"] == "forward"], "iwae_elbo_gap")))
    for mode, part in sorted(frame.groupby("mode")):
        errors, top = error_frame(part)
        if facet_plot(errors, "max_abs_err", "max |err|", f"error against the float64 reference, {mode}",
                      plots / f"error_{mode}.png", non_finite_at=top):
            sections.append((f"Error against the reference: {mode}", f"plots/error_{mode}.png",
                             "Largest |bound - float64 bound| per cell (all dtypes); points on the top "
                             "row are infinite errors (a -inf bound where the reference is finite).",
                             pivot(part, "max_abs_err")))
        if part["grad_max_abs_err"].notna().any():
            sections.append((f"Gradient error: {mode}", None,
                             "Largest |gradient - float64 autograd gradient| over logits, z, mu, logvar.",
                             pivot(part, "grad_max_abs_err")))

    report_md = _markdown(frame, record, sections)
    _write_atomic(out / "report.md", report_md)
    _write_atomic(out / "report.html", _html(frame, record, sections))
    return out / "report.md"


def _machine_lines(record: dict) -> list[tuple[str, str]]:
    info = record.get("machine", {})
    lines = [(key, str(value)) for key, value in info.items()]
    for i, run in enumerate(record.get("runs", []), 1):
        lines.append((f"run {i}", f"`{run.get('command')}` started {run.get('started')}, finished "
                                   f"{run.get('finished') or 'not (interrupted)'}, copy bandwidth "
                                   f"{run.get('copy_bandwidth_gbps', float('nan')):.1f} GB/s"))
    return lines


def _status_table(frame: pd.DataFrame) -> pd.DataFrame:
    rows = frame[frame["status"] != "ok"]
    return rows[["variant", "mode", "dtype", "batch", "latent", "k", "status", "message"]].set_index(
        ["variant", "mode", "dtype", "batch", "latent", "k"])


def _markdown(frame, record, sections) -> str:
    parts = ["# iwae-bench sweep report\n\n",
             f"{len(frame)} cells from `results.csv`. Rendered by `python -m iwae_bench report`; "
             "every number below is a cell of that CSV or a field of `machine.json`.\n\n",
             "## Machine\n\n", "| field | value |\n|---|---|\n" +
             "".join(f"| {k} | {v} |\n" for k, v in _machine_lines(record))]
    for title, image, text, table in sections:
        parts.append(f"\n## {title}\n\n{text}\n")
        if image:
            parts.append(f"\n![{title}]({image})\n")
        if table is not None:
            parts.append("\n" + markdown_table(table))
    status = _status_table(frame)
    parts.append("\n## Cells that are not speed measurements\n\n"
                 "`interpreted`: Triton kernels run by the CPU interpreter (checked for correctness, "
                 "their time is not a speed); `fallback`: torch.compile ran eager; `oom`, `error`, "
                 "`skipped`: no measurement, with the reason.\n\n" + markdown_table(status))
    return "".join(parts)


def _html(frame, record, sections) -> str:
    body = [f"<h1>iwae-bench sweep report</h1><p>{len(frame)} cells from results.csv.</p>",
            "<h2>Machine</h2><table>" + "".join(
                f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                for k, v in _machine_lines(record)) + "</table>"]
    for title, image, text, table in sections:
        body.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>")
        if image:
            body.append(f'<img src="{image}" style="max-width:100%">')
        if table is not None and not table.empty:
            body.append(table.to_html(float_format=_fmt, na_rep=""))
    body.append("<h2>Cells that are not speed measurements</h2>" + _status_table(frame).to_html())
    return ("<!doctype html><html><head><meta charset='utf-8'><title>iwae-bench report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
            "collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            + "".join(body) + "</body></html>\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
