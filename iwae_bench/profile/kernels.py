"""The compiled-kernel profile of this package's kernels, at the shapes ``validate`` times.

For each scenario (a kernel as the host code launches it, at one validate shape and logits
dtype), the real host function runs on meta tensors under ``kernels._common.capture_launches``:
the split plan, tiling and arguments are exactly a launch's, planned for a GPU of ``sm_count``
SMs, but nothing runs. Each captured launch is then compiled for the target once per config
its autotuner keeps after pruning, with the specialization a launch gets (tensors 16-byte
aligned, integers equal to 1 made constants, integers divisible by 16 marked so), and its SASS
read by ``profile.sass``. One row per (scenario, config): resources, hot-loop counts per
element of the tile, occupancy and bytes in flight.

A proxy from the compiler's output, not a measurement: only a GPU run measures speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .sass import analyze, bytes_in_flight_per_sm, compile_for_target, occupancy, per_element

# the shapes of validate's GPU sweep (D = 784, d = 50) and of its reduction cells
BOUND_SHAPES = [(1024, 64), (20, 5000), (256, 256), (8, 100_000)]
REDUCTION_SHAPES = [(16384, 1), (16384, 64), (16384, 1024), (8, 100_000), (8, 1_000_000)]
DATA_DIM, LATENT = 784, 50
DTYPES = ("float32", "bfloat16")
H100_SMS = 132
SMALL_INPUTS = 2 * 2**20  # below this every implementation is bound by launch latency

# static targets (issue "GPU speed, worked on without a GPU"): a stand-in for the measured goals
TARGET_INSTRUCTIONS = {"forward": 10.0, "backward": 12.0}
TARGET_MUFU = {"forward": 1.0, "backward": 1.0, "reduction": 1.05}
# the family's epilogues beyond the IWAE bound's (kernels.Reduction), each a row of its own:
# MIWAE's groups (a grid axis), and a scale with the mean mixed in (CIWAE's beta, VR's alpha)
FAMILY = {"miwae M=2": dict(groups=2), "ciwae beta=0.25 scale=0.5": dict(scale=0.5, groups=2, beta=0.25)}
REDUCTION_FAMILY = {"scale=0.5": dict(scale=0.5), "beta=0.25 scale=0.5": dict(scale=0.5, beta=0.25)}
# the likelihoods beyond the Bernoulli (kernels/likelihood.py), each a row of its own with the
# MUFU ops per element its arithmetic needs in the forward's hot loop (the floor; the logs of
# the grouped products sit outside it) and in the backward's:
#   gaussian fixed / pixel   0 / 0   exp(-s) a number or a host [D] row
#   gaussian sample          1 / 1   exp(-s)
#   continuous_bernoulli     2 / 3   exp(-|l|), log |l| / exp(-l) and two reciprocals for its mean
#   discretized_logistic     4 / 7   exp(-s), exp(-|a|), exp(-|b|), exp(-eps) / exp(-s), the two
#                                    sigmoids' exps and reciprocals, eps / (e^eps - 1)
LIKELIHOOD_MUFU = {"gaussian:sigma=0.1": (0, 0), "gaussian:pixel,floor=-9": (0, 0),
                   "gaussian:sample,floor=-9": (1, 1), "continuous_bernoulli": (2, 3),
                   "discretized_logistic": (4, 7)}
LIKELIHOOD_SHAPE = (1024, 64)
HEAD_SHAPES = [(20, 5000, 200)]  # validate's decoder-head shape: (B, k, H) at D = 784
# the two-layer model's stochastic layers (kernels/latent.py), each a row of its own: (d, the
# layouts of its posterior's mean and log-variance and of its prior's, the MUFU ops per element
# its arithmetic needs forward and backward: one exp(-v) per element of a per-sample
# log-variance, and a per-example one's exp once per column for the 8 or more of its samples a
# thread holds, at most 1/8 more)
#   h1   q(h1|x) per example, p(h1|h2) per sample    1 + 1/8
#   h2   q(h2|h1) per sample, p(h2) absent            1        (the standard normal: no exp)
LATENT_LAYERS = {"h1: q per example, p per sample": (100, ("example", "example", "sample", "sample"), 1.125),
                 "h2: q per sample, p absent": (50, ("sample", "sample", None, None), 1.0)}
# (B, k, directions): the experiment's training batch at the family's k = 64, and its
# evaluation's chunk of 512 samples (forward only: evaluation takes no gradient)
LATENT_SHAPES = [(100, 64, ("forward", "backward")), (100, 512, ("forward",))]
TARGET_IN_FLIGHT = 14 * 1024

TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}
COLUMNS = ["kernel", "direction", "dtype", "shape", "config", "num_warps", "num_stages", "registers",
           "spills", "shared_bytes", "loop_instructions_per_element", "mufu_per_element",
           "mufu_kinds", "software_transcendentals_in_loop", "logits_load_bits",
           "resident_warps_per_sm", "input_bytes", "programs", "programs_per_sm",
           "bytes_in_flight_per_sm", "meets_static_targets", "misses"]


@dataclass
class Scenario:
    kernel: str          # what the row is called
    direction: str       # forward, backward or reduction: which targets apply
    dtype: str
    shape: str
    input_bytes: int
    run: Callable[[], object]  # the host code, on meta tensors
    mufu_target: float | None = None  # overrides the direction's MUFU target (a likelihood's floor)
    rank: Callable[[dict], tuple] | None = None  # how to find the hot loop, if not ``_hot_loop_rank``


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def scenarios(kernel_filter: str | None = None) -> Iterator[Scenario]:
    from kernels import Reduction
    from kernels.fused_bound import fused_iwae_forward
    from kernels.logw import log_weights_backward, log_weights_forward
    from kernels.lse import logsumexp_backward, logsumexp_forward
    from kernels.reweight import reweight

    D, d = DATA_DIM, LATENT
    out = []
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for B, k in BOUND_SHAPES:
            inputs = (_meta(B, D), _meta(B, k, D, dtype=dtype), _meta(B, k, d), _meta(B, d), _meta(B, d))
            shape = f"B={B} k={k}"
            size = sum(t.numel() * t.element_size() for t in inputs)
            log_w, lse = _meta(B, k), _meta(B)
            out += [
                Scenario("fused forward", "forward", dtype_name, shape, size,
                         lambda i=inputs: fused_iwae_forward(*i)),
                Scenario("fused forward, saving log_w", "forward", dtype_name, shape, size,
                         lambda i=inputs: fused_iwae_forward(*i, save_log_w=True)),
                Scenario("log-weights forward", "forward", dtype_name, shape, size,
                         lambda i=inputs: log_weights_forward(*i)),
                Scenario("log-weights backward", "backward", dtype_name, shape, size,
                         lambda i=inputs, B=B, k=k: log_weights_backward(*i, _meta(B, k))),
            ]
            out += [Scenario(f"fused forward, saving log_w, {name}", "forward", dtype_name, shape, size,
                             lambda i=inputs, r=Reduction(**args): fused_iwae_forward(*i, save_log_w=True, reduction=r))
                    for name, args in FAMILY.items()]
            if dtype_name == "float32":
                out.append(Scenario("dreg reweight", "backward", dtype_name, shape, B * k * d * 8,
                                    lambda B=B, k=k, w=log_w, s=lse: reweight(_meta(B, k, d), w, s)))
    out += _likelihood_scenarios()
    out += _latent_scenarios()
    from kernels.fused_linear import fused_linear_backward, fused_linear_forward

    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for B, k, H in HEAD_SHAPES:
            head = (_meta(B, D), _meta(B, k, H, dtype=dtype), _meta(D, H, dtype=dtype), _meta(D, dtype=dtype),
                    _meta(B, k, d), _meta(B, d), _meta(B, d))
            shape = f"B={B} k={k} H={H}"
            size = sum(t.numel() * t.element_size() for t in head)
            out += [Scenario("fused linear forward", "head", dtype_name, shape, size,
                             lambda i=head: _tf32(fused_linear_forward, *i, save_log_w=True)),
                    *(Scenario(f"fused linear forward, {name}", "head", dtype_name, shape, size,
                               lambda i=head, r=Reduction(**args): _tf32(fused_linear_forward, *i,
                                                                          save_log_w=True, reduction=r))
                      for name, args in FAMILY.items()),
                    Scenario("fused linear backward (dh, dW)", "head", dtype_name, shape, size,
                             lambda i=head, B=B, k=k: _tf32(fused_linear_backward, *i, _meta(B, k),
                                                            needs=(False, True, True, True, False, False, False)))]
    for B, k in REDUCTION_SHAPES:
        t = _meta(B, k)
        shape = f"B={B} k={k}"
        out += [Scenario("logsumexp forward", "reduction", "float32", shape, B * k * 4,
                         lambda t=t: logsumexp_forward(t, 1.0)),
                *(Scenario(f"logsumexp forward, {name}", "reduction", "float32", shape, B * k * 4,
                           lambda t=t, r=Reduction(**args): logsumexp_forward(t, 1.0, reduction=r))
                  for name, args in REDUCTION_FAMILY.items()),
                Scenario("logsumexp backward", "reduction", "float32", shape, B * k * 4,
                         lambda t=t, B=B: logsumexp_backward(t, _meta(B), _meta(B)))]
    return (s for s in out if kernel_filter is None or kernel_filter in s.kernel)


def _likelihood_scenarios() -> list[Scenario]:
    """The fused forward (saving log_w, as training runs it) and the log-weights backward for
    each likelihood beyond the Bernoulli, at one shape, with that likelihood's MUFU floor."""
    from kernels import Likelihood
    from kernels.fused_bound import fused_iwae_forward
    from kernels.logw import log_weights_backward

    B, k = LIKELIHOOD_SHAPE
    D, d = DATA_DIM, LATENT
    out = []
    for dtype_name in DTYPES:
        for spec, (forward, backward) in LIKELIHOOD_MUFU.items():
            lik = Likelihood.parse(spec)
            inputs = (_meta(B, D), _meta(B, k, lik.channels * D, dtype=getattr(torch, dtype_name)),
                      _meta(B, k, d), _meta(B, d), _meta(B, d))
            options = {"likelihood": lik, "scale": _meta(D) if lik.needs_scale else None}
            size = sum(t.numel() * t.element_size() for t in inputs)
            out += [Scenario(f"fused forward, saving log_w, {spec}", "forward", dtype_name, f"B={B} k={k}", size,
                             lambda i=inputs, o=options: fused_iwae_forward(*i, save_log_w=True, **o), forward,
                             _pixel_loop_rank),
                    Scenario(f"log-weights backward, {spec}", "backward", dtype_name, f"B={B} k={k}", size,
                             lambda i=inputs, o=options: log_weights_backward(*i, _meta(B, k), **o), backward,
                             _pixel_loop_rank)]
    from kernels.fused_linear import fused_linear_forward

    B, k, H = HEAD_SHAPES[0]
    for spec, (forward, _) in LIKELIHOOD_MUFU.items():  # the fused head, 16-bit (its usual dtype)
        lik = Likelihood.parse(spec)
        C = lik.channels
        head = (_meta(B, D), _meta(B, k, H, dtype=torch.bfloat16), _meta(C * D, H, dtype=torch.bfloat16),
                _meta(C * D, dtype=torch.bfloat16), _meta(B, k, d), _meta(B, d), _meta(B, d))
        options = {"likelihood": lik, "scale": _meta(D) if lik.needs_scale else None}
        size = sum(t.numel() * t.element_size() for t in head)
        out.append(Scenario(f"fused linear forward, {spec}", "head", "bfloat16", f"B={B} k={k} H={H}", size,
                            lambda i=head, o=options: fused_linear_forward(*i, save_log_w=True, **o), forward,
                            _pixel_loop_rank))
    return out


