"""Gradient signal-to-noise ratio per estimator and k: ``python -m iwae_bench snr``.

Rainforth et al. (2018, "Tighter Variational Bounds are Not Necessarily Better") showed that as
k grows the IWAE gradient's SNR rises like sqrt(k) for the decoder and falls like 1/sqrt(k) for
the encoder; STL (Roeder et al. 2017) and DReG (Tucker et al. 2019) are the answers. This
measures it on a fixed minibatch of binarized MNIST test images:

    for each k and estimator, M gradient draws g_1..g_M (each a full gradient of the batch loss
    with respect to every parameter, each with fresh noise eps; draw m uses the same eps for
    every estimator: paired)
    SNR of one scalar parameter = |mean_m g_m| / std_m g_m   (ddof = 1)
    per group (encoder, decoder): the mean and the median of the SNR over the group's scalars,
    the mean with a bootstrap interval over resampled draws (``basic_interval``)

The noise measured is the reparameterization noise alone (the minibatch is fixed). The time per
step is one full step (model forward, loss, backward): on CUDA timed by the suite's
``harness.timing.time_call``, on CPU the median of the draws' own steps (``step_timing``).

Output (``run_snr``): snr.csv (one row per k, estimator and group, rewritten whole after each
(k, estimator) so an interrupted run keeps what it finished, and ``--resume`` measures only
the rest), machine.json, and the plot and report.md rendered from the CSV alone
(``snr_report.render_snr``).

Memory: one (k, estimator) at a time, its draws [M, parameters] in float32 (M = 200 and the
784-200-200-50 model: 340 MB); the statistics and the bootstrap run over chunks of parameters
(``CHUNK``), so nothing else grows with the model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import write_csv
from ..harness.machine import MachineRecord
from ..harness.shard import Shard
from ..harness.timing import Timing, time_call
from ..training import BernoulliVAE, IWAELoss
from ..training.model import load_checkpoint, save_checkpoint  # noqa: F401  (re-exported)
from .snr_report import render_snr

# name -> (objective, gradient estimator) of IWAELoss
ESTIMATORS = {
    "multi_sample_elbo": ("multi_sample_elbo", "iwae"),
    "iwae": ("iwae", "iwae"),
    "stl": ("iwae", "stl"),
    "dreg": ("iwae", "dreg"),
}
K_VALUES = (1, 3, 10, 30, 100, 300, 1000)
# The default run's work (torch backend, 784-200-200-50, batch 16): 590 s of CPU time on one
# thread of an AMD EPYC (measured), so about 6 minutes on 2 idle cores; 3/4 of it is k = 1000.
DRAWS = 200
BATCH = 16
RESAMPLES = 200
MIN_RESAMPLES = 20   # fewer and the 2.5/97.5 percentiles are the extreme resamples themselves
CHUNK = 1 << 15      # parameters per chunk of the SNR and bootstrap computations
COLUMNS = ["k", "estimator", "objective", "grad_estimator", "group", "params", "zero_variance",
           "draws", "resamples", "snr_mean", "snr_mean_low", "snr_mean_high", "snr_mean_boot_shift",
           "log_snr_mean_sd",
           "snr_median", "seconds_per_step", "seconds_p20",
           "seconds_p80", "timer", "backend", "interpreted", "device", "batch", "seed", "model"]


# --------------------------------------------------------------------------- checkpoints
# The checkpoint format lives with the model (``training.model``): {"state_dict" (on CPU),
# "data_dim", "latent", "hidden"} by ``torch.save``, written atomically; the MNIST experiment
# saves its trained models with ``save_checkpoint`` and ``--checkpoint`` loads one here.


def describe_model(model: BernoulliVAE) -> str:
    return (f"BernoulliVAE({model.encoder[0].in_features}, {model.decoder[0].in_features}, "
            f"{model.encoder[0].out_features})")


# --------------------------------------------------------------------------- the statistics


def parameter_groups(model: torch.nn.Module) -> dict[str, list[slice]]:
    """Slices of the flat gradient (parameters in ``named_parameters`` order) per group, the
    group being the first component of the name: {"encoder": [...], "decoder": [...]}."""
    groups: dict[str, list[slice]] = {}
    start = 0
    for name, parameter in model.named_parameters():
        stop = start + parameter.numel()
        groups.setdefault(name.split(".")[0], []).append(slice(start, stop))
        start = stop
    return groups


def _chunks(slices: list[slice], size: int = CHUNK):
    for part in slices:
        for start in range(part.start, part.stop, size):
            yield slice(start, min(start + size, part.stop))


def _varies(block: torch.Tensor) -> torch.Tensor:
    """Which columns take more than one value over the draws: exact, unlike a computed std
    (the mean of identical values can round, leaving a std of 1e-16 and an SNR of 1e16)."""
    return block.amax(0) != block.amin(0)


def parameter_snr(draws: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """|mean| / std (ddof = 1) over the draws (dim 0) of each column, float64 [P] on the CPU;
    NaN where the column never varies (no defined SNR)."""
    if draws.shape[0] < 2:
        raise ValueError(f"the SNR needs at least 2 draws, got {draws.shape[0]}")
    out = torch.empty(draws.shape[1], dtype=torch.float64)
    for part in _chunks([slice(0, draws.shape[1])], chunk):
        block = draws[:, part]
        varies = _varies(block)
        std, mean = torch.std_mean(block.double(), dim=0, correction=1)
        ratio = mean.abs() / std
        out[part] = torch.where(varies, ratio, torch.full_like(ratio, float("nan"))).cpu()
    return out


def group_summary(snr: torch.Tensor, slices: list[slice]) -> dict:
    """Mean and median of the SNR over a group's scalars (NaN entries, zero variance, left out)."""
    values = torch.cat([snr[part] for part in slices]).numpy()
    defined = values[~np.isnan(values)]
    return {"params": int(values.size), "zero_variance": int(values.size - defined.size),
            "snr_mean": float(defined.mean()) if defined.size else float("nan"),
            "snr_median": float(np.median(defined)) if defined.size else float("nan")}


