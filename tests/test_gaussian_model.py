"""The linear-Gaussian model (experiments/gaussian.py) against its closed forms in float64, the
SNR machinery on it (slopes whose signs the papers give, batched draws against one at a time),
the bias column, and the family's entries in ``snr``."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from iwae_bench.cli import build_parser
from iwae_bench.experiments import gaussian
from iwae_bench.experiments.snr import (Settings, bias_statistics, bias_summary, entry, expected_keys, fits,
                                        gradient_step, loss_for, noise, reference_of, run_snr)
from iwae_bench.experiments.snr_report import fit_slope
from iwae_bench.training.bounds import log_weights, objective_bound

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup():
    x, mu_true = gaussian.make_data(seed=3)
    return x, mu_true, gaussian.near_optimum(x, seed=3)


def _samples(model, x, k, seed=0):
    """u [B, k, D] from q(u|x), and q's mean and log-variance."""
    mean, logvar = model.encode(x)
    eps = torch.randn(x.shape[0], k, x.shape[1], generator=torch.Generator().manual_seed(seed))
    return mean.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps, mean, logvar


# --------------------------------------------------------------------------- closed forms


def test_the_data_and_the_optimum_are_the_papers(setup):
    x, mu_true, _ = setup
    assert x.shape == (1024, 20)
    # x ~ N(mu_true, 2 I): the sample mean within 4 standard errors, the variance near 2
    assert ((x.double().mean(0) - mu_true).abs() < 4 * math.sqrt(2 / 1024)).all()
    assert x.double().var(0).mean().item() == pytest.approx(2.0, abs=0.1)
    exact = gaussian.near_optimum(x, perturbation=0.0)
    A, b, mu = exact.paper_parameters()
    assert torch.equal(A, torch.eye(20) / 2)
    assert torch.allclose(mu, x.double().mean(0).float()) and torch.allclose(b, mu / 2, atol=1e-6)
    # at the optimum q's mean is the posterior's
    assert torch.allclose(gaussian.q_mean(exact, x[:5]), gaussian.posterior(exact, x[:5])[0], atol=1e-5)