def _latent_scenarios() -> list[Scenario]:
    """The stochastic layers' kernels (``LATENT_LAYERS``) at ``LATENT_SHAPES``, held to their MUFU
    floor; and the likelihood-only fused forward with the layers' [B, k] sum as its offset
    (latent width 0, OFFSET on), as the two-layer model's bound runs it."""
    from kernels.fused_bound import fused_iwae_forward
    from kernels.latent import Latent, latent_backward, latent_forward

    out = []
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for B, k, directions in LATENT_SHAPES:
            for name, (d, layouts, floor) in LATENT_LAYERS.items():
                per = {"example": (B, d), "sample": (B, k, d)}
                layer = Latent(_meta(B, k, d, dtype=dtype),
                               *(None if at is None else _meta(*per[at], dtype=dtype) for at in layouts))
                size = sum(t.numel() * t.element_size() for t in layer if t is not None)
                run = {"forward": lambda l=layer: latent_forward(l),
                       "backward": lambda l=layer, B=B, k=k: latent_backward(l, _meta(B, k))}
                out += [Scenario(f"latent {direction}, {name}", direction, dtype_name, f"B={B} k={k} d={d}",
                                 size, run[direction], floor) for direction in directions]
        B, k = LATENT_SHAPES[0][:2]
        inputs = (_meta(B, DATA_DIM), _meta(B, k, DATA_DIM, dtype=dtype), _meta(B, k, 0), _meta(B, 0), _meta(B, 0))
        offset = _meta(B, k)
        size = sum(t.numel() * t.element_size() for t in (*inputs, offset))
        out.append(Scenario("fused forward, saving log_w, latent offset", "forward", dtype_name, f"B={B} k={k}",
                            size, lambda i=inputs, o=offset: fused_iwae_forward(*i, save_log_w=True, offset=o)))
    return out


