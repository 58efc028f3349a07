"""The MNIST experiment: data, streamed evaluation, active units, and a short real run."""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

import kernels
from iwae_bench.experiments.data import binarize, dequantize, load_mnist, model_data
from iwae_bench.experiments.mnist import (GAUSSIAN_FLOOR, RUNS, Run, Schedule, active_units, bits_per_dim,
                                          evaluate, evaluation_data, run_experiment, streamed_log_weights,
                                          work_list)
from iwae_bench.training import BernoulliVAE
from iwae_bench.training.model import load_checkpoint
from kernels.likelihood import Likelihood

from .helpers import assert_close

ROOT = Path(__file__).resolve().parent.parent


def test_loader_gives_binarized_mnist_from_the_shipped_file():
    split = load_mnist(train_size=300, test_size=100, seed=3)
    assert split.train.shape == (300, 784) and split.test.shape == (100, 784)
    assert split.train.min() >= 0 and split.train.max() <= 1 and split.train.max() == 1
    assert set(split.test.unique().tolist()) == {0.0, 1.0}
    assert 0.08 < split.test.mean() < 0.2  # MNIST: about 13% of pixels on
    again = load_mnist(train_size=300, test_size=100, seed=3)
    assert torch.equal(split.test, again.test)  # the test set is binarized once, fixed
    x = binarize(split.train[:50], torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="sum to at most 5000"):
        load_mnist(train_size=4500, test_size=1000)


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_streamed_k1100_equals_the_unchunked_bound(backend, device):
    """k = 1100 in chunks of 512 (two whole chunks and a part one of 76 samples, not a whole
    number of 64-sample noise blocks) against one chunk of all k, and the fused bound."""
    torch.manual_seed(0)
    model = BernoulliVAE(data_dim=20, latent=3, hidden=16).to(device)
    x = (torch.rand(4, 20) < 0.3).float().to(device)
    k = 1100
    log_w_chunked, lse_chunked = streamed_log_weights(model, x, k, chunk=512, backend=backend, seed=7)
    log_w_whole, lse_whole = streamed_log_weights(model, x, k, chunk=k, backend=backend, seed=7)
    assert_close(log_w_chunked, log_w_whole, what="log_w chunked vs whole")
    assert_close(lse_chunked - math.log(k), lse_whole - math.log(k), what="L_1100")
    # and the unchunked bound by the fused kernel on all 5000 samples at once, same samples
    with torch.no_grad():
        mu, logvar = model.encode(x)
        gen = torch.Generator(device=device).manual_seed(7)
        eps = torch.cat([torch.randn(64, 4, 3, generator=gen, device=device)
                         for _ in range(-(-k // 64))])[:k].transpose(0, 1)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        whole = kernels.fused_iwae_bound(x, model.decoder(z), z, mu, logvar)
    assert_close(lse_chunked - math.log(k), whole, what="streamed vs fused_iwae_bound")


def test_evaluate_takes_log_k_over_all_samples_not_per_chunk():
    """evaluate's test NLL against an independent logsumexp over the same streamed log-weights
    (chunk 128 of k = 300, in batches of 3): a log-k taken per chunk would shift it by
    log(300 / 128)."""
    torch.manual_seed(0)
    model = BernoulliVAE(data_dim=12, latent=2, hidden=8)
    test = (torch.rand(7, 12, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    schedule = Schedule(stages=[(1, 1e-3)], eval_k=300, eval_chunk=128, k_curve=[1, 300])
    result = evaluate(model, test, schedule, "torch", seed=5, batch=3)
    bounds = []
    for start in range(0, 7, 3):
        log_w, _ = streamed_log_weights(model, test[start:start + 3], 300, 128, "torch", seed=5 + start)
        bounds.append(torch.logsumexp(log_w.double(), dim=1) - math.log(300))
    want = -torch.cat(bounds).mean().item()
    assert math.isclose(result["test_nll"], want, rel_tol=1e-6)
    assert math.isclose(result["curve"][300], -want, rel_tol=1e-6)


class _KnownEncoder(torch.nn.Module):
    """mu_u(x) = scale_u * x_u: over x with unit variance, unit u has variance scale_u**2."""

    def __init__(self, scales):
        super().__init__()
        self.scales = torch.tensor(scales)

    def encode(self, x):
        mu = x[:, : len(self.scales)] * self.scales
        return mu, torch.zeros_like(mu)


def test_active_units_count_known_variances():
    x = torch.randn(20000, 6, generator=torch.Generator().manual_seed(0))
    x = (x - x.mean(0)) / x.std(0, unbiased=False)  # exactly unit variance per column
    encoder = _KnownEncoder([1.0, 0.5, 0.2, 0.05, 0.09, 0.0])  # variances 1, .25, .04, .0025, .0081, 0
    count, variance = active_units(encoder, x)
    assert count == 3
    assert_close(variance, torch.tensor([1.0, 0.25, 0.04, 0.0025, 0.0081, 0.0], dtype=torch.float64),
                 rtol=1e-6, atol=1e-9)


def test_two_epoch_run_of_each_objective_writes_csvs_plots_report(tmp_path):
    schedule = Schedule(stages=[(2, 1e-3)], batch_size=50, train_size=100, test_size=10,
                        eval_k=64, eval_chunk=64, k_curve=[1, 8, 64], hidden=32, latent=8)
    runs = work_list(["dreg"])
    report = run_experiment(tmp_path, schedule, "torch", torch.device("cpu"), runs, log=lambda *a: None)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert [(r.objective, r.k, r.estimator) for r in summary.itertuples()] == \
        [(r.objective, r.k, r.estimator) for r in runs]
    assert [r.estimator for r in runs][-2:] == ["dreg", "dreg"] and len(runs) == len(RUNS) + 2
    assert summary["test_nll"].between(50, 800).all() and (summary["train_seconds"] > 0).all()
    for run in runs:
        history = pd.read_csv(tmp_path / "runs" / f"{run.name}.csv")
        assert list(history["epoch"]) == [1, 2]
        assert (tmp_path / "checkpoints" / f"{run.name}.pt").stat().st_size > 1000
    curve = pd.read_csv(tmp_path / "lk_curve.csv")
    assert len(curve) == len(runs) * 3
    for _, part in curve.groupby(["objective", "k_train", "estimator"]):  # L_k rises with k, above the ELBO
        values = part.sort_values("k_eval")["L_k"].tolist()
        assert values[-1] >= part["elbo"].iloc[0]
    for name in ["training_curves.png", "lk_curves.png"]:
        assert (tmp_path / "plots" / name).stat().st_size > 10_000
    text = report.read_text()
    assert "| IWAE | 50 | iwae |" in text and "| IWAE | 50 | dreg |" in text and "84.78" in text
    assert "IWAE k=50 trained with the dreg gradient estimator" in text

    # resume with a second seed: the finished models are kept, only the new ones train
    before = (tmp_path / "runs" / f"{runs[0].name}.csv").read_text()
    run_experiment(tmp_path, schedule, "torch", torch.device("cpu"), work_list(["dreg"], seeds=2),
                   resume=True, log=lambda *a: None)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert len(summary) == 2 * len(runs) and sorted(set(summary["seed"])) == [0, 1]
    assert (tmp_path / "runs" / f"{runs[0].name}.csv").read_text() == before


def test_experiment_command_one_fused_run_and_report_only(tmp_path, capsys):
    """The command on the fused backend, one model (the IWAE at k = 64: the fused bound's
    training and streamed evaluation per objective are tests/test_training.py's and the
    streamed test's), then --report-only redraws the report. In-process: the command's own
    process runs in tests/test_shard.py."""
    from iwae_bench.cli import main

    out = tmp_path / "exp"
    assert main(["experiment", "--objectives", "iwae", "--epochs", "1", "--train-size", "20", "--test-size", "4",
                 "--eval-k", "64", "--backend", "fused", "--out", str(out)]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["backend"]) == ["fused"] and list(summary["objective"]) == ["iwae"]
    assert summary["test_nll"].between(50, 800).all()
    (out / "report.md").unlink()
    assert main(["experiment", "--report-only", "--out", str(out)]) == 0 and (out / "report.md").exists()


def test_paper_columns_only_beside_the_estimator_the_paper_used():
    """The paper trained every model with the total gradient: its Table 1 sits beside the
    iwae-estimator rows only, whatever an older summary.csv carried beside STL and DReG."""
    import pandas as pd

    from iwae_bench.experiments.mnist_report import aggregate
    from iwae_bench.experiments.paper import paper_active_units, paper_nll

    assert paper_nll("iwae", 50) == 84.78 and paper_active_units("elbo", 1) == 19
    assert paper_nll("iwae", 50, "dreg") is None and paper_active_units("iwae", 5, "stl") is None
    summary = pd.DataFrame([
        {"objective": "iwae", "k": 50, "estimator": estimator, "seed": 0, "test_nll": nll,
         "active_units": 20, "test_elbo": -110.0, "train_seconds": 1.0, "eval_seconds": 1.0,
         "paper_nll": 84.78, "paper_active_units": 25}
        for estimator, nll in (("iwae", 98.0), ("stl", 97.0), ("dreg", 97.5))])
    table = aggregate(summary).set_index("estimator")
    assert table.loc["iwae", "paper_nll"] == 84.78 and table.loc["iwae", "paper_active_units"] == 25
    assert table.loc[["stl", "dreg"], "paper_nll"].isna().all()
    assert table.loc[["stl", "dreg"], "paper_active_units"].isna().all()


# --------------------------------------------------------------------------- gray-level MNIST


def test_bits_per_dim_by_hand():
    """1000 nats over 784 pixels: 1000 / 784 / ln 2 = 1.84017 bits/dim on the levels; a density on
    dequantized data adds log2(256) = 8 bits (the change of variables from [0, 256) to [0, 1))."""
    assert math.isclose(bits_per_dim(1000.0, 784, "discretized_logistic"), 1.8401722, rel_tol=1e-7)
    assert math.isclose(bits_per_dim(1000.0, 784, "bernoulli"), 1.8401722, rel_tol=1e-7)
    for continuous in ("gaussian", "continuous_bernoulli", "gaussian:sigma=0.1"):
        assert math.isclose(bits_per_dim(1000.0, 784, continuous), 9.8401722, rel_tol=1e-7)
    assert math.isclose(bits_per_dim(-784 * math.log(256), 784, "gaussian"), 0.0, abs_tol=1e-12)


def test_dequantized_levels_stay_in_their_bin_inside_0_1():
    """600000 draws at each extreme level hit u's extreme cells (1 in 32768 each): y is
    exactly 2^-24 at the bottom and 1 - 2^-24 at the top, never 0 or 1, and each y stays in its
    level's bin [v / 256, (v + 1) / 256) with u's mean 1/2."""
    intensities = torch.tensor([0.0, 1.0]).repeat(600_000)
    y = dequantize(intensities, torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32
    assert y.min().item() == 2.0 ** -24 and y.max().item() == 1.0 - 2.0 ** -24
    v = torch.round(intensities * 255)
    assert torch.equal(torch.floor(y * 256), v)
    assert abs((y * 256 - v).double().mean().item() - 0.5) < 2e-3
    split = load_mnist(train_size=20, test_size=10, seed=3, gray=True)
    levels = split.test * 255
    assert torch.equal(levels, torch.round(levels)) and split.test.max() == 1  # 8-bit levels v/255, not binary
    assert len(split.test.unique()) > 50
    logistic = model_data(split.test, Likelihood.parse("logistic"))
    want = torch.round(levels).double() * 2 / 255 - 1
    assert torch.equal(logistic, want.float()) and logistic.min() == -1 and logistic.max() == 1  # nearest floats


def _gray_schedule(epochs=1, lr=1e-3) -> Schedule:
    return Schedule(stages=[(epochs, lr)], batch_size=20, train_size=40, test_size=6, eval_k=32, eval_chunk=32,
                    k_curve=[1, 32], hidden=16, latent=4)


def test_gray_level_runs_end_to_end_and_resume(tmp_path):
    """A floored Gaussian VAE and a logistic IWAE-5 end to end: summary rows with the likelihood,
    test_bpd from test_nll on the likelihood's footing, a test NLL that the saved model gives
    again on the test images made from the data seed (the same dequantization every time), the
    likelihood table in the report; resume trains only the run whose likelihood is new."""
    schedule, trained = _gray_schedule(), []
    gaussian = work_list(likelihoods=["gaussian"])[0]
    logistic = Run("iwae", 5, likelihood="discretized_logistic")
    assert gaussian.likelihood == f"gaussian:floor={GAUSSIAN_FLOOR:g}" and gaussian.name.startswith("gaussian-floor=")
    run_experiment(tmp_path, schedule, "torch", torch.device("cpu"), [gaussian, logistic], data_seed=4,
                   log=trained.append)
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary["likelihood"]) == [gaussian.likelihood, "discretized_logistic"]
    for row, run in zip(summary.itertuples(), [gaussian, logistic]):
        assert math.isclose(row.test_bpd, bits_per_dim(row.test_nll, 784, run.likelihood), rel_tol=1e-9)
        split = load_mnist(schedule.train_size, schedule.test_size, 4, gray=True)
        model = load_checkpoint(tmp_path / "checkpoints" / f"{run.name}.pt")
        again = evaluate(model, evaluation_data(split, run.likelihood, 4), schedule, "torch", seed=run.seed)
        assert math.isclose(again["test_nll"], row.test_nll, rel_tol=1e-9), run.name
    assert 8 < summary["test_bpd"].iloc[0] < 12 and 1 < summary["test_bpd"].iloc[1] < 9
    history = pd.read_csv(tmp_path / "runs" / f"{gaussian.name}.csv")
    assert history["min_log_scale"].iloc[0] >= GAUSSIAN_FLOOR - 20  # recorded, before the floor
    assert "| `discretized_logistic` | 8-bit levels | IWAE-5 |" in (tmp_path / "report.md").read_text()

    trained.clear()
    cb = Run("iwae", 5, likelihood="continuous_bernoulli")  # the same objective: only the likelihood is new
    run_experiment(tmp_path, schedule, "torch", torch.device("cpu"), [gaussian, logistic, cb], data_seed=4,
                   resume=True, log=trained.append)
    assert [line.split(":")[0].strip() for line in trained if not line.startswith("  ->")] == [cb.name]
    assert list(pd.read_csv(tmp_path / "summary.csv")["likelihood"])[-1] == "continuous_bernoulli"


def test_nonfinite_loss_stops_the_run_and_the_collapse_demo_reports_it(tmp_path):
    """At learning rate 10 an unfloored Gaussian's loss goes non-finite within three epochs:
    the run stops cleanly (no crash, no evaluation), its summary row says the epoch, and the
    collapse demo's csv and the report say where it diverged."""
    run = Run("elbo", 1, likelihood="gaussian")
    run_experiment(tmp_path, _gray_schedule(epochs=3, lr=10.0), "torch", torch.device("cpu"), [run],
                   collapse_epochs=3, log=lambda *a: None)
    collapse = pd.read_csv(tmp_path / "collapse.csv")
    assert list(collapse["diverged"])[-1] and not any(collapse["diverged"][:-1])
    assert not math.isfinite(collapse["train_objective"].iloc[-1]) and len(collapse) <= 3
    summary = pd.read_csv(tmp_path / "summary.csv")
    history = pd.read_csv(tmp_path / "runs" / f"{run.name}.csv")
    assert summary["diverged_epoch"].iloc[0] == history["epoch"].iloc[-1] <= 3
    assert summary["test_nll"].isna().all() and not math.isfinite(history["train_objective"].iloc[-1])
    text = (tmp_path / "report.md").read_text()
    assert f"The loss became non-finite in epoch {collapse['epoch'].iloc[-1]}" in text


def test_collapse_demo_trains_on_the_raw_intensities(tmp_path, monkeypatch):
    """The demo's batches are the images' intensities v/255 themselves, exact zeros and all (not
    dequantized), and its likelihood has no floor."""
    from iwae_bench.experiments import mnist

    seen, loss = [], mnist._batch_loss
    monkeypatch.setattr(mnist, "_batch_loss",
                        lambda model, fn, x, *rest: seen.append((x, model)) or loss(model, fn, x, *rest))
    split = load_mnist(train_size=40, test_size=6, seed=1, gray=True)
    rows = mnist.collapse_demo(tmp_path, split, 1, 1e-3, _gray_schedule(), "torch", torch.device("cpu"),
                               log=lambda *a: None)
    assert len(seen) == 2 and (seen[0][0] == 0).float().mean() > 0.5
    assert torch.equal(torch.sort(torch.cat([x for x, _ in seen]), dim=0).values, torch.sort(split.train, dim=0).values)
    assert seen[0][1].likelihood.floor == -math.inf and rows[0]["data"] == "raw"
    assert math.isfinite(rows[0]["min_log_scale"])


def test_summary_rows_from_before_the_likelihood_column_are_bernoulli(tmp_path):
    """An older summary.csv (no likelihood, test_bpd or diverged_epoch column): resume counts its
    row as the Bernoulli run it is (not retrained; a logistic run of the same objective is
    trained), writes it back as the Bernoulli's, and the report renders both."""
    from iwae_bench.experiments.mnist_report import read_table

    old = ("objective,k,estimator,seed,backend,epochs,train_seconds,eval_seconds,train_objective,test_nll,"
           "test_elbo,active_units,paper_nll,paper_active_units\n"
           "elbo,1,iwae,0,torch,2,1.0,1.0,-120.0,110.0,-115.0,12,86.76,19\n")
    (tmp_path / "summary.csv").write_text(old)
    (tmp_path / "lk_curve.csv").write_text("objective,k_train,estimator,seed,k_eval,L_k,elbo\n"
                                           "elbo,1,iwae,0,1,-115.0,-115.0\nelbo,1,iwae,0,32,-110.0,-115.0\n")
    assert list(read_table(tmp_path / "summary.csv")["likelihood"]) == ["bernoulli"]
    trained, logistic = [], Run("elbo", 1, likelihood="discretized_logistic")
    run_experiment(tmp_path, _gray_schedule(), "torch", torch.device("cpu"), [Run("elbo", 1), logistic],
                   resume=True, log=trained.append)
    assert trained[0].split(":")[0].strip() == logistic.name and len(trained) == 2  # its training and its test
    rows = pd.read_csv(tmp_path / "summary.csv")
    assert list(rows["likelihood"]) == ["bernoulli", "discretized_logistic"] and rows["test_nll"].iloc[0] == 110.0
    text = (tmp_path / "report.md").read_text()
    assert "| VAE | 1 | iwae | 110.00 | 86.76 |" in text and "| `discretized_logistic` | 8-bit levels | VAE |" in text


def test_likelihoods_command_sharded_and_merged(tmp_path, capsys):
    """``experiment --likelihoods ... --collapse-demo`` in two shards, then merged: every
    likelihood's three runs once (each shard built the same work list), the demo's csv from the
    first shard; a likelihood that is not one exits 2 naming it."""
    from iwae_bench.cli import main

    common = ["experiment", "--likelihoods", "logistic", "gaussian", "--collapse-demo", "1", "--epochs", "1",
              "--train-size", "20", "--test-size", "4", "--eval-k", "32", "--backend", "torch", "--out", str(tmp_path)]
    for i in range(2):
        assert main([*common, "--shard", f"{i}/2"]) == 0
    assert (tmp_path / "shard-000-of-002" / "collapse.csv").exists()
    assert not (tmp_path / "shard-001-of-002" / "collapse.csv").exists()
    assert main(["merge", str(tmp_path / "shard-000-of-002"), str(tmp_path / "shard-001-of-002"),
                 "--out", str(tmp_path)]) == 0
    summary = pd.read_csv(tmp_path / "summary.csv")
    keys = {(r.likelihood, r.objective, r.k, r.estimator) for r in summary.itertuples()}
    floored = f"gaussian:floor={GAUSSIAN_FLOOR:g}"
    assert len(summary) == len(keys) == 6 and {k[0] for k in keys} == {"discretized_logistic", floored}
    assert {(o, k, e) for _, o, k, e in keys} == {("elbo", 1, "iwae"), ("iwae", 50, "iwae"), ("iwae", 50, "dreg")}
    assert len(pd.read_csv(tmp_path / "collapse.csv")) == 1
    assert "## The Gaussian's variance without dequantization" in (tmp_path / "report.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "--likelihoods", "gauss", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2 and "likelihood must be one of" in capsys.readouterr().err


# --------------------------------------------------------------------------- diagnostics and the family


def test_evaluate_reports_the_jackknife_and_khat_of_its_own_log_weights():
    """evaluate's jvi1/jvi2 NLLs and k-hat shares against experiments/diagnostics.py applied to
    the same streamed log-weights (batches of 3, chunk 128 of k = 300): no second set of samples."""
    from iwae_bench.experiments.diagnostics import jvi, psis_khat

    torch.manual_seed(0)
    model = BernoulliVAE(data_dim=12, latent=2, hidden=8)
    test = (torch.rand(7, 12, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    schedule = Schedule(stages=[(1, 1e-3)], eval_k=300, eval_chunk=128, k_curve=[1, 300])
    result = evaluate(model, test, schedule, "torch", seed=5, batch=3)
    log_w = torch.cat([streamed_log_weights(model, test[s:s + 3], 300, 128, "torch", seed=5 + s)[0]
                       for s in range(0, 7, 3)])
    for order in (1, 2):
        assert math.isclose(result[f"jvi{order}_nll"], -jvi(log_w, order).mean().item(), rel_tol=1e-12)
    khat = psis_khat(log_w)
    assert math.isclose(result["khat_above"], (khat > 0.7).double().mean().item(), abs_tol=1e-12)
    assert math.isclose(result["khat_median"], khat.median().item(), rel_tol=1e-12)
    assert result["jvi1_nll"] < result["test_nll"]  # the bound's bias removed: above L_k, so a lower NLL


def test_family_work_list_is_rainforths_set_and_takes_extra_estimators():
    from iwae_bench.experiments.mnist import FAMILY_RUNS, family_runs

    runs = work_list(objectives=[], seeds=2)
    assert [(r.objective, r.k, r.estimator) for r in runs[:8]] == FAMILY_RUNS and len(runs) == 16
    assert {r.k for r in runs} == {64} and runs[1].name == "miwae-8x8-k64-iwae-seed0"
    assert [r.estimator for r in runs if r.objective == "rws"] == ["wake", "dreg", "wake", "dreg"]
    assert family_runs(["vr:0.50", "rws"], ["dreg", "stl"]) == [
        ("vr:0.5", 64, "iwae"), ("rws", 64, "wake"), ("vr:0.5", 64, "dreg"), ("vr:0.5", 64, "stl"), ("rws", 64, "dreg")]
    with pytest.raises(ValueError, match="miwae takes its groups as MxK"):
        family_runs(["miwae:8"])
    with pytest.raises(ValueError, match="do not combine"):
        work_list(likelihoods=["gaussian"], objectives=[])


def test_family_report_judges_differences_against_the_seeds_spread(tmp_path):
    """Three seeds per member that move every model alike by -3, 0, +3 nats (a seed fixes the
    initial weights and data order), plus a little of each model's own: paired by seed, PIWAE's
    1-nat lead over MIWAE has a standard error of 0.058, a 95% interval of 4.303 (t, 2 degrees of
    freedom) times that, 0.25 (beyond the spread), and CIWAE's 0.05 nats over PIWAE one of 0.12
    (within); VR, trained on other seeds, falls back to the unpaired standard error (2.4 nats)
    and is within. The orderings against Rainforth et al.'s."""
    from iwae_bench.experiments.mnist_report import _family_text, aggregate

    members = {("iwae", 0): (90.0, (0.0, 0.0, 0.0)), ("miwae:8x8", 0): (91.0, (0.1, -0.1, 0.0)),
               ("piwae:8x8", 0): (90.0, (0.0, 0.0, 0.0)), ("ciwae:0.05", 0): (90.05, (0.05, -0.05, 0.0)),
               ("vr:0.5", 3): (91.0, (0.0, 0.0, 0.0))}
    rows = [{"objective": o, "k": 64, "estimator": "iwae", "seed": first + s, "test_nll": m + shared + own,
             "active_units": 20, "test_elbo": -95.0, "train_seconds": 1.0, "eval_seconds": 1.0,
             "jvi1_nll": m - 0.2, "jvi2_nll": m - 0.21, "khat_median": 0.5, "khat_above": 0.1}
            for (o, first), (m, noise) in members.items() for s, (shared, own) in enumerate(zip((-3, 0, 3), noise))]
    summary = pd.DataFrame(rows)
    text = "\n".join(_family_text(aggregate(summary), summary, seeds=3))
    assert "| MIWAE(8, 8) | 91.00 ± 2.95 | 90.80 | 90.79 | 10.0% | 20.0 | +1.00 ± 0.25 | 84.97 |" in text
    assert ("ours PIWAE(8, 8) < CIWAE(beta = 0.05) < MIWAE(8, 8); Rainforth et al. PIWAE(8, 8) < "
            "CIWAE(beta = 0.05) < MIWAE(8, 8) (the same order)") in text
    assert "PIWAE(8, 8) - MIWAE(8, 8): ours -1.00 nats, theirs -0.51 (same sign; ours beyond the seeds' spread)" in text
    assert ("PIWAE(8, 8) - CIWAE(beta = 0.05): ours -0.05 nats, theirs -0.11 (same sign; ours within the seeds' "
            "spread)") in text
    assert "MIWAE(8, 8) against IWAE: +1.00 nats (worse; beyond the seeds' spread)" in text
    assert "VR(alpha = 0.5) against IWAE: +1.00 nats (worse; within the seeds' spread)" in text
    from iwae_bench.experiments.mnist_report import _t975

    assert _t975(2) == 4.303 and abs(_t975(11) - 2.201) < 5e-4 and abs(_t975(60) - 2.000) < 5e-4
    names = ["| IWAE |", "| MIWAE(8, 8) |", "| PIWAE(8, 8) |", "| CIWAE(beta = 0.05) |", "| VR(alpha = 0.5) |"]
    assert [text.index(name) for name in names] == sorted(text.index(name) for name in names)  # Rainforth's order


def test_family_report_names_diverged_seeds_and_leaves_them_out(tmp_path):
    """A seed whose training loss went non-finite has no test NLL (and no other number): the
    report names it with its epoch, the member's mean and its paired difference use the
    finished seeds only, a member with no finished seed reads "diverged" and drops out of the
    orderings, and no "nan" reaches the rendered report. VR, trained on seeds 2-4 with seed 4
    lost, shares one finished seed with the IWAE: the unpaired interval over 3 and 2 seeds."""
    from iwae_bench.experiments.mnist_report import _family_text, _report_text, aggregate

    nlls = {("iwae", 0): (90.0, 91.0, 92.0), ("piwae:8x8", 0): (89.0, math.nan, 91.5),
            ("miwae:8x8", 0): (math.nan,) * 3, ("ciwae:0.05", 0): (90.5, 91.5, 92.5),
            ("vr:0.5", 2): (91.0, 92.0, math.nan)}
    finished = {"active_units": 20, "test_elbo": -95.0, "eval_seconds": 1.0, "khat_median": 0.5,
                "khat_above": 0.1}
    summary = pd.DataFrame([{"objective": o, "k": 64, "estimator": "iwae", "seed": first + s, "test_nll": v,
                             "train_seconds": 1.0, "jvi1_nll": v, "jvi2_nll": v,
                             **({"diverged_epoch": 3} if math.isnan(v) else finished)}
                            for (o, first), values in nlls.items() for s, v in enumerate(values)])
    text = "\n".join(_family_text(aggregate(summary), summary, seeds=3))
    assert "| PIWAE(8, 8) | 90.25 ± 1.77 |" in text  # seeds 0 and 2
    assert "| -0.75 ± 3.18 |" in text  # paired over seeds 0 and 2: (-1.0, -0.5), t(1 dof) 12.706 x 0.25
    # unpaired: 91.5 - 91.0, 12.706 (min(3, 2) - 1 dof) x sqrt(0.5 / 2 + 1 / 3)
    assert "| +0.50 ± 9.70 |" in text
    assert ("PIWAE(8, 8): no result at seed 1 (non-finite loss in epoch 3); its numbers are over the "
            "other 2.") in text
    assert ("MIWAE(8, 8): no result at seed 0 (non-finite loss in epoch 3), seed 1 (non-finite loss in epoch "
            "3), seed 2 (non-finite loss in epoch 3); no seed finished.") in text
    assert "| diverged |" in text and "MIWAE(8, 8) against IWAE" not in text
    assert "ours PIWAE(8, 8) < CIWAE(beta = 0.05); Rainforth et al. PIWAE(8, 8) < CIWAE(beta = 0.05)" in text
    curve = pd.DataFrame([{"objective": o, "k_train": 64, "estimator": "iwae", "k_eval": k_eval, "L_k": -90.0,
                           "elbo": -95.0, "likelihood": "bernoulli"} for o, _ in nlls for k_eval in (1, 5000)])
    report = _report_text(summary.assign(likelihood="bernoulli"), curve, {})
    assert report.startswith("# The importance-weighted family on MNIST at k = 64")
    assert "| PIWAE(8, 8) | 64 | iwae | 90.25 ± 1.77 |" in report  # the first table names members as the second
    assert "nan" not in report.lower(), [line for line in report.splitlines() if "nan" in line.lower()]


def test_family_command_sharded_resumed_and_merged(tmp_path):
    """``experiment --objectives miwae:8x8 rws --estimators dreg`` in two shards, one resumed,
    then merged: MIWAE, MIWAE-DReG, RWS (wake) and RWS-DReG once each, every row with its
    jackknife and k-hat, the report's family section beside Rainforth's number; an objective
    that is not one exits 2 naming it."""
    from iwae_bench.cli import main

    common = ["experiment", "--objectives", "miwae:8x8", "rws", "--estimators", "dreg", "--epochs", "1",
              "--train-size", "20", "--test-size", "4", "--eval-k", "64", "--backend", "torch", "--out", str(tmp_path)]
    for i in range(2):
        assert main([*common, "--shard", f"{i}/2"]) == 0
    first = tmp_path / "shard-000-of-002"
    before = (first / "summary.csv").read_text()
    assert main([*common, "--shard", "0/2", "--resume"]) == 0 and (first / "summary.csv").read_text() == before
    # the first shard alone, merged before the second finished: a partial report that says so
    assert main(["merge", str(first), "--out", str(tmp_path / "partial")]) == 0
    partial = (tmp_path / "partial" / "report.md").read_text().splitlines()
    assert partial[2].startswith("**Partial: 2 of the experiment's runs are not in these results yet**")
    assert partial[2].endswith("(objective, k, estimator, seed, likelihood, layers): `rws 64 dreg 0 bernoulli 1`; "
                               "`rws 64 wake 0 bernoulli 1`.")
    assert main(["merge", str(first), str(tmp_path / "shard-001-of-002"), "--out", str(tmp_path)]) == 0
    assert "Partial" not in (tmp_path / "report.md").read_text()
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert sorted(zip(summary["objective"], summary["estimator"])) == [
        ("miwae:8x8", "dreg"), ("miwae:8x8", "iwae"), ("rws", "dreg"), ("rws", "wake")]
    assert summary[["jvi1_nll", "jvi2_nll", "khat_median", "khat_above"]].notna().all().all()
    assert (summary["jvi1_nll"] < summary["test_nll"]).all()
    text = (tmp_path / "report.md").read_text()
    assert "## The importance-weighted family at k = 64 beside Rainforth et al. (2018)" in text
    assert "| MIWAE(8, 8) |" in text and "| 84.97 |" in text and "| RWS DReG |" in text
    # a family-only run: its own title, and no empty columns for Burda et al.'s Table 1
    assert text.startswith("# The importance-weighted family on MNIST at k = 64\n")
    assert "paper NLL" not in text and "Burda" not in text
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "--objectives", "miwae:8", "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2


def test_a_run_killed_mid_training_resumes_from_its_saved_state_bit_for_bit(tmp_path, monkeypatch):
    """Four epochs straight, then the same run killed at the start of its third epoch (state
    saved after every epoch) and trained again from the saved state: the same parameters, the
    same rows (objectives; the clock goes on), with the optimizer's moments and both generators
    restored (a fresh Adam or a reseeded data order would move the numbers)."""
    from iwae_bench.experiments import mnist

    split = load_mnist(train_size=60, test_size=4, seed=0)
    schedule = Schedule(stages=[(2, 1e-3), (2, 3e-4)], batch_size=20, hidden=12, latent=3)
    run = Run("iwae", 3, "dreg", 0)
    straight, rows, _ = mnist.train(run, split, schedule, "torch", torch.device("cpu"), log=lambda *_: None)
    state = tmp_path / "run.state.pt"
    real_randperm, calls = torch.randperm, []

    def killed_in_epoch_three(*args, **kwargs):  # one data order per epoch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_randperm(*args, **kwargs)

    monkeypatch.setattr(mnist.torch, "randperm", killed_in_epoch_three)
    with pytest.raises(KeyboardInterrupt):
        mnist.train(run, split, schedule, "torch", torch.device("cpu"), log=lambda *_: None,
                    state_path=state, state_every=0.0)
    monkeypatch.setattr(mnist.torch, "randperm", real_randperm)
    assert torch.load(state, weights_only=False)["history"][-1]["epoch"] == 2
    lines = []
    resumed, resumed_rows, _ = mnist.train(run, split, schedule, "torch", torch.device("cpu"), log=lines.append,
                                           state_path=state, state_every=0.0)
    assert any("resumed after epoch 2" in line for line in lines)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["train_objective"] for r in resumed_rows] == [r["train_objective"] for r in rows]
    assert [r["lr"] for r in resumed_rows] == [1e-3, 1e-3, 3e-4, 3e-4]


def test_two_layer_checkpoint_and_evaluation_log_weights():
    """A TwoLayerVAE's checkpoint loads as the same model, and the evaluation's chunked
    log-weights (torch and fused backends) are float64's on the same draws (both layers' terms,
    the per-sample ones included)."""
    from iwae_bench import reference
    from iwae_bench.experiments.mnist import two_layer_log_weights
    from iwae_bench.training.model import TwoLayerVAE, save_checkpoint

    torch.manual_seed(0)
    model = TwoLayerVAE(12, (6, 3), (10, 5))
    x = (torch.rand(4, 12) < 0.3).float()
    got = two_layer_log_weights(model, x, 130, 64, "torch", seed=5)
    generator = torch.Generator().manual_seed(5)
    parts = []
    for size in (64, 64, 2):
        layers = model.sample(x, size, generator)
        parts.append(reference.log_weights(x, model.decoder(layers[0].z).double(), layers))
    assert_close(got, torch.cat(parts, dim=1), atol=1e-4, rtol=1e-6)
    fused = two_layer_log_weights(model, x, 130, 64, "fused", seed=5)  # the fused head, the layers' offset
    assert_close(fused, torch.cat(parts, dim=1), atol=1e-4, rtol=1e-6)
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(model, Path(folder) / "m.pt")
        loaded = load_checkpoint(Path(folder) / "m.pt")
    assert type(loaded) is TwoLayerVAE
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert torch.equal(two_layer_log_weights(loaded, x, 8, 64, "torch", seed=1),
                       two_layer_log_weights(model, x, 8, 64, "torch", seed=1))


def test_two_layer_active_units_are_counted_per_layer_and_summed():
    """The summary's active units of a TwoLayerVAE: each layer's count by the paper's criterion
    (Cov_x(E_q[u | x]) > 0.01, E_q[h2 | x] over seeded draws of h1) as "h1/h2", their sum the
    total; q(h2|h1)'s output scaled so that h2 has active units too."""
    from iwae_bench.experiments.mnist import units_of
    from iwae_bench.training.model import TwoLayerVAE

    torch.manual_seed(0)
    model = TwoLayerVAE(12, (6, 3), (10, 5))
    with torch.no_grad():
        model.q1.net[-1].weight.mul_(10.0)
        model.q2.net[-1].weight.mul_(10.0)
    x = (torch.rand(64, 12) < 0.3).float()
    mu1, _ = model.q1(x)
    means = model.posterior_means(x, 64, torch.Generator().manual_seed(3))
    counts = [int((m.double().var(dim=0, unbiased=False) > 1e-2).sum()) for m in (mu1, means[1])]
    assert counts[0] > 0 and counts[1] > 0
    assert units_of(model, x, seed=3) == {"active_units": sum(counts), "active_units_per_layer": f"{counts[0]}/{counts[1]}"}


def test_two_layer_experiment_through_the_cli(tmp_path):
    """--layers 2: the paper's two-layer rows (VAE, k-sample ELBO and IWAE at k = 5, 50, IWAE-50
    with the generalized and the plain DReG) trained for 2 epochs, each with its active units
    per layer, the paper's two-layer NLL beside the total gradient's rows, its checkpoint a
    TwoLayerVAE; the report's two-layer section."""
    from iwae_bench.experiments.mnist import TWO_LAYER_RUNS
    from iwae_bench.training.model import TwoLayerVAE

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "exp"
    done = subprocess.run([sys.executable, "-m", "iwae_bench", "experiment", "--layers", "2", "--epochs", "2",
                           "--train-size", "40", "--test-size", "8", "--eval-k", "64", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = pd.read_csv(out / "summary.csv")
    assert list(zip(summary["objective"], summary["k"], summary["estimator"])) == TWO_LAYER_RUNS
    assert set(summary["layers"]) == {2} and summary["test_nll"].between(50, 800).all()
    for row in summary.itertuples():
        h1, h2 = map(int, row.active_units_per_layer.split("/"))
        assert h1 + h2 == row.active_units and 0 <= h1 <= 100 and 0 <= h2 <= 50
    paper = dict(zip(zip(summary["objective"], summary["k"], summary["estimator"]), summary["paper_nll"]))
    assert paper[("elbo", 1, "iwae")] == 85.33 and paper[("iwae", 50, "iwae")] == 82.90
    assert math.isnan(paper[("iwae", 50, "dreg")]) and math.isnan(paper[("iwae", 50, "dreg_plain")])
    assert type(load_checkpoint(out / "checkpoints" / "two-layer-iwae-k50-dreg-seed0.pt")) is TwoLayerVAE
    report = (out / "report.md").read_text()
    assert "## Two stochastic layers beside the paper" in report and "| IWAE-50 plain DReG |" in report
    assert "| 82.9 |" in report or "| 82.90 |" in report


def test_evaluate_a_checkpoint_prints_what_the_experiment_would_measure(tmp_path, capsys):
    """experiment --evaluate CHECKPOINT: the saved model on the experiment's test images and
    samples, the same numbers evaluate() gives for it (NLL, jackknife, k-hat, active units)."""
    from iwae_bench.cli import main
    from iwae_bench.training.model import save_checkpoint

    torch.manual_seed(3)
    model = BernoulliVAE(data_dim=784, latent=4, hidden=16)
    path = tmp_path / "model.pt"
    save_checkpoint(model, path)
    assert main(["experiment", "--evaluate", str(path), "--train-size", "40", "--test-size", "6", "--eval-k", "48",
                 "--device", "cpu", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    schedule = Schedule(stages=[(1, 1e-3)], train_size=40, test_size=6, eval_k=48, k_curve=[1, 48])
    split = load_mnist(40, 6, 1)
    want = evaluate(model, evaluation_data(split, Likelihood.parse("bernoulli"), 1), schedule, "torch", seed=1)
    assert (f"test NLL {want['test_nll']:.2f} nats at k = 48 on 6 images; jackknife {want['jvi1_nll']:.2f} "
            f"(order 1), {want['jvi2_nll']:.2f} (order 2); PSIS k-hat median {want['khat_median']:.2f}") in printed
    seeded = tmp_path / "iwae-k64-iwae-seed2.pt"  # a --seeds run's second model: its samples' seed is 2
    save_checkpoint(model, seeded)
    assert main(["experiment", "--evaluate", str(seeded), "--train-size", "40", "--test-size", "6", "--eval-k", "48",
                 "--device", "cpu", "--seed", "1"]) == 0
    want = evaluate(model, evaluation_data(split, Likelihood.parse("bernoulli"), 1), schedule, "torch", seed=2)
    assert f"test NLL {want['test_nll']:.2f} nats at k = 48 on 6 images; jackknife {want['jvi1_nll']:.2f}" \
        in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["experiment", "--evaluate", str(tmp_path / "missing.pt"), "--device", "cpu"])
    assert "--evaluate: checkpoint" in capsys.readouterr().err


def test_evaluate_update_adds_the_diagnostics_to_a_folder_trained_without_them(tmp_path, capsys):
    """experiment --evaluate CHECKPOINT ... --update --out OUT: a folder whose summary predates the
    jackknife and k-hat columns gets the values its own training run would have written (the
    evaluation seed is each row's training seed, the images the data seed's), the report shows
    them under the training's "Made by" and keeps a partial merge's note, machine.json records
    the command. Refused, with the folder left byte for byte as it was: a checkpoint that does
    not give its row's test NLL again (the second of two included), one no row is named like, a
    diverged row, --update without --evaluate or beside --resume, a folder with no summary
    (which is not created)."""
    from iwae_bench.cli import main
    from iwae_bench.experiments.diagnostics import COLUMNS

    schedule = _gray_schedule()
    runs = [Run("iwae", 5, seed=1, likelihood="discretized_logistic"), Run("elbo", 1)]
    run_experiment(tmp_path, schedule, "torch", torch.device("cpu"), runs, data_seed=4, log=lambda line: None)
    trained = pd.read_csv(tmp_path / "summary.csv")
    assert trained[COLUMNS].notna().all().all()
    trained.drop(columns=COLUMNS).to_csv(tmp_path / "summary.csv", index=False)  # as an older folder has it
    record = json.loads((tmp_path / "machine.json").read_text())
    record["runs"][0]["commit"] = "c0ffee"  # trained at another commit than the update's
    record["runs"][-1]["missing_cells"] = ["iwae 5 iwae 2 discretized_logistic 1"]  # as a partial merge says
    (tmp_path / "machine.json").write_text(json.dumps(record))
    flags = ["experiment", "--train-size", "40", "--test-size", "6", "--eval-k", "32", "--device", "cpu", "--backend", "torch",
             "--seed", "4", "--out", str(tmp_path), "--update", "--evaluate"]
    checkpoints = [str(tmp_path / "checkpoints" / f"{run.name}.pt") for run in runs]

    assert main(flags + checkpoints) == 0
    updated = pd.read_csv(tmp_path / "summary.csv")
    pd.testing.assert_frame_equal(updated[COLUMNS], trained[COLUMNS])
    report = (tmp_path / "report.md").read_text()
    assert f"{trained['jvi1_nll'].iloc[0]:.2f}" in report
    assert report.count("Made by") == report.count("commit c0ffee)") == 1
    assert "**Partial: 1 of the experiment's runs are not in these results yet**" in report
    entry = json.loads((tmp_path / "machine.json").read_text())["runs"][-1]
    assert entry["evaluated"] == checkpoints and entry["data_seed"] == 4 and entry["finished"]

    folder = {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}

    def refused(argv, message):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
        assert {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == folder

    refused([flag if flag != "4" else "0" for flag in flags] + checkpoints, "test NLL")  # other test images
    tampered = updated.copy()
    tampered.loc[1, "test_nll"] += 1.0  # the second model's recorded NLL no longer comes out
    tampered.to_csv(tmp_path / "summary.csv", index=False)
    folder[tmp_path / "summary.csv"] = (tmp_path / "summary.csv").read_bytes()
    refused(flags + checkpoints, f"--evaluate {checkpoints[1]}: test NLL")
    tampered["diverged_epoch"] = tampered["diverged_epoch"].astype(object)
    tampered.loc[1, ["test_nll", "diverged_epoch"]] = [math.nan, "3"]
    tampered.to_csv(tmp_path / "summary.csv", index=False)
    folder[tmp_path / "summary.csv"] = (tmp_path / "summary.csv").read_bytes()
    refused(flags + checkpoints, "elbo-k1-iwae-seed0 (diverged in epoch 3) has no test NLL")
    refused(flags + [str(tmp_path / "checkpoints" / "iwae-k50-iwae-seed0.pt")], "no run in")
    refused(flags[:-1], "--update: only with --evaluate")
    refused(flags + checkpoints + ["--resume"], "--update: not with --resume")
    missing = tmp_path / "elsewhere"
    refused([flag if flag != str(tmp_path) else str(missing) for flag in flags] + checkpoints,
            "--update: no summary.csv in")
    assert not missing.exists()
