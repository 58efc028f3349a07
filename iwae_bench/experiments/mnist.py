"""The seed's claim, measured: VAE vs multi-sample VAE vs IWAE on real (binarized) MNIST.

``python -m iwae_bench experiment`` trains one architecture (784-200-200-50, tanh, as in the
IWAE paper's one-stochastic-layer model) with five objectives (and, on request, the IWAE
with the STL and DReG estimators, and several seeds), evaluates each on held-out images as the
paper does, and writes OUT (default results/runs/experiment/):

    runs/<run name>.csv         per-epoch training curve (name: objective-k-estimator-seed)
    checkpoints/<run name>.pt   the trained model (the SNR benchmark loads it)
    summary.csv                 test NLL (IWAE bound, k = 5000) with its jackknife (orders 1, 2)
                                and PSIS k-hat (median, share above 0.7), active units, ELBO, time
    lk_curve.csv                L_k and the ELBO on the test set for k = 1 ... 5000
    plots/, report.md, machine.json   (the report: ``mnist_report``)

With ``--objectives`` (``FAMILY_RUNS``) it trains the importance-weighted family instead, at
Rainforth et al. (2018)'s budget of k = 64 samples (MIWAE and PIWAE as 8 groups of 8), each
member with its objective's gradient (RWS: wake-phi) and, where named, DReG.

Evaluation streams the k = 5000 samples in chunks (with the fused backend through the kernel
that fuses the decoder's output layer into the bound: no logits stored) so memory stays
bounded, and combines the chunks' logsumexps exactly.

Gray-level MNIST (``--likelihoods gaussian continuous_bernoulli discretized_logistic``): the
same images, not binarized, the same architecture with the likelihood's C output channels per
pixel, and for each likelihood the VAE (k = 1), the IWAE at k = 50 and the IWAE at k = 50 with
DReG (``LIKELIHOOD_RUNS``). Each likelihood sees the data it is a model of
(experiments/data.py): the continuous densities (Gaussian, continuous Bernoulli) uniformly
dequantized 8-bit levels y = (v + u) / 256, u fresh per batch in training and drawn once with
the data seed for the test set; the discretized logistic the levels 2 v / 255 - 1 themselves
(256 bins).

Bits per dimension on one footing, an upper bound on the discrete data's bits per pixel for
every likelihood (D pixels, NLL the test -L_k in nats per image, ``bits_per_dim``):

    discretized    bpd = NLL / (D log 2)
    continuous     bpd = (NLL / D + log 256) / log 2

The second line, after Theis, van den Oord & Bethge (2016, "A note on the evaluation of
generative models", section 3.1): for a density p on [0, 1)^D, the model of the levels
P(v) = int_[0,1)^D p((v + u) / 256) / 256^D du is a distribution on the 256^D images, and by
Jensen E_u[log p((v + u) / 256)] - D log 256 <= log P(v): the continuous model's average
log-density on dequantized data, less D log 256 (the change of variables from [0, 256) to
[0, 1)), lower-bounds a discrete log-likelihood. The IWAE bound L_k <= log p(y) lower-bounds
the density in turn, so -L_k + D log 256 upper-bounds -log P(v) in nats; the discretized
likelihood's L_k bounds log P(v) directly. The binarized Bernoulli's bpd (NLL / (D log 2)) is
on other data (the binary images) and is not comparable.

The Gaussian's learned variance: on the raw intensities the background pixels are exactly 0
in every image, so its density has no maximum (the variance of a pixel that never changes
can fall without end and log p runs to +inf; Mattei & Frellsen 2018). Two things keep it:
dequantization (a pixel whose level never changes is uniform on a bin of width 1/256 after
it, variance 1 / (12 256^2), so a finite variance is the optimum), and a floor on the decoder's
log-variance, ``GAUSSIAN_FLOOR`` = log(1 / (12 256^2)) = -13.575, which a Gaussian with a
learned variance gets in this experiment unless its spelling names another floor: exactly
that least variance the dequantized data supports, so it never binds below the data's own
optimum, and it caps each pixel's density at (2 pi e^F)^-1/2 (5.87 nats) in float32, so no
step can take exp(-s) to overflow. ``--collapse-demo`` shows what happens without both:
the IWAE (k = 50) with an unfloored per-sample Gaussian on the raw intensities
(``collapse_demo``, collapse.csv).

Two stochastic layers (``--layers 2``, ``TWO_LAYER_RUNS``): the IWAE paper's second
architecture (training/model.py's ``TwoLayerVAE``: h1 100 and h2 50 units) on binarized MNIST,
the VAE (k = 1), the k-sample ELBO and the IWAE at k = 5 and 50, and the IWAE at k = 50 with
DReG twice: ``dreg``, the generalized DReG (Bauer & Mnih 2021; q(h2|h1)'s score through h1
handled, training/family.py), and ``dreg_plain``, DReG with q(h2|h1)'s parameters detached as
one layer's would be (biased: tests/test_two_layer.py). Its summary rows carry ``layers`` 2,
the active units of each layer (``active_units_per_layer``, "h1/h2"; ``active_units`` their
sum) and the paper's two-layer NLL. Evaluation draws each chunk of samples from the model
(h1, then h2 given h1); the first k of them give L_k as for one layer.

Training never crashes on a non-finite loss: the run stops before stepping on it, its last
epoch's row says so, and its summary row has ``diverged_epoch`` (and no test numbers).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.likelihood import Likelihood, slug

from ..files import atomic_path, write_csv
from ..harness.machine import MachineRecord, missing_cells, now
from ..harness.shard import Shard
from ..training import IWAELoss, log_weights
from ..training.bounds import head_log_weights
from ..training.family import Objective, default_estimator
from ..training.model import VAE, TwoLayerVAE, active_units_per_layer, save_checkpoint
from ..training.sampling import SAMPLE_BLOCK, noise_blocks
from .data import DEQUANTIZED_LOG_VARIANCE, LEVELS, MNISTSplit, load_mnist, model_data
from .diagnostics import COLUMNS as DIAGNOSTICS
from .diagnostics import KHAT_UNRELIABLE, jvi, psis_khat
from .mnist_report import render_experiment
from .paper import RAINFORTH_K, paper_active_units, paper_nll

PAPER_RUNS = [("elbo", 1), ("multi_sample_elbo", 5), ("multi_sample_elbo", 50), ("iwae", 5), ("iwae", 50)]
LIKELIHOOD_RUNS = [("elbo", 1, "iwae"), ("iwae", 50, "iwae"), ("iwae", 50, "dreg")]
FAMILY_K = RAINFORTH_K  # Rainforth et al. (2018)'s budget: k = M K = 64
FAMILY_RUNS = [("iwae", FAMILY_K, "iwae"), ("miwae:8x8", FAMILY_K, "iwae"), ("piwae:8x8", FAMILY_K, "iwae"),
               ("ciwae:0.05", FAMILY_K, "iwae"), ("vr:0.5", FAMILY_K, "iwae"), ("rws", FAMILY_K, "wake"),
               ("rws", FAMILY_K, "dreg"), ("iwae", FAMILY_K, "dreg")]
PLAIN_DREG = "dreg_plain"  # DReG with q(h2|h1)'s parameters detached (the module docstring)
TWO_LAYER_RUNS = [("elbo", 1, "iwae"), ("multi_sample_elbo", 5, "iwae"), ("multi_sample_elbo", 50, "iwae"),
                  ("iwae", 5, "iwae"), ("iwae", 50, "iwae"), ("iwae", 50, "dreg"), ("iwae", 50, PLAIN_DREG)]
ACTIVE_THRESHOLD = 1e-2
GAUSSIAN_FLOOR = DEQUANTIZED_LOG_VARIANCE  # the least log-variance dequantized data supports


@dataclass(frozen=True)
class Run:
    """One trained model: an objective at k samples, a gradient estimator, a training seed, a
    likelihood (its label; the Bernoulli's runs keep their names and rows), stochastic layers
    (2: ``TwoLayerVAE``)."""
    objective: str
    k: int
    estimator: str = "iwae"
    seed: int = 0
    likelihood: str = "bernoulli"
    layers: int = 1

    @property
    def name(self) -> str:
        """objective-k-estimator-seed; a family member's spelling with '-' for ':' (miwae-8x8-k64-...);
        two-layer- before a two-layer model's."""
        name = f"{self.objective.replace(':', '-')}-k{self.k}-{self.estimator}-seed{self.seed}"
        name = name if self.layers == 1 else f"two-layer-{name}"
        return name if self.likelihood == "bernoulli" else f"{slug(Likelihood.parse(self.likelihood))}-{name}"

    def key(self) -> tuple:
        return (self.objective, self.k, self.estimator, self.seed, self.likelihood, self.layers)


COLLAPSE = Run("iwae", 50, likelihood="gaussian")  # per-sample variance, no floor
COLLAPSE_EPOCHS = 10


def experiment_likelihood(spec) -> Likelihood:
    """The likelihood as this experiment trains it: a Gaussian with a learned variance and no
    floor of its own gets ``GAUSSIAN_FLOOR`` (the module docstring says why)."""
    likelihood = Likelihood.parse(spec)
    if likelihood.name == "gaussian" and likelihood.scale != "fixed" and likelihood.floor == -math.inf:
        likelihood = replace(likelihood, floor=GAUSSIAN_FLOOR)
    return likelihood


def work_list(estimators=(), seeds: int = 1, base_seed: int = 0, likelihoods=(), objectives=None,
              layers: int = 1) -> list[Run]:
    """The experiment's runs, each repeated over ``seeds`` training seeds. By default: the
    paper's five with the total gradient, then the IWAE at k = 5 and 50 with each extra
    estimator. With ``likelihoods``: per likelihood the VAE, the IWAE at k = 50 and the IWAE at
    k = 50 with DReG and each extra estimator. With ``objectives`` (a list; empty: Rainforth's
    set, ``FAMILY_RUNS``): each objective of the family at k = 64 with its default estimator
    and each extra estimator that applies to it. With ``layers`` 2: ``TWO_LAYER_RUNS`` and the
    IWAE at k = 50 with each other extra estimator. Every shard builds this same list and takes
    its part."""
    extra = [e for e in dict.fromkeys(estimators) if e != "iwae"]
    if likelihoods and objectives is not None:
        raise ValueError("objectives and likelihoods do not combine: the family is trained on binarized MNIST")
    if layers == 2 and (likelihoods or objectives is not None):
        raise ValueError("layers 2 does not combine with likelihoods or objectives: the two-layer rows are the "
                         "paper's, on binarized MNIST")
    if layers == 2:
        kinds = [(objective, k, estimator, "bernoulli") for objective, k, estimator in TWO_LAYER_RUNS]
        kinds += [("iwae", 50, e, "bernoulli") for e in extra if e != "dreg"]
    elif objectives is not None:
        kinds = [(objective, k, estimator, "bernoulli") for objective, k, estimator in family_runs(objectives, extra)]
    elif likelihoods:
        kinds = [(objective, k, estimator, experiment_likelihood(spec).label) for spec in likelihoods
                 for objective, k, estimator in LIKELIHOOD_RUNS
                 + [("iwae", 50, e) for e in extra if e != "dreg"]]
    else:
        kinds = [(objective, k, "iwae", "bernoulli") for objective, k in PAPER_RUNS]
        kinds += [("iwae", k, estimator, "bernoulli") for estimator in extra for k in (5, 50)]
    return [Run(objective, k, estimator, base_seed + i, likelihood, layers) for i in range(seeds)
            for objective, k, estimator, likelihood in kinds]


def family_runs(objectives, extra=()) -> list[tuple[str, int, str]]:
    """(objective label, k, estimator) at k = 64: ``FAMILY_RUNS`` for no objectives, else each
    objective (a spelling ``Objective.parse`` reads) with its default estimator; then each
    ``extra`` estimator wherever the objective takes it. A ValueError names a bad spelling."""
    if objectives:
        runs = [(spec.label, FAMILY_K, default_estimator(spec)) for spec in map(Objective.parse, objectives)]
    else:
        runs = list(FAMILY_RUNS)
    for objective in list(dict.fromkeys(label for label, _, _ in runs)):
        for estimator in extra:
            try:
                Objective.parse(objective).check(FAMILY_K, estimator)
            except ValueError:
                continue
            runs.append((objective, FAMILY_K, estimator))
    return list(dict.fromkeys(runs))


def bits_per_dim(nll: float, D: int, likelihood) -> float:
    """Test NLL (nats per image) in bits per pixel: NLL / (D log 2), plus 8 bits (log 256 nats
    per pixel) for a continuous density on dequantized data (the module docstring derives it)."""
    per_pixel = nll / D + (math.log(LEVELS) if Likelihood.parse(likelihood).continuous else 0.0)
    return per_pixel / math.log(2.0)


RUNS = work_list()


@dataclass
class Schedule:
    """Training and evaluation sizes. ``stages``: (epochs, learning rate) run in order."""
    stages: list[tuple[int, float]]
    batch_size: int = 20
    train_size: int = 4000
    test_size: int = 1000
    eval_k: int = 5000
    eval_chunk: int = 512
    k_curve: list[int] = field(default_factory=lambda: [1, 5, 50, 500, 5000])
    hidden: int = 200
    latent: int = 50

    @property
    def epochs(self) -> int:
        return sum(e for e, _ in self.stages)


def default_schedule() -> Schedule:
    """About 13 minutes on a 2-core CPU for all five objectives (torch backend): 80 epochs at
    batch 100 with a stepped learning rate (about 8 minutes, most of it the two k = 50 runs),
    then the k = 5000 evaluation of 1000 test images per model (about 45 s each)."""
    return Schedule(stages=[(50, 1e-3), (20, 3e-4), (10, 1e-4)], batch_size=100)


def full_schedule() -> Schedule:
    """The paper's: 3**i epochs at learning rate 0.001 * 10**(-i/7), i = 0..7 (3280 epochs)."""
    return Schedule(stages=[(3 ** i, 1e-3 * 10 ** (-i / 7)) for i in range(8)])


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def streamed_log_weights(model, x: torch.Tensor, k: int, chunk: int, backend: str, seed: int = 0):
    """log w [B, k] and logsumexp over k [B], computed chunk by chunk of samples.

    Memory holds one chunk's logits [B, chunk, D] at a time with the torch backend; with the
    fused one the decoder's output layer is fused into the kernel and no chunk's logits are
    ever stored. The chunks' logsumexps are combined exactly.
    """
    if chunk % SAMPLE_BLOCK and chunk < k:
        raise ValueError(f"chunk must be a multiple of {SAMPLE_BLOCK} (so any chunking draws the same "
                         f"samples), got {chunk}")
    if isinstance(model, TwoLayerVAE):
        log_w = two_layer_log_weights(model, x, k, chunk, backend, seed)
        return log_w, torch.logsumexp(log_w, dim=1)

    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    blocks = noise_blocks((x.shape[0], mu.shape[1]), torch.Generator(device=x.device).manual_seed(seed),
                          x.device)
    pending = torch.empty(0, x.shape[0], mu.shape[1], device=x.device)
    log_w_parts, lse_parts = [], []
    for start in range(0, k, chunk):
        size = min(chunk, k - start)
        while pending.shape[0] < size:
            pending = torch.cat([pending, next(blocks)])
        eps, pending = pending[:size], pending[size:]
        z = mu.unsqueeze(1) + std.unsqueeze(1) * eps.transpose(0, 1)
        lik = {"likelihood": model.likelihood, "scale": model.scale}
        if backend == "fused":  # the chunk's logits are never stored
            layer = model.output_layer
            log_w = head_log_weights(x, model.decode_hidden(z), layer.weight, layer.bias, z, mu, logvar, "fused",
                                     **lik)
        else:
            log_w = log_weights(x, model.decoder(z), z, mu, logvar, backend, **lik)
        log_w_parts.append(log_w)
        lse_parts.append(torch.logsumexp(log_w, dim=1))
    return torch.cat(log_w_parts, dim=1), torch.logsumexp(torch.stack(lse_parts, dim=1), dim=1)


@torch.no_grad()
def two_layer_log_weights(model: TwoLayerVAE, x: torch.Tensor, k: int, chunk: int, backend: str,
                          seed: int = 0) -> torch.Tensor:
    """log w [B, k] of a TwoLayerVAE, chunk by chunk of samples drawn by the model (h1 ~ q(h1|x),
    h2 ~ q(h2|h1)) from one seeded generator; with the fused backend through the fused head
    (the chunk's logits never stored), the layers' terms added as the kernels' offset."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    lik = {"likelihood": model.likelihood, "scale": model.scale}
    parts = []
    for start in range(0, k, chunk):
        layers = model.sample(x, min(chunk, k - start), generator)
        if backend == "fused":
            layer = model.output_layer
            parts.append(head_log_weights(x, model.decoder[:-1](layers[0].z), layer.weight, layer.bias, layers,
                                          backend="fused", **lik))
        else:
            parts.append(log_weights(x, model.decoder(layers[0].z), layers, backend=backend, **lik))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def units_of(model, x: torch.Tensor, seed: int = 0) -> dict:
    """The summary's active-unit columns: the count (a two-layer model's: the sum over its
    layers, each layer's in ``active_units_per_layer`` as "h1/h2", E_q[h2 | x] averaged over
    seeded draws of h1)."""
    if isinstance(model, TwoLayerVAE):
        counts = active_units_per_layer(model, x, ACTIVE_THRESHOLD,
                                        generator=torch.Generator(device=x.device).manual_seed(seed))
        return {"active_units": sum(counts), "active_units_per_layer": "/".join(map(str, counts))}
    return {"active_units": active_units(model, x)[0]}


@torch.no_grad()
def active_units(model, x: torch.Tensor, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, torch.Tensor]:
    """The paper's criterion: unit u is active if Cov_x(E_q[u | x]) > threshold; E_q[u | x] is
    the encoder mean. Returns the count and each unit's variance over x."""
    mu, _ = model.encode(x)
    variance = mu.double().var(dim=0, unbiased=False)
    return int((variance > threshold).sum()), variance


