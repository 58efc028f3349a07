"""Elementwise math shared by the kernels, in the forms that compile to one MUFU op.

    exp(x)     = exp2(x * log2(e))     -> MUFU.EX2 (flush-to-zero), no denormal guard
    log(x)     = log2(x) * ln(2)       -> MUFU.LG2 with FAST (libdevice's fast_log2f), else the
                                          exact libdevice log2 (a ~30-instruction software log)
    sigmoid(x) = 0.5 + 0.5 tanh(x / 2) -> MUFU.TANH with TANH (PTX tanh.approx.f32), else
                                          1 / (1 + exp(-x)): MUFU.EX2 + MUFU.RCP with FAST
                                          (an approximate divide, 2 ulp), the exact divide else

FAST is a constexpr the host sets: on for a compiled launch, off under the CPU interpreter,
which has no libdevice (so the tests on a CPU check the exact forms and the compiled suite on
a GPU checks the fast ones against the same float64 reference). Accuracy of the fast forms
(PTX ISA): lg2.approx has a relative error near 2^-22, fine for the logs of the Bernoulli
term's partial products; tanh.approx near 2^-11, so the fast sigmoid is used only where the
result is stored in 16 bits anyway (the gradient of bf16/fp16 logits).
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
NEG_LOG2E = tl.constexpr(-1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def exp_(x):
    return tl.exp2(x * LOG2E)


@triton.jit
def exp_neg_(x):
    """exp(-x) = exp2(x * -log2(e)), the sign in the constant (the same bits as exp_(-x)):
    Triton 3.6 lowers -x to 0 - x, an FADD per element that ptxas cannot fold into the
    multiply (0 - 0 is +0, not -0); 3.9's negation folds, so both forms cost it the same."""
    return tl.exp2(x * NEG_LOG2E)


@triton.jit
def log2_(x, FAST: tl.constexpr):
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def sigmoid_(x, FAST: tl.constexpr, TANH: tl.constexpr):
    """TANH (FAST only): one MUFU.TANH, good to about 2^-11; FAST: exp2 and an approximate
    divide (MUFU.EX2 + MUFU.RCP, 2 ulp); neither: the exact form the interpreter runs."""
    if TANH:
        tanh = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [0.5 * x],
                                         dtype=tl.float32, is_pure=True, pack=1)
        return 0.5 + 0.5 * tanh
    elif FAST:
        return libdevice.fast_dividef(1.0, 1.0 + exp_neg_(x))
    else:
        return 1.0 / (1.0 + exp_neg_(x))
