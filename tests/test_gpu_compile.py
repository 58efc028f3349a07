"""The kernels build with the real Triton compiler for an H100, with a launch's specialization
and every flag combination the host code launches them with, not only under the interpreter."""

import os
import re
import subprocess
import sys
from pathlib import Path


def test_every_kernel_and_flag_combination_compiles_for_sm90():
    script = Path(__file__).with_name("compile_for_gpu.py")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = {line.split(" (")[0].removeprefix("compiled ") for line in done.stdout.splitlines()}
    for dtype in ("fp32", "bf16", "fp16"):
        for save in (0, 1):
            for split in (0, 1):
                assert f"_fused_iwae_forward_kernel *{dtype} SAVE_LOG_W={save} SPLIT_K={split} FAST=1" in lines
        tanh = int(dtype != "fp32")
        for dx in (0, 1):
            assert f"_log_weights_backward_kernel *{dtype} NEED_DX={dx} FAST=1 TANH_SIGMOID={tanh}" in lines
        assert f"_log_weights_forward_kernel *{dtype} FAST=1" in lines
        # the pipelined configs the autotuner may pick (loads two tiles ahead through cp.async)
        assert f"_log_weights_forward_kernel *{dtype} FAST=1 LOAD_STAGES=3" in lines
        assert any(line.startswith(f"_fused_iwae_forward_kernel *{dtype} ") and line.endswith("LOAD_STAGES=3")
                   for line in lines)
        for split in (0, 1):
            assert f"_logsumexp_forward_kernel *{dtype} SPLIT_K={split}" in lines
            # the family's epilogues (kernels.Reduction): the mean mixed in, a scale
            assert f"_fused_iwae_forward_kernel *{dtype} SAVE_LOG_W=1 SPLIT_K={split} FAST=1 GROUPED=1" in lines
            assert f"_fused_iwae_forward_kernel *{dtype} SAVE_LOG_W=1 SPLIT_K={split} FAST=1 LINEAR=1 GROUPED=1" in lines
            assert f"_logsumexp_forward_kernel *{dtype} SPLIT_K={split} LINEAR=1 SCALED=1" in lines
        assert f"_logsumexp_backward_kernel *{dtype}" in lines
        assert f"_reweight_kernel *{dtype}" in lines
    # the head: float32 exact (torch's default) and 16-bit everywhere; TF32 and float16 once
    for dtype, dots in (("fp32", "ieee"), ("bf16", "tf32")):
        for split in (0, 1):
            assert f"_fused_linear_forward_kernel *{dtype} HAS_BIAS=1 BOUND=1 SAVE_LOG_W=1 SPLIT_K={split} FAST=1 {dots}" in lines
        assert f"_fused_linear_forward_kernel *{dtype} HAS_BIAS=1 BOUND=0 SAVE_LOG_W=1 SPLIT_K=0 FAST=1 {dots}" in lines
        assert f"_fused_linear_forward_kernel *{dtype} HAS_BIAS=0 BOUND=1 SAVE_LOG_W=0 SPLIT_K=0 FAST=1 {dots}" in lines
        for split in (0, 1):
            assert f"_fused_linear_forward_kernel *{dtype} HAS_BIAS=1 BOUND=1 SAVE_LOG_W=1 SPLIT_K={split} FAST=1 {dots} LINEAR=1 GROUPED=1" in lines
    for dtype, dots in (("fp32", "ieee"), ("bf16", "tf32"), ("fp32", "tf32"), ("fp16", "tf32")):
        tanh = int(dtype != "fp32")
        assert f"_fused_linear_forward_kernel *{dtype} HAS_BIAS=1 BOUND=1 SAVE_LOG_W=1 SPLIT_K=0 FAST=1 {dots}" in lines
        assert f"_fused_linear_backward_dh_kernel *{dtype} HAS_BIAS=1 NEED_DX=1 FAST=1 TANH_SIGMOID={tanh} {dots}" in lines
        assert f"_fused_linear_backward_dw_kernel *{dtype} HAS_BIAS=1 FAST=1 TANH_SIGMOID={tanh} {dots}" in lines
    # the likelihoods (kernels/likelihood.py codes): Gaussian fixed, pixel and sample scales, the
    # continuous Bernoulli, the discretized logistic; its log-weights forward too
    for code, scale in ((1, 1), (1, 2), (1, 3), (2, 0), (3, 3)):
        flags = f"LIKELIHOOD={code}" + (f" SCALE={scale}" if scale else "")
        assert f"_fused_iwae_forward_kernel *bf16 SAVE_LOG_W=1 SPLIT_K=1 FAST=1 {flags}" in lines
        assert f"_log_weights_backward_kernel *bf16 NEED_DX=1 FAST=1 TANH_SIGMOID=1 {flags}" in lines
    assert "_log_weights_forward_kernel *bf16 FAST=1 LIKELIHOOD=3 SCALE=3" in lines
    # the head's continuous likelihoods (LIKELIHOOD and SCALE codes of kernels/likelihood.py)
    every_code = ("LIKELIHOOD=2", "LIKELIHOOD=1 SCALE=1", "LIKELIHOOD=1 SCALE=2", "LIKELIHOOD=1 SCALE=3",
                  "LIKELIHOOD=3 SCALE=1", "LIKELIHOOD=3 SCALE=2", "LIKELIHOOD=3 SCALE=3")
    for dtype, dots, codes_compiled in (("bf16", "tf32", every_code), ("fp32", "ieee", every_code[3::3])):
        tanh = int(dtype != "fp32")
        for codes in codes_compiled:
            assert f"_fused_linear_forward_kernel *{dtype} HAS_BIAS=1 BOUND=1 SAVE_LOG_W=1 SPLIT_K=0 FAST=1 {dots} {codes}" in lines
            assert f"_fused_linear_backward_dh_kernel *{dtype} HAS_BIAS=1 NEED_DX=1 FAST=1 TANH_SIGMOID={tanh} {dots} {codes}" in lines
            assert f"_fused_linear_backward_dw_kernel *{dtype} HAS_BIAS=1 FAST=1 TANH_SIGMOID={tanh} {dots} {codes}" in lines
    # stochastic layers (kernels/latent.py): the two-layer model's layouts, and their terms as an
    # offset to the likelihood-only fused bound and head
    for kinds in ("QM=1 QV=1 PM=2 PV=2", "QM=2 QV=2 PM=0 PV=0"):
        assert f"_latent_forward_kernel *fp32 {kinds}" in lines
        assert f"_latent_backward_kernel *fp32 {kinds}" in lines
    assert "_fused_iwae_forward_kernel *bf16 SAVE_LOG_W=1 SPLIT_K=0 FAST=1 OFFSET=1" in lines
    assert "_fused_linear_forward_kernel *bf16 HAS_BIAS=1 BOUND=1 SAVE_LOG_W=1 SPLIT_K=0 FAST=1 tf32 OFFSET=1" in lines
    spilled = [line for line in done.stdout.splitlines() if _spilled_bytes(line) > KNOWN_SPILLS.get(_kernel(line), 0)]
    assert not spilled, "default tiles spill registers:\n" + "\n".join(spilled)


