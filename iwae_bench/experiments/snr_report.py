"""The SNR benchmark's report: plots/snr.png and report.md rendered from snr.csv alone.

Every number is read from snr.csv (machine.json says which machine and command made it); the
log-log slopes are fitted here from the CSV's group-mean SNRs, and the papers' expectations
beside them are the exponents the papers state, not numbers of theirs.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..files import read_json, save_figure, write_text  # noqa: E402
from ..harness.machine import made_by  # noqa: E402
from ..harness.timing import NOISE_LIMIT  # noqa: E402

GROUPS = ("encoder", "decoder")
LABELS = {"multi_sample_elbo": "k-sample ELBO", "iwae": "IWAE", "stl": "IWAE + STL",
          "dreg": "IWAE + DReG"}
RAINFORTH = "Rainforth et al. 2018"
TUCKER = "Tucker et al. 2019"
AGREE = 0.1  # a slope within this of the expected exponent agrees with it
# the bias verdict (experiments/snr.py bias_summary): biased where the share of |t| > 3 is
# BIASED_FACTOR x chance or more and BIASED_COUNT parameters or more (1 in 400 is chance)
BIASED_FACTOR, BIASED_COUNT = 5, 3
TIMERS = {
    "draws": "Timed with perf_counter around each of the draws' own steps (the noise drawn "
             "before, the gradient's copy after, outside): the samples span the whole "
             "measurement, so a burst of load from another process moves a few of them, not the "
             "median.",
    "time_call": "Timed with the suite's `time_call` (`triton.testing.do_bench` on CUDA).",
}
# (estimator, group) -> (expected slope of log SNR on log k, why); None: no prediction
EXPECTED = {
    ("multi_sample_elbo", "encoder"): (0.5, f"{RAINFORTH}: an average of k draws"),
    ("multi_sample_elbo", "decoder"): (0.5, f"{RAINFORTH}: an average of k draws"),
    ("iwae", "encoder"): (-0.5, f"{RAINFORTH}: the signal falls like 1/k, the noise like 1/sqrt(k)"),
    ("iwae", "decoder"): (0.5, RAINFORTH),
    ("stl", "encoder"): (None, f"none: STL is biased on the IWAE bound ({TUCKER})"),
    ("stl", "decoder"): (0.5, "the IWAE's decoder gradient, unchanged"),
    ("dreg", "encoder"): (0.5, TUCKER),
    ("dreg", "decoder"): (0.5, "the IWAE's decoder gradient, unchanged"),
}


def fit_slope(k, snr, log_sd=None) -> tuple[float, float]:
    """Least-squares slope of log SNR on log k, and its standard error from the per-point
    standard deviations of log SNR (``log_sd``; independent points): the slope is
    sum_i a_i log SNR_i with a_i = (x_i - mean x) / sum_j (x_j - mean x)^2, so its variance
    is sum_i a_i^2 sd_i^2. NaN (slope) with fewer than two distinct k; NaN (error) without sds."""
    x = np.log(np.asarray(k, dtype=float))
    y = np.log(np.asarray(snr, dtype=float))
    centered = x - x.mean()
    sxx = float((centered ** 2).sum())
    if x.size < 2 or sxx == 0:
        return float("nan"), float("nan")
    weights = centered / sxx
    slope = float((weights * y).sum())
    if log_sd is None:
        return slope, float("nan")
    return slope, float(np.sqrt((weights ** 2 * np.asarray(log_sd, dtype=float) ** 2).sum()))


def noise_floor(draws: int) -> float:
    """What the SNR estimate of a parameter with no signal averages: E|mean| / std of M
    normal draws is about sqrt(2 / (pi M))."""
    return math.sqrt(2 / (math.pi * draws))


def slope_table(frame: pd.DataFrame, column: str = "snr_mean") -> pd.DataFrame:
    """One row per (estimator, group): the fitted slope of ``column`` and, for the mean, its
    standard error from the CSV's ``log_snr_mean_sd``."""
    rows = []
    for (estimator, group), part in frame.groupby(["estimator", "group"], sort=False):
        part = part.sort_values("k")
        sd = part["log_snr_mean_sd"] if column == "snr_mean" else None
        slope, se = fit_slope(part["k"], part[column], sd)
        rows.append({"estimator": estimator, "group": group, "slope": slope, "se": se})
    return pd.DataFrame(rows)


