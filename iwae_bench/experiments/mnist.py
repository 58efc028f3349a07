"""The seed's claim, measured: VAE vs multi-sample VAE vs IWAE on real (binarized) MNIST.

``python -m iwae_bench experiment`` trains one architecture (784-200-200-50, tanh, as in the
IWAE paper's one-stochastic-layer model) with five objectives (and, on request, the IWAE
with the STL and DReG estimators, and several seeds), evaluates each on held-out images as the
paper does, and writes OUT (default results/runs/experiment/):

    runs/<run name>.csv         per-epoch training curve (name: objective-k-estimator-seed)
    checkpoints/<run name>.pt   the trained model (the SNR benchmark loads it)
    summary.csv                 test NLL (IWAE bound, k = 5000), active units, ELBO, time
    lk_curve.csv                L_k and the ELBO on the test set for k = 1 ... 5000
    plots/, report.md, machine.json   (the report: ``mnist_report``)

Evaluation streams the k = 5000 samples in chunks (with the fused backend through the kernel
that fuses the decoder's output layer into the bound: no logits stored) so memory stays
bounded, and combines the chunks' logsumexps exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..files import write_csv
from ..harness.machine import MachineRecord
from ..harness.shard import Shard
from ..training import BernoulliVAE, IWAELoss, log_weights
from ..training.bounds import head_log_weights
from ..training.model import save_checkpoint
from ..training.sampling import SAMPLE_BLOCK, noise_blocks
from .data import MNISTSplit, binarize, load_mnist
from .mnist_report import render_experiment
from .paper import paper_active_units, paper_nll

PAPER_RUNS = [("elbo", 1), ("multi_sample_elbo", 5), ("multi_sample_elbo", 50), ("iwae", 5), ("iwae", 50)]
ACTIVE_THRESHOLD = 1e-2


@dataclass(frozen=True)
class Run:
    """One trained model: an objective at k samples, a gradient estimator, a training seed."""
    objective: str
    k: int
    estimator: str = "iwae"
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.objective}-k{self.k}-{self.estimator}-seed{self.seed}"

    def key(self) -> tuple:
        return (self.objective, self.k, self.estimator, self.seed)


def work_list(estimators=(), seeds: int = 1, base_seed: int = 0) -> list[Run]:
    """The experiment's runs: the paper's five with the total gradient, then the IWAE at k = 5
    and 50 with each extra estimator, each repeated over ``seeds`` training seeds. Every shard
    builds this same list and takes its part."""
    kinds = [(objective, k, "iwae") for objective, k in PAPER_RUNS]
    kinds += [("iwae", k, estimator) for estimator in estimators if estimator != "iwae" for k in (5, 50)]
    return [Run(objective, k, estimator, base_seed + i) for i in range(seeds) for objective, k, estimator in kinds]


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
        if backend == "fused":  # the chunk's logits are never stored
            layer = model.output_layer
            log_w = head_log_weights(x, model.decode_hidden(z), layer.weight, layer.bias, z, mu, logvar, "fused")
        else:
            log_w = log_weights(x, model.decoder(z), z, mu, logvar, backend)
        log_w_parts.append(log_w)
        lse_parts.append(torch.logsumexp(log_w, dim=1))
    return torch.cat(log_w_parts, dim=1), torch.logsumexp(torch.stack(lse_parts, dim=1), dim=1)


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
    (mean log-weight) and the active units."""
    lse_all, curve = [], {k: [] for k in schedule.k_curve}
    elbo = []
    for start in range(0, test.shape[0], batch):
        x = test[start:start + batch]
        log_w, lse = streamed_log_weights(model, x, schedule.eval_k, schedule.eval_chunk, backend,
                                          seed=seed + start)
        lse_all.append(lse.double())
        for k in schedule.k_curve:
            curve[k].append((torch.logsumexp(log_w[:, :k].double(), dim=1) - math.log(k)))
        elbo.append(log_w.double().mean(dim=1))
    units, variance = active_units(model, test)
    bound = torch.cat(lse_all) - math.log(schedule.eval_k)
    return {"test_nll": -bound.mean().item(), "test_elbo": torch.cat(elbo).mean().item(),
            "active_units": units, "unit_variance": variance.tolist(),
            "curve": {k: torch.cat(v).mean().item() for k, v in curve.items()}}


# --------------------------------------------------------------------------- training


