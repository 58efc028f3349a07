"""Host-side helpers shared by every kernel: the interpreter switch, input checks, the tiling
policy (autotuned, default or interpreter tiles) and the split-k plan with its workspace.

Input checks live here, once, so the Triton entry points and the PyTorch code in ``iwae_bench``
reject bad input with the same messages.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreted() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET`` set to a
    true value). The one place the variable is parsed."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def target_programs(device: torch.device) -> int:
    """How many programs a launch wants so every SM has work (a few per SM on a GPU).

    Under the interpreter programs run one after another, so a small number is as fast
    as any and still exercises the split paths.
    """
    if _capture is not None:
        return 4 * _capture.sm_count
    if device.type == "cuda" and not interpreted():
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# --------------------------------------------------------------------------- input checks


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_float_tensor(name: str, t, ndim: int | None = None, layout: str = "") -> None:
    """A floating tensor with ``ndim`` dimensions, or a TypeError/ValueError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {shape_str(t)}")


def check_devices(tensors: dict[str, torch.Tensor], for_kernel: bool) -> None:
    """One real device for all; for a Triton kernel, CUDA (or any device under the interpreter)."""
    for name, t in tensors.items():
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name} is on the {t.device.type} device; the bound needs real data "
                             "on a cpu or cuda device")
    devices = {t.device for t in tensors.values()}
    if len(devices) > 1:
        listed = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")
    if for_kernel and not interpreted():
        name, t = next(iter(tensors.items()))
        if t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}: the Triton kernels run on CUDA tensors "
                             "(or on CPU tensors with TRITON_INTERPRET=1 set before triton is imported)")


# layout of each bound input, in the order the kernels take them
BOUND_LAYOUT = {"x": ("B", "D"), "logits": ("B", "k", "D"), "z": ("B", "k", "d"),
                "mu": ("B", "d"), "logvar": ("B", "d")}
# who sets a size when the arguments disagree: the majority, ties broken in this order
SIZE_PRIORITY = {"B": ("logits", "x", "z", "mu", "logvar"), "k": ("logits", "z"),
                 "D": ("logits", "x"), "d": ("mu", "logvar", "z")}
# checked in this order, so the argument outvoted by the others is named before a tie's loser
CHECK_ORDER = ("mu", "logvar", "z", "x", "logits")


def check_shapes(tensors: dict[str, torch.Tensor], layout: dict[str, tuple],
                 priority: dict[str, tuple], order: tuple) -> dict[str, int]:
    """Read each named size from every argument that carries it; where they disagree the
    majority sets it (ties: ``priority``), and the first argument (in ``order``) whose shape
    does not match is named with the shape it should have. Returns the sizes."""
    sizes = {}
    for size, carriers in priority.items():
        votes = Counter(tensors[n].shape[layout[n].index(size)] for n in carriers)
        best = max(votes.values())
        sizes[size] = next(tensors[n].shape[layout[n].index(size)] for n in carriers
                           if votes[tensors[n].shape[layout[n].index(size)]] == best)
    for name in order:
        want = [sizes[s] for s in layout[name]]
        if list(tensors[name].shape) != want:
            others = [f"{n} {shape_str(t)}" for n, t in tensors.items() if n != name]
            raise ValueError(
                f"{name} must have shape [{', '.join(map(str, want))}] ({', '.join(layout[name])}) "
                f"to match {', '.join(others[:-1])} and {others[-1]}; got {shape_str(tensors[name])}")
    return sizes


def check_inputs(tensors: dict[str, torch.Tensor], layout: dict[str, tuple], priority: dict[str, tuple],
                 order: tuple) -> dict[str, int]:
    """Each named argument a floating tensor of its layout's rank, and their sizes consistent
    (``check_shapes``); returns the sizes."""
    for name, t in tensors.items():
        dims = layout[name]
        check_float_tensor(name, t, len(dims), "[" + ", ".join(dims) + "]")
    return check_shapes(tensors, layout, priority, order)


