"""Compile every Triton kernel of the package for a Hopper GPU (sm_90) the way a launch would,
without a GPU: Triton's own compiler and ptxas run on the CPU. The interpreter accepts code the
compiler rejects (Python builtins, non-constexpr globals, loop-carried types that change), so
this is what proves, on a machine without a GPU, that the kernels the tests check will also
build on one.

The real host functions run on meta tensors under ``capture_launches`` (nothing executes), for
shapes and dtypes that walk every flag combination they launch with (split or not, saving
log_w or not, dx or not, 32- and 16-bit logits, the head's exact, TF32 and 16-bit dots);
each captured launch is compiled with its default tile (and, once per kernel and dtype, a
pipelined config of its autotune space) and the specialization a launch gets
(``iwae_bench.profile.kernels``).

Run as a script with TRITON_INTERPRET=0: ``python tests/compile_for_gpu.py``; it prints one
line per distinct compile: ``compiled <kernel> <data dtype> <flags>``.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from iwae_bench.profile.kernels import specialization  # noqa: E402
from iwae_bench.profile.sass import compile_for_target  # noqa: E402
from kernels._common import Reduction, capture_launches  # noqa: E402
from kernels.likelihood import Likelihood  # noqa: E402
from kernels.fused_bound import fused_iwae_forward  # noqa: E402
from kernels.fused_linear import fused_linear_backward, fused_linear_forward, matmul_tf32  # noqa: E402
from kernels.latent import Latent, latent_backward, latent_forward  # noqa: E402
from kernels.logw import log_weights_backward, log_weights_forward  # noqa: E402
from kernels.lse import logsumexp_backward, logsumexp_forward  # noqa: E402
from kernels.reweight import reweight  # noqa: E402

FLAGS = ("HAS_BIAS", "BOUND", "SAVE_LOG_W", "SPLIT_K", "NEED_DX", "FAST", "TANH_SIGMOID")
FAMILY_FLAGS = ("LINEAR", "SCALED", "GROUPED")  # the bound's epilogue beyond the IWAE's (kernels.Reduction)
OFFSET_FLAGS = ("OFFSET",)  # stochastic layers' terms added to log w (kernels/latent.py), only where on
LATENT_FLAGS = ("QM", "QV", "PM", "PV")  # each Gaussian parameter's layout: 0 absent, 1 per example, 2 per sample
# MIWAE-like groups, VR's scale, and CIWAE's mean mixed in with groups and a scale (k = 3000 and
# k = 8 both split into 2 groups)
FAMILY = (Reduction(groups=2), Reduction(scale=0.5), Reduction(scale=0.5, groups=2, beta=0.25))
# the likelihoods beyond the Bernoulli (kernels/likelihood.py): every scale kind and each family
LIKELIHOODS = ("gaussian:sigma=0.1", "gaussian:pixel,floor=-9", "gaussian:sample,floor=-9",
               "continuous_bernoulli", "discretized_logistic")
# every (likelihood, scale) code the head's kernels specialize on
HEAD_LIKELIHOODS = ("continuous_bernoulli", "gaussian:sigma=0.3", "gaussian:pixel,floor=-9", "gaussian:floor=-9",
                    "discretized_logistic:scale=0.05", "discretized_logistic:pixel", "discretized_logistic")
LIKELIHOOD_FLAGS = ("LIKELIHOOD", "SCALE")  # printed as their codes where not the Bernoulli's 0


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def launches():
    """Every launch the host code makes over the flag combinations, captured, not run."""
    D, d = 100, 5
    with capture_launches(sm_count=132) as captured:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for B, k in ((2, 3000), (1024, 8)):  # k split over programs, and not
                inputs = (meta(B, D), meta(B, k, D, dtype=dtype), meta(B, k, d), meta(B, d), meta(B, d))
                for save in (False, True):
                    fused_iwae_forward(*inputs, save_log_w=save)
                for reduction in FAMILY:  # the family's epilogues: groups, a scale, the mean mixed in
                    fused_iwae_forward(*inputs, save_log_w=True, reduction=reduction)
                log_weights_forward(*inputs)
                for need_dx in (False, True):
                    log_weights_backward(*inputs, meta(B, k), need_dx=need_dx)
            for R, K in ((2, 50_000), (1024, 64)):
                t = meta(R, K, dtype=dtype)
                logsumexp_forward(t, 1.0)
                logsumexp_forward(t, 1.0, reduction=FAMILY[-1])
                logsumexp_backward(t, meta(R), meta(R), FAMILY[-1])
                logsumexp_backward(t, meta(R), meta(R))
            reweight(meta(4, 9, d, dtype=dtype), meta(4, 9), meta(4))
        # the likelihoods: 16-bit decoder outputs, the split forward saving log_w and the backward
        for spec in LIKELIHOODS:
            lik = Likelihood.parse(spec)
            B, k = 2, 3000
            inputs = (meta(B, D), meta(B, k, lik.channels * D, dtype=torch.bfloat16), meta(B, k, d), meta(B, d),
                      meta(B, d))
            scale = meta(D) if lik.needs_scale else None
            fused_iwae_forward(*inputs, save_log_w=True, likelihood=lik, scale=scale)
            log_weights_backward(*inputs, meta(B, k), need_dx=True, likelihood=lik, scale=scale)
            if lik.name == "discretized_logistic":
                log_weights_forward(*inputs, likelihood=lik, scale=scale)
        # the decoder head: 32- and 16-bit h and W, k split and not, with and without a bias;
        # float32 with torch's TF32 switch off (the exact dots, torch's default) and on
        H = 40
        # (dtype, TF32 switch, every variant or the plain bound and backward at one shape)
        for dtype, tf32, every in ((torch.float32, False, True), (torch.bfloat16, False, True),
                                   (torch.float32, True, False), (torch.float16, False, False)):
            with matmul_tf32(tf32):
                for B, k in ((2, 3000), (1024, 8)) if every else ((1024, 8),):
                    head = (meta(B, D), meta(B, k, H, dtype=dtype), meta(D, H, dtype=dtype),
                            meta(D, dtype=dtype), meta(B, k, d), meta(B, d), meta(B, d))
                    fused_linear_forward(*head, save_log_w=True)
                    if every:
                        fused_linear_forward(*head, save_log_w=True, reduction=FAMILY[-1])
                        fused_linear_forward(*head, bound=False, save_log_w=True)
                    fused_linear_backward(*head, meta(B, k), needs=(True, True, True, True, False, False, False))
                if every:
                    fused_linear_forward(*head[:3], None, *head[4:])
        # the head's continuous likelihoods (kernels/likelihood.py), one shape: C output channels
        # and a per-pixel scale where they take one
        # (16-bit for every code; the exact float32 dots for the two-channel ones only: the
        # suite's time)
        for dtype, specs in ((torch.bfloat16, HEAD_LIKELIHOODS), (torch.float32, HEAD_LIKELIHOODS[3::3])):
            for spec in specs:
                likelihood = Likelihood.parse(spec)
                B, k, C = 1024, 8, likelihood.channels
                head = (meta(B, D), meta(B, k, H, dtype=dtype), meta(C * D, H, dtype=dtype),
                        meta(C * D, dtype=dtype), meta(B, k, d), meta(B, d), meta(B, d))
                lik = {"likelihood": likelihood, "scale": meta(D) if likelihood.needs_scale else None}
                fused_linear_forward(*head, save_log_w=True, **lik)
                fused_linear_backward(*head, meta(B, k), needs=(True, True, True, True, False, False, False, True),
                                      **lik)
        # stochastic layers (kernels/latent.py): the two-layer model's parameter layouts, and the
        # likelihood-only bound (latent width 0) with their terms as an offset, bare and with the head
        B, k = 64, 8
        for layer in (Latent(meta(B, k, d), meta(B, d), meta(B, d), meta(B, k, d), meta(B, k, d)),
                      Latent(meta(B, k, d), meta(B, k, d), meta(B, k, d))):
            latent_forward(layer)
            latent_backward(layer, meta(B, k))
        bare = (meta(B, k, 0), meta(B, 0), meta(B, 0))
        fused_iwae_forward(meta(B, D), meta(B, k, D, dtype=torch.bfloat16), *bare, save_log_w=True, offset=meta(B, k))
        fused_linear_forward(meta(B, D), meta(B, k, H, dtype=torch.bfloat16), meta(D, H, dtype=torch.bfloat16),
                             meta(D, dtype=torch.bfloat16), *bare, save_log_w=True, offset=meta(B, k))
    return captured


def _tiles(launch, pipelined_done: set):
    """The launch's default tile, and the first pipelined config (LOAD_STAGES > 1) of its
    autotune space once per kernel and dtype: the autotuner may pick it on a GPU."""
    yield launch.kernel.tiling.default(**launch.sizes)
    key = (launch.kernel.fn.__name__, str(launch.named_args()[launch.kernel.tiling.data_arg].dtype))
    for config in launch.kernel.tiling.configs:
        if config.kwargs.get("LOAD_STAGES", 1) > 1 and key not in pipelined_done:
            pipelined_done.add(key)
            yield {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def main() -> int:
    seen, pipelined = set(), set()
    for launch, tile in ((launch, tile) for launch in launches() for tile in _tiles(launch, pipelined)):
        named = launch.named_args()
        blocks = {k: v for k, v in tile.items() if k not in ("num_warps", "num_stages")}
        signature, constexprs, aligned = specialization(launch.kernel.fn, named, blocks)
        flags = " ".join(f"{f}={int(bool(constexprs[f]))}" for f in FLAGS if f in constexprs)
        if blocks.get("LOAD_STAGES", 1) > 1:
            flags += f" LOAD_STAGES={blocks['LOAD_STAGES']}"
        if "INPUT_PRECISION" in constexprs:
            flags += f" {constexprs['INPUT_PRECISION']}"
        flags += "".join(f" {f}=1" for f in FAMILY_FLAGS if constexprs.get(f))  # only where on
        flags += "".join(f" {f}={constexprs[f]}" for f in LIKELIHOOD_FLAGS if constexprs.get(f))
        flags += "".join(f" {f}=1" for f in OFFSET_FLAGS if constexprs.get(f))
        flags += "".join(f" {f}={constexprs[f]}" for f in LATENT_FLAGS if f in constexprs)
        line = f"{launch.kernel.fn.__name__} {signature[launch.kernel.tiling.data_arg]} {flags.strip()}".strip()
        key = (line, tuple(sorted(signature.items())), tuple(sorted(aligned)),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = compile_for_target(launch.kernel.fn, signature, constexprs, aligned=aligned,
                                      num_warps=tile.get("num_warps", 4), num_stages=tile.get("num_stages", 3))
        assert compiled.cubin, f"{line}: no cubin"
        print(f"compiled {line} ({compiled.registers} registers, {compiled.spill_store_bytes} B spilled)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
