"""The MNIST experiment: data, streamed evaluation, active units, and a short real run."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import kernels
from iwae_bench.experiments.data import binarize, load_mnist
from iwae_bench.experiments.mnist import (RUNS, Schedule, active_units, evaluate, run_experiment,
                                          streamed_log_weights, work_list)
from iwae_bench.training import BernoulliVAE

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
def test_streamed_k5000_equals_the_unchunked_bound(backend, device):
    torch.manual_seed(0)
    model = BernoulliVAE(data_dim=20, latent=3, hidden=16).to(device)
    x = (torch.rand(4, 20) < 0.3).float().to(device)
    k = 5000
    log_w_chunked, lse_chunked = streamed_log_weights(model, x, k, chunk=1024, backend=backend, seed=7)
    log_w_whole, lse_whole = streamed_log_weights(model, x, k, chunk=k, backend=backend, seed=7)
    assert_close(log_w_chunked, log_w_whole, what="log_w chunked vs whole")
    assert_close(lse_chunked - math.log(k), lse_whole - math.log(k), what="L_5000")
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
    schedule = Schedule(stages=[(2, 1e-3)], batch_size=50, train_size=200, test_size=30,
                        eval_k=128, eval_chunk=64, k_curve=[1, 8, 128], hidden=32, latent=8)
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


def test_experiment_command_one_fused_run_and_report_only(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "exp"
    done = subprocess.run([sys.executable, "-m", "iwae_bench", "experiment", "--epochs", "1",
                           "--train-size", "20", "--test-size", "4", "--eval-k", "64", "--backend", "fused",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["backend"]) == {"fused"} and len(summary) == len(RUNS)
    (out / "report.md").unlink()
    done = subprocess.run([sys.executable, "-m", "iwae_bench", "experiment", "--report-only",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and (out / "report.md").exists()


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