def with_later_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """An snr.csv from before the RMS SNR and the bias column, with those columns empty (each
    entry its own reference), so that its report renders as before."""
    for column in ("snr_rms", "snr_rms_low", "snr_rms_high", "reference_snr"):
        if column not in frame:
            frame[column] = float("nan")
    if "bias_reference" not in frame:
        frame["bias_reference"], frame["bias_verdict"] = frame["estimator"], "-"
    return frame


def render_snr(out: Path) -> Path:
    """plots/snr.png and report.md from out/snr.csv (and out/machine.json) alone."""
    out = Path(out)
    frame = with_later_columns(pd.read_csv(out / "snr.csv"))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    save_figure(_figure(frame), plots / "snr.png")
    write_text(out / "report.md", _report_text(frame, read_json(out / "machine.json")))
    return out / "report.md"


def _figure(frame: pd.DataFrame):
    groups = [g for g in GROUPS if g in set(frame["group"])] + \
             [g for g in frame["group"].unique() if g not in GROUPS]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    floor = noise_floor(int(frame["draws"].min()))
    for ax, group in zip(axes[0], groups):
        part = frame[frame["group"] == group]
        # distinct markers, shrinking: the estimators that share the decoder's gradient overlap
        for (estimator, line), marker, size in zip(part.groupby("estimator", sort=False),
                                                  "osD^v<>", (9, 7, 5, 3.5, 3, 3, 3)):
            line = line.sort_values("k")
            yerr = np.vstack([line["snr_mean"] - line["snr_mean_low"],
                              line["snr_mean_high"] - line["snr_mean"]]).clip(min=0)
            ax.errorbar(line["k"], line["snr_mean"], yerr=yerr, marker=marker, ms=size, capsize=2,
                        mfc="none" if size > 5 else None, label=LABELS.get(estimator, estimator))
        borrowed = _borrowed(frame)
        for estimator, line in borrowed[borrowed["group"] == group].groupby("estimator", sort=False):
            line = line.sort_values("k")
            reference = line["bias_reference"].iloc[0]
            ax.plot(line["k"], line["reference_snr"], linestyle="--", marker="x", ms=5,
                    label=f"{LABELS.get(reference, reference)}, signal from {LABELS.get(estimator, estimator)}")
        k = np.array(sorted(part["k"].unique()), dtype=float)
        if k.size > 1:
            first = part[part["k"] == k[0]]["snr_mean"]
            anchor = float(np.exp(np.log(first).mean()))  # the geometric mean at the smallest k
            for exponent, style in ((0.5, (0, (5, 3))), (-0.5, (0, (2, 2)))):
                ax.plot(k, anchor * (k / k[0]) ** exponent, color="grey", linestyle=style, lw=1,
                        label=f"slope {exponent:+.1f}")
        ax.axhline(floor, color="black", linestyle=":", lw=1, label="no-signal floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="k (importance samples)", ylabel="mean SNR over the group's parameters",
               title=f"{group} parameters")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("gradient SNR (|mean| / std over draws) against k; bars: 95% bootstrap intervals")
    return fig


def _threads(count) -> str:
    return f"{count} thread" + ("" if count == 1 else "s") if count is not None else "? threads"


