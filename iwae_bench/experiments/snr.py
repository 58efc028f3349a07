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

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import write_csv
from ..harness.machine import MachineRecord
from ..harness.shard import Shard
from ..harness.timing import Timing, time_call
from ..training import IWAELoss
from ..training.family import Objective, check_estimator, default_estimator
from ..training.model import load_checkpoint, save_checkpoint  # noqa: F401  (re-exported)
from . import gaussian
from .snr_report import BIASED_COUNT, BIASED_FACTOR, render_snr

# name -> (objective, gradient estimator) of IWAELoss
ESTIMATORS = {
    "multi_sample_elbo": ("multi_sample_elbo", "iwae"),
    "iwae": ("iwae", "iwae"),
    "stl": ("iwae", "stl"),
    "dreg": ("iwae", "dreg"),
}
# the family at Rainforth et al.'s budget M K = 64 (their Figure: SNR per split), VR at a few
# alpha, CIWAE, RWS and RWS-DReG: ``snr --objectives`` spellings (``entry``)
BUDGET = 64
SPLITS = ((1, 64), (4, 16), (8, 8), (16, 4), (64, 1))
FAMILY = (tuple(f"{name}:{M}x{K}" for name in ("miwae", "piwae") for M, K in SPLITS)
          + ("vr:0.5", "vr:0.5/dreg", "vr:0.9", "ciwae:0.05", "rws", "rws/dreg"))
K_VALUES = (1, 3, 10, 30, 100, 300, 1000)
# the Gaussian model (experiments/gaussian.py): 10^4 draws resolve the IWAE encoder's RMS SNR
# to k = 10^4 (about 1e-3 there); 4 estimators x these k: about 8 minutes on one core
GAUSSIAN_K = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000)
GAUSSIAN_DRAWS = 10_000
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
           "snr_median", "snr_rms", "snr_rms_low", "snr_rms_high",
           "bias_reference", "bias_abs_mean", "bias_relative", "bias_t3_share",
           "bias_chance_share", "bias_tested", "bias_verdict",
           "reference_snr", "seconds_per_step", "seconds_p20",
           "seconds_p80", "timer", "backend", "interpreted", "device", "batch", "seed", "model"]


# --------------------------------------------------------------------------- checkpoints
# The checkpoint format lives with the model (``training.model``): {"state_dict" (on CPU),
# "data_dim", "latent", "hidden"} by ``torch.save``, written atomically; the MNIST experiment
# saves its trained models with ``save_checkpoint`` and ``--checkpoint`` loads one here.


def describe_model(model) -> str:
    if isinstance(model, gaussian.LinearGaussian):
        return f"LinearGaussian(D={model.dim})"
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


def group_summary(snr: torch.Tensor, slices: list[slice], draws: int) -> dict:
    """Mean and median of the SNR over a group's scalars (NaN entries, zero variance, left out),
    and the debiased root-mean-square SNR (``debiased_square``)."""
    values = torch.cat([snr[part] for part in slices]).numpy()
    defined = values[~np.isnan(values)]
    return {"params": int(values.size), "zero_variance": int(values.size - defined.size),
            "snr_mean": float(defined.mean()) if defined.size else float("nan"),
            "snr_median": float(np.median(defined)) if defined.size else float("nan"),
            "snr_square": float(debiased_square(defined, draws).mean()) if defined.size else float("nan")}


def debiased_square(snr, draws: int):
    """SNR^2 less what noise alone gives it: the squared mean of M draws has expectation
    mu^2 + sigma^2 / M, so (mean / std)^2 - 1/M estimates (mu / sigma)^2 without the floor
    (to O(1/M) relative); it can be negative where the signal is below the noise. Averaged over
    a group's parameters the noise of these estimates averages out, so the group's RMS SNR is
    resolved far below the mean SNR's floor sqrt(2 / (pi M)) (which flattens slopes at large k)."""
    return snr ** 2 - 1.0 / draws


def rms(mean_square: float) -> float:
    """sqrt of a debiased mean square, 0 where noise left it negative (no signal resolved)."""
    return math.sqrt(mean_square) if mean_square > 0 else 0.0