@torch.no_grad()
def evaluate(model, test: torch.Tensor, schedule: Schedule, backend: str, seed: int = 0,
             batch: int = 100) -> dict:
    """Test NLL (-L_k at eval_k), the L_k curve from the first k of the same samples, the ELBO
    (mean log-weight), the active units, and from the same log-weights (experiments/diagnostics.py)
    the jackknife NLLs of order 1 and 2 (NaN for eval_k <= order) and the PSIS k-hat per image:
    its median and the share of images above 0.7 (NaN for eval_k < 25). A TwoLayerVAE's
    log-weights sum both layers' terms; its active units are counted per layer."""
    lse_all, curve = [], {k: [] for k in schedule.k_curve}
    elbo, jackknife, khat = [], {1: [], 2: []}, []
    for start in range(0, test.shape[0], batch):
        x = test[start:start + batch]
        log_w, lse = streamed_log_weights(model, x, schedule.eval_k, schedule.eval_chunk, backend,
                                          seed=seed + start)
        lse_all.append(lse.double())
        for k in schedule.k_curve:
            curve[k].append((torch.logsumexp(log_w[:, :k].double(), dim=1) - math.log(k)))
        elbo.append(log_w.double().mean(dim=1))
        for order in jackknife:
            if schedule.eval_k > order:
                jackknife[order].append(jvi(log_w.cpu(), order))
        khat.append(psis_khat(log_w.cpu()))
    bound = torch.cat(lse_all) - math.log(schedule.eval_k)
    khat = torch.cat(khat)
    return {"test_nll": -bound.mean().item(), "test_elbo": torch.cat(elbo).mean().item(),
            **units_of(model, test, seed),
            "curve": {k: torch.cat(v).mean().item() for k, v in curve.items()},
            **{f"jvi{order}_nll": -torch.cat(v).mean().item() if v else math.nan for order, v in jackknife.items()},
            "khat_median": khat.nanmedian().item(),
            "khat_above": (khat > KHAT_UNRELIABLE).double().mean().item() if not khat.isnan().all() else math.nan}