def bootstrap_counts(draws: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """[resamples, draws] float32: how often each draw appears in each resample (drawn with
    replacement, ``draws`` per resample)."""
    index = torch.randint(draws, (resamples, draws), generator=generator)
    return torch.zeros(resamples, draws).scatter_add_(1, index, torch.ones(resamples, draws))


def bootstrap_group_snr(draws: torch.Tensor, slices: list[slice], counts: torch.Tensor,
                        chunk: int = CHUNK) -> np.ndarray:
    """The group-mean SNR of each bootstrap resample, float64 [resamples].

    A resample's per-parameter mean and variance come from count-weighted sums of the draws
    (one matmul per chunk of parameters, no resample materialized), each column centered
    first on a value c near its mean so that float32 sums lose nothing to cancellation; any c
    gives the same result in exact arithmetic:
        S1 = counts @ (g - c),  S2 = counts @ (g - c)^2,
        mean* = c + S1 / M,     var* = (S2 - S1^2 / M) / (M - 1).
    A column that never varies is left out (as in ``parameter_snr``), as is, in one resample,
    a column whose resampled draws are all equal (possible only for tiny M).
    """
    m = draws.shape[0]
    counts = counts.to(device=draws.device, dtype=torch.float32)
    total = torch.zeros(counts.shape[0], dtype=torch.float64, device=draws.device)
    defined = torch.zeros(counts.shape[0], dtype=torch.float64, device=draws.device)
    for part in _chunks(slices, chunk):
        block = draws[:, part]
        block = block[:, _varies(block)].float()
        if block.shape[1] == 0:
            continue
        center = block.mean(0)
        centered = block - center
        s1 = counts @ centered
        var = (counts @ centered.square()).addcmul_(s1, s1, value=-1 / m).div_(m - 1)
        ratio = s1.div_(m).add_(center).abs_().div_(var.sqrt_())  # inf where var = 0
        summed = ratio.sum(1, dtype=torch.float64)
        if torch.isfinite(summed).all():
            total += summed
            defined += ratio.shape[1]
        else:
            finite = torch.isfinite(ratio)
            total += torch.where(finite, ratio, 0.0).sum(1, dtype=torch.float64)
            defined += finite.sum(1, dtype=torch.float64)
    return (total / defined).cpu().numpy()


def basic_interval(estimate: float, resampled: np.ndarray, level: float = 0.95,
                   floor: float = 0.0) -> tuple[float, float]:
    """The basic (reverse percentile) bootstrap interval: (2 estimate - q_high, 2 estimate - q_low)
    with q the 2.5 and 97.5 percentiles of the resampled values, cut at ``floor`` (an SNR is
    never negative).

    Not the plain percentile interval (q_low, q_high): the SNR of a parameter with little signal
    is biased upward (|mean| carries the noise), and a resample's |mean| carries it twice, so the
    resampled group means sit above the estimate, often all of them, and the percentile
    interval would exclude the estimate itself. The basic interval reflects that shift back:
    it corrects the bias the bootstrap sees, to first order (for a parameter with no signal at
    all the bootstrap sees about 0.41 of it)."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(resampled, [tail, 100 - tail])
    return max(floor, float(2 * estimate - high)), max(floor, float(2 * estimate - low))


# --------------------------------------------------------------------------- the draws


def noise(seed: int, k: int, draw: int, shape: tuple[int, int], device) -> torch.Tensor:
    """eps [B, k, d] of one draw: a function of (seed, k, draw) only, so every estimator gets
    the same eps for a given draw (paired) and different k get independent draws."""
    state = int(np.random.SeedSequence([seed, k, draw]).generate_state(1)[0])
    generator = torch.Generator(device=device).manual_seed(state)
    return torch.randn(shape[0], k, shape[1], generator=generator, device=device)


def loss_for(name: str, backend: str) -> IWAELoss:
    objective, estimator = ESTIMATORS[name]
    return IWAELoss(objective, backend, estimator=estimator)


def gradient_step(model, x: torch.Tensor, eps: torch.Tensor, loss_fn: IWAELoss) -> tuple:
    """One full step without the update: encode, reparameterize with eps, decode, loss, and
    the gradient of the loss with respect to every parameter."""
    mu, logvar = model.encode(x)
    z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
    loss = loss_fn(x, model.decoder(z), z, mu, logvar)
    return torch.autograd.grad(loss, list(model.parameters()))


def gradient_draws(model, x: torch.Tensor, k: int, name: str, draws: int, backend: str,
                   seed: int = 0, step_seconds: list | None = None) -> torch.Tensor:
    """[draws, parameters] float32 (on x's device): the flat gradient of each draw. With
    ``step_seconds`` (CPU), each step's perf_counter time is appended to it (the noise drawn
    before, the gradient's copy after, both outside the timed span)."""
    loss_fn = loss_for(name, backend)
    params = list(model.parameters())
    out = torch.empty(draws, sum(p.numel() for p in params), device=x.device)
    latent = model.decoder[0].in_features
    for draw in range(draws):
        eps = noise(seed, k, draw, (x.shape[0], latent), x.device)
        started = time.perf_counter()
        grads = gradient_step(model, x, eps, loss_fn)
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - started)
        torch.cat([g.reshape(-1) for g in grads], out=out[draw])
    return out


def step_timing(model, x: torch.Tensor, k: int, name: str, settings: "Settings", device: torch.device,
                step_seconds: list) -> tuple[Timing, str]:
    """The time of one step, and how it was taken. CUDA: the suite's ``time_call``
    (``triton.testing.do_bench``) on the first draw's noise. CPU: the median and p20/p80 of the
    draws' own steps, which span the whole measurement, so a burst of load from another process
    moves a few samples and not the median (``time_call``'s fraction of a second of repeats
    would be all burst); and they cost nothing extra."""
    if device.type == "cuda":
        loss_fn = loss_for(name, settings.backend)
        eps = noise(settings.seed, k, 0, (x.shape[0], model.decoder[0].in_features), device)
        return time_call(lambda: gradient_step(model, x, eps, loss_fn), device), "time_call"
    return Timing.from_samples([t * 1e3 for t in step_seconds]), "draws"


# --------------------------------------------------------------------------- the run


@dataclass
class Settings:
    k: tuple[int, ...] = K_VALUES
    estimators: tuple[str, ...] = tuple(ESTIMATORS)
    draws: int = DRAWS
    resamples: int = RESAMPLES
    backend: str = "torch"
    seed: int = 0


def expected_keys(settings: dict, groups=("encoder", "decoder")) -> set:
    """The (k, estimator, group) keys of snr.csv, as strings, that a run with these settings (a
    machine.json run entry's "settings") writes: what a merge of shards checks it has."""
    return {(str(k), name, group) for k in settings["k"] for name in settings["estimators"]
            for group in groups}


def measure(model, x: torch.Tensor, k: int, name: str, settings: Settings, device: torch.device,
            model_label: str) -> list[dict]:
    """The rows of one (k, estimator): one per parameter group."""
    step_seconds: list[float] = []
    draws = gradient_draws(model, x, k, name, settings.draws, settings.backend, settings.seed,
                           step_seconds)
    snr = parameter_snr(draws)
    # the same resamples for every estimator at this k (paired), independent across k
    counts = bootstrap_counts(settings.draws, settings.resamples,
                              torch.Generator().manual_seed(settings.seed * 1_000_003 + k))
    groups = parameter_groups(model)
    summaries = {}
    for group, slices in groups.items():
        summaries[group] = (group_summary(snr, slices), bootstrap_group_snr(draws, slices, counts))
    del draws

    timing, timer = step_timing(model, x, k, name, settings, device, step_seconds)

    from kernels import interpreted

    objective, estimator = ESTIMATORS[name]
    rows = []
    for group, (summary, boot_mean) in summaries.items():
        low, high = basic_interval(summary["snr_mean"], boot_mean)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sd = float(np.nanstd(np.log(boot_mean), ddof=1))
        rows.append({"k": k, "estimator": name, "objective": objective, "grad_estimator": estimator,
                     "group": group, "params": summary["params"],
                     "zero_variance": summary["zero_variance"], "draws": settings.draws,
                     "resamples": settings.resamples, "snr_mean": summary["snr_mean"],
                     "snr_mean_low": low, "snr_mean_high": high,
                     "snr_mean_boot_shift": float(np.nanmean(boot_mean)) - summary["snr_mean"],
                     "log_snr_mean_sd": log_sd,
                     "snr_median": summary["snr_median"], "seconds_per_step": timing.median_ms / 1e3,
                     "seconds_p20": timing.p20_ms / 1e3, "seconds_p80": timing.p80_ms / 1e3,
                     "timer": timer, "backend": settings.backend,
                     "interpreted": settings.backend == "fused" and interpreted(),
                     "device": device.type, "batch": x.shape[0], "seed": settings.seed,
                     "model": model_label})
    return rows


# the columns of snr.csv that must agree for its rows to belong to one run (resume refuses
# to mix them): everything but the measurement itself
RUN_SETTINGS = ("draws", "resamples", "backend", "device", "batch", "seed", "model")


def read_rows(path: Path) -> list[dict]:
    """The rows of an snr.csv (strings, as written), or [] where there is none."""
    import csv

    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def resumable_rows(path: Path, wanted: dict, groups: int = 2) -> tuple[list[dict], set]:
    """The rows of an earlier run to keep and the (k, estimator) cells they finish (every
    group written). ValueError naming each setting where the CSV differs from ``wanted``
    (the values of ``RUN_SETTINGS`` this run writes)."""
    rows = read_rows(path)
    clashes = []
    for name in RUN_SETTINGS:
        earlier = sorted({r.get(name, "") for r in rows})
        if earlier and earlier != [str(wanted[name])]:
            clashes.append(f"{name} {', '.join(earlier)} there, {wanted[name]} now")
    if clashes:
        raise ValueError(f"--resume would mix settings in {path}: " + "; ".join(clashes)
                         + ". Run without --resume (it starts the CSV afresh) or into another --out.")
    cells: dict[tuple, int] = {}
    for r in rows:
        cells[(int(r["k"]), r["estimator"])] = cells.get((int(r["k"]), r["estimator"]), 0) + 1
    finished = {cell for cell, count in cells.items() if count >= groups}
    return [r for r in rows if (int(r["k"]), r["estimator"]) in finished], finished


def run_snr(out: Path, model, x: torch.Tensor, settings: Settings, device: torch.device,
            model_label: str | None = None, command: str | None = None, log=print,
            shard: Shard | None = None, resume: bool = False) -> Path:
    """Every (k, estimator) of ``settings`` on ``model`` and the minibatch ``x``; writes
    snr.csv (after each (k, estimator)), machine.json, plots/ and report.md into ``out``.
    ``shard``: only its part of the k values (all estimators of a k stay together: their
    draws are paired). ``resume``: keep the (k, estimator) cells an earlier run of the same
    settings finished in ``out`` and measure only the others."""
    for name in settings.estimators:
        if name not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}")
    if settings.draws < 2:
        raise ValueError(f"the SNR needs at least 2 draws, got {settings.draws}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(device)
    x = x.to(device)
    model_label = model_label or describe_model(model)
    rows, finished = [], set()
    if resume:
        wanted = {"draws": settings.draws, "resamples": settings.resamples, "backend": settings.backend,
                  "device": device.type, "batch": x.shape[0], "seed": settings.seed, "model": model_label}
        rows, finished = resumable_rows(out / "snr.csv", wanted, len(parameter_groups(model)))
    record = MachineRecord.open(out / "machine.json", device, resume=resume)
    run = record.start_run(command, settings={**asdict(settings), "k": list(settings.k),
                                              "estimators": list(settings.estimators),
                                              "batch": x.shape[0], "model": model_label},
                           timing="one step (forward, loss, backward): CPU, perf_counter over the "
                                  "draws; CUDA, harness.timing.time_call",
                           shard=shard.as_dict() if shard is not None else None)
    for k in shard.take(settings.k) if shard is not None else settings.k:
        for name in settings.estimators:
            if (k, name) in finished:
                continue
            started = time.perf_counter()
            new = measure(model, x, k, name, settings, device, model_label)
            rows += new
            write_csv(out / "snr.csv", rows, COLUMNS)
            by = {row["group"]: row for row in new}
            log(f"  k={k:<5} {name:<17} " + ", ".join(
                f"{g} SNR {r['snr_mean']:.3g} [{r['snr_mean_low']:.3g}, {r['snr_mean_high']:.3g}]"
                for g, r in by.items())
                + f"; {new[0]['seconds_per_step'] * 1e3:.1f} ms/step ({time.perf_counter() - started:.0f} s)")
    record.finish(run)
    return render_snr(out)