def _tf32(fn, *args, **kwargs):
    """The head's float32 launches as a user who enabled TF32 gets them (torch's default is the
    exact, much slower, CUDA-core dot)."""
    from kernels.fused_linear import matmul_tf32

    with matmul_tf32(True):
        return fn(*args, **kwargs)


def specialization(fn, named: dict, constants: dict) -> tuple[dict, dict, list]:
    """(signature, constexprs, aligned) a launch with these argument values compiles with."""
    signature, constexprs, aligned = {}, dict(constants), []
    params = {p.name: p for p in fn.params}
    for name in fn.arg_names:
        if params[name].is_constexpr:
            constexprs.setdefault(name, named.get(name))
            continue
        value = named[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            aligned.append(name)  # fresh allocations are 16-byte aligned (meta: address 0)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                constexprs[name] = 1  # a launch specializes integers equal to 1
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    aligned.append(name)
        else:
            signature[name] = "fp32"
    return signature, constexprs, aligned


def _pruned_configs(launch) -> list:
    tiling = launch.kernel.tiling
    named = launch.named_args()
    if tiling.prune is None:
        return list(tiling.configs)
    return list(tiling.prune(list(tiling.configs), named))


def profile_rows(arch: int = 90, sm_count: int = H100_SMS, kernel_filter: str | None = None,
                 max_configs: int | None = None, log=print) -> list[dict]:
    """One row per (scenario, pruned config)."""
    from kernels._common import capture_launches

    cache: dict = {}
    rows = []
    for scenario in scenarios(kernel_filter):
        with capture_launches(sm_count) as launches:
            scenario.run()
        for launch in launches:
            named = launch.named_args()
            configs = _pruned_configs(launch)[:max_configs]
            for config in configs:
                meta = {**config.kwargs}
                signature, constexprs, aligned = specialization(launch.kernel.fn, named, meta)
                key = (launch.kernel.fn.__name__, tuple(sorted(signature.items())),
                       tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(aligned)),
                       config.num_warps, config.num_stages)
                if key not in cache:
                    log(f"compiling {launch.kernel.fn.__name__} {signature.get(launch.kernel.tiling.data_arg)} {meta} ...")
                    cache[key] = compile_for_target(launch.kernel.fn, signature, constexprs, aligned=aligned,
                                                    num_warps=config.num_warps, num_stages=config.num_stages,
                                                    arch=arch)
                rows.append(_row(scenario, launch, config, meta, named, cache[key], sm_count))
    return rows