def _g(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


def _verdict(slope: float, expected) -> str:
    if expected is None or math.isnan(slope):
        return "-"
    if abs(slope - expected) <= AGREE:
        return f"agrees (within {AGREE})"
    return "same sign" if slope * expected > 0 else "opposite sign"


def _slope_cell(slope: float, se: float) -> str:
    if math.isnan(slope):
        return "-"
    return f"{slope:+.3f}" + ("" if math.isnan(se) else f" ± {1.96 * se:.3f}")


def _report_text(frame: pd.DataFrame, record: dict) -> str:
    run, info = made_by(record, index=-1)
    first = frame.iloc[0]
    draws, resamples = int(frame["draws"].min()), int(frame["resamples"].min())
    floor = noise_floor(draws)
    ks = sorted(frame["k"].unique())
    large_k = ks[len(ks) // 2]
    estimators = list(dict.fromkeys(frame["estimator"]))
    interpreted = bool(frame["interpreted"].astype(str).str.lower().eq("true").any())
    lines = [
        "# Gradient signal-to-noise ratio against k, per estimator\n",
        f"Made by `{run.get('command', '?')}` on {info.get('device_name', '?')} "
        f"({first['device']}, torch {info.get('torch', '?')}, triton {info.get('triton', '?')}, "
        f"{_threads(info.get('torch_threads'))}, commit {info.get('commit', '?')}). Every number "
        "below is read from `snr.csv`.\n",
        f"Model: {first['model']}. Minibatch: "
        + (f"the first {int(first['batch'])} of the model's data points" if str(first["model"]).startswith(
            "LinearGaussian") else f"{int(first['batch'])} binarized MNIST test images")
        + f", fixed. For each k and estimator, {draws} gradient draws, each a full gradient of the "
        f"batch's loss with fresh reparameterization noise; draw m uses the same noise for every "
        f"estimator (paired). Backend `{first['backend']}`, seed {int(first['seed'])}.\n",
        "## What is measured\n",
        "- SNR of one scalar parameter: |mean| / std of its gradient over the draws (std with "
        "ddof = 1). The noise is the reparameterization noise alone: the minibatch is fixed.",
        "- Per group (the encoder's parameters, the decoder's), the **mean** SNR over the group's "
        "scalars, as Rainforth et al. (2018) average over each network's parameters. A mean over "
        "parameters is dominated by the few with high SNR, so the **median** is given too.",
        f"- 95% intervals of the mean SNR: basic bootstrap intervals over the draws ({resamples} "
        "resamples, the same resamples for every estimator at a given k): 2 x estimate less the "
        "97.5 and 2.5 percentiles of the resampled group means. Not the plain percentiles: a "
        "parameter with little signal reads too high an SNR (|mean| carries the noise), a "
        "resample reads it higher still, and the resampled means sit above the estimate "
        "(column `snr_mean_boot_shift`, below), often all of them; the basic interval reflects "
        "that shift back to first order, so it can lie below the estimate.",
        f"- The no-signal floor: a parameter whose true gradient mean is 0 still reads an SNR of "
        f"about sqrt(2 / (pi M)) = {_g(floor)} from M = {draws} draws, so group SNRs near it are "
        "mostly estimation noise, and slopes through them are flattened.",
        "- STL on the IWAE bound (k > 1) is biased (Tucker et al. 2019): its SNR measures how "
        "consistently it points somewhere, not toward the IWAE bound's gradient.",
        "- At k = 1 the IWAE is the ELBO (the iwae and k-sample ELBO rows agree) and DReG is STL.",
        "", "![SNR against k](plots/snr.png)", ""]
    lines += _slope_section(frame, ks, large_k)
    lines += _family_section(frame)
    lines += _rms_section(frame)
    lines += _borrowed_section(frame)
    lines += _bias_section(frame)
    if "freshly initialised" in str(first["model"]):
        lines += ["", "The model is freshly initialised: q(h|x) is far from the posterior, one "
                  "sample carries most of the importance weight, and k up to "
                  f"{max(ks)} may not reach the regime the papers' exponents describe (they "
                  "measured trained models). Run with `--checkpoint` for a trained model."]
    near = frame[frame["snr_mean"] < 2 * floor]
    if len(near):
        lines += ["", f"Near the floor (mean SNR below 2 x {_g(floor)}): " + ", ".join(
            f"{LABELS.get(r.estimator, r.estimator)} {r.group} at k = {r.k}" for r in near.itertuples())
            + "."]

    lines += ["", "## Time per gradient step\n",
              "One step: encode, reparameterize, decode, loss and backward, in ms: the median, "
              f"[p20, p80] in brackets, marked noisy where p80 / p20 > {NOISE_LIMIT}; backend "
              f"`{first['backend']}`. " + " ".join(TIMERS.get(t, f"Timer: {t}.") for t in
                                                   dict.fromkeys(frame["timer"]))
              + (" Triton ran under the CPU interpreter: these timings say nothing about speed."
                 if interpreted else ""),
              "", "| k | " + " | ".join(LABELS.get(e, e) for e in estimators) + " |",
              "|---|" + "---|" * len(estimators)]
    timing = frame.drop_duplicates(["k", "estimator"]).set_index(["k", "estimator"])
    for k in ks:
        cells = []
        for estimator in estimators:
            if (k, estimator) not in timing.index:
                cells.append("-")
                continue
            t = timing.loc[(k, estimator)]
            noisy = t["seconds_p80"] > NOISE_LIMIT * t["seconds_p20"]
            cells.append(f"{_g(t['seconds_per_step'] * 1e3)} [{_g(t['seconds_p20'] * 1e3)}, "
                         f"{_g(t['seconds_p80'] * 1e3)}]" + (" noisy" if noisy else ""))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")

    lines += ["", "## Signal per second\n",
              "Averaging n independent steps multiplies every parameter's SNR by sqrt(n), so "
              "mean SNR x sqrt(1 s / step time) is the mean SNR that one second of steps buys: "
              "it weighs a large k against many cheaper small-k steps.\n",
              "| k | group | " + " | ".join(LABELS.get(e, e) for e in estimators) + " |",
              "|---|---|" + "---|" * len(estimators)]
    indexed = frame.set_index(["k", "estimator", "group"])
    for k in ks:
        for group in dict.fromkeys(frame["group"]):
            cells = []
            for estimator in estimators:
                key = (k, estimator, group)
                if key not in indexed.index:
                    cells.append("-")
                    continue
                r = indexed.loc[key]
                cells.append(_g(r["snr_mean"] / math.sqrt(r["seconds_per_step"])))
            lines.append(f"| {k} | {group} | " + " | ".join(cells) + " |")

    lines += ["", "## Every measurement\n",
              "| k | estimator | group | mean SNR | 95% interval | resamples' shift | median SNR | "
              "ms per step | RMS SNR (debiased) | its interval | bias | reference's SNR, this signal |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in frame.sort_values(["group", "estimator", "k"], key=_order(estimators)).itertuples():
        lines.append(f"| {r.k} | {r.estimator} | {r.group} | {_g(r.snr_mean)} | "
                     f"[{_g(r.snr_mean_low)}, {_g(r.snr_mean_high)}] | {r.snr_mean_boot_shift:+.3g} | "
                     f"{_g(r.snr_median)} | {_g(r.seconds_per_step * 1e3)} | {_g(r.snr_rms)} | "
                     f"[{_g(r.snr_rms_low)}, {_g(r.snr_rms_high)}] | {_bias_cell(r, r.estimator)} | "
                     f"{_g(r.reference_snr) if r.bias_reference != r.estimator else '-'} |")
    zero = frame[frame["zero_variance"] > 0]
    if len(zero):
        parts = []
        for (group, params, count), rows in zero.groupby(["group", "params", "zero_variance"], sort=False):
            where = ("every k and estimator" if len(rows) == (frame["group"] == group).sum() else
                     ", ".join(f"{r.estimator} k = {r.k}" for r in rows.itertuples()))
            parts.append(f"{group}: {count} of {params} scalars ({where})")
        lines += ["", "Scalars whose gradient was the same in every draw have no SNR and are left out "
                  "of the averages (with a fixed minibatch, e.g. the first-layer weights of pixels "
                  "that are off in every image: their gradient is exactly 0): " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


def _slope_section(frame: pd.DataFrame, ks: list, large_k) -> list[str]:
    """The fitted log-log slopes per estimator and network beside the papers' exponents; one
    sentence instead when the run measured a single k."""
    if len(ks) < 2:
        return ["## Fitted log-log slopes\n",
                f"One k ({ks[0]}): no slope to fit. Measure several (`--k 1 10 100 1000`) for the slopes."]
    lines = [
        "## Fitted log-log slopes\n",
        f"Least squares of log(mean SNR) on log k, over every k ({', '.join(map(str, ks))}) and "
        f"over the larger ones (k >= {large_k}), where the papers' exponents, which describe large "
        "k, should show first; ± is 1.96 standard errors, propagated from each point's bootstrap "
        "spread of log SNR (the k values use independent noise): sampling noise only, not how "
        "well a straight line fits. The median's slope is fitted the same way, over every k. "
        f"Verdict on the larger k: agrees when within {AGREE} of the expected exponent.\n",
        f"| estimator | group | slope, every k | slope, k >= {large_k} | slope of the median | "
        "expected | from | verdict |",
        "|---|---|---|---|---|---|---|---|"]
    medians = slope_table(frame, "snr_median").set_index(["estimator", "group"])
    large = slope_table(frame[frame["k"] >= large_k]).set_index(["estimator", "group"])
    for row in slope_table(frame).itertuples():
        expected, source = EXPECTED.get((row.estimator, row.group), (None, "-"))
        median = medians.loc[(row.estimator, row.group), "slope"]
        tail = large.loc[(row.estimator, row.group)]
        lines.append(f"| {LABELS.get(row.estimator, row.estimator)} | {row.group} | "
                     f"{_slope_cell(row.slope, row.se)} | {_slope_cell(tail['slope'], tail['se'])} | "
                     f"{'-' if math.isnan(median) else f'{median:+.3f}'} | "
                     f"{'-' if expected is None else f'{expected:+.1f}'} | {source} | "
                     f"{_verdict(tail['slope'], expected)} |")
    return lines


def _family_section(frame: pd.DataFrame) -> list[str]:
    """Where the run measured members of the family (``snr --objectives``): every entry's
    encoder and decoder SNR side by side at each k (Rainforth et al.'s figure: per split of a
    fixed budget M K, not per k)."""
    if set(frame["estimator"]) <= set(LABELS):
        return []
    lines = ["", "## The family side by side\n",
             "Per k, every entry's mean SNR (95% interval) and debiased RMS SNR for both networks, and "
             "the encoder's bias verdict (below). A split M x K of MIWAE and PIWAE is measured at "
             "k = M K only; at a fixed M K, MIWAE(1 x K) is the IWAE and MIWAE(M x 1) the k-sample "
             "ELBO; PIWAE's decoder is the IWAE's.\n",
             "| k | entry | encoder mean SNR | encoder RMS | decoder mean SNR | decoder RMS | encoder bias |",
             "|---|---|---|---|---|---|---|"]
    indexed = frame.set_index(["k", "estimator", "group"])
    for (k, estimator), _ in frame.groupby(["k", "estimator"], sort=False):
        cells = []
        for group in GROUPS:
            r = indexed.loc[(k, estimator, group)]
            cells += [f"{_g(r['snr_mean'])} [{_g(r['snr_mean_low'])}, {_g(r['snr_mean_high'])}]", _g(r["snr_rms"])]
        lines.append(f"| {k} | {LABELS.get(estimator, estimator)} | " + " | ".join(cells)
                     + f" | {_bias_cell(indexed.loc[(k, estimator, 'encoder')], estimator)} |")
    return lines


def _bias_cell(row, estimator: str) -> str:
    """The verdict, or "reference" for an entry that is its own reference (the total gradient)."""
    reference = row["bias_reference"] if isinstance(row, pd.Series) else row.bias_reference
    verdict = row["bias_verdict"] if isinstance(row, pd.Series) else row.bias_verdict
    return "reference" if reference == estimator and verdict != "-" else verdict


def _rms_section(frame: pd.DataFrame) -> list[str]:
    """The slopes of the debiased RMS SNR over the k where it is resolved (its interval's low
    end above 0), beside the papers' exponents."""
    if frame["snr_rms"].isna().all():
        return []
    lines = ["", "## Slopes of the debiased RMS SNR\n",
             "The mean SNR above has a floor: a parameter whose signal is below sqrt(2 / (pi M)) reads "
             "about that much from noise alone, so where an estimator's signal falls with k (the "
             "IWAE's encoder) its mean SNR stops falling and the slope flattens toward 0. The RMS "
             "SNR debiases each parameter's squared SNR (less 1/M, what noise gives it) before "
             "averaging over the group: sqrt(mean_p(SNR_p^2 - 1/M)), with 95% bootstrap "
             "intervals (percentiles of the resamples, each debiased for its own noise too). "
             "It is resolved where the interval's low end is above 0; the slope is "
             "fitted over those k only (the RMS weighs parameters by their squared SNR, so its "
             "level differs from the mean's; its exponent is the same where every parameter "
             "shares one).\n",
             "| estimator | group | slope | resolved k | expected | from | verdict |", "|---|---|---|---|---|---|---|"]
    for (estimator, group), part in frame.groupby(["estimator", "group"], sort=False):
        part = part[part["snr_rms_low"] > 0].sort_values("k")
        slope = fit_slope(part["k"], part["snr_rms"])[0] if len(part) > 1 else float("nan")
        expected, source = EXPECTED.get((estimator, group), (None, "-"))
        resolved = ", ".join(map(str, part["k"])) or "none"
        lines.append(f"| {LABELS.get(estimator, estimator)} | {group} | {_slope_cell(slope, float('nan'))} | "
                     f"{resolved} | {'-' if expected is None else f'{expected:+.1f}'} | {source} | "
                     f"{_verdict(slope, expected)} |")
    return lines


def _borrowed(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows whose ``reference_snr`` is the reference's SNR: entries with another reference
    that the bias column calls biased at no k, measured at two k or more; the encoder's only
    (the decoder's gradient is the same for the IWAE's estimators)."""
    biased = set(frame.loc[frame["bias_verdict"] == "biased", "estimator"])
    rows = frame[(frame["bias_reference"] != frame["estimator"]) & ~frame["estimator"].isin(biased)
                 & frame["reference_snr"].notna() & (frame["group"] == "encoder")]
    return rows[rows.groupby("estimator")["k"].transform("nunique") > 1]


def _borrowed_section(frame: pd.DataFrame) -> list[str]:
    """The reference's mean SNR with the signal read from an unbiased entry's paired mean
    (``reference_snr``), and its slope beside the reference's expected exponent."""
    rows = _borrowed(frame)
    if not len(rows):
        return []
    lines = ["", "## The reference's encoder SNR with the signal from an unbiased estimator\n",
             "The expected gradient is the same for every unbiased estimator of it, so it can be read "
             "from the one with the least noise: SNR = |mean of the unbiased entry| / std of the "
             "reference, per parameter, averaged over the group. The floor that flattens the "
             "reference's own mean SNR is then the entry's noise over the reference's "
             "(sd_entry / (sd_ref sqrt(M))), far lower where the entry is DReG. Only entries the bias "
             "column calls biased at no k; the slope is over every k.\n",
             "| reference | signal from | slope | expected | from | verdict |", "|---|---|---|---|---|---|"]
    for estimator, part in rows.groupby("estimator", sort=False):
        part = part.sort_values("k")
        reference = part["bias_reference"].iloc[0]
        slope = fit_slope(part["k"], part["reference_snr"])[0] if len(part) > 1 else float("nan")
        expected, source = EXPECTED.get((reference, "encoder"), (None, "-"))
        lines.append(f"| {LABELS.get(reference, reference)} | {LABELS.get(estimator, estimator)} | "
                     f"{_slope_cell(slope, float('nan'))} | {'-' if expected is None else f'{expected:+.1f}'} | "
                     f"{source} | {_verdict(slope, expected)} |")
    return lines


def _bias_section(frame: pd.DataFrame) -> list[str]:
    """Each entry's bias against its reference (the same objective's total gradient; RWS's
    wake-phi), from the paired draws."""
    rows = frame[frame["bias_reference"] != frame["estimator"]]
    if not len(rows):
        return []
    chance = float(frame["bias_chance_share"].iloc[0])
    lines = ["", "## Bias against the objective's total gradient\n",
             "Over the paired draws (the same noise for every estimator), per parameter the mean "
             "of (estimator - reference) and its t-statistic (mean / (sd / sqrt(M))). The reference "
             "is the same objective's total gradient (unbiased by construction; for RWS, whose "
             "wake-phi is no objective's gradient, the wake-phi estimator). Columns: the mean "
             "|bias| over the group's parameters, that over the mean |reference gradient|, and "
             f"the share of parameters with |t| > 3 beside the share chance gives ({chance:.2%}, "
             "normal). Verdict: **biased** where that share is at least "
             f"{BIASED_FACTOR} x chance and at least {BIASED_COUNT} parameters, **identical** where the "
             "difference is exactly 0 in every draw (the decoder's gradient, which these "
             "estimators leave unchanged), else **unbiased** (no bias resolved at this many "
             "draws). The t-statistics take the mean as normal: heavy-tailed gradients at a few "
             "hundred draws over-reject (on the Gaussian model, DReG read biased at 300 draws and "
             "unbiased at 10^4), so an isolated 'biased' at small M is a prompt for more draws.\n",
             "| k | estimator | group | reference | mean abs bias | relative | share abs t > 3 | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows.sort_values(["group", "k"], key=_order(list(dict.fromkeys(frame["estimator"])))).itertuples():
        lines.append(f"| {r.k} | {LABELS.get(r.estimator, r.estimator)} | {r.group} | "
                     f"{LABELS.get(r.bias_reference, r.bias_reference)} | {_g(r.bias_abs_mean)} | "
                     f"{_g(r.bias_relative)} | {r.bias_t3_share:.2%} | {r.bias_verdict} |")
    return lines


def _order(estimators):
    """Sort key: groups encoder first, estimators in the run's order, k ascending."""
    def key(column: pd.Series) -> pd.Series:
        if column.name == "group":
            return column.map(lambda g: GROUPS.index(g) if g in GROUPS else len(GROUPS))
        if column.name == "estimator":
            return column.map(lambda e: estimators.index(e) if e in estimators else len(estimators))
        return column
    return key
