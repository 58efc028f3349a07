"""Plots and a comparison report, rendered from a results CSV alone (plus its machine.json).

Nothing in the report is typed by hand: every number is a cell of ``results.csv`` (read through
the table's contract: malformed lines are listed and skipped, never drawn) or a field of
``machine.json``, and every plot is drawn from the table printed under it. The Markdown is the
report; the HTML is rendered from it by markdown-it-py.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402

from .files import read_json, save_figure, write_text  # noqa: E402
from .harness.machine import missing_cells  # noqa: E402
from .harness.table import COLUMNS, IDENTITY, MODES, TEXT_COLUMNS, TIMED, TableError, read_table  # noqa: E402
from .harness.timing import NOISE_LIMIT  # noqa: E402

VARIANT_ORDER = ["naive", "blog", "torch", "compile", "triton", "fused", "fused_linear"]
# colour, marker and marker size: sizes shrink along the order and later variants draw on top,
# so series that coincide (triton under fused) stay visible as rings around dots
STYLE = {"naive": ("tab:gray", "x", 9), "blog": ("tab:brown", "v", 9), "torch": ("tab:blue", "o", 8),
         "compile": ("tab:orange", "s", 7), "triton": ("tab:green", "^", 8), "fused": ("tab:red", "D", 4),
         "fused_linear": ("tab:purple", "P", 5)}
NUMERIC = [c for c in COLUMNS if c not in TEXT_COLUMNS]
NATS = "nats"
TITLE = "iwae-bench report"


def load(csv_path: Path) -> tuple[pd.DataFrame, list[str]]:
    """The CSV's valid rows as a frame, and one line per malformed line that was skipped."""
    table = read_table(csv_path)
    if not table.rows:
        detail = f" ({'; '.join(table.problems[:3])})" if table.problems else ""
        raise TableError(f"{csv_path} holds no valid rows{detail}")
    frame = pd.DataFrame(table.rows, columns=COLUMNS)
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].fillna("")
    return frame, table.problems


def _ordered(variants) -> list[str]:
    present = set(variants)
    return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