# --------------------------------------------------------------------------- training


def lowest_log_scale(model, logits: torch.Tensor | None) -> float:
    """The smallest log-scale (the Gaussian's log-variance, the logistic's log-scale) the
    decoder produced, before any floor: the learned per-pixel one, or the per-sample channels
    of logits [B, k, C D] (the last L channels); NaN for a likelihood without a learned scale."""
    likelihood = model.likelihood
    if likelihood.scale == "pixel":
        return model.scale.min().item()
    if likelihood.scale != "sample":
        return math.nan
    return logits.detach().unflatten(-1, (likelihood.channels, -1))[..., -likelihood.mixture:, :].min().item()


def _batch_loss(model, loss_fn, x, k, generator, backend, plain: bool = False) -> tuple[torch.Tensor, float]:
    """The batch's loss and the smallest log-scale the decoder produced for it (on the fused
    backend, whose logits never exist, that of each example's first sample). A TwoLayerVAE's
    layers go in z's place; ``plain``: without how q(h2|h1) was made (``PLAIN_DREG``)."""
    if isinstance(model, TwoLayerVAE):
        hidden, layers = (model.forward_hidden if backend == "fused" else model)(x, k, generator=generator)
        if plain:
            layers = tuple(layer._replace(posterior=None, given=None) for layer in layers)
        if backend == "fused":
            return loss_fn.from_hidden(x, hidden, model.output_layer, layers, scale=model.scale), math.nan
        return loss_fn(x, hidden, layers, scale=model.scale), math.nan
    if backend == "fused":  # the output layer fused into the bound: no logits stored
        h, z, mu, logvar = model.forward_hidden(x, k, generator=generator)
        layer = model.output_layer
        loss = loss_fn.from_hidden(x, h, layer, z, mu, logvar, scale=model.scale)
        with torch.no_grad():
            first = F.linear(h[:, :1], layer.weight, layer.bias) if model.likelihood.scale == "sample" else None
        return loss, lowest_log_scale(model, first)
    logits, z, mu, logvar = model(x, k, generator=generator)
    return loss_fn(x, logits, z, mu, logvar, scale=model.scale), lowest_log_scale(model, logits)


