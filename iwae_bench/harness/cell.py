"""One cell: a variant on one problem in one mode, measured into one results row.

    problem -> inputs -> variant -> (bound, time, memory) -> row

The harness, not the variants, owns all of it: the first call (which compiles) is checked
against the float64 reference for the accuracy columns; then the call is timed (and timed
again once if the samples were noisy), its peak memory taken, and the speed columns computed
from the fewest bytes the cell must move. A failure becomes the row's status, never an
exception, so one bad cell cannot stop a sweep. The sweep, the pytest-benchmark runs and
validate all build their rows here.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import torch

import kernels
from kernels.likelihood import BERNOULLI, Likelihood

from .. import reference
from ..problems import HeadInputs, Problem, named_tensors, with_tensors
from ..training.family import IWAE_OBJECTIVE, Objective
from ..variants import Variant, reset_compiled
from .memory import AllocationTracker
from .timing import Timing, peak_extra_memory, time_call

# --------------------------------------------------------------------------- bytes


def bound_bytes(inputs, mode: str) -> int:
    """The fewest bytes a bound or decoder-head cell must move: every input read once and the
    [B] float32 bound written once; forward + backward also reads the incoming [B] gradient and
    writes the gradient of every input but x (data) once: logits, z, mu and logvar, or for the
    head h, weight, bias, z, mu and logvar. What the likelihood reads is in the inputs: x, the
    decoder output's C channels ([B, k, C D] logits, the head's [C D, H] weight and [C D]
    bias) and a per-pixel scale [D] (read, and its gradient written) where it has one. Two
    stochastic layers: each layer's sample and parameters, the per-sample [B, k, d] ones
    included (the bound reads them as it reads z)."""
    x, *rest = named_tensors(inputs).values()
    read = sum(t.numel() * t.element_size() for t in (x, *rest))
    out = x.shape[0] * 4
    if mode == "forward":
        return read + out
    return read + 2 * out + sum(t.numel() * t.element_size() for t in rest)


def head_flops(inputs, mode: str) -> int | None:
    """The fewest flops of a decoder-head cell: the output layer's matmul, 2 B k H D, and in
    backward mode its two gradients (dh = g W and dW = g^T h) besides: 6 B k H D. None for a
    bound cell (no matmul)."""
    if not isinstance(inputs, HeadInputs):
        return None
    B, k, H = inputs.h.shape
    matmul = 2 * B * k * H * inputs.weight.shape[0]
    return matmul if mode == "forward" else 3 * matmul


def reduction_bytes(log_w: torch.Tensor) -> int:
    """The fewest bytes of the reduction alone: log_w read once, the [B] float32 bound written once."""
    return log_w.numel() * log_w.element_size() + log_w.shape[0] * 4


# --------------------------------------------------------------------------- accuracy


def max_abs_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| where want is finite; inf if got is not finite there (nan when
    want has no finite value to compare with)."""
    want = want.to(got.device)
    finite = torch.isfinite(want)
    if not finite.any():
        return float("nan")
    diff = (got.detach().double()[finite] - want[finite]).abs()
    return float("inf") if not torch.isfinite(diff).all() else diff.max().item()


SHARED = ("weight", "bias", "scale")  # inputs not of one example: whole in every slice