# Spills measured and left, each with its reason; anything more, anywhere else, fails.
# The 16-bit fused forward saving log_w without a split: 5 values (thread-index and z-tile
# addresses of the latent term) stored before the D loop and reloaded after it, no spill
# instruction in the hot loop; the same at e12bcd3, hidden then by a check that read "20 B" as
# ending in "0 B". Computing the latent term first removes it but takes every fused forward,
# float32 included, to 159-168 registers.
KNOWN_SPILLS = {f"_fused_iwae_forward_kernel *{dtype} SAVE_LOG_W=1 SPLIT_K=0 FAST=1{family}": 20
                for dtype in ("bf16", "fp16") for family in ("", " GROUPED=1")}
# The head with a continuous likelihood: one 4-byte value (a shared-memory address of the row
# sums' reduction; in the dh kernel one address of the prologue) stored once before the loops
# and loaded once per block of samples, nothing in the hot loop; ptxas parks it at 48-168
# registers. The exact float32 forward (the one ieee tile, 8 warps; 4 warps would not spill)
# with every likelihood but the Bernoulli and the per-pixel scales, and the 16-bit dh kernel
# of the logistic with a per-sample scale.
KNOWN_SPILLS.update({
    **{"_fused_linear_forward_kernel *fp32 HAS_BIAS=1 BOUND=1 SAVE_LOG_W=1 SPLIT_K=0 FAST=1 ieee " + codes: 4
       for codes in ("LIKELIHOOD=2", "LIKELIHOOD=1 SCALE=1", "LIKELIHOOD=1 SCALE=3", "LIKELIHOOD=3 SCALE=1",
                     "LIKELIHOOD=3 SCALE=3")},
    "_fused_linear_backward_dh_kernel *bf16 HAS_BIAS=1 NEED_DX=1 FAST=1 TANH_SIGMOID=1 tf32 LIKELIHOOD=3 SCALE=3": 4,
})


def _kernel(line: str) -> str:
    """The kernel, dtype and flags of a compile line (what KNOWN_SPILLS is keyed by)."""
    return line.split(" (")[0].removeprefix("compiled ")


def _spilled_bytes(line: str) -> int:
    """N from a compile line's "(R registers, N B spilled)"; 0 for a line without one."""
    found = re.search(r"(\d+) B spilled\)$", line)
    return int(found.group(1)) if found else 0
