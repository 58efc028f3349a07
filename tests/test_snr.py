"""The gradient SNR benchmark: the statistics against known values, the slope fit on exact power
laws, a tiny end-to-end run whose report matches its CSV, checkpoints, and the command's flags."""

import copy
import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from iwae_bench.cli import build_parser
from iwae_bench.experiments.snr import (COLUMNS, ESTIMATORS, Settings, basic_interval,
                                        bootstrap_counts, bootstrap_group_snr, expected_keys,
                                        gradient_step,
                                        group_summary, load_checkpoint, noise, parameter_groups,
                                        parameter_snr, run_snr, save_checkpoint)
from iwae_bench.experiments.snr_report import LABELS, fit_slope, noise_floor, render_snr
from iwae_bench.training import BernoulliVAE, IWAELoss

D, LATENT, HIDDEN = 12, 2, 8


def _model(seed=0, data_dim=D, latent=LATENT, hidden=HIDDEN):
    torch.manual_seed(seed)
    return BernoulliVAE(data_dim, latent, hidden)


def _data(batch=3, seed=1, data_dim=D):
    return (torch.rand(batch, data_dim, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def _synthetic(mu, sigma, draws, seed=0):
    """draws [M, P] = mu + sigma * N(0, 1): parameter p has SNR |mu_p| / sigma_p."""
    g = torch.Generator().manual_seed(seed)
    return (mu + sigma * torch.randn(draws, mu.numel(), generator=g, dtype=torch.float64)).float()


# --------------------------------------------------------------------------- the statistics


def test_snr_by_hand_uses_the_absolute_mean_and_ddof_1():
    draws = torch.tensor([[1.0, -1.0, 2.0, 5.0],
                          [3.0, -3.0, -2.0, 5.0]])
    # column 0: mean 2, std (ddof 1) sqrt(2); column 1 the same negated; column 2: mean 0;
    # column 3: never varies, no SNR
    snr = parameter_snr(draws)
    assert snr[0].item() == pytest.approx(math.sqrt(2), rel=1e-12)
    assert snr[1].item() == pytest.approx(math.sqrt(2), rel=1e-12)
    assert snr[2].item() == 0
    assert math.isnan(snr[3].item())
    with pytest.raises(ValueError, match="at least 2 draws"):
        parameter_snr(draws[:1])


def test_snr_matches_known_ratios_within_the_sampling_error():
    m = 4000
    mu = torch.tensor([0.0, 0.0, 0.1, -0.3, 1.0, -2.0, 5.0, -20.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 3.0, 1.0, 1.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    true = (mu.abs() / sigma).numpy()
    snr = parameter_snr(_synthetic(mu, sigma, m), chunk=3).numpy()  # chunks not a divisor of P
    # the estimate's standard error is about sqrt((1 + snr^2 / 2) / M); a zero SNR reads
    # |N(0, 1 / M)|, at most a few / sqrt(M)
    se = np.sqrt((1 + true ** 2 / 2) / m)
    assert np.all(np.abs(snr - true) < 4 * se), (snr, true)


def test_noise_floor_is_what_parameters_without_signal_read():
    m = 200
    no_signal = _synthetic(torch.zeros(5000, dtype=torch.float64), torch.ones(5000, dtype=torch.float64), m)
    snr = parameter_snr(no_signal)
    assert snr.mean().item() == pytest.approx(noise_floor(m), rel=0.03)


def test_group_averages_by_hand():
    snr = torch.tensor([1.0, 2.0, 3.0, float("nan"), 10.0, 4.0], dtype=torch.float64)
    encoder = group_summary(snr, [slice(0, 2)], draws=4)
    # the debiased mean square: mean(SNR^2) - 1/M
    assert encoder == {"params": 2, "zero_variance": 0, "snr_mean": 1.5, "snr_median": 1.5,
                       "snr_square": pytest.approx(2.5 - 0.25)}
    # a group of two slices; NaN (zero variance) left out: {3, 10, 4}
    decoder = group_summary(snr, [slice(2, 5), slice(5, 6)], draws=4)
    assert decoder == {"params": 4, "zero_variance": 1, "snr_mean": pytest.approx(17 / 3),
                       "snr_median": 4.0, "snr_square": pytest.approx(125 / 3 - 0.25)}


def test_parameter_groups_are_the_encoder_and_decoder_parameters():
    model = _model()
    groups = parameter_groups(model)
    assert list(groups) == ["encoder", "decoder"]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    for name, network in (("encoder", model.encoder), ("decoder", model.decoder)):
        got = torch.cat([flat[part] for part in groups[name]])
        assert torch.equal(got, torch.cat([p.detach().flatten() for p in network.parameters()]))


def _explicit_bootstrap(draws, index):
    """Each resample built by indexing, its group-mean SNR by the definition."""
    means = []
    for row in index:
        sample = draws[row].double()
        std = sample.std(0, correction=1)
        means.append((sample.mean(0).abs()[std > 0] / std[std > 0]).mean().item())
    return np.array(means)


def test_bootstrap_equals_explicit_resampling():
    m, resamples = 7, 30
    mu = torch.tensor([0.5, -1.0, 0.0, 3.0, 100.0, 0.0], dtype=torch.float64)
    draws = _synthetic(mu, torch.ones(6, dtype=torch.float64), m, seed=2)
    draws[:, 5] = 0.0  # a column that never varies: no SNR, left out
    index = torch.randint(m, (resamples, m), generator=torch.Generator().manual_seed(3))
    counts = torch.zeros(resamples, m).scatter_add_(1, index, torch.ones(resamples, m))
    slices = [slice(0, 2), slice(3, 6)]  # a group of two slices; column 2 outside it
    got = bootstrap_group_snr(draws, slices, counts, chunk=2)
    want = _explicit_bootstrap(draws[:, [0, 1, 3, 4]], index)
    np.testing.assert_allclose(got, want, rtol=1e-5)

    made = bootstrap_counts(m, resamples, torch.Generator().manual_seed(0))
    assert made.shape == (resamples, m) and torch.all(made.sum(1) == m)
    assert torch.all(made == made.round()) and made.min() >= 0


def test_basic_interval_reflects_the_resamples_about_the_estimate():
    resampled = np.arange(1001) / 1000 + 2.0  # percentiles 2.5 and 97.5: 2.025 and 2.975
    low, high = basic_interval(2.1, resampled)
    assert (low, high) == (pytest.approx(2 * 2.1 - 2.975), pytest.approx(2 * 2.1 - 2.025))
    assert basic_interval(1.1, resampled) == (0.0, pytest.approx(2 * 1.1 - 2.025))  # SNR >= 0


def test_bootstrap_interval_covers_the_true_group_mean():
    """Over 60 seeded replicates of 100 parameters with known SNRs (0.5 to 3), the 95% interval
    holds the true group mean in at least 80% of them (measured: about 90%; the plain
    percentile interval: about 45%)."""
    m, params, replicates = 100, 100, 60
    covered = 0
    for seed in range(replicates):
        g = torch.Generator().manual_seed(100 + seed)
        sigma = 0.5 + torch.rand(params, generator=g, dtype=torch.float64)
        mu = sigma * (0.5 + 2.5 * torch.rand(params, generator=g, dtype=torch.float64))
        mu[::2] *= -1
        true = float((mu.abs() / sigma).mean())
        draws = _synthetic(mu, sigma, m, seed=seed)
        estimate = group_summary(parameter_snr(draws), [slice(0, params)], m)["snr_mean"]
        resampled = bootstrap_group_snr(draws, [slice(0, params)],
                                        bootstrap_counts(m, 200, torch.Generator().manual_seed(seed)))
        low, high = basic_interval(estimate, resampled)
        assert low < estimate < high and high - low < 0.2 * true
        covered += low < true < high
    assert covered >= 0.8 * replicates, f"covered {covered} of {replicates}"


def test_resampled_means_sit_above_the_estimate_where_signal_is_weak():
    """Why the interval is the basic one: with half the parameters at no signal, (nearly) every
    resample's group mean exceeds the estimate, which itself exceeds the truth; the percentile
    interval would exclude the estimate, the basic one lies below it, toward the truth."""
    m, params = 200, 4000
    mu = torch.zeros(params, dtype=torch.float64)
    mu[: params // 2] = 1.0
    draws = _synthetic(mu, torch.ones(params, dtype=torch.float64), m, seed=4)
    true = 0.5
    estimate = group_summary(parameter_snr(draws), [slice(0, params)], m)["snr_mean"]
    resampled = bootstrap_group_snr(draws, [slice(0, params)],
                                    bootstrap_counts(m, 200, torch.Generator().manual_seed(4)))
    assert true < estimate < np.percentile(resampled, 2.5)
    low, high = basic_interval(estimate, resampled)
    assert low < high < estimate
    # the floor: half the parameters read about sqrt(2 / (pi M)) instead of 0
    assert estimate - true == pytest.approx(0.5 * noise_floor(m), rel=0.15)


# --------------------------------------------------------------------------- the slope fit


@pytest.mark.parametrize("exponent", [-0.5, 0.5, 0.37, 0.0])
def test_slope_of_an_exact_power_law_is_its_exponent(exponent):
    k = np.array([1, 3, 10, 30, 100, 300, 1000])
    slope, se = fit_slope(k, 0.7 * k ** exponent)
    assert slope == pytest.approx(exponent, abs=1e-12)
    assert math.isnan(se)


def test_slope_standard_error_by_hand():
    # two points: slope = (y2 - y1) / (x2 - x1), variance (s1^2 + s2^2) / (x2 - x1)^2
    slope, se = fit_slope([2, 50], [3.0, 0.5], [0.1, 0.2])
    dx = math.log(50) - math.log(2)
    assert slope == pytest.approx((math.log(0.5) - math.log(3.0)) / dx)
    assert se == pytest.approx(math.sqrt(0.1 ** 2 + 0.2 ** 2) / dx)
    # equal sds s over n points: s / sqrt(sum (x - mean x)^2)
    k = np.array([1, 10, 100, 1000])
    x = np.log(k)
    _, se = fit_slope(k, k ** 0.5, np.full(4, 0.05))
    assert se == pytest.approx(0.05 / math.sqrt(((x - x.mean()) ** 2).sum()))
    assert math.isnan(fit_slope([10], [1.0])[0])


# --------------------------------------------------------------------------- a tiny run


def _table(report: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``heading``, header and rule left out."""
    lines = report.split(heading, 1)[1].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table[2:]


def _interval(cell: str) -> tuple[float, float]:
    low, high = re.fullmatch(r"\[(\S+), (\S+)\]", cell).groups()
    return float(low), float(high)


def _hand_group_means(model, x, k, name, draws, seed):
    """The encoder's and the decoder's mean SNR computed from the definition, independently
    of the module's draw loop and groups."""
    objective, estimator = ESTIMATORS[name]
    loss_fn = IWAELoss(objective, "torch", estimator=estimator)
    grads = {"encoder": [], "decoder": []}
    for draw in range(draws):
        model_copy = copy.deepcopy(model)
        eps = noise(seed, k, draw, (x.shape[0], LATENT), "cpu")
        mu, logvar = model_copy.encode(x)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        loss_fn(x, model_copy.decoder(z), z, mu, logvar).backward()
        for group, network in (("encoder", model_copy.encoder), ("decoder", model_copy.decoder)):
            grads[group].append(torch.cat([p.grad.flatten() for p in network.parameters()]).double())
    out = {}
    for group, rows in grads.items():
        g = torch.stack(rows)
        std = g.std(0, correction=1)
        out[group] = (g.mean(0).abs()[std > 0] / std[std > 0]).mean().item()
    return out


def test_tiny_run_writes_csv_plot_and_a_report_that_matches_the_csv(tmp_path):
    model, x = _model(), _data()
    settings = Settings(k=(1, 4, 16), estimators=("multi_sample_elbo", "iwae", "stl", "dreg"),
                        draws=30, resamples=20, seed=5)
    report = run_snr(tmp_path, model, x, settings, torch.device("cpu"), command="snr-test",
                     log=lambda *_: None)
    frame = pd.read_csv(tmp_path / "snr.csv")
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 3 * 4 * 2
    assert set(zip(frame["k"], frame["estimator"], frame["group"])) == {
        (k, e, g) for k in (1, 4, 16) for e in settings.estimators for g in ("encoder", "decoder")}
    assert (frame["draws"] == 30).all() and (frame["timer"] == "draws").all()
    assert ((0 < frame["seconds_p20"]) & (frame["seconds_p20"] <= frame["seconds_per_step"])
            & (frame["seconds_per_step"] <= frame["seconds_p80"])).all()
    assert (frame["snr_mean_low"] <= frame["snr_mean_high"]).all()
    # each group's resamples are of its own parameters: they sit near its estimate (within
    # the floor's reach where the signal is weak)
    near = frame["snr_mean_boot_shift"].abs() < 0.3 * frame["snr_mean"] + 2 * noise_floor(30)
    assert near.all(), frame[~near]
    assert (tmp_path / "plots" / "snr.png").stat().st_size > 10_000
    run = json.loads((tmp_path / "machine.json").read_text())["runs"][0]
    assert run["command"] == "snr-test" and run["settings"]["draws"] == 30
    # what a merge of shards expects is what the run wrote
    assert expected_keys(run["settings"]) == {(str(k), e, g) for k, e, g in
                                              zip(frame["k"], frame["estimator"], frame["group"])}

    by = frame.set_index(["k", "estimator", "group"])
    # paired draws: at k = 1 the IWAE is the ELBO and DReG is STL; STL and DReG leave the
    # decoder's gradient as the IWAE's at every k
    def snr(k, name, group):
        return by.loc[(k, name, group), "snr_mean"]

    for group in ("encoder", "decoder"):
        assert snr(1, "iwae", group) == pytest.approx(snr(1, "multi_sample_elbo", group), rel=1e-5)
        assert snr(1, "stl", group) == pytest.approx(snr(1, "dreg", group), rel=1e-5)
    for name in ("stl", "dreg"):
        assert snr(4, name, "decoder") == pytest.approx(snr(4, "iwae", "decoder"), rel=1e-5)
    assert snr(4, "dreg", "encoder") != pytest.approx(snr(4, "iwae", "encoder"), rel=1e-3)
    # the numbers against the definition, each group from its own network's parameters
    for name in ("iwae", "dreg"):
        want = _hand_group_means(model, x, 4, name, 30, seed=5)
        for group in ("encoder", "decoder"):
            assert by.loc[(4, name, group), "snr_mean"] == pytest.approx(want[group], rel=1e-4)

    # every number of the report is the CSV's
    text = report.read_text()
    measured = _table(text, "## Every measurement")
    assert len(measured) == len(frame)
    for cells in measured:
        row = by.loc[(int(cells[0]), cells[1], cells[2])]
        assert float(cells[3]) == pytest.approx(row["snr_mean"], rel=5e-3)
        assert _interval(cells[4]) == pytest.approx((row["snr_mean_low"], row["snr_mean_high"]), rel=5e-3)
        assert float(cells[5]) == pytest.approx(row["snr_mean_boot_shift"], rel=5e-3)
        assert float(cells[6]) == pytest.approx(row["snr_median"], rel=5e-3)
        assert float(cells[7]) == pytest.approx(row["seconds_per_step"] * 1e3, rel=5e-3)
    slopes = _table(text, "## Fitted log-log slopes")
    assert len(slopes) == 8
    labels = {label: name for name, label in LABELS.items()}
    for cells in slopes:
        part = frame[(frame["estimator"] == labels[cells[0]]) & (frame["group"] == cells[1])].sort_values("k")
        for cell, rows in ((cells[2], part), (cells[3], part[part["k"] >= 4])):
            slope, se = fit_slope(rows["k"], rows["snr_mean"], rows["log_snr_mean_sd"])
            got_slope, got_spread = (float(v) for v in cell.split(" ± "))
            assert got_slope == pytest.approx(slope, abs=6e-4)
            assert got_spread == pytest.approx(1.96 * se, abs=6e-4)
        assert float(cells[4]) == pytest.approx(fit_slope(part["k"], part["snr_median"])[0], abs=6e-4)
    assert "Made by `snr-test`" in text  # the command that made it is named

    # the report is a function of the files alone
    (tmp_path / "report.md").unlink()
    assert render_snr(tmp_path).read_text() == text


def test_an_interrupted_run_resumes_with_each_cell_once_and_refuses_other_settings(tmp_path, monkeypatch):
    import iwae_bench.experiments.snr as snr_module

    model, x = _model(), _data()
    settings = Settings(k=(1, 4), estimators=("iwae", "dreg"), draws=6, resamples=20, seed=2)
    whole = tmp_path / "whole"
    run_snr(whole, model, x, settings, torch.device("cpu"), log=lambda *_: None)
    want = pd.read_csv(whole / "snr.csv").set_index(["k", "estimator", "group"])

    # killed after k = 1 and halfway through a cell's rows: the half cell is measured again
    part = tmp_path / "part"
    part.mkdir()
    lines = (whole / "snr.csv").read_text().splitlines()
    (part / "snr.csv").write_text("\n".join(lines[:1 + 4 + 1]) + "\n")
    measured = []
    original = snr_module.measure
    monkeypatch.setattr(snr_module, "measure",
                        lambda m, x_, k, name, *a, **kw: measured.append((k, name)) or original(m, x_, k, name, *a, **kw))
    run_snr(part, model, x, settings, torch.device("cpu"), log=lambda *_: None, resume=True)
    assert measured == [(4, "iwae"), (4, "dreg")]
    got = pd.read_csv(part / "snr.csv").set_index(["k", "estimator", "group"])
    assert sorted(got.index) == sorted(want.index)  # every cell once
    assert got["snr_mean"].to_dict() == pytest.approx(want["snr_mean"].to_dict(), rel=1e-6)

    with pytest.raises(ValueError, match="draws 6 there, 7 now"):
        run_snr(part, model, x, Settings(k=(1, 4), estimators=("iwae",), draws=7, resamples=20, seed=2),
                torch.device("cpu"), log=lambda *_: None, resume=True)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_gives_identical_parameters_and_gradients(tmp_path):
    model = _model(seed=3)
    path = tmp_path / "model.pt"
    save_checkpoint(model, path)
    saved = torch.load(path, weights_only=True)
    assert (saved["data_dim"], saved["latent"], saved["hidden"]) == (D, LATENT, HIDDEN)
    loaded = load_checkpoint(path)
    for (name, a), (other, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == other and torch.equal(a, b)
    x, eps = _data(), noise(0, 5, 0, (3, LATENT), "cpu")
    loss_fn = IWAELoss("iwae", "torch", estimator="dreg")
    for a, b in zip(gradient_step(model, x, eps, loss_fn), gradient_step(loaded, x, eps, loss_fn)):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*partial*"))  # written atomically, nothing left behind

    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a torch.save file"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected a dict with keys"):
        load_checkpoint(tmp_path / "other.pt")


# --------------------------------------------------------------------------- the command


def _run(argv):
    args = build_parser().parse_args(["snr", *argv])
    return args.handler(args, args.parser)


@pytest.mark.parametrize("argv, message", [
    (["--draws", "1"], "--draws 1: the SNR's standard deviation needs at least 2 draws"),
    (["--draws", "0"], "argument --draws: must be an integer >= 1, got 0"),
    (["--resamples", "5"], "--resamples 5: the 95% interval's 2.5 and 97.5 percentiles need at least 20"),
    (["--batch", "2000"], "--batch 2000: the held-out test set has 1000 images"),
    (["--checkpoint", "missing.pt"], "checkpoint missing.pt: no such file"),
    (["--checkpoint", "missing.pt", "--latent", "3"], "--latent and --hidden size a fresh model"),
    (["--report-only"], "--report-only: no snr.csv in"),
    (["--estimators", "reinforce"], "argument --estimators: invalid choice: 'reinforce'"),
], ids=["draws-1", "draws-0", "resamples", "batch", "checkpoint", "checkpoint-latent", "report-only",
        "estimator"])
def test_bad_flags_give_one_clear_line_and_status_2(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run(["--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_command_runs_on_mnist_with_a_checkpoint_and_redraws_its_report(tmp_path, capsys):
    save_checkpoint(_model(seed=1, data_dim=784, latent=2, hidden=4), tmp_path / "m.pt")
    out = tmp_path / "out"
    common = ["--out", str(out), "--k", "2", "1", "2", "--estimators", "iwae", "dreg", "--draws", "3",
              "--resamples", "20", "--batch", "2"]
    assert _run(common + ["--checkpoint", str(tmp_path / "m.pt")]) == 0
    frame = pd.read_csv(out / "snr.csv")
    assert sorted(frame["k"].unique()) == [1, 2] and len(frame) == 8  # repeated k measured once
    assert (frame["batch"] == 2).all() and (frame["backend"] == "torch").all()
    assert frame["model"].str.contains("BernoulliVAE\\(784, 2, 4\\) from checkpoint").all()
    assert "wrote" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert _run(["--out", str(out), "--report-only"]) == 0
    assert (out / "report.md").read_text() == report
    assert "| slope, every k |" in report  # two k: a slope per estimator and network

    one = tmp_path / "one-k"  # the same run at k = 2 alone: no table of slopes that cannot be fitted
    one.mkdir()
    frame[frame["k"] == 2].to_csv(one / "snr.csv", index=False)
    shutil.copy(out / "machine.json", one / "machine.json")
    single = render_snr(one).read_text()
    assert "One k (2): no slope to fit." in single and "| slope, every k |" not in single
