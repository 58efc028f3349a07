"""Compile every Triton kernel of the package for a Hopper GPU (sm_90) to PTX and cubin,
without a GPU: Triton's own compiler and ptxas run on the CPU. The interpreter accepts code
the compiler rejects (Python builtins, loop-carried types that change), so this is what proves,
on a machine without a GPU, that the kernels the tests check will also build on one.

Run as a script with TRITON_INTERPRET=0: ``python tests/compile_for_gpu.py``.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import fused_bound, logw, lse  # noqa: E402

# Pointers that carry the dtype under test; everything else is float32 (or int32 counters).
DATA_POINTERS = {"t_ptr", "grad_t_ptr", "logits_ptr", "grad_logits_ptr"}
FLOAT_SCALARS = {"offset", "log_k"}
BLOCKS = {"BLOCK_R": 4, "BLOCK_K": 16, "BLOCK_D": 128, "BLOCK_L": 64, "PROD_GROUP": 64,
          "BLOCK_S": 32}
KERNELS = {
    lse._logsumexp_forward_kernel: {"SPLIT_K": True},
    lse._logsumexp_backward_kernel: {},
    logw._log_weights_forward_kernel: {},
    logw._log_weights_backward_kernel: {"FROM_BOUND": True, "NEED_DX": True},
    fused_bound._fused_iwae_forward_kernel: {"SAVE_LOG_W": True, "SPLIT_K": True},
}


def signature(fn, data_dtype, constants):
    sig, consts = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = constants.get(p.name, BLOCKS.get(p.name))
        elif p.name.endswith("_ptr"):
            sig[p.name] = (f"*{data_dtype}" if p.name in DATA_POINTERS
                           else "*i32" if p.name == "ticket_ptr" else "*fp32")
        else:
            sig[p.name] = "fp32" if p.name in FLOAT_SCALARS else "i32"
    return sig, consts


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    for fn, constants in KERNELS.items():
        for data_dtype in ("fp32", "bf16"):
            sig, consts = signature(fn, data_dtype, constants)
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
            print(f"compiled {fn.__name__} ({data_dtype}) for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