def check_bound_inputs(x, logits, z, mu, logvar, *, for_kernel: bool = False, likelihood=None,
                       scale=None) -> tuple[int, int, int, int]:
    """Validate the five bound inputs; return (B, k, D, d).

    x [B, D], logits [B, k, C D] (the decoder's C output channels per pixel, C = 1 for the
    Bernoulli: ``likelihood``, kernels/likelihood.py), z [B, k, d], mu [B, d], logvar [B, d];
    ``scale`` [D] for a likelihood with a per-pixel scale, else None; floating dtypes (they may
    differ: float16/bfloat16 logits beside float32 latents is the usual mix); one device.
    """
    shaped = check_channels("logits", logits, x, likelihood)
    tensors = {"x": x, "logits": shaped, "z": z, "mu": mu, "logvar": logvar}
    sizes = check_inputs(tensors, BOUND_LAYOUT, SIZE_PRIORITY, CHECK_ORDER)
    if sizes["k"] < 1:
        raise ValueError(f"k must be >= 1: logits has shape {shape_str(logits)} (k = {sizes['k']})")
    if sizes["D"] < 1:
        raise ValueError(f"logits must have D >= 1, got shape {shape_str(logits)}")
    if sizes["d"] < 1:
        raise ValueError(f"z must have a latent width d >= 1, got shape {shape_str(z)}")
    check_scale(scale, sizes["D"], likelihood, tensors)
    check_devices(tensors, for_kernel)
    return sizes["B"], sizes["k"], sizes["D"], sizes["d"]


def check_channels(name: str, t, x, likelihood, axis: int = -1):
    """``t`` with its ``axis`` cut to its first channel (D wide) when the likelihood has C > 1
    channels and ``t`` holds C D there (so the shape checks see D), or a ValueError naming
    ``name`` when it holds a width that is not C times x's D."""
    C = 1 if likelihood is None else likelihood.channels
    if C == 1 or not isinstance(t, torch.Tensor) or not isinstance(x, torch.Tensor) or x.dim() != 2 \
            or t.dim() == 0:
        return t
    D = x.shape[1]
    if t.shape[axis] != C * D:
        raise ValueError(f"{name} must hold {C} channels of D = {D} (x's width) for likelihood "
                         f"{likelihood.label!r}: {C * D} along dim {axis % t.dim()}, got shape {shape_str(t)}")
    return t.narrow(axis, 0, D)


def check_scale(scale, D: int, likelihood, tensors: dict) -> None:
    """A per-pixel log-scale [D] exactly when the likelihood takes one (added to ``tensors``
    for the device check)."""
    if likelihood is None or not likelihood.needs_scale:
        if scale is not None:
            label = "bernoulli" if likelihood is None else likelihood.label
            raise ValueError(f"scale is for a likelihood with a per-pixel scale (e.g. gaussian:pixel); "
                             f"likelihood {label!r} takes none")
        return
    if scale is None:
        raise ValueError(f"likelihood {likelihood.label!r} needs scale, the per-pixel log-scale [D]")
    check_float_tensor("scale", scale, 1, "[D]")
    if scale.shape[0] != D:
        raise ValueError(f"scale must have shape [{D}] (D), got shape {shape_str(scale)}")
    tensors["scale"] = scale


def check_log_weights(name: str, t, allow_empty: bool = False, for_kernel: bool = False) -> int:
    """``t`` is a floating [..., k] tensor with k >= 1 (or k = 0 if ``allow_empty``); return k."""
    check_float_tensor(name, t)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension [..., k], got a 0-d tensor")
    k = t.shape[-1]
    if k < 1 and not allow_empty:
        raise ValueError(f"k must be >= 1: {name} has shape {shape_str(t)} (k = {k})")
    check_devices({name: t}, for_kernel)
    return k


# --------------------------------------------------------------------------- the bound's epilogue