def test_log_p_x_and_the_posterior_satisfy_bayes_rule(setup):
    """log p(x|u) + log p(u) - log p(x) = log p(u|x) at any u: a wrong log p(x) is off by a
    constant, a wrong posterior by a function of u."""
    x, _, model = setup
    x = x[:4].double()
    u = 2 * torch.randn(4, 7, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mu = model.decoder.mu.detach().double()
    joint = gaussian.log_normal(x.unsqueeze(1), u + mu, 1.0) + gaussian.log_normal(u, torch.zeros(()), 1.0)
    mean, var = gaussian.posterior(model, x)
    lhs = joint - gaussian.log_marginal(model, x).unsqueeze(1)
    assert torch.allclose(lhs, gaussian.log_normal(u, mean.unsqueeze(1), var), atol=1e-10)


def test_the_suites_log_weights_are_the_models(setup):
    """The log-weights that IWAELoss reduces (the Gaussian likelihood at the decoder's output,
    the standard prior, q) are the model's, float64 densities at float32 accuracy."""
    x, _, model = setup
    u, mean, logvar = _samples(model, x[:6], 50)
    suite = log_weights(x[:6], model.decoder(u), u, mean, logvar, "torch", likelihood=gaussian.LIKELIHOOD)
    want = gaussian.log_weights64(model, x[:6], u)
    assert torch.allclose(suite.double(), want, rtol=1e-5, atol=1e-3)


def test_the_elbo_is_log_p_x_less_the_kl(setup):
    """The k-sample ELBO through the suite averages to log p(x) - KL(q || p(u|x)) (closed form)."""
    x, _, model = setup
    x = x[:8]
    u, mean, logvar = _samples(model, x, 20_000, seed=2)
    value = objective_bound(x, model.decoder(u), u, mean, logvar, "multi_sample_elbo",
                            likelihood=gaussian.LIKELIHOOD).double()
    log_w = gaussian.log_weights64(model, x, u)
    stderr = log_w.std(1) / math.sqrt(20_000)
    assert ((value - gaussian.elbo(model, x)).abs() < 4 * stderr + 1e-4).all()
    # the gap is the KL, at least the variances' share: 10 (4/3 - 1 - log(4/3)) = 0.456 nats
    variances = 10 * (4 / 3 - 1 - math.log(4 / 3))
    assert (gaussian.log_marginal(model, x) - gaussian.elbo(model, x) >= variances).all()


def test_the_iwae_bound_rises_to_log_p_x_as_the_delta_method_says(setup):
    """Over replicates of one point (4000 at k = 30, 1000 at k = 300): E L_k = log p(x) - (E w~^2 - 1) / (2k) + O(1/k^2),
    E w~^2 = integral p(u|x)^2 / q(u|x) in closed form; the bound below log p(x) and closer at
    larger k. q's mean moved 0.2 off the posterior's in every dimension, so that both terms of
    E w~^2 (the variances', the means') count."""
    x, _, model = setup
    A, b, mu = model.paper_parameters()
    model = gaussian.LinearGaussian().set_parameters(A, b + 0.2, mu)
    exact = gaussian.log_marginal(model, x[:1]).item()
    variance = gaussian.second_moment(model, x[:1]).item() - 1
    gaps = {}
    for k, replicates in ((30, 4000), (300, 1000)):
        point = x[:1].repeat(replicates, 1)
        u, mean, logvar = _samples(model, point, k, seed=k)
        bound = objective_bound(point, model.decoder(u), u, mean, logvar, "iwae",
                                likelihood=gaussian.LIKELIHOOD).double()
        gaps[k] = exact - bound.mean().item()
        stderr = bound.std().item() / math.sqrt(replicates)
        assert gaps[k] == pytest.approx(variance / (2 * k), abs=4 * stderr + 0.15 * variance / (2 * k))
    assert 0 < gaps[300] < gaps[30]


# --------------------------------------------------------------------------- the draws


@pytest.mark.parametrize("name", ["iwae", "dreg", "rws", "piwae:2x4"])
def test_batched_draws_are_the_one_at_a_time_gradients(setup, name):
    """gaussian.gradient_draws (each draw its own parameter copy in one pass) against the
    benchmark's one-draw step on the model itself, draw by draw (float32: log w near -40
    carries 1e-5 of rounding into the weights)."""
    x, _, model = setup
    x = x[:3]
    loss_fn = loss_for(name, "torch", model.likelihood)
    batched = gaussian.gradient_draws(model, x, 8, loss_fn, 5, lambda r: noise(4, 8, r, (3, 20), "cpu"))
    for r in range(5):
        grads = gradient_step(model, x, noise(4, 8, r, (3, 20), "cpu"), loss_fn)
        assert torch.allclose(batched[r], torch.cat([g.reshape(-1) for g in grads]), rtol=1e-4, atol=1e-4)


def test_the_slopes_have_the_papers_signs_on_small_k(setup, tmp_path):
    """k = 1..64, 1000 draws: the IWAE's encoder SNR falls (its signal read from DReG's paired
    mean, and the debiased RMS), the decoder's and DReG's encoder SNR rise; STL reads biased,
    DReG unbiased (Tucker et al.)."""
    _, _, model = setup
    x = gaussian.make_data(seed=3)[0][:1]
    settings = Settings(k=(1, 4, 16, 64), estimators=("iwae", "stl", "dreg"), draws=1000, resamples=20)
    run_snr(tmp_path, model, x, settings, CPU, "g", log=lambda *_: None)
    frame = pd.read_csv(tmp_path / "snr.csv")
    rows = frame.set_index(["estimator", "group"]).sort_values("k")

    def slope(estimator, group, column):
        part = rows.loc[(estimator, group)]
        return fit_slope(part["k"], part[column])[0]

    assert slope("dreg", "encoder", "reference_snr") < -0.3      # the IWAE's, signal from DReG
    assert slope("iwae", "encoder", "snr_rms") < -0.2
    assert slope("iwae", "decoder", "snr_mean") > 0.3
    assert slope("dreg", "encoder", "snr_mean") > 0.1
    big = frame[(frame["k"] >= 16) & (frame["group"] == "encoder")].set_index(["estimator", "k"])
    assert (big.loc["stl", "bias_verdict"] == "biased").all()
    assert (big.loc["dreg", "bias_verdict"] == "unbiased").all()
    assert (frame.loc[frame["group"] == "decoder", "bias_verdict"] == "identical").all()


# --------------------------------------------------------------------------- the bias column


def test_a_known_bias_is_reported_with_its_size_and_t():
    """Paired draws: the estimator = reference + independent noise + a known bias on the first
    20 of 1000 parameters; the column recovers the bias and calls the group biased; without
    the bias, unbiased; the same draws, identical."""
    g = torch.Generator().manual_seed(0)
    m, params, bias = 400, 1000, 0.3
    reference = 2.0 + torch.randn(m, params, generator=g)
    estimator = reference + torch.randn(m, params, generator=g)
    estimator[:, :20] += bias
    stats = bias_statistics(estimator, reference)
    stderr = 1 / math.sqrt(m)
    assert (stats["mean"][:20] - bias).abs().max() < 4.5 * stderr
    assert (stats["t"][:20] > 3).all()   # 0.3 / 0.05 = 6 standard errors
    summary = bias_summary(stats, [slice(0, params)])
    assert summary["bias_verdict"] == "biased"
    assert summary["bias_t3_share"] >= 0.02 and summary["bias_chance_share"] == pytest.approx(0.0027, abs=1e-4)
    assert summary["bias_relative"] == pytest.approx(summary["bias_abs_mean"] / 2.0, rel=0.01)
    clean = bias_summary(bias_statistics(estimator[:, 20:], reference[:, 20:]), [slice(0, params - 20)])
    assert clean["bias_verdict"] == "unbiased" and clean["bias_t3_share"] < 0.01
    same = bias_summary(bias_statistics(reference, reference), [slice(0, params)])
    assert same["bias_verdict"] == "identical" and same["bias_abs_mean"] == 0
    # a constant nonzero difference is a bias with no noise: t infinite
    whole = torch.randint(-5, 5, (m, params), generator=g).double()  # + 0.5 exactly
    shifted = bias_statistics(whole + 0.5, whole)
    assert torch.isinf(shifted["t"]).all()


def test_a_run_reports_a_deliberately_biased_estimator(setup, tmp_path, monkeypatch):
    """End to end: DReG's draws shifted by 0.25 on every encoder parameter (a known bias)
    appear in snr.csv as a mean |bias| of 0.25 and the verdict biased."""
    import iwae_bench.experiments.snr as snr_module

    _, _, model = setup
    x = gaussian.make_data(seed=3)[0][:1]
    original = snr_module.gradient_draws
    encoder = model.encoder.weight.numel() + model.encoder.bias.numel()

    def shifted(model_, x_, k, name, *args, **kwargs):
        draws = original(model_, x_, k, name, *args, **kwargs)
        if name == "dreg":
            draws[:, :encoder] += 0.25
        return draws

    monkeypatch.setattr(snr_module, "gradient_draws", shifted)
    run_snr(tmp_path, model, x, Settings(k=(8,), estimators=("iwae", "dreg"), draws=1000, resamples=20),
            CPU, "g", log=lambda *_: None)
    row = pd.read_csv(tmp_path / "snr.csv").set_index(["estimator", "group"]).loc[("dreg", "encoder")]
    assert row["bias_reference"] == "iwae" and row["bias_verdict"] == "biased"
    assert row["bias_abs_mean"] == pytest.approx(0.25, abs=0.03)


# --------------------------------------------------------------------------- entries and the command


def test_entries_parse_to_objective_and_estimator():
    assert entry("stl") == ("iwae", "stl")
    assert entry("vr:0.5") == ("vr:0.5", "iwae") and entry("vr:0.5/dreg") == ("vr:0.5", "dreg")
    assert entry("rws") == ("rws", "wake") and entry("rws/dreg") == ("rws", "dreg")
    assert reference_of("dreg") == "iwae" and reference_of("vr:0.5/dreg") == "vr:0.5"
    assert reference_of("rws/dreg") == "rws" and reference_of("miwae:8x8") == "miwae:8x8"
    assert fits("miwae:8x8", 64) and not fits("miwae:8x8", 32) and fits("vr:0.5", 3)
    keys = expected_keys({"k": [16, 64], "estimators": ["iwae", "miwae:8x8"]})
    assert ("64", "miwae:8x8", "encoder") in keys and ("16", "miwae:8x8", "encoder") not in keys
    with pytest.raises(ValueError, match="entry 'vr:0.5/wake'"):
        entry("vr:0.5/wake")


def _run(argv):
    args = build_parser().parse_args(["snr", *argv])
    return args.handler(args, args.parser)


@pytest.mark.parametrize("argv, message", [
    (["--model", "gaussian", "--checkpoint", "m.pt", "--k", "1", "--draws", "2"],
     "--checkpoint, --latent and --hidden are the MNIST model's"),
    (["--model", "gaussian", "--batch", "2000", "--k", "1", "--draws", "2"],
     "--batch 2000: the Gaussian model's data has 1024 points"),
    (["--objectives", "miwae:8x8", "--k", "10"], "entry 'miwae:8x8' applies at none of k = 10"),
    (["--objectives", "vr:0.5/wake"], "argument --objectives: entry 'vr:0.5/wake': estimator 'wake'"),
    (["--objectives", "bogus"], "argument --objectives: entry 'bogus': objective 'bogus': objective must be one of"),
    (["--model", "linear"], "argument --model: invalid choice: 'linear'"),
], ids=["gaussian-checkpoint", "gaussian-batch", "split-k", "estimator", "objective", "model"])
def test_bad_flags_name_the_argument(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run(["--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_command_measures_the_family_on_the_gaussian_model(tmp_path):
    out = tmp_path / "out"
    assert _run(["--out", str(out), "--model", "gaussian", "--k", "4", "8", "--objectives", "miwae:2x4",
                 "rws/dreg", "--estimators", "iwae", "--draws", "50", "--resamples", "20"]) == 0
    frame = pd.read_csv(out / "snr.csv")
    assert set(zip(frame["k"], frame["estimator"])) == {(4, "iwae"), (8, "iwae"), (8, "miwae:2x4"),
                                                        (4, "rws/dreg"), (8, "rws/dreg")}
    assert frame["model"].str.startswith("LinearGaussian(D=20").all() and (frame["batch"] == 1).all()
    report = (out / "report.md").read_text()
    assert "the first 1 of the model's data points" in report and "## Bias against" in report
    side = report.split("## The family side by side", 1)[1]
    assert "| 8 | miwae:2x4 |" in side and "| 4 | rws/dreg |" in side


def test_a_csv_from_before_the_new_columns_renders_without_their_sections(tmp_path):
    """An snr.csv of the earlier columns (the committed MNIST runs) still renders."""
    import shutil

    from iwae_bench.experiments.snr_report import render_snr

    _run(["--out", str(tmp_path / "new"), "--model", "gaussian", "--k", "2", "4", "--estimators", "iwae",
          "dreg", "--draws", "20", "--resamples", "20"])
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    frame = pd.read_csv(old / "snr.csv")
    frame.drop(columns=[c for c in frame if c.startswith(("bias_", "snr_rms", "reference_snr"))]).to_csv(
        old / "snr.csv", index=False)
    report = render_snr(old).read_text()
    assert "## Fitted log-log slopes" in report and "## Every measurement" in report
    for section in ("## Bias against", "## Slopes of the debiased", "## The reference's encoder SNR"):
        assert section in (tmp_path / "new" / "report.md").read_text() and section not in report