def _hot_loop_rank(counts: dict) -> tuple:
    """Every kernel here takes one transcendental per element of its tile (the Bernoulli
    term's exp, the logsumexp's exp, the backward's sigmoid), so its hot loop is the innermost
    loop with the most MUFU ops; a latent-width loop loads as much but exps per column, not per
    element. Then the most loaded bits; then the shorter body (an exact fallback loop does the
    same with more)."""
    loads = sum(bits * n for bits, n in counts["global_loads"].items())
    return sum(counts["mufu"].values()), loads, -counts["instructions"]


def _pixel_loop_rank(counts: dict) -> tuple:
    """A likelihood's hot loop is its pixel loop, the one that loads the most bits: a Gaussian
    with a given variance takes no MUFU op there (the latent loop's exp per column would win
    on ``_hot_loop_rank``)."""
    loads = sum(bits * n for bits, n in counts["global_loads"].items())
    return loads, sum(counts["mufu"].values()), -counts["instructions"]


def _row(scenario: Scenario, launch, config, meta: dict, named: dict, compiled, sm_count: int) -> dict:
    tiling = launch.kernel.tiling
    data = named[tiling.data_arg]
    tile = tiling.tile({**named, **meta})
    threads = config.num_warps * 32
    loop = analyze(compiled, rank=scenario.rank or _hot_loop_rank)
    each = per_element(loop, tile, threads)
    grid = launch.grid({**named, **meta})
    programs = math.prod(grid)
    occ = occupancy(compiled.registers, compiled.shared_bytes, config.num_warps)
    launched_per_sm = math.ceil(programs / sm_count)
    resident = min(occ.programs_per_sm, launched_per_sm)
    # a pipelined loop (LOAD_STAGES = s) keeps the loads of s - 1 iterations in flight, a
    # plain one the loads of the iteration it is in
    ahead = max(1, meta.get("LOAD_STAGES", 1) - 1)
    in_flight = bytes_in_flight_per_sm(resident, tile * data.element_size() * ahead)
    mufu = sum(each.mufu.values())
    row = {
        "kernel": scenario.kernel, "direction": scenario.direction, "dtype": scenario.dtype,
        "shape": scenario.shape, "config": " ".join(f"{k}={v}" for k, v in config.kwargs.items()),
        "num_warps": config.num_warps, "num_stages": config.num_stages,
        "registers": compiled.registers, "spills": compiled.spill_store_bytes + compiled.spill_load_bytes,
        "shared_bytes": compiled.shared_bytes, "loop_instructions_per_element": round(each.instructions, 2),
        "mufu_per_element": round(mufu, 3),
        "mufu_kinds": " ".join(f"{k.removeprefix('MUFU.')}:{v:.2f}" for k, v in sorted(each.mufu.items())),
        "software_transcendentals_in_loop": loop.software_transcendentals,
        "logits_load_bits": max(loop.global_loads, default=0), "resident_warps_per_sm": occ.warps_per_sm,
        "input_bytes": scenario.input_bytes, "programs": programs,
        "programs_per_sm": round(programs / sm_count, 2), "bytes_in_flight_per_sm": in_flight,
    }
    misses = _misses(scenario.direction, row, scenario.mufu_target)
    targeted = scenario.direction in TARGET_MUFU or scenario.mufu_target is not None
    row["meets_static_targets"] = ("n/a (no static target)" if not targeted
                                   else "n/a (inputs under 2 MB)" if scenario.input_bytes < SMALL_INPUTS
                                   else "yes" if not misses else "no")
    row["misses"] = "; ".join(misses)
    return row