@dataclass(frozen=True)
class Reduction:
    """How the bound reduces an example's log-weights, the one epilogue every bound kernel takes:
    the k samples form ``groups`` (M) groups of K = k / M consecutive samples, and

        bound = (1 / M) sum_g [ (1 - beta) (logsumexp_{i in g} (scale log w_i) - log K) / scale
                               + beta mean_{i in g} log w_i ]

    The IWAE bound is (scale 1, 1 group, beta 0); VR-alpha is scale 1 - alpha; MIWAE(M, K) is M
    groups; CIWAE is beta; the ELBOs are beta = 1 (``iwae_bench.training.family`` maps every
    objective onto one). scale = 0 (VR at alpha = 1) is the limit beta = 1, and is stored so.

    Its gradient, for the kernels' backward: d bound / d log w_i = (1 - beta) / M w~_i + beta / k,
    w~_i = exp(scale log w_i - lse_g(i)) the softmax within sample i's group.
    """

    scale: float = 1.0
    groups: int = 1
    beta: float = 0.0

    def __post_init__(self):
        for name in ("scale", "beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta!r}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {self.groups!r}")
        if self.scale == 0.0:  # the limit scale -> 0 of (lse(s t) - log K) / s is mean(t)
            object.__setattr__(self, "scale", 1.0)
            object.__setattr__(self, "beta", 1.0)

    @property
    def linear(self) -> bool:
        """Whether the mean of the log-weights enters (beta > 0): the kernels sum them too."""
        return self.beta > 0.0

    def group_length(self, k: int, name: str = "k") -> int:
        """K = k / M, or a ValueError naming the group count that does not divide k."""
        if k % self.groups:
            raise ValueError(f"groups = {self.groups} does not divide {name} = {k}: the k samples must "
                             f"split into groups of equal length")
        return k // self.groups

    def weights(self, log_w: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """d bound / d log w [B, k] float32 from log_w [B, k] and the groups' logsumexps of
        scale log w [B * M] (a group whose lse is infinite has no finite weights to give: zeros;
        -inf when every weight is 0, +inf for a scale < 0 and any weight 0)."""
        B, k = log_w.shape
        M = self.groups
        lse = lse.view(B, M, 1)
        soft = torch.where(torch.isinf(lse), 0.0,
                           torch.exp(self.scale * log_w.view(B, M, k // M) - lse)).view(B, k)
        if not self.linear:
            return soft if M == 1 else soft / M
        return (1.0 - self.beta) / M * soft + self.beta / k


IWAE = Reduction()


# --------------------------------------------------------------------------- tiling


def autotune_enabled() -> bool:
    """Autotune on a GPU unless IWAE_BENCH_AUTOTUNE=0 (the correctness suite sets it: it
    checks numbers, and tuning every test shape would only cost time)."""
    return os.environ.get("IWAE_BENCH_AUTOTUNE", "1") != "0"


@dataclass(frozen=True)
class Tiling:
    """Where one kernel's block sizes come from, in one place:

    - on a GPU, autotuned over ``configs`` (keyed on the argument names ``key``, pruned by
      ``prune(configs, named_args)``);
    - on a GPU with IWAE_BENCH_AUTOTUNE=0, ``default(**sizes)``;
    - under the CPU interpreter, ``interpreter(**sizes)``: large tiles, since the interpreter
      pays per operation, not per element.

    ``sizes`` are the few problem sizes the tile depends on (e.g. k and D), given at launch.

    For the compiled-kernel profile, a tiling also says what one iteration of the kernel's hot
    loop handles: ``tile(meta)`` elements of the tensor named by ``data_arg`` (the one that
    sets the cost: logits, log-weights, a gradient).
    """

    configs: list
    key: list[str]
    default: Callable[..., dict]
    interpreter: Callable[..., dict]
    prune: Callable | None = None
    data_arg: str = ""
    tile: Callable[[dict], int] | None = None


# CUDA's grid limits: 2^31 - 1 programs along the first axis, 65535 along the second and third.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def grid_fits(grid: Callable, meta: dict) -> bool:
    """Whether a launch grid (a function of the block sizes) is within CUDA's limits."""
    return all(n <= limit for n, limit in zip(grid(meta), GRID_LIMITS))


def fitting_configs(configs: list, grid: Callable, named_args: dict) -> list:
    """The configs whose grid CUDA can launch. A config over the limit fails at launch with
    "invalid argument" (an H200 measured it: the logsumexp backward's one-column tile at
    k = 100 000 asks for 100 000 programs along the second axis), which the autotuner does
    not skip; a ValueError names the sizes when none fits."""
    fitting = [c for c in configs if grid_fits(grid, {**named_args, **c.kwargs})]
    if not fitting:
        raise ValueError(f"no tile launches this problem within CUDA's grid limits {GRID_LIMITS}: "
                         f"grid {grid({**named_args, **configs[-1].kwargs})} at the largest tile")
    return fitting


class Tunable:
    """A Triton kernel launched with the block sizes its ``Tiling`` gives."""

    def __init__(self, fn, tiling: Tiling):
        import triton

        self.fn = fn
        self.tiling = tiling
        self.tuned = None
        self._grid = None  # the launch being tuned: its grid prunes the configs CUDA cannot launch
        if not interpreted():
            self.tuned = triton.autotune(configs=tiling.configs, key=tiling.key,
                                         prune_configs_by={"early_config_prune": self._prune})(fn)

    def _prune(self, configs, named_args, **kwargs):
        """The tiling's own pruning, then the grid limits (the tiling's fallback config too)."""
        kept = self.tiling.prune(configs, named_args, **kwargs) if self.tiling.prune is not None else configs
        if self._grid is None:
            return kept
        fitting = [c for c in kept if grid_fits(self._grid, {**named_args, **c.kwargs})]
        return fitting or fitting_configs(configs, self._grid, named_args)

    def meta(self, sizes: dict) -> dict | None:
        """The block sizes a launch with these sizes gets, or None when the autotuner picks."""
        if self.tuned is None:
            return self.tiling.interpreter(**sizes)
        if not autotune_enabled():
            return self.tiling.default(**sizes)
        return None

    def launch(self, grid, *args, sizes: dict, **kwargs):
        """``grid`` is a function of the block sizes (a dict), as Triton's autotuner calls it."""
        if _capture is not None:
            _capture.launches.append(Launch(self, grid, args, kwargs, sizes))
            return None
        meta = self.meta(sizes)
        if meta is None:
            self._grid = grid
            try:
                return self.tuned[grid](*args, **kwargs)
            finally:
                self._grid = None
        if not grid_fits(grid, meta):
            raise ValueError(f"the {self.fn.__name__} launch for sizes {sizes} needs grid {grid(meta)}, "
                             f"past CUDA's limits {GRID_LIMITS}")
        return self.fn[grid](*args, **kwargs, **meta)


@dataclass
class Launch:
    """One launch as the host code made it: kernel, grid function, arguments, tile sizes."""

    kernel: Tunable
    grid: Callable
    args: tuple
    kwargs: dict
    sizes: dict

    def named_args(self) -> dict:
        return {**dict(zip(self.kernel.fn.arg_names, self.args)), **self.kwargs}


@dataclass
class _Capture:
    sm_count: int
    launches: list = field(default_factory=list)


_capture: _Capture | None = None


@contextlib.contextmanager
def capture_launches(sm_count: int) -> Iterator[list]:
    """Record every launch the host code makes instead of running it, planning splits for a
    GPU of ``sm_count`` SMs: the compiled-kernel profile replays the real host code (split
    plan, tiling, arguments) on meta tensors and compiles what it would have launched."""
    global _capture
    previous, _capture = _capture, _Capture(sm_count)
    try:
        yield _capture.launches
    finally:
        _capture = previous


# --------------------------------------------------------------------------- split-k


@dataclass(frozen=True)
class SplitPlan:
    """How a launch walks k: ``splits`` programs per row, each over ``per_split`` samples."""

    per_split: int
    splits: int

    @property
    def is_split(self) -> bool:
        return self.splits > 1


def split_plan(rows: int, k: int, device: torch.device, quantum: int,
               splits: int | None = None) -> SplitPlan:
    """Split k only when there are too few rows to fill the device: enough programs for
    ``target_programs``, each over a multiple of ``quantum`` samples (so any tile up to the
    quantum covers a split without a ragged block in the middle) and at least two quanta
    long. ``splits`` forces a number of splits (tests walk the split path with it)."""
    if splits is not None:
        per_split = cdiv(k, max(1, splits))
        return SplitPlan(per_split, cdiv(k, per_split))
    wanted = cdiv(target_programs(device), max(1, rows))
    if wanted <= 1 or k < 2 * quantum:
        return SplitPlan(k, 1)
    per_split = quantum * cdiv(cdiv(k, quantum), wanted)
    return SplitPlan(per_split, cdiv(k, per_split))


@dataclass
class SplitWorkspace:
    """What a split launch combines its partials in: ``partial`` [rows, splits] float32 (the
    logsumexps), ``linear`` [rows, splits] float32 (the plain sums, for a reduction that mixes
    in the mean; None when it does not) and one ``ticket`` counter per row group (int32). The
    kernel leaves every ticket at 0, so a workspace can serve launch after launch (the
    autotuner reruns one launch many times)."""

    partial: torch.Tensor
    ticket: torch.Tensor
    linear: torch.Tensor | None = None

    @classmethod
    def allocate(cls, rows: int, plan: SplitPlan, device: torch.device, linear: bool = False) -> "SplitWorkspace":
        partial = torch.empty((rows, plan.splits), device=device, dtype=torch.float32)
        return cls(partial, torch.zeros(rows, device=device, dtype=torch.int32),
                   torch.empty_like(partial) if linear else None)

    @property
    def linear_partial(self) -> torch.Tensor:
        """The tensor the kernel's linear-partials pointer gets (``partial`` when never read)."""
        return self.partial if self.linear is None else self.linear

    def check(self, rows: int, plan: SplitPlan, linear: bool = False) -> None:
        if tuple(self.partial.shape) != (rows, plan.splits) or self.ticket.numel() < rows:
            raise ValueError(f"workspace holds partials {shape_str(self.partial)} and "
                             f"{self.ticket.numel()} tickets; this launch needs [{rows}, {plan.splits}] "
                             f"and {rows}")
        if linear and (self.linear is None or self.linear.shape != self.partial.shape):
            raise ValueError("this launch mixes in the mean (beta > 0) and needs the workspace's "
                             "linear partials: allocate it with linear=True")