class Reference:
    """float64 values for one problem's inputs, shared by all its variants and modes.

    Computed over slices of the batch (each example's bound depends on its own row only), so
    a float64 copy of the largest cells' logits never has to exist whole. A decoder-head
    problem's logits are built in float64 from h, weight and bias, slice by slice. The
    likelihood (kernels/likelihood.py) is the problem's; a per-pixel scale is an input.
    """

    CHUNK_ELEMENTS = 1 << 25  # float64 logits elements per slice

    def __init__(self, inputs, objective: Objective = IWAE_OBJECTIVE, likelihood: Likelihood = BERNOULLI):
        self.inputs = inputs
        self.objective = objective
        self.likelihood = likelihood
        self.head = isinstance(inputs, HeadInputs)
        self.names = list(named_tensors(inputs))  # the stochastic layers' as layers[l].field
        log_w = torch.cat([self._log_weights(part) for part in self._slices()])
        self.bound = reference.objective_bound(log_w, objective)
        self.elbo = reference.elbo(log_w)

    def _log_weights(self, part: dict) -> torch.Tensor:
        given = with_tensors(self.inputs, part)
        logits = given.logits() if self.head else given.logits
        return reference.log_weights(given.x, logits, given.z, given.mu, given.logvar, self.likelihood, given.scale)

    def _slices(self) -> Iterator[dict]:
        x = self.inputs[0]
        k = self.inputs[1].shape[1]
        rows = max(1, self.CHUNK_ELEMENTS // (k * x.shape[1]))
        given = named_tensors(self.inputs)
        for start in range(0, x.shape[0], rows):
            yield {name: t if name in SHARED else t[start:start + rows] for name, t in given.items()}

    def grad_max_abs_err(self, grads) -> float:
        """Largest error of the gradients of the sum of the objective's bound (L_k by default)
        with respect to every input but x (logits, z, mu, logvar; or h, weight, bias, z, mu,
        logvar; and a per-pixel scale) against float64 autograd. The gradients of the inputs
        every slice shares (the head's weight and bias, the scale) sum over the slices before
        they are compared."""
        worst, start, shared = 0.0, 0, {}
        names = self.names[1:]
        for part in self._slices():
            leaves = {name: part[name].detach().double().requires_grad_() for name in names}
            bound = reference.objective_bound(self._log_weights({**part, **leaves}), self.objective)
            want = torch.autograd.grad(bound.sum(), list(leaves.values()))
            stop = start + part["x"].shape[0]
            for name, got, expected in zip(names, grads, want):
                if name in SHARED:
                    shared[name] = shared.get(name, 0) + expected
                else:
                    worst = max(worst, max_abs_err(got[start:stop], expected))
            start = stop
        for name, expected in shared.items():
            worst = max(worst, max_abs_err(grads[names.index(name)], expected))
        return worst


def bound_accuracy(bound: torch.Tensor, ref: Reference) -> dict:
    """The accuracy columns of a bound row: its mean, the float64 ELBO, the largest error,
    the finite fraction and the IWAE-ELBO gap (this bound minus the float64 L_1)."""
    bound = bound.detach()
    return {
        "bound_mean": bound.double().mean().item(),
        "elbo_mean": ref.elbo.mean().item(),
        "max_abs_err": max_abs_err(bound, ref.bound),
        "finite_fraction": torch.isfinite(bound).double().mean().item(),
        "iwae_elbo_gap": (bound.double().cpu() - ref.elbo.cpu()).mean().item(),
    }


def reduction_accuracy(bound: torch.Tensor, want: torch.Tensor) -> dict:
    """The accuracy columns of a reduction row, against the float64 iwae_bound ``want``."""
    bound = bound.detach()
    return {"bound_mean": bound.double().mean().item(), "max_abs_err": max_abs_err(bound, want),
            "finite_fraction": torch.isfinite(bound).double().mean().item()}


# --------------------------------------------------------------------------- identity


def bound_identity(variant: str, problem: Problem, mode: str, device: torch.device) -> dict:
    """The identity columns of a bound or decoder-head cell (plus the thread count it runs with)."""
    return {"family": problem.family, "variant": variant, "device": device.type, "dtype": problem.dtype,
            "k": problem.k, "batch": problem.batch, "latent": problem.latent,
            "data_dim": problem.data_dim, "hidden": problem.hidden, "mode": mode,
            "regime": problem.regime, "objective": problem.objective, "likelihood": problem.likelihood,
            "layers": problem.layers, "seed": problem.seed, "threads": torch.get_num_threads()}


def reduction_identity(variant: str, batch: int, k: int, device: torch.device, seed: int) -> dict:
    """The identity columns of a reduction cell: float32 log-weights, latent and data_dim 0 (and
    the defaults of the axes that make log-weights, which it takes ready-made)."""
    return {"family": "reduction", "variant": variant, "device": device.type, "dtype": "float32",
            "k": k, "batch": batch, "latent": 0, "data_dim": 0, "hidden": 0, "mode": "forward",
            "regime": "realistic", "objective": "iwae", "likelihood": "bernoulli", "layers": 1,
            "seed": seed, "threads": torch.get_num_threads()}


def reduction_log_weights(batch: int, k: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[B, k] float32 log-weights at realistic scale (about -150 nats, spread of 10)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, k, generator=gen, device=device) * 10 - 150


# --------------------------------------------------------------------------- measuring


def speed_columns(samples: int, nbytes: int, seconds: float, copy_gbps: float | None,
                  flops: int | None = None, matmul_tflops: float | None = None) -> dict:
    """samples_per_s, gbps and bw_fraction of a cell from its median time; for a cell with a
    matmul also tflops and flop_fraction (of the matmul peak measured in the same run), so the
    report can tell which roof binds."""
    gbps = nbytes / seconds / 1e9
    columns = {"samples_per_s": samples / seconds, "gbps": gbps,
               "bw_fraction": gbps / copy_gbps if copy_gbps else None}
    if flops:
        tflops = flops / seconds / 1e12
        columns.update(tflops=tflops, flop_fraction=tflops / matmul_tflops if matmul_tflops else None)
    return columns


def timing_columns(timing: Timing) -> dict:
    return {"time_ms": timing.median_ms, "time_ms_p20": timing.p20_ms, "time_ms_p80": timing.p80_ms,
            "time_samples": timing.samples, "time_spread": timing.spread}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def timed(call: Callable[[], object], device: torch.device, min_time: float) -> tuple[Timing, bool]:
    """Time ``call``; a noisy timing is measured once more (a burst of other work may have
    passed). Returns the timing kept and whether it was re-measured."""
    timing = time_call(call, device, min_run_time=min_time)
    if not timing.noisy:
        return timing, False
    return time_call(call, device, min_run_time=min_time), True


def run_cell(row: dict, variant: Variant, call: Callable[[], object], check: Callable[[object], dict],
             device: torch.device, *, samples: int, copy_gbps: float | None, min_time: float) -> dict:
    """The harness's part of every cell, filling ``row``: one first call (compiles; ``check``
    turns its output into the accuracy columns), then timing, peak memory and speed."""
    try:
        if variant.compiles:
            reset_compiled()  # a fresh compile per cell: no recompile limit, no silent eager
        interpreted = variant.uses_triton and kernels.interpreted()
        tracker = AllocationTracker() if interpreted else contextlib.nullcontext()
        start = time.perf_counter()
        with tracker:  # an interpreted call is slow: its one run is also its memory measurement
            first = call()
        _synchronize(device)
        first_ms = (time.perf_counter() - start) * 1e3
        status, notes = "ok", []
        if variant.compiles:
            row["compile_ms"] = round(first_ms, 3)
            if _compiled_graphs() == 0:
                status, notes = "fallback", ["torch.compile captured no graph: this ran eager"]
        row.update(check(first))
        if interpreted:
            timing = Timing(first_ms, first_ms, first_ms, 1)  # the one call above
            row["peak_mem_bytes"] = tracker.peak
            status, notes = "interpreted", ["Triton interpreter on CPU: a correctness run, not a speed"]
        else:
            timing, again = timed(call, device, min_time)
            row["peak_mem_bytes"] = peak_extra_memory(call, device, compiled=variant.compiles)
            if timing.noisy:
                status = "noisy" if status == "ok" else status
                notes.append(f"noisy timing: p80/p20 = {timing.spread:.2f} over {timing.samples} "
                             f"samples{' after a second measurement' if again else ''}")
        row.update(timing_columns(timing))
        if status in ("ok", "noisy"):
            row.update(speed_columns(samples, row["bytes"], timing.median_ms * 1e-3, copy_gbps,
                                     row.get("flops"), row.get("matmul_tflops")))
        row.update({"status": status, "message": "; ".join(notes)})
    except Exception as error:  # one failing cell must not stop the sweep
        row.update({"status": "oom" if _is_oom(error) else "error",
                    "message": " ".join(f"{type(error).__name__}: {error}".split())[:300]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def bound_call(variant: Variant, inputs, mode: str, objective: Objective = IWAE_OBJECTIVE,
               likelihood: Likelihood = BERNOULLI) -> Callable[[], tuple]:
    """What one call of a bound or head cell runs: the objective's bound under the likelihood,
    and in backward mode its gradients with respect to every input but x (a per-pixel scale
    among them). Returns (bound, grads or None)."""
    if mode == "forward":
        return lambda: (variant(*inputs, objective=objective, likelihood=likelihood), None)
    leaves = {name: t.detach().requires_grad_() for name, t in list(named_tensors(inputs).items())[1:]}
    given = with_tensors(inputs, leaves)

    def call():
        bound = variant(*given, objective=objective, likelihood=likelihood)
        return bound, torch.autograd.grad(bound.sum(), list(leaves.values()))

    return call


def bound_check(ref: Reference) -> Callable[[tuple], dict]:
    def check(first):
        bound, grads = first
        columns = bound_accuracy(bound, ref)
        if grads is not None:
            columns["grad_max_abs_err"] = ref.grad_max_abs_err(grads)
        return columns

    return check


def measure_bound(variant: Variant, problem: Problem, inputs, ref: Reference, mode: str,
                  device: torch.device, copy_gbps: float | None, min_time: float = 0.2,
                  matmul_tflops: float | None = None) -> dict:
    """Run one bound or decoder-head cell and return its row (failures included, as a status)."""
    flops = head_flops(inputs, mode)
    row = {**bound_identity(variant.name, problem, mode, device), "copy_gbps": copy_gbps,
           "bytes": bound_bytes(inputs, mode), "flops": flops,
           "matmul_tflops": matmul_tflops if flops else None}
    call = bound_call(variant, inputs, mode, problem.spec, problem.likelihood_spec)
    return run_cell(row, variant, call, bound_check(ref), device,
                    samples=problem.batch * problem.k, copy_gbps=copy_gbps, min_time=min_time)


def measure_reduction(variant: Variant, log_w: torch.Tensor, device: torch.device,
                      copy_gbps: float | None, min_time: float = 0.2, seed: int = 0) -> dict:
    """One cell of the reduction alone, iwae_bound(log_w [B, k])."""
    batch, k = log_w.shape
    row = {**reduction_identity(variant.name, batch, k, device, seed), "copy_gbps": copy_gbps,
           "bytes": reduction_bytes(log_w)}
    want = reference.iwae_bound(log_w)
    return run_cell(row, variant, lambda: variant(log_w), lambda bound: reduction_accuracy(bound, want),
                    device, samples=batch * k, copy_gbps=copy_gbps, min_time=min_time)