def train(run: Run, split: MNISTSplit, schedule: Schedule, backend: str,
          device: torch.device, log=print) -> tuple[BernoulliVAE, list[dict]]:
    """Adam (betas 0.9/0.999, eps 1e-4, as in the paper) on dynamically binarized images."""
    objective, k, seed = run.objective, run.k, run.seed
    torch.manual_seed(seed)
    model = BernoulliVAE(split.train.shape[1], schedule.latent, schedule.hidden).to(device)
    loss_fn = IWAELoss(objective, backend, estimator=run.estimator)
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.stages[0][1], betas=(0.9, 0.999), eps=1e-4)
    data_gen = torch.Generator().manual_seed(seed + 1)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 2)
    train = split.train
    history, epoch, started = [], 0, time.perf_counter()
    for stage_epochs, lr in schedule.stages:
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(stage_epochs):
            epoch += 1
            order = torch.randperm(train.shape[0], generator=data_gen)
            total, count = 0.0, 0
            for start in range(0, train.shape[0], schedule.batch_size):
                x = binarize(train[order[start:start + schedule.batch_size]], data_gen).to(device)
                if backend == "fused":  # the output layer fused into the bound: no logits stored
                    h, z, mu, logvar = model.forward_hidden(x, k, generator=noise_gen)
                    loss = loss_fn.from_hidden(x, h, model.output_layer, z, mu, logvar)
                else:
                    loss = loss_fn(x, *model(x, k, generator=noise_gen))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * x.shape[0]
                count += x.shape[0]
            history.append({"epoch": epoch, "lr": lr, "train_objective": -total / count,
                            "seconds": time.perf_counter() - started})
    log(f"  {run.name}: {epoch} epochs in {time.perf_counter() - started:.0f} s, "
        f"train objective {history[-1]['train_objective']:.2f}")
    return model, history


# --------------------------------------------------------------------------- the experiment


def run_experiment(out: Path, schedule: Schedule, backend: str, device: torch.device,
                   runs: list[Run] | None = None, data_seed: int = 0, resume: bool = False,
                   shard: Shard | None = None, log=print) -> Path:
    """Train and evaluate every run (this shard's part of them); write CSVs, checkpoints,
    plots, report and machine.json into ``out``. ``resume`` keeps the runs already in
    summary.csv and trains only the others."""
    runs = list(runs if runs is not None else RUNS)
    mine = shard.take(runs) if shard is not None else runs
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("runs", "checkpoints"):
        (out / folder).mkdir(exist_ok=True)
    summary = _read_rows(out / "summary.csv") if resume else []
    curve_rows = _read_rows(out / "lk_curve.csv") if resume else []
    done = {(r["objective"], int(r["k"]), r["estimator"], int(r["seed"])) for r in summary}
    split = load_mnist(schedule.train_size, schedule.test_size, data_seed)
    test = split.test.to(device)
    record = MachineRecord.open(out / "machine.json", device, resume=resume)
    entry = record.start_run(backend=backend, schedule=asdict(schedule), data_seed=data_seed,
                             runs=[asdict(r) for r in runs], shard=shard.as_dict() if shard else None)
    for run in mine:
        if run.key() in done:
            continue
        model, history = train(run, split, schedule, backend, device, log)
        write_csv(out / "runs" / f"{run.name}.csv", history)
        save_checkpoint(model, out / "checkpoints" / f"{run.name}.pt")
        start = time.perf_counter()
        result = evaluate(model, test, schedule, backend, seed=run.seed)
        eval_seconds = time.perf_counter() - start
        summary.append({**asdict(run), "backend": backend, "epochs": schedule.epochs,
                        "train_seconds": history[-1]["seconds"], "eval_seconds": eval_seconds,
                        "train_objective": history[-1]["train_objective"],
                        "test_nll": result["test_nll"], "test_elbo": result["test_elbo"],
                        "active_units": result["active_units"],
                        "paper_nll": paper_nll(run.objective, run.k, run.estimator),
                        "paper_active_units": paper_active_units(run.objective, run.k, run.estimator)})
        curve_rows += [{"objective": run.objective, "k_train": run.k, "estimator": run.estimator,
                        "seed": run.seed, "k_eval": ke, "L_k": value, "elbo": result["test_elbo"]}
                       for ke, value in result["curve"].items()]
        log(f"  -> test NLL {result['test_nll']:.2f} nats, {result['active_units']} active units "
            f"(evaluated in {eval_seconds:.0f} s)")
        write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
        write_csv(out / "lk_curve.csv", curve_rows, CURVE_COLUMNS)
    record.finish(entry)
    return render_experiment(out) if summary else out / "summary.csv"


SUMMARY_COLUMNS = ["objective", "k", "estimator", "seed", "backend", "epochs", "train_seconds",
                   "eval_seconds", "train_objective", "test_nll", "test_elbo", "active_units",
                   "paper_nll", "paper_active_units"]
CURVE_COLUMNS = ["objective", "k_train", "estimator", "seed", "k_eval", "L_k", "elbo"]


def _read_rows(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
