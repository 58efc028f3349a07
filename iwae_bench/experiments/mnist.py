"""The seed's claim, measured: VAE vs multi-sample VAE vs IWAE on real (binarized) MNIST.

``python -m iwae_bench experiment`` trains one architecture (784-200-200-50, tanh, as in the
IWAE paper's one-stochastic-layer model) with five objectives, evaluates each on held-out
images as the paper does, and writes results/experiment/:

    runs/<objective>-k<k>.csv   per-epoch training curve
    summary.csv                 test NLL (IWAE bound, k = 5000), active units, ELBO, time
    lk_curve.csv                L_k and the ELBO on the test set for k = 1 ... 5000
    plots/, report.md, machine.json   (the report: ``mnist_report``)

Evaluation streams the k = 5000 samples in chunks (through the Triton log-weights kernel with
the fused backend) so memory stays bounded, and combines the chunks' logsumexps exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..files import write_csv
from ..harness.machine import MachineRecord
from ..training import BernoulliVAE, IWAELoss, log_weights
from ..training.sampling import SAMPLE_BLOCK, noise_blocks
from .data import MNISTSplit, binarize, load_mnist
from .mnist_report import render_experiment
from .paper import paper_active_units, paper_nll

RUNS = [("elbo", 1), ("multi_sample_elbo", 5), ("multi_sample_elbo", 50), ("iwae", 5), ("iwae", 50)]
ACTIVE_THRESHOLD = 1e-2


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

    Memory holds one chunk's logits [B, chunk, D] at a time; each chunk's log-weights come
    from ``training.log_weights`` with ``backend``. The chunks' logsumexps are combined exactly.
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


def train(objective: str, k: int, split: MNISTSplit, schedule: Schedule, backend: str,
          device: torch.device, seed: int = 0, log=print) -> tuple[BernoulliVAE, list[dict]]:
    """Adam (betas 0.9/0.999, eps 1e-4, as in the paper) on dynamically binarized images."""
    torch.manual_seed(seed)
    model = BernoulliVAE(split.train.shape[1], schedule.latent, schedule.hidden).to(device)
    loss_fn = IWAELoss(objective, backend)
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
                loss = loss_fn(x, *model(x, k, generator=noise_gen))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * x.shape[0]
                count += x.shape[0]
            history.append({"epoch": epoch, "lr": lr, "train_objective": -total / count,
                            "seconds": time.perf_counter() - started})
    log(f"  {objective} k={k}: {epoch} epochs in {time.perf_counter() - started:.0f} s, "
        f"train objective {history[-1]['train_objective']:.2f}")
    return model, history


# --------------------------------------------------------------------------- the experiment


def run_experiment(out: Path, schedule: Schedule, backend: str, device: torch.device,
                   runs=RUNS, seed: int = 0, log=print) -> Path:
    """Train and evaluate every run; write CSVs, plots, report and machine.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    split = load_mnist(schedule.train_size, schedule.test_size, seed)
    test = split.test.to(device)
    record = MachineRecord.open(out / "machine.json", device)
    run = record.start_run(backend=backend, schedule=asdict(schedule))
    summary, curve_rows = [], []
    for objective, k in runs:
        model, history = train(objective, k, split, schedule, backend, device, seed, log)
        write_csv(out / "runs" / f"{objective}-k{k}.csv", history)
        start = time.perf_counter()
        result = evaluate(model, test, schedule, backend, seed=seed)
        eval_seconds = time.perf_counter() - start
        summary.append({"objective": objective, "k": k, "backend": backend, "epochs": schedule.epochs,
                        "train_seconds": history[-1]["seconds"], "eval_seconds": eval_seconds,
                        "train_objective": history[-1]["train_objective"],
                        "test_nll": result["test_nll"], "test_elbo": result["test_elbo"],
                        "active_units": result["active_units"], "paper_nll": paper_nll(objective, k),
                        "paper_active_units": paper_active_units(objective, k)})
        curve_rows += [{"objective": objective, "k_train": k, "k_eval": ke, "L_k": value,
                        "elbo": result["test_elbo"]} for ke, value in result["curve"].items()]
        log(f"  -> test NLL {result['test_nll']:.2f} nats, {result['active_units']} active units "
            f"(evaluated in {eval_seconds:.0f} s)")
        write_csv(out / "summary.csv", summary)
        write_csv(out / "lk_curve.csv", curve_rows)
    record.finish(run)
    return render_experiment(out)