STATE_EVERY = 300.0  # seconds of training between two saves of a run's training state


def train(run: Run, split: MNISTSplit, schedule: Schedule, backend: str, device: torch.device, log=print,
          prepare=None, state_path: Path | None = None,
          state_every: float = STATE_EVERY) -> tuple[VAE, list[dict], int | None]:
    """Adam (betas 0.9/0.999, eps 1e-4, as in the paper) on the images as the run's likelihood
    models them, drawn afresh per batch (``prepare(intensities, generator)``, default
    ``data.model_data``). Returns the model, one row per epoch (with the smallest log-scale
    the decoder produced where it learns one) and the epoch whose loss went non-finite (None if
    none): the run stops there, before stepping on it, and that epoch's objective is the
    non-finite value.

    ``state_path``: where the training state (model, optimizer, both generators, the epochs'
    rows) is saved at the end of an epoch once ``state_every`` seconds have passed since the
    last save, and read back if it exists, so a run killed mid-way (a session's end) goes on
    from its last saved epoch and ends where an uninterrupted run would, bit for bit."""
    objective, k, seed = run.objective, run.k, run.seed
    likelihood = Likelihood.parse(run.likelihood)
    prepare = prepare or (lambda images, generator: model_data(images, likelihood, generator))
    torch.manual_seed(seed)
    D, plain = split.train.shape[1], run.estimator == PLAIN_DREG
    model = (TwoLayerVAE(D, likelihood=likelihood) if run.layers == 2 else
             VAE(D, schedule.latent, schedule.hidden, likelihood)).to(device)
    loss_fn = IWAELoss(objective, backend, estimator="dreg" if plain else run.estimator, likelihood=likelihood)
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.stages[0][1], betas=(0.9, 0.999), eps=1e-4)
    data_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 2)
    train = split.train
    history, diverged, started = [], None, time.perf_counter()
    if state_path is not None and state_path.exists():
        history = _load_state(state_path, model, optimizer, data_gen, noise_gen)
        started -= history[-1]["seconds"]  # the rows' clock goes on from the saved epoch
        log(f"  {run.name}: resumed after epoch {len(history)} from {state_path.name}")
    saved = time.perf_counter()
    rates = [lr for stage_epochs, lr in schedule.stages for _ in range(stage_epochs)]
    for epoch, lr in enumerate(rates[len(history):], len(history) + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(train.shape[0], generator=data_gen)
        total, count, lowest = 0.0, 0, math.inf
        for start in range(0, train.shape[0], schedule.batch_size):
            x = prepare(train[order[start:start + schedule.batch_size]], data_gen).to(device)
            loss, batch_lowest = _batch_loss(model, loss_fn, x, k, noise_gen, backend, plain)
            lowest = min(lowest, batch_lowest)  # a NaN (a diverging batch's) is passed over
            value = loss.item()
            if not math.isfinite(value):
                diverged, total, count = epoch, value, 1
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += value * x.shape[0]
            count += x.shape[0]
        row = {"epoch": epoch, "lr": lr, "train_objective": -total / count, "seconds": time.perf_counter() - started}
        if likelihood.scale in ("pixel", "sample"):
            row["min_log_scale"] = lowest if lowest < math.inf else math.nan
        history.append(row)
        if diverged:
            break
        if state_path is not None and time.perf_counter() - saved >= state_every and epoch < len(rates):
            _save_state(state_path, model, optimizer, data_gen, noise_gen, history)
            saved = time.perf_counter()
    state = f"diverged (non-finite loss) in epoch {diverged}" if diverged else \
        f"train objective {history[-1]['train_objective']:.2f}"
    log(f"  {run.name}: {epoch} epochs in {time.perf_counter() - started:.0f} s, {state}")
    return model, history, diverged


def collapse_demo(out: Path, split: MNISTSplit, epochs: int, lr: float, schedule: Schedule, backend: str,
                  device: torch.device, log=print) -> list[dict]:
    """What keeps the Gaussian's variance, taken away: ``COLLAPSE`` (the IWAE at k = 50 with a
    per-sample Gaussian and no floor) trained on the raw intensities v/255, not dequantized,
    for ``epochs`` epochs at ``lr``. Writes and returns collapse.csv's rows: per epoch the
    training objective and the smallest log-variance the decoder produced, ``diverged`` true
    on the epoch whose loss went non-finite (the last one then)."""
    demo = Schedule(**{**asdict(schedule), "stages": [(epochs, lr)]})
    _, history, diverged = train(COLLAPSE, split, demo, backend, device, log, prepare=lambda images, _: images)
    rows = [{"likelihood": COLLAPSE.likelihood, "data": "raw", **row, "diverged": row["epoch"] == diverged}
            for row in history]
    write_csv(out / "collapse.csv", rows, COLLAPSE_COLUMNS)
    return rows


# --------------------------------------------------------------------------- the experiment


def split_for(schedule: Schedule, likelihood, data_seed: int, splits: dict | None = None) -> MNISTSplit:
    """The experiment's split as ``likelihood`` models it: gray levels, or binarized for the
    Bernoulli; loaded once per kind into ``splits`` when given."""
    gray = Likelihood.parse(likelihood).name != "bernoulli"
    if splits is None or gray not in splits:
        split = load_mnist(schedule.train_size, schedule.test_size, data_seed, gray=gray)
        if splits is None:
            return split
        splits[gray] = split
    return splits[gray]


def evaluation_data(split: MNISTSplit, likelihood, data_seed: int) -> torch.Tensor:
    """The test images as ``likelihood`` models them, made once from the data seed: every model
    of a likelihood (every run, every training seed) is evaluated on the same dequantized
    images."""
    return model_data(split.test, Likelihood.parse(likelihood), torch.Generator().manual_seed(data_seed))


def evaluate_as_trained(model, likelihood, seed: int, schedule: Schedule, backend: str, device: torch.device,
                        data_seed: int, splits: dict | None = None) -> dict:
    """``evaluate`` as the experiment evaluates a model it trained: on the test images made from
    the data seed (``evaluation_data``), with samples drawn from the model's training seed."""
    images = evaluation_data(split_for(schedule, likelihood, data_seed, splits), likelihood, data_seed)
    return evaluate(model, images.to(device), schedule, backend, seed=seed)


def _save_state(path: Path, model, optimizer, data_gen, noise_gen, history) -> None:
    """The training state after the last row of ``history``, written atomically."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
             "data_gen": data_gen.get_state(), "noise_gen": noise_gen.get_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, model, optimizer, data_gen, noise_gen) -> list[dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    data_gen.set_state(state["data_gen"])
    noise_gen.set_state(state["noise_gen"])
    return state["history"]


def run_experiment(out: Path, schedule: Schedule, backend: str, device: torch.device,
                   runs: list[Run] | None = None, data_seed: int = 0, resume: bool = False,
                   shard: Shard | None = None, collapse_epochs: int = 0, log=print) -> Path:
    """Train and evaluate every run (this shard's part of them); write CSVs, checkpoints,
    plots, report and machine.json into ``out``. ``resume`` keeps the runs already in
    summary.csv and trains only the others, a run killed mid-way from its saved state
    (checkpoints/<run>.state.pt, every ``STATE_EVERY`` seconds of its training). ``collapse_epochs``: also run ``collapse_demo``
    that long at the first learning rate (in the first shard; kept on resume)."""
    runs = list(runs if runs is not None else RUNS)
    mine = shard.take(runs) if shard is not None else runs
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("runs", "checkpoints"):
        (out / folder).mkdir(exist_ok=True)
    summary = read_rows(out / "summary.csv") if resume else []
    curve_rows = read_rows(out / "lk_curve.csv") if resume else []
    done = {(r["objective"], int(r["k"]), r["estimator"], int(r["seed"]), r["likelihood"], int(r["layers"]))
            for r in summary}
    splits = {}  # gray or binarized test images: the same split, loaded when first needed

    record = MachineRecord.open(out / "machine.json", device, resume=resume)
    entry = record.start_run(backend=backend, schedule=asdict(schedule), data_seed=data_seed,
                             runs=[asdict(r) for r in runs], shard=shard.as_dict() if shard else None,
                             collapse_epochs=collapse_epochs)
    if collapse_epochs and (shard is None or shard.index == 0) and not (resume and (out / "collapse.csv").exists()):
        collapse_demo(out, split_for(schedule, COLLAPSE.likelihood, data_seed, splits), collapse_epochs,
                      schedule.stages[0][1], schedule, backend, device, log)
    for run in mine:
        if run.key() in done:
            continue
        likelihood = Likelihood.parse(run.likelihood)
        split = split_for(schedule, likelihood, data_seed, splits)
        state_path = out / "checkpoints" / f"{run.name}.state.pt"  # a killed run's last saved epoch
        if not resume:
            state_path.unlink(missing_ok=True)
        model, history, diverged = train(run, split, schedule, backend, device, log, state_path=state_path)
        write_csv(out / "runs" / f"{run.name}.csv", history)
        save_checkpoint(model, out / "checkpoints" / f"{run.name}.pt")
        state_path.unlink(missing_ok=True)
        row = {**asdict(run), "backend": backend, "epochs": schedule.epochs,
               "train_seconds": history[-1]["seconds"], "train_objective": history[-1]["train_objective"],
               "diverged_epoch": diverged or ""}
        if likelihood.name == "bernoulli":
            row.update(paper_nll=paper_nll(run.objective, run.k, run.estimator, run.layers),
                       paper_active_units=paper_active_units(run.objective, run.k, run.estimator, run.layers))
        if not diverged:
            start = time.perf_counter()
            result = evaluate_as_trained(model, likelihood, run.seed, schedule, backend, device, data_seed, splits)
            row.update(eval_seconds=time.perf_counter() - start, test_nll=result["test_nll"],
                       test_bpd=bits_per_dim(result["test_nll"], split.test.shape[1], likelihood),
                       test_elbo=result["test_elbo"], active_units=result["active_units"],
                       active_units_per_layer=result.get("active_units_per_layer", ""),
                       **{name: result[name] for name in DIAGNOSTICS})
            curve_rows += [{"objective": run.objective, "k_train": run.k, "estimator": run.estimator,
                            "seed": run.seed, "likelihood": run.likelihood, "layers": run.layers, "k_eval": ke, "L_k": value,
                            "elbo": result["test_elbo"]} for ke, value in result["curve"].items()]
            log(f"  -> test NLL {result['test_nll']:.2f} nats ({row['test_bpd']:.3f} bits/dim; jackknife "
                f"{result['jvi1_nll']:.2f}, {result['jvi2_nll']:.2f}), {result['active_units']} active units, "
                f"k-hat > {KHAT_UNRELIABLE} on {result['khat_above']:.0%} of the images "
                f"(evaluated in {row['eval_seconds']:.0f} s)")
        summary.append(row)
        write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
        write_csv(out / "lk_curve.csv", curve_rows, CURVE_COLUMNS)
    record.finish(entry)
    return render_experiment(out) if summary or (out / "collapse.csv").exists() else out / "summary.csv"


def add_diagnostics(out: Path, checkpoints: list[Path], schedule: Schedule, backend: str, device: torch.device,
                    data_seed: int = 0, log=print) -> Path:
    """Evaluate saved models of ``out``'s runs again and write their jackknife NLLs and PSIS
    k-hat (``DIAGNOSTICS``) into their summary.csv rows: for folders trained before the
    diagnostics existed. A checkpoint belongs to the row whose run has its file name; it is
    evaluated as ``run_experiment`` evaluated it (test images made from ``data_seed``, samples
    from the run's seed, ``schedule``'s test size and eval_k), and must give the row's test NLL
    again (to 1e-6 relative), else the samples, images or model differ. Every checkpoint is
    matched to a finished row and loaded before any is evaluated, and nothing is written
    (summary, machine.json, report) until every one has given its NLL again: a failure or an
    interruption leaves the folder as it was."""
    from ..training.model import load_checkpoint

    summary = read_rows(out / "summary.csv")
    if not summary:
        raise ValueError(f"--update: no summary.csv rows in {out} to add diagnostics to")
    rows = {Run(r["objective"], int(r["k"]), r["estimator"], int(r["seed"]), r["likelihood"], int(r["layers"])).name: r
            for r in summary}
    paths = [Path(path) for path in checkpoints]
    unknown = [str(path) for path in paths if path.stem not in rows]
    if unknown:
        raise ValueError(f"--evaluate: no run in {out / 'summary.csv'} is named like {', '.join(unknown)} "
                         f"(its runs: {', '.join(rows)})")
    unfinished = [f"{path.stem} (diverged in epoch {rows[path.stem]['diverged_epoch'] or '?'})" for path in paths
                  if not rows[path.stem].get("test_nll")]
    if unfinished:
        raise ValueError(f"--evaluate: {', '.join(unfinished)} has no test NLL in {out / 'summary.csv'} to check "
                         "against, and no diagnostics to add")
    models = [load_checkpoint(path, device) for path in paths]
    started, splits, results = now(), {}, []
    for path, model in zip(paths, models):
        row = rows[path.stem]
        result = evaluate_as_trained(model, row["likelihood"], int(row["seed"]), schedule, backend, device, data_seed,
                                     splits)
        recorded = float(row["test_nll"])
        if not math.isclose(result["test_nll"], recorded, rel_tol=1e-6):
            raise ValueError(f"--evaluate {path}: test NLL {result['test_nll']:.6f}, but {out / 'summary.csv'} "
                             f"says {recorded:.6f}: not the model, test images, samples or k it was evaluated "
                             "with (check --seed, --test-size and --eval-k); nothing written")
        results.append(result)
        log(f"{path.stem}: test NLL {recorded:.2f} again; jackknife {result['jvi1_nll']:.2f}, "
            f"{result['jvi2_nll']:.2f}; k-hat > {KHAT_UNRELIABLE} on {result['khat_above']:.0%} of the images")
    for path, result in zip(paths, results):
        rows[path.stem].update({name: result[name] for name in DIAGNOSTICS})
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    record = MachineRecord.open(out / "machine.json", device, resume=True)
    missing = missing_cells(record.as_dict())  # the rows are the same runs: a partial merge stays partial
    entry = record.start_run(started=started, backend=backend, schedule=asdict(schedule), data_seed=data_seed,
                             evaluated=[str(path) for path in paths], **({"missing_cells": missing} if missing else {}))
    record.finish(entry)
    return render_experiment(out)


SUMMARY_COLUMNS = ["objective", "k", "estimator", "seed", "likelihood", "layers", "backend", "epochs",
                   "train_seconds", "eval_seconds", "train_objective", "test_nll", "test_bpd", "test_elbo",
                   "active_units", "active_units_per_layer", "diverged_epoch", "paper_nll", "paper_active_units",
                   *DIAGNOSTICS]
CURVE_COLUMNS = ["objective", "k_train", "estimator", "seed", "likelihood", "layers", "k_eval", "L_k", "elbo"]
COLLAPSE_COLUMNS = ["likelihood", "data", "epoch", "lr", "train_objective", "min_log_scale", "seconds", "diverged"]


def read_rows(path: Path) -> list[dict]:
    """A summary.csv's or lk_curve.csv's rows; a row from before the likelihood or layers
    column (the one-layer Bernoulli experiment's) reads as the Bernoulli's, of one layer."""
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{**row, "likelihood": row.get("likelihood") or "bernoulli", "layers": row.get("layers") or "1"}
                for row in csv.DictReader(f)]