def _groups(frame: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """``frame.groupby(keys)`` in the report's order: sorted, but forward before backward (the
    order of MODES, not the alphabet's), so a backward section follows its forward one."""
    def rank(group):
        return tuple((MODES.index(v), v) if key == "mode" else (0, v) for key, v in zip(keys, group[0]))
    return sorted(frame.groupby(keys), key=rank)


# --------------------------------------------------------------------------- plots


def _log_x(ax) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _panel_title(keys: tuple[str, ...], values: tuple) -> str:
    names = {"batch": "B", "latent": "d", "k": "k", "hidden": "H"}
    return ", ".join(f"{names.get(key, key)}={value}" for key, value in zip(keys, values))


def _panel_rows(frame: pd.DataFrame, panels: tuple[str, ...]) -> list[list[tuple[tuple, pd.DataFrame]]]:
    """(values of ``panels``, their rows) for each combination that has rows, in one list per value
    of the first key: a pair the grid never ran (B=4, d=16) gets no panel, rather than an empty one."""
    rows: dict = {}
    for values, part in frame.groupby(list(panels)):  # sorted, keys always tuples
        rows.setdefault(values[0], []).append((values, part))
    return list(rows.values())


def _facet_grid(frame: pd.DataFrame, draw, ylabel: str, title: str, path: Path,
                panels: tuple[str, ...] = ("batch", "latent"), xlabel: str = "k (samples per example)") -> None:
    """One panel per value of ``panels`` that has data: a row per value of the first key, holding
    its values of the second (if any), left-aligned; ``draw(ax, panel_rows)`` fills each panel."""
    rows = _panel_rows(frame, panels)
    width = max(map(len, rows))
    fig = plt.figure(figsize=(4.2 * width + 1, 3.2 * len(rows) + 0.6))
    grid = fig.add_gridspec(len(rows), width)
    first = None
    for i, row in enumerate(rows):
        for j, (values, part) in enumerate(row):
            ax = fig.add_subplot(grid[i, j], sharex=first)
            first = first or ax
            draw(ax, part)
            _log_x(ax)
            ax.set_title(_panel_title(panels, values), fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i + 1 < len(rows) and j < len(rows[i + 1]):  # the panel below carries the x axis
                ax.tick_params(labelbottom=False)
            else:
                ax.set_xlabel(xlabel)
            if j == 0:
                ax.set_ylabel(ylabel)
    legend = {}
    for ax in fig.axes:  # every label once, whichever panel drew it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend and len(rows[0]) < width:  # in the top row's free corner, clear of the data
        corner = grid[0, width - 1].get_position(fig)
        fig.legend(legend.values(), legend.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(corner.x0, corner.y1))
    elif legend:
        fig.axes[width - 1].legend(legend.values(), legend.keys(), fontsize=8, loc="best")
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def _draw_series(ax, part: pd.DataFrame, x: str, metric: str, bars: tuple[str, str] | None = None) -> None:
    """One line per variant; noisy cells as hollow markers; p20-p80 bars where given."""
    for variant in _ordered(part["variant"]):
        line = part[part["variant"] == variant].sort_values(x)
        color, marker, size = STYLE.get(variant, (None, ".", 6))
        z = 2 + VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else 10
        ax.plot(line[x], line[metric], color=color, lw=1, alpha=0.85, zorder=z)
        steady = line[line["status"] != "noisy"]
        ax.plot(steady[x], steady[metric], ls="none", marker=marker, ms=size, color=color,
                label=variant, zorder=z)
        noisy = line[line["status"] == "noisy"]
        if not noisy.empty:
            ax.plot(noisy[x], noisy[metric], ls="none", marker=marker, ms=size + 2, mfc="none",
                    color=color, zorder=z)
            ax.plot([], [], ls="none", marker="o", mfc="none", color="black",
                    label=f"noisy (p80/p20 > {NOISE_LIMIT})")
        if bars is not None:
            low, high = line[bars[0]], line[bars[1]]
            ax.errorbar(line[x], line[metric], yerr=[line[metric] - low, high - line[metric]],
                        fmt="none", ecolor=color, elinewidth=0.8, capsize=2, zorder=z)


def facet_plot(frame: pd.DataFrame, metric: str, ylabel: str, title: str, path: Path,
               logy: bool = True, reference_line: float | None = None,
               non_finite_at: float | None = None, bars: tuple[str, str] | None = None,
               panels: tuple[str, ...] = ("batch", "latent")) -> bool:
    """``metric`` against k, one line per variant, one panel per ``panels`` value."""
    frame = frame.dropna(subset=[metric])
    if frame.empty:
        return False

    def draw(ax, panel):
        _draw_series(ax, panel, "k", metric, bars)
        if reference_line is not None:
            ax.axhline(reference_line, color="black", lw=0.8, ls="--")
        if non_finite_at is not None:
            _mark_non_finite(ax, non_finite_at)
        if logy:
            ax.set_yscale("log")

    _facet_grid(frame, draw, ylabel, title, path, panels)
    return True


def _with_throughput_bars(frame: pd.DataFrame) -> pd.DataFrame:
    """samples/s at the p80 and p20 times: the throughput's p20-p80 band."""
    frame = frame.copy()
    samples = frame["batch"] * frame["k"]
    frame["samples_per_s_low"] = samples / (frame["time_ms_p80"] * 1e-3)
    frame["samples_per_s_high"] = samples / (frame["time_ms_p20"] * 1e-3)
    return frame


def bounds_plot(frame: pd.DataFrame, path: Path) -> bool:
    """L_k (the IWAE bound, from the torch variant, or any finite one) and the ELBO against k."""
    rows = frame[(frame["family"] == "bound") & (frame["mode"] == "forward")
                 & (frame["regime"] == "realistic") & frame["bound_mean"].notna()
                 & (frame["finite_fraction"] == 1.0)]
    if rows.empty:
        return False
    rows = rows[rows["variant"] == ("torch" if "torch" in set(rows["variant"]) else rows["variant"].iloc[0])]
    rows = rows[rows["dtype"] == rows["dtype"].iloc[0]]

    def draw(ax, panel):
        panel = panel.sort_values("k")
        ax.plot(panel["k"], panel["bound_mean"], marker="o", label="IWAE bound L_k")
        ax.plot(panel["k"], panel["elbo_mean"], marker="s", label="ELBO (mean of log w)")
        ax.fill_between(panel["k"], panel["elbo_mean"], panel["bound_mean"], alpha=0.15)

    _facet_grid(rows, draw, f"{NATS} per example",
                f"IWAE bound vs ELBO on the same samples ({rows['dtype'].iloc[0]} logits)", path)
    return True


def latent_plot(part: pd.DataFrame, path: Path, title: str) -> pd.DataFrame | None:
    """Throughput against the latent width d at each (B, k) that the grid ran at several d."""
    groups = part.groupby(["batch", "k"])["latent"].nunique()
    shapes = groups[groups > 1].index
    if len(shapes) == 0:
        return None
    rows = part.set_index(["batch", "k"]).loc[list(shapes)].reset_index()

    def draw(ax, panel):
        _draw_series(ax, panel, "latent", "samples_per_s")
        ax.set_yscale("log")

    _facet_grid(rows, draw, "samples / s", title, path, panels=("batch", "k"),
                xlabel="latent width d")
    return rows.pivot_table(index=["batch", "k", "latent"], columns="variant", values="time_ms",
                            aggfunc="first")


def error_frame(frame: pd.DataFrame, column: str = "max_abs_err") -> tuple[pd.DataFrame, float]:
    """Errors with inf replaced by a marker value two decades above the finite ones, so a
    non-finite result shows on the plot (on a dotted line labelled as such); returns the marker."""
    rows = frame[frame[column].notna()].copy()
    finite = rows.loc[rows[column].apply(math.isfinite), column]
    top = 10.0 ** (math.ceil(math.log10(max(finite.max(), 1e-12))) + 2) if not finite.empty else 1.0
    rows[column] = rows[column].apply(lambda v: top if not math.isfinite(v) else max(v, 1e-12))
    return rows, top


def _mark_non_finite(ax, top: float) -> None:
    ax.axhline(top, color="gray", lw=0.8, ls=":")
    ax.text(0.02, top, " non-finite result", transform=ax.get_yaxis_transform(), va="bottom",
            fontsize=7, color="gray")


def headline_plot(frame: pd.DataFrame, path: Path) -> bool:
    """Throughput and error against k for the forward bound at the largest batch."""
    forward = frame[(frame["family"] == "bound") & (frame["mode"] == "forward")
                    & (frame["regime"] == "realistic")]
    if forward.empty:
        return False
    dtype = "float32" if "float32" in set(forward["dtype"]) else forward["dtype"].iloc[0]
    forward = forward[forward["dtype"] == dtype]
    batch = forward["batch"].max()
    at_batch = forward[forward["batch"] == batch]
    latent = at_batch.groupby("latent")["k"].nunique().idxmax()  # the d with the most k
    panel = at_batch[at_batch["latent"] == latent]
    speed = _with_throughput_bars(panel[panel["status"].isin(TIMED)])
    errors, top = error_frame(panel)
    # a half only where it has data: a run of interpreted kernels times nothing
    halves = [half for half, rows in (("speed", speed), ("error", errors)) if not rows.empty]
    if not halves:
        return False
    where = f"{panel['device'].iloc[0]}, B={batch}, d={latent}, {dtype}"
    fig, axes = plt.subplots(1, len(halves), figsize=(5 * len(halves), 3.8), squeeze=False)
    for ax, half in zip(axes[0], halves):
        if half == "speed":
            _draw_series(ax, speed, "k", "samples_per_s", ("samples_per_s_low", "samples_per_s_high"))
            ax.set(ylabel="samples (B*k) per second", title=f"throughput, {where}")
        else:
            _draw_series(ax, errors, "k", "max_abs_err")
            ax.set(ylabel=f"max |bound - float64 reference| ({NATS})",
                   title="error against the float64 reference" + ("" if "speed" in halves else f", {where}"))
            _mark_non_finite(ax, top)
        ax.set(yscale="log", xlabel="k")
        _log_x(ax)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


# --------------------------------------------------------------------------- tables


def with_speedup(part: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """``part`` with a speedup_vs_<baseline> column: baseline time / time, per cell."""
    cell = ["batch", "latent", "k"]
    base = part[part["variant"] == baseline].set_index(cell)["time_ms"].rename("baseline_ms")
    ratio = part.join(base, on=cell)
    ratio[f"speedup_vs_{baseline}"] = ratio["baseline_ms"] / ratio["time_ms"]
    return ratio


def pivot(frame: pd.DataFrame, metric: str, index=("batch", "latent", "k")) -> pd.DataFrame:
    rows = frame.dropna(subset=[metric])
    if rows.empty:
        return rows
    table = rows.pivot_table(index=list(index), columns="variant", values=metric, aggfunc="first")
    return table[_ordered(table.columns)]


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "_no rows_\n"
    flat = table.reset_index() if not isinstance(table.index, pd.RangeIndex) else table
    head = "| " + " | ".join(map(str, flat.columns)) + " |"
    rule = "|" + "---|" * len(flat.columns)
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in flat.itertuples(index=False)]
    return "\n".join([head, rule, *body]) + "\n"


# --------------------------------------------------------------------------- the report


class Report:
    """Sections in order: (title, image or None, text, table or None)."""

    def __init__(self, out: Path):
        self.out = out
        self.plots = out / "plots"
        self.plots.mkdir(parents=True, exist_ok=True)
        self.sections: list[tuple[str, str | None, str, pd.DataFrame | None]] = []

    def add(self, title: str, text: str, table: pd.DataFrame | None = None, image: str | None = None):
        self.sections.append((title, f"plots/{image}" if image else None, text, table))


def _speed_sections(report: Report, frame: pd.DataFrame) -> None:
    timed = frame[frame["status"].isin(TIMED)]
    bound = timed[(timed["family"] == "bound") & (timed["regime"] == "realistic")]
    for (mode, dtype), part in _groups(bound, ["mode", "dtype"]):
        _speed_group(report, part, f"{mode}_{dtype}", f"{mode}, {dtype} logits", ("batch", "latent"))
        table = latent_plot(part, report.plots / f"latent_{mode}_{dtype}.png",
                            f"throughput against the latent width d, {mode}, {dtype} logits")
        if table is not None:
            report.add(f"Latent width: {mode}, {dtype}", "Samples (B*k) per second against the "
                       "latent width d at the (B, k) the grid ran at several d. Table: median time "
                       "of one call, ms.", table, f"latent_{mode}_{dtype}.png")
    reduction = timed[timed["family"] == "reduction"]
    for (dtype,), part in _groups(reduction, ["dtype"]):
        _speed_group(report, part, f"reduction_{dtype}", f"the reduction alone on [B, k] {dtype} "
                     "log-weights", ("batch",))
    head = timed[timed["family"] == "head"]
    for (mode, dtype), part in _groups(head, ["mode", "dtype"]):
        what = f"the decoder head (output layer + bound), {mode}, {dtype} h and weight"
        tag = f"head_{mode}_{dtype}"
        _speed_group(report, part, tag, what, ("batch", "hidden"))
        if facet_plot(part, "flop_fraction", "fraction of matmul peak", f"fraction of measured matmul peak, {what}",
                      report.plots / f"flops_{tag}.png", logy=False, reference_line=1.0, panels=("batch", "hidden")):
            roofs = part.set_index(["batch", "hidden", "k", "variant"])[["bw_fraction", "flop_fraction"]]
            roofs = roofs.assign(binds=roofs.idxmax(axis=1).str.replace("_fraction", "", regex=False))
            report.add(f"Which roof binds: {what}", "Flops (the output layer's matmul: 2 B k H D, three "
                       "times that with its gradients) over the median time, as a fraction of a large "
                       "matmul timed in the same run, beside the fraction of copy bandwidth: the larger "
                       "fraction is the roof the cell runs against.", roofs, f"flops_{tag}.png")


def _speed_group(report: Report, part: pd.DataFrame, tag: str, what: str, panels: tuple) -> None:
    index = [*panels, "k"]
    bars = _with_throughput_bars(part)
    if facet_plot(bars, "samples_per_s", "samples / s", f"throughput, {what}", report.plots / f"throughput_{tag}.png",
                  bars=("samples_per_s_low", "samples_per_s_high"), panels=panels):
        report.add(f"Throughput: {what}", "Samples (B*k) per second against k; bars span the "
                   "20th to 80th percentile of the timing samples, hollow markers are noisy cells. "
                   "Table: median time of one call, ms.", pivot(part, "time_ms", index),
                   f"throughput_{tag}.png")
    if "torch" in set(part["variant"]):
        ratio = with_speedup(part, "torch")
        if facet_plot(ratio, "speedup_vs_torch", "speedup over torch", f"speedup over eager torch, {what}",
                      report.plots / f"speedup_{tag}.png", reference_line=1.0, panels=panels):
            report.add(f"Speedup over torch: {what}", "Time of the torch variant divided by each "
                       "variant's time, per cell.", pivot(ratio, "speedup_vs_torch", index), f"speedup_{tag}.png")
    if facet_plot(part, "bw_fraction", "fraction of copy bandwidth", f"fraction of measured copy bandwidth, {what}",
                  report.plots / f"bandwidth_{tag}.png", logy=False, reference_line=1.0, panels=panels):
        report.add(f"Fraction of copy bandwidth: {what}", "Fewest bytes the cell must move over its "
                   "median time, divided by the copy bandwidth measured in the same run.",
                   pivot(part, "bw_fraction", index), f"bandwidth_{tag}.png")
    if facet_plot(part, "peak_mem_bytes", "peak extra bytes", f"peak memory, {what}",
                  report.plots / f"memory_{tag}.png", panels=panels):
        report.add(f"Peak memory: {what}", "Bytes allocated at the peak of one call beyond what was "
                   "allocated before it (CUDA: the allocator's counters; CPU: the torch tensors the "
                   "call creates, alive at its peak, which misses memory inside one op and compiled "
                   "code).", pivot(part, "peak_mem_bytes", index), f"memory_{tag}.png")


def _accuracy_sections(report: Report, frame: pd.DataFrame) -> None:
    if bounds_plot(frame, report.plots / "bounds.png"):
        forward = frame[(frame["family"] == "bound") & (frame["mode"] == "forward")
                        & (frame["regime"] == "realistic")]
        report.add("IWAE bound and ELBO", "Mean L_k and mean ELBO (float64) of each cell's inputs "
                   f"against k: the gap the importance weights close. Table: the IWAE-ELBO gap in {NATS} "
                   "(each variant's mean bound minus the float64 ELBO of the same inputs).",
                   pivot(forward, "iwae_elbo_gap"), "bounds.png")
    for (family, regime, mode), part in _groups(frame, ["family", "regime", "mode"]):
        panels = {"reduction": ("batch",), "head": ("batch", "hidden")}.get(family, ("batch", "latent"))
        index = [*panels, "k"]
        what = {"reduction": "the reduction alone", "head": f"the decoder head, {mode}"}.get(
            family, f"{mode}, {regime} inputs")
        tag = f"{family}_{regime}_{mode}"
        errors, top = error_frame(part)
        if facet_plot(errors, "max_abs_err", f"max |err| ({NATS})", f"bound error against the float64 reference, {what}",
                      report.plots / f"error_{tag}.png", non_finite_at=top, panels=panels):
            report.add(f"Bound error: {what}", f"Largest |bound - float64 bound| per cell, in {NATS} "
                       "(all dtypes); points on the dotted top line are non-finite results (a -inf "
                       "or NaN bound where the reference is finite).", pivot(part, "max_abs_err", index),
                       f"error_{tag}.png")
        if part["grad_max_abs_err"].notna().any():
            errors, top = error_frame(part, "grad_max_abs_err")
            if facet_plot(errors, "grad_max_abs_err", "max |grad err|", f"gradient error against float64 autograd, {what}",
                          report.plots / f"grad_error_{tag}.png", non_finite_at=top, panels=panels):
                report.add(f"Gradient error: {what}", "Largest |gradient - float64 autograd gradient| "
                           "over every input but x (logits, z, mu, logvar; for the head h, weight, bias, "
                           "z, mu, logvar), in nats per unit of the input.",
                           pivot(part, "grad_max_abs_err", index), f"grad_error_{tag}.png")
    saturated = frame[frame["regime"] == "saturated"]
    if not saturated.empty:
        table = pd.DataFrame({
            f"{metric} ({mode})": part.groupby("variant")[metric].max()
            for (mode,), part in _groups(saturated, ["mode"])
            for metric in ("max_abs_err", "grad_max_abs_err") if part[metric].notna().any()})
        report.add("Saturated logits: where code on probabilities breaks",
                   "Inputs where 2% of pixels get logits of 20-40 nats on the wrong side, so "
                   "sigmoid rounds to exactly 0 or 1 in float32. Code that works from probabilities "
                   "(naive, blog: BCE on sigmoid(l), whose log torch clamps at -100) gets -100 where "
                   "the log-probability is -l, and a zero gradient where it is -1; code that works "
                   "from logits does not. Largest error over the saturated cells, per variant.",
                   table.loc[_ordered(table.index)])


def _objective_sections(report: Report, family: pd.DataFrame) -> None:
    """The family block (rows whose objective is not the IWAE bound): per objective and mode,
    each variant's error against the float64 value of that objective, and its time."""
    if family.empty:
        return
    index = ["objective", "batch", "k"]
    for (mode,), part in _groups(family, ["mode"]):
        _checked_sections(
            report, f"The family: {{}}, {mode}", part, part[part["status"].isin(TIMED)], index,
            f"Each objective of the family (training/family.py: vr:alpha, miwae:MxK, ciwae:beta, "
            f"the ELBOs) computed by every variant on the same inputs: largest |bound - float64 "
            f"bound of that objective, written from its paper's definition| in {NATS}. naive "
            "computes each without the max shift (non-finite on realistic log-weights); blog "
            "computes the IWAE bound only.",
            "Largest |gradient - float64 autograd gradient of the objective| over every input but x.",
            "Median time per call in ms (timed variants only; the IWAE bound's cells of the same (B, k) "
            "are in the sections above).")


def _checked_sections(report: Report, title: str, part: pd.DataFrame, timed: pd.DataFrame, index: list[str],
                      bound_text: str, gradient_text: str, time_text: str, time_index: list[str] | None = None) -> None:
    """A block's three sections, titled ``title.format(what)``: each variant's bound error
    against float64 (``part``), its gradient error where any cell has one, and the median time
    of the ``timed`` cells (pivoted on ``time_index``, by default ``index``) where there are any."""
    report.add(title.format("bound error"), bound_text, pivot(part, "max_abs_err", index))
    if part["grad_max_abs_err"].notna().any():
        report.add(title.format("gradient error"), gradient_text, pivot(part, "grad_max_abs_err", index))
    if not timed.empty:
        report.add(title.format("time"), time_text, pivot(timed, "time_ms", time_index or index))


def _likelihood_sections(report: Report, continuous: pd.DataFrame) -> None:
    """The likelihoods' block (rows whose likelihood is not the Bernoulli): per likelihood and
    mode, each variant's error against the float64 bound under that likelihood, and its time,
    by regime, family, dtype and (B, k) (and objective where there are several)."""
    if continuous.empty:
        return
    index = [c for c in ("objective", "regime", "family", "dtype") if continuous[c].nunique() > 1] + ["batch", "k"]
    for (likelihood, mode), part in _groups(continuous, ["likelihood", "mode"]):
        _checked_sections(
            report, f"Likelihood {likelihood}: {{}}, {mode}", part, part[part["status"].isin(TIMED)], index,
            f"The bound under the likelihood {likelihood} (kernels/likelihood.py) on gray-level data "
            f"(iwae_bench/problems.py; the saturated regime is its trap) by every variant that takes "
            f"it: largest |bound - float64 bound written from the likelihood's definition| in "
            f"{NATS}. naive computes it as typical code does (torch.distributions, PixelCNN++'s "
            "recipe) with no max shift; blog is the Bernoulli's only.",
            "Largest |gradient - float64 autograd gradient| over every input but x (every channel of the "
            "decoder output, a per-pixel scale).",
            "Median time per call in ms (timed variants only; the Bernoulli's cells of the same (B, k) are "
            "in the sections above).")


def _layers_sections(report: Report, everything: pd.DataFrame) -> None:
    """The two-layer block (rows with layers > 1): per mode, each variant's error against the
    float64 bound, and its time beside the one-layer bound's on the same (B, k, d) (the cost of
    the per-sample latent parameters), by dtype where there are several."""
    layered = everything[everything["layers"] > 1]
    if layered.empty:
        return
    same = everything[(everything["layers"] == 1) & (everything["objective"] == "iwae")
                      & (everything["likelihood"] == "bernoulli") & (everything["regime"] == "realistic")
                      & (everything["family"] == "bound")]
    shapes = layered[["batch", "k", "latent", "dtype"]].drop_duplicates()
    beside = pd.concat([layered, same.merge(shapes, on=["batch", "k", "latent", "dtype"])])
    index = [c for c in ("objective", "likelihood", "dtype") if layered[c].nunique() > 1] + ["batch", "latent", "k"]
    for (mode,), part in _groups(layered, ["mode"]):
        _checked_sections(
            report, f"Two stochastic layers: {{}}, {mode}", part,
            beside[(beside["mode"] == mode) & beside["status"].isin(TIMED)], index,
            "The two-layer model's log-weights (iwae_bench/problems.py: h1 of 2 d units with the "
            "per-sample prior p(h1|h2), h2 of d units with the per-sample posterior q(h2|h1)) by "
            f"every variant that takes stochastic layers: largest |bound - float64 bound| in {NATS}. "
            "blog has one latent: its cells are skipped.",
            "Largest |gradient - float64 autograd gradient| over every input but x, each layer's sample "
            "and parameters among them.",
            "Median time per call in ms (timed variants only), the two-layer bound (layers 2) beside the "
            "one-layer bound (layers 1) on the same (B, k, d): the cost of reading the per-sample latent "
            "parameters.", index + ["layers"])


def _status_sections(report: Report, frame: pd.DataFrame, record: dict) -> None:
    columns = ["family", "variant", "mode", "dtype", "regime", "likelihood", "layers", "batch", "latent", "hidden",
               "k"]
    missing = missing_cells(record)
    if missing:
        why = ("validate's budget ran out before them; `python -m iwae_bench validate --phases sweep "
               "report --resume` runs them" if "validate" in record["runs"][-1] else
               "no shard merged here measured them: rerun the missing shards (each resumes) and merge again")
        report.add("Cells not measured", f"{len(missing)} cells of the grid (identity: "
                   f"{' '.join(IDENTITY)}): {why}.",
                   pd.DataFrame({"cell": missing}))
    noisy = frame[frame["status"] == "noisy"]
    if not noisy.empty:
        report.add("Noisy cells", f"Timed twice and still spread: p80/p20 > {NOISE_LIMIT}. Their "
                   "times are measurements, drawn hollow; another process on the same cores is the "
                   "usual cause. Rerun them with --resume after deleting their rows, or on a quiet "
                   "machine.", noisy[columns + ["time_spread", "time_samples", "time_ms"]].set_index(columns))
    rows = frame[~frame["status"].isin(TIMED)]
    report.add("Cells that are not speed measurements",
               "`interpreted`: Triton kernels run by the CPU interpreter (checked for correctness, "
               "their time is not a speed); `fallback`: torch.compile ran eager; `oom`, `error`, "
               "`skipped`: no measurement, with the reason.",
               rows[columns + ["status", "message"]].set_index(columns))


def _comparison_section(report: Report, frame: pd.DataFrame, against: Path) -> None:
    """This run beside another results folder (e.g. the committed reference run)."""
    other, _ = load(against / "results.csv")
    keys = [c for c in IDENTITY if c != "device"]
    merged = frame.merge(other, on=keys, how="outer", suffixes=("", "_ref"), indicator=True)
    both = merged[merged["_merge"] == "both"]
    timed = both[both["status"].isin(TIMED) & both["status_ref"].isin(TIMED)].copy()
    timed["time_ratio"] = timed["time_ms"] / timed["time_ms_ref"]
    summary = pd.DataFrame({
        "cells timed in both": timed.groupby("variant").size(),
        "median time ratio (this / reference)": timed.groupby("variant")["time_ratio"].median(),
        "largest |bound difference|": (both["bound_mean"] - both["bound_mean_ref"]).abs().groupby(both["variant"]).max(),
    })
    summary = summary.loc[_ordered(summary.index)] if not summary.empty else summary
    ref_machine = read_json(against / "machine.json").get("machine", {})
    status_changed = both[both["status"] != both["status_ref"]]
    only_here = int((merged["_merge"] == "left_only").sum())
    only_there = int((merged["_merge"] == "right_only").sum())
    image = None
    if not timed.empty:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for variant in _ordered(timed["variant"]):
            part = timed[timed["variant"] == variant]
            color, marker, size = STYLE.get(variant, (None, ".", 6))
            ax.plot(part["time_ms_ref"], part["time_ms"], ls="none", marker=marker, ms=size,
                    color=color, label=variant)
        lo, hi = timed[["time_ms", "time_ms_ref"]].min().min(), timed[["time_ms", "time_ms_ref"]].max().max()
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="same time")
        ax.set(xscale="log", yscale="log", xlabel="reference run: median ms", ylabel="this run: median ms",
               title="each cell timed in both runs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save_figure(fig, report.plots / "against_reference.png")
        image = "against_reference.png"
    report.add(f"Against {against}",
               f"The reference was made on {ref_machine.get('device_name', 'an unrecorded machine')} "
               f"(torch {ref_machine.get('torch', '?')}, commit {ref_machine.get('commit', '?')}). "
               f"{len(both)} cells in both runs, {only_here} only in this one, {only_there} only in "
               f"the reference; {len(status_changed)} changed status. Time ratios above 1: this run "
               "is slower.", summary, image)


def render(out: Path, csv_path: Path | None = None, against: Path | None = None) -> Path:
    """Write plots, report.md and (with markdown-it-py) report.html into ``out`` from its CSV;
    ``against`` adds a comparison with another results folder. Returns report.md."""
    csv_path = csv_path or out / "results.csv"
    everything, problems = load(csv_path)
    record = read_json(csv_path.parent / "machine.json")
    report = Report(out)
    # the one-layer Bernoulli IWAE bound's rows feed the plots and sections; the rest of the
    # family, the other likelihoods and the two stochastic layers their own tables
    one_layer = everything[everything["layers"] == 1]
    bernoulli = one_layer[one_layer["likelihood"] == "bernoulli"]
    frame = bernoulli[bernoulli["objective"] == "iwae"]

    if (frame["device"] == "cuda").any():
        from .targets import targets_table

        table = targets_table(frame)
        met = int((table["met"] == "yes").sum())
        report.add("GPU targets", f"{met} of {len(table)} targets met. Each row: a cell of the CSV, "
                   "what it measured, and the goal (fraction of the copy bandwidth, speedup over "
                   "torch.compile on the same inputs, or peak extra bytes).", table.set_index(["target", "cell"]))
    if headline_plot(frame, report.plots / "headline.png"):
        report.add("Headline", "Throughput of the forward bound (timed variants only, p20-p80 bars) "
                   f"and each variant's error against the float64 reference in {NATS}, at the largest batch.",
                   image="headline.png")
    _speed_sections(report, frame)
    if frame.loc[frame["status"].isin(TIMED), "peak_mem_bytes"].dropna().empty:
        report.add("Peak memory", "Not measured in this run: no timed cell has a peak-memory "
                   "figure (on a CPU only torch.compile's cells lack one: its generated code is "
                   "invisible to the tensor tracker), so the column is empty rather than guessed.")
    _accuracy_sections(report, frame)
    _objective_sections(report, bernoulli[bernoulli["objective"] != "iwae"])
    _likelihood_sections(report, one_layer[one_layer["likelihood"] != "bernoulli"])
    _layers_sections(report, everything)
    _status_sections(report, everything, record)
    if against is not None:
        _comparison_section(report, everything, against)

    markdown = _markdown(everything, record, report.sections, problems)
    write_text(out / "report.md", markdown)
    html = _html(markdown)
    if html is not None:
        write_text(out / "report.html", html)
    return out / "report.md"


def _machine_lines(record: dict) -> list[tuple[str, str]]:
    info = record.get("machine", {})
    lines = [(key, str(value)) for key, value in info.items()]
    for i, machine in enumerate(record.get("machines", []), 1):  # a merged folder's, or one resumed elsewhere
        lines.append((f"machine {i}", ", ".join(f"{key} {machine[key]}" for key in
                                                ("folder", "device_name", "torch", "triton", "commit") if machine.get(key))))
    for i, run in enumerate(record.get("runs", []), 1):
        copy = run.get("copy_bandwidth_gbps")
        lines.append((f"run {i}", f"`{run.get('command')}` started {run.get('started')}, finished "
                                   f"{run.get('finished') or 'not (interrupted)'}"
                                   + (f", commit {run['commit']}" if run.get("commit") else "")
                                   + (f", copy bandwidth {copy:.1f} GB/s" if copy else "")))
    return lines


def _anchors(headings: list[str]) -> list[str]:
    """Each heading's id as GitHub makes it (lower case, punctuation but - and _ dropped, spaces to
    hyphens, a repeat numbered -1, -2, ...): the contents' links work in report.md on GitHub and,
    with these ids set by _html, in report.html."""
    seen: dict[str, int] = {}
    anchors = []
    for heading in headings:
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.append(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _contents(titles: list[str], anchors: list[str]) -> str:
    """The sections as a list of links; neighbours on one subject ("Throughput: forward, float32
    logits", "Peak memory: forward, float32 logits") share a line, which keeps the list short."""
    lines = []
    for subject, run in itertools.groupby(zip(titles, anchors), key=lambda pair: pair[0].partition(": ")[2]):
        run = list(run)
        if subject and len(run) > 1:
            lines.append(f"- {subject}: " + " · ".join(f"[{title.partition(': ')[0]}](#{anchor})"
                                                        for title, anchor in run))
        else:
            lines += [f"- [{title}](#{anchor})" for title, anchor in run]
    return "\n".join(lines) + "\n"


def _markdown(frame, record, sections, problems) -> str:
    timed = frame[frame["status"].isin(TIMED)]
    noisy = int((frame["status"] == "noisy").sum())
    titles = ["Machine", *(title for title, *_ in sections)]
    parts = [f"# {TITLE}\n\n",
             f"{len(frame)} cells from `results.csv`; {noisy} of {len(timed)} timed cells are noisy "
             f"(p80/p20 > {NOISE_LIMIT} after a second measurement){': see Noisy cells' if noisy else ''}. "
             "Rendered by `python -m iwae_bench report`: every number below is a cell of that CSV or "
             "a field of `machine.json`.\n\n",
             "Contents:\n\n" + _contents(titles, _anchors([TITLE, *titles])[1:]) + "\n"]
    if problems:
        parts.append(f"{len(problems)} malformed lines of the CSV were skipped: "
                     + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "") + "\n\n")
    parts += ["## Machine\n\n", "| field | value |\n|---|---|\n"
              + "".join(f"| {k} | {_fmt(v)} |\n" for k, v in _machine_lines(record))]
    for title, image, text, table in sections:
        parts.append(f"\n## {title}\n\n{text}\n")
        if image:
            parts.append(f"\n![{title}]({image})\n")
        if table is not None:
            parts.append("\n" + markdown_table(table))
    return "".join(parts)


def _html(markdown: str) -> str | None:
    """The report as HTML, rendered from its Markdown; None where markdown-it-py is missing
    (a bare GPU image): report.md is the report, the HTML a convenience."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    parser = MarkdownIt("commonmark").enable("table")
    tokens = parser.parse(markdown)
    heads = [(token, tokens[i + 1].content) for i, token in enumerate(tokens) if token.type == "heading_open"]
    for (token, _), anchor in zip(heads, _anchors([text for _, text in heads])):
        token.attrSet("id", anchor)  # commonmark gives headings no id: the contents link to these
    body = parser.renderer.render(tokens, parser.options, {})
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
            "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
            "</style></head><body>\n" + body + "</body></html>\n")