def bootstrap_counts(draws: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """[resamples, draws] float32: how often each draw appears in each resample (drawn with
    replacement, ``draws`` per resample)."""
    index = torch.randint(draws, (resamples, draws), generator=generator)
    return torch.zeros(resamples, draws).scatter_add_(1, index, torch.ones(resamples, draws))


def bootstrap_group_snr(draws: torch.Tensor, slices: list[slice], counts: torch.Tensor,
                        chunk: int = CHUNK, squared: bool = False) -> np.ndarray:
    """The group-mean SNR of each bootstrap resample, float64 [resamples]; with ``squared`` the
    group-mean of the debiased SNR^2 (``debiased_square``), less 2/M rather than 1/M: a
    resample's squared mean carries the noise twice (the draws' and the resampling's), so its
    replicates center on the estimate and their percentiles are the interval.

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
        if squared:
            ratio = debiased_square(ratio, m / 2)
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


# --------------------------------------------------------------------------- the bias column
# Over the paired draws (draw m uses the same noise for every entry), the difference
# d_m = g_m(entry) - g_m(reference) per parameter: its mean is the entry's bias against the
# reference's expectation (the objective's total gradient, which is unbiased), to sampling error
# sd(d) / sqrt(M); pairing cancels the noise the two share, so small biases show.

T_LIMIT = 3.0
CHANCE = math.erfc(T_LIMIT / math.sqrt(2))  # P(|t| > 3) for an unbiased parameter: 0.27%


def bias_statistics(draws: torch.Tensor, reference: torch.Tensor, chunk: int = CHUNK) -> dict:
    """Per parameter (columns), float64 [P] on the CPU: "mean" of the paired difference
    draws - reference, its "t" (mean / (sd / sqrt(M)), ddof = 1; +-inf where the difference is
    a nonzero constant, NaN where it is exactly 0 in every draw), "reference" (the reference's
    mean) and "reference_snr": the entry's |mean| over the reference's std (NaN where that std
    is 0). Where the entry is unbiased its mean is the reference's expectation too, measured
    with the entry's (lower) variance: this is the reference's SNR without the floor its own
    |mean| has (the IWAE's encoder signal, 1e-3 of its noise at k = 10^4, read from DReG's mean)."""
    m = draws.shape[0]
    if reference.shape != draws.shape or m < 2:
        raise ValueError(f"the bias needs paired draws of one shape, at least 2: {tuple(draws.shape)} "
                         f"against {tuple(reference.shape)}")
    out = {name: torch.empty(draws.shape[1], dtype=torch.float64)
           for name in ("mean", "t", "reference", "reference_snr")}
    for part in _chunks([slice(0, draws.shape[1])], chunk):
        diff = draws[:, part].double() - reference[:, part].double()
        std, mean = torch.std_mean(diff, dim=0, correction=1)
        t = torch.where(_varies(diff), mean / (std / math.sqrt(m)),
                        torch.where(mean == 0, float("nan"), mean.sign() * math.inf))
        out["mean"][part], out["t"][part] = mean.cpu(), t.cpu()
        ref_std, ref_mean = torch.std_mean(reference[:, part].double(), dim=0, correction=1)
        out["reference"][part] = ref_mean.cpu()
        signal = draws[:, part].double().mean(0).abs()
        out["reference_snr"][part] = torch.where(_varies(reference[:, part]), signal / ref_std,
                                                 float("nan")).cpu()
    return out


def bias_summary(stats: dict, slices: list[slice]) -> dict:
    """A group's bias columns from ``bias_statistics``: the mean |bias| over its parameters, that
    relative to the mean |reference gradient|, the share of parameters with |t| > 3 (of those
    whose difference is not exactly 0), the share chance gives, and the verdict: "identical"
    (the difference is 0 in every draw for every parameter), "biased" (share >= 5 x chance and
    >= 3 parameters) or "unbiased" (no evidence of bias at this many draws)."""
    mean, t, ref, ref_snr = (torch.cat([stats[n][part] for part in slices]).numpy()
                             for n in ("mean", "t", "reference", "reference_snr"))
    tested = ~np.isnan(t)
    over = int((np.abs(t[tested]) > T_LIMIT).sum())
    share = over / tested.sum() if tested.any() else 0.0
    if not tested.any():
        verdict = "identical"
    elif share >= BIASED_FACTOR * CHANCE and over >= BIASED_COUNT:
        verdict = "biased"
    else:
        verdict = "unbiased"
    scale = float(np.abs(ref).mean())
    return {"bias_abs_mean": float(np.abs(mean).mean()),
            "bias_relative": float(np.abs(mean).mean()) / scale if scale > 0 else float("nan"),
            "bias_t3_share": float(share), "bias_chance_share": CHANCE, "bias_tested": int(tested.sum()),
            "bias_verdict": verdict,
            "reference_snr": float(np.nanmean(ref_snr)) if (~np.isnan(ref_snr)).any() else float("nan")}


# --------------------------------------------------------------------------- the draws


def noise(seed: int, k: int, draw: int, shape: tuple[int, int], device) -> torch.Tensor:
    """eps [B, k, d] of one draw: a function of (seed, k, draw) only, so every estimator gets
    the same eps for a given draw (paired) and different k get independent draws."""
    state = int(np.random.SeedSequence([seed, k, draw]).generate_state(1)[0])
    generator = torch.Generator(device=device).manual_seed(state)
    return torch.randn(shape[0], k, shape[1], generator=generator, device=device)


def entry(name: str) -> tuple[str, str]:
    """(objective label, gradient estimator) of a measured entry: one of ``ESTIMATORS``' names,
    or an objective's spelling (training/family.py: 'vr:0.5', 'miwae:8x8', 'rws') with its
    default estimator (the total gradient; RWS's wake-phi), or 'SPELLING/ESTIMATOR'
    ('vr:0.5/dreg', 'rws/dreg'). ValueError naming the entry where it does not parse or the
    estimator does not apply."""
    if name in ESTIMATORS:
        return ESTIMATORS[name]
    spelling, _, estimator = str(name).partition("/")
    try:
        objective = Objective.parse(spelling)
        estimator = estimator or default_estimator(objective)
        check_estimator(objective, estimator, "sampled")
    except ValueError as error:
        raise ValueError(f"entry {name!r}: {error}") from None
    return objective.label, estimator


def fits(name: str, k: int) -> bool:
    """Whether the entry applies at k samples (a split M x K only at k = M K)."""
    objective, estimator = entry(name)
    try:
        Objective.parse(objective).check(k, estimator)
    except ValueError:
        return False
    return True


def reference_of(name: str) -> str:
    """The entry whose draws the bias column compares ``name``'s with: the same objective with
    its defining gradient (the total gradient; RWS's wake-phi, which no objective's gradient is)."""
    objective, estimator = entry(name)
    default = default_estimator(Objective.parse(objective))
    if name in ESTIMATORS:
        return "iwae" if objective == "iwae" else name
    return name if estimator == default else objective


def loss_for(name: str, backend: str, likelihood="bernoulli") -> IWAELoss:
    objective, estimator = entry(name)
    return IWAELoss(objective, backend, estimator=estimator, likelihood=likelihood)


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
    loss_fn = loss_for(name, backend, model.likelihood)
    if isinstance(model, gaussian.LinearGaussian):
        return gaussian.gradient_draws(model, x, k, loss_fn, draws,
                                       lambda r: noise(seed, k, r, tuple(x.shape), x.device), step_seconds)
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
        loss_fn = loss_for(name, settings.backend, model.likelihood)
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
            if fits(name, k) for group in groups}


def check_entries(names, ks) -> None:
    """Refuse, naming it, an entry that does not parse or fits none of the k values."""
    for name in names:
        entry(name)
        if not any(fits(name, k) for k in ks):
            raise ValueError(f"entry {name!r} applies at none of k = {', '.join(map(str, ks))} "
                             f"(a split M x K is measured at k = M K)")


def reference_draws(model, x, k: int, name: str, draws: torch.Tensor, settings: Settings,
                    cache: dict) -> tuple[str, torch.Tensor]:
    """(the reference entry, its draws at this k): ``draws`` themselves where the entry is its
    own reference; else from ``cache`` (one entry kept, so memory holds two sets of draws at
    most), drawn with the same noise (paired) where it lacks them."""
    ref = reference_of(name)
    if ref == name:
        cache.clear()
        cache[(k, name)] = draws
        return ref, draws
    if (k, ref) not in cache:
        cache.clear()
        cache[(k, ref)] = gradient_draws(model, x, k, ref, settings.draws, settings.backend, settings.seed)
    return ref, cache[(k, ref)]


def measure(model, x: torch.Tensor, k: int, name: str, settings: Settings, device: torch.device,
            model_label: str, cache: dict | None = None) -> list[dict]:
    """The rows of one (k, estimator): one per parameter group. ``cache``: the reference draws
    kept between the entries of one k (``reference_draws``)."""
    step_seconds: list[float] = []
    draws = gradient_draws(model, x, k, name, settings.draws, settings.backend, settings.seed,
                           step_seconds)
    ref, reference = reference_draws(model, x, k, name, draws, settings, {} if cache is None else cache)
    bias = bias_statistics(draws, reference)
    del reference
    snr = parameter_snr(draws)
    # the same resamples for every estimator at this k (paired), independent across k
    counts = bootstrap_counts(settings.draws, settings.resamples,
                              torch.Generator().manual_seed(settings.seed * 1_000_003 + k))
    groups = parameter_groups(model)
    summaries = {}
    for group, slices in groups.items():
        summaries[group] = (group_summary(snr, slices, settings.draws),
                            bootstrap_group_snr(draws, slices, counts),
                            bootstrap_group_snr(draws, slices, counts, squared=True),
                            bias_summary(bias, slices))
    del draws

    timing, timer = step_timing(model, x, k, name, settings, device, step_seconds)

    from kernels import interpreted

    objective, estimator = entry(name)
    rows = []
    for group, (summary, boot_mean, boot_square, biased) in summaries.items():
        low, high = basic_interval(summary["snr_mean"], boot_mean)
        square_low, square_high = np.nanpercentile(boot_square, [2.5, 97.5])
        with np.errstate(divide="ignore", invalid="ignore"):
            log_sd = float(np.nanstd(np.log(boot_mean), ddof=1))
        rows.append({"k": k, "estimator": name, "objective": objective, "grad_estimator": estimator,
                     "group": group, "params": summary["params"],
                     "zero_variance": summary["zero_variance"], "draws": settings.draws,
                     "resamples": settings.resamples, "snr_mean": summary["snr_mean"],
                     "snr_mean_low": low, "snr_mean_high": high,
                     "snr_mean_boot_shift": float(np.nanmean(boot_mean)) - summary["snr_mean"],
                     "log_snr_mean_sd": log_sd,
                     "snr_median": summary["snr_median"], "snr_rms": rms(summary["snr_square"]),
                     "snr_rms_low": rms(square_low), "snr_rms_high": rms(square_high),
                     "bias_reference": ref, **biased,
                     "seconds_per_step": timing.median_ms / 1e3,
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
    check_entries(settings.estimators, settings.k)
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
        cache: dict = {}  # the reference draws, shared by the entries of this k
        for name in settings.estimators:
            if (k, name) in finished or not fits(name, k):
                continue
            started = time.perf_counter()
            new = measure(model, x, k, name, settings, device, model_label, cache)
            rows += new
            write_csv(out / "snr.csv", rows, COLUMNS)
            by = {row["group"]: row for row in new}
            log(f"  k={k:<5} {name:<17} " + ", ".join(
                f"{g} SNR {r['snr_mean']:.3g} [{r['snr_mean_low']:.3g}, {r['snr_mean_high']:.3g}] "
                f"rms {r['snr_rms']:.3g}" for g, r in by.items())
                + f"; bias {by['encoder']['bias_verdict']}; {new[0]['seconds_per_step'] * 1e3:.1f} ms/step "
                  f"({time.perf_counter() - started:.0f} s)")
    record.finish(run)
    return render_snr(out)