def _misses(direction: str, row: dict, mufu_target: float | None = None) -> list[str]:
    """The static targets a row misses. A likelihood's row has its own MUFU floor and no
    instruction target (its arithmetic is not the Bernoulli's: the count is reported, the floor
    on its transcendentals is what is held)."""
    misses = []
    limit = TARGET_INSTRUCTIONS.get(direction) if mufu_target is None else None
    if limit is not None and row["loop_instructions_per_element"] > limit:
        misses.append(f"{row['loop_instructions_per_element']} instructions/element > {limit}")
    mufu_limit = TARGET_MUFU.get(direction) if mufu_target is None else mufu_target
    if mufu_limit is not None and row["mufu_per_element"] > mufu_limit + 1e-9:
        misses.append(f"{row['mufu_per_element']} MUFU/element > {mufu_limit}")
    if row["software_transcendentals_in_loop"]:
        misses.append(f"{row['software_transcendentals_in_loop']} software transcendentals in the loop")
    if row["bytes_in_flight_per_sm"] < TARGET_IN_FLIGHT:
        misses.append(f"{row['bytes_in_flight_per_sm']} B in flight/SM < {TARGET_IN_FLIGHT}")
    if row["spills"]:
        misses.append(f"{row['spills']} B of spills")
    return misses
