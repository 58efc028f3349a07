"""The compile-only profile (iwae_bench.profile.sass): compiling for sm_90 with a launch's
specialization, reading the SASS, counting the hot loop, and the occupancy arithmetic.

The kernels below are compiled for real, which needs TRITON_INTERPRET=0 when they are
decorated, but tests/conftest.py sets TRITON_INTERPRET=1 at collection on machines without a
GPU. So this file is also a script: the ``compiled`` fixture runs it in a subprocess
(``python tests/test_profile_sass.py OUT.json``), where the block just below switches the
interpreter off before triton is imported, so the same kernel definitions are real JIT
functions there; it compiles them, and the tests read the results back. In the pytest process
the kernels are only defined, never compiled. The subprocess also runs ptxas with its log on
(TRITON_DUMP_PTXAS_LOG, in a fresh cache so that ptxas does run): an independent account of
registers and spills to check the library's figures against.
"""

import base64
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from iwae_bench.profile import sass as prof  # noqa: E402

BLOCK = 512
NUM_WARPS = 4
THREADS = NUM_WARPS * 32  # 128 threads: 4 consecutive floats (one 128-bit load) each per block


@triton.jit
def stream_kernel(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr, OP: tl.constexpr):
    """Sum OP(x) over row ``program_id`` of x, one BLOCK at a time (n a multiple of BLOCK).
    OP 0: exp2 (one MUFU.EX2), 1: log, 2: log2 (both software routines on float32)."""
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        x = tl.load(x_ptr + row * stride + start + tl.arange(0, BLOCK))
        if OP == 0:
            y = tl.exp2(x)
        elif OP == 1:
            y = tl.log(x)
        else:
            y = tl.log2(x)
        acc += y
    tl.store(out_ptr + row * BLOCK + tl.arange(0, BLOCK), acc)


SIGNATURE = {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "stride": "i32"}
# what a launch marks divisible by 16 when tensors are 16-byte aligned and n, stride multiples of 16
ALIGNED = ("x_ptr", "out_ptr", "n", "stride")
CASES = {
    "exp2": dict(constexprs={"BLOCK": BLOCK, "OP": 0}, aligned=ALIGNED),
    "exp2_unaligned": dict(constexprs={"BLOCK": BLOCK, "OP": 0}, aligned=()),
    "log": dict(constexprs={"BLOCK": BLOCK, "OP": 1}, aligned=ALIGNED),
    "log2": dict(constexprs={"BLOCK": BLOCK, "OP": 2}, aligned=ALIGNED),
    # a launch with stride == 1 makes it a constant (Triton >= 3.3)
    "unit_stride": dict(constexprs={"BLOCK": BLOCK, "OP": 0, "stride": 1},
                        aligned=("x_ptr", "out_ptr", "n")),
    # 32 accumulators per thread under a 32-register cap: ptxas must spill
    "spill": dict(constexprs={"BLOCK": 4096, "OP": 0}, aligned=ALIGNED, maxnreg=32),
}


def _compile_cases(out_path: str) -> None:
    """Run in the subprocess: compile every case, keep each one's ptxas log."""
    results = {}
    for name, case in CASES.items():
        case = dict(case)
        signature = {k: v for k, v in SIGNATURE.items() if k not in case["constexprs"]}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # where TRITON_DUMP_PTXAS_LOG prints
            compiled = prof.compile_for_target(stream_kernel, signature, case.pop("constexprs"),
                                               num_warps=NUM_WARPS, **case)
        fields = dataclasses.asdict(compiled)
        fields["cubin"] = base64.b64encode(compiled.cubin).decode()
        results[name] = {"compiled": fields, "ptxas_log": log.getvalue()}
    Path(out_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    out = tmp / "compiled.json"
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DUMP_PTXAS_LOG": "1",
           "TRITON_CACHE_DIR": str(tmp / "cache")}
    done = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    for result in results.values():
        fields = result["compiled"]
        fields["cubin"] = base64.b64decode(fields["cubin"])
        result["compiled"] = prof.Compiled(**fields)
    return results


def _ptxas(log: str, pattern: str):
    match = re.search(pattern, log)
    if match is None:
        pytest.skip("this Triton does not print the ptxas log (TRITON_DUMP_PTXAS_LOG)")
    return [int(group) for group in match.groups()]


# ---- the compiled kernels -------------------------------------------------------------------

def test_exp2_loop_is_one_mufu_per_element_on_128_bit_loads(compiled):
    kernel = compiled["exp2"]["compiled"]
    profile = prof.analyze(kernel)
    assert profile.loop_found and profile.loops_found == 1
    assert profile.global_loads and set(profile.global_loads) == {128}
    assert profile.global_stores == {}  # the store of the row sum is after the loop
    assert profile.instructions_outside > 0
    assert set(profile.mufu) == {"MUFU.EX2"}
    # ptxas unrolls this loop: the PTX comparison must account for it, whatever the factor
    assert profile.unroll is not None and profile.unroll >= 1
    assert profile.mufu["MUFU.EX2"] == profile.unroll * BLOCK // THREADS
    per = prof.per_element(profile, BLOCK, THREADS)
    assert per.elements_per_thread == profile.unroll * BLOCK / THREADS
    assert per.mufu == {"MUFU.EX2": 1.0}
    assert per.software_transcendentals == 0
    assert per.load_bits == 32.0  # each float read once
    # What the body must do per element: one MUFU.EX2 and one FADD (2); per 128-bit vector
    # of 4 elements: one LDG and at most 3 instructions of 64-bit address arithmetic
    # (offset, LEA, LEA.HI.X), <= 1 per element; per SASS iteration: add, compare, branch,
    # <= 3 over at least 4 elements. So 2 + 1/4 <= instructions per element <= 2 + 1 + 3/4.
    assert 2.25 <= per.instructions <= 3.75, per.instructions


def test_registers_and_spills_match_ptxas(compiled):
    for name in ("exp2", "spill"):
        kernel, log = compiled[name]["compiled"], compiled[name]["ptxas_log"]
        assert kernel.registers > 0
        assert [kernel.registers] == _ptxas(log, r"Used (\d+) registers")
        stores, loads = _ptxas(log, r"(\d+) bytes spill stores, (\d+) bytes spill loads")
        assert (kernel.spill_store_bytes, kernel.spill_load_bytes) == (stores, loads)
    assert compiled["exp2"]["compiled"].spill_store_bytes == 0
    spill = compiled["spill"]["compiled"]
    assert spill.registers <= 32 and spill.spill_store_bytes > 0 and spill.stack_bytes > 0


def test_software_log_is_detected_and_exp2_is_not(compiled):
    for name in ("log", "log2"):
        profile = prof.analyze(compiled[name]["compiled"])
        assert "MUFU.LG2" not in profile.mufu, name
        assert profile.software_transcendentals > 0, name
        per = prof.per_element(profile, BLOCK, THREADS)
        assert per.software_transcendentals == 1.0, name  # exactly one per element
    assert prof.analyze(compiled["exp2"]["compiled"]).software_transcendentals == 0


def test_divisibility_hints_are_what_vectorizes_the_loads(compiled):
    aligned = prof.analyze(compiled["exp2"]["compiled"])
    unaligned = prof.analyze(compiled["exp2_unaligned"]["compiled"])
    assert set(aligned.global_loads) == {128}
    assert set(unaligned.global_loads) == {32}
    assert unaligned.load_bits == aligned.load_bits  # same data, 4x the load instructions
    assert (prof.per_element(unaligned, BLOCK, THREADS).instructions
            > prof.per_element(aligned, BLOCK, THREADS).instructions)


def test_unit_stride_is_compiled_as_a_constant(compiled):
    def params(kernel):  # the entry's parameter declarations
        return len(re.findall(r"^\s*\.param\s", kernel.ptx, re.MULTILINE))

    unit, general = compiled["unit_stride"]["compiled"], compiled["exp2"]["compiled"]
    assert params(unit) == params(general) - 1
    # row * 1 is no longer a multiple of 16 elements: the row start is not 16-byte aligned
    assert set(prof.analyze(unit).global_loads) == {32}


def test_an_interpreted_or_plain_function_is_refused():
    with pytest.raises(TypeError, match="TRITON_INTERPRET"):
        prof.compile_for_target(lambda x_ptr: None, {"x_ptr": "*fp32"})


# ---- SASS analysis on hand-written listings -------------------------------------------------

def _listing(lines, name="fake_kernel"):
    """A cuobjdump -sass style listing; "@N" in a line stands for the address of line N."""
    out = ["\tcode for sm_90a", f"\t\tFunction : {name}",
           '\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90"']
    for index, line in enumerate(lines):
        line = re.sub(r"@(\d+)", lambda m: f"0x{int(m.group(1)) * 16:x}", line)
        out.append(f"        /*{index * 16:04x}*/                   {line} ;"
                   f"   /* 0x000000000000000000000000000000 */")
        out.append("                                                    /* 0x000fc00000000000 */")
    return "\n".join(out) + "\n"


NESTED = _listing([
    "S2R R0, SR_TID.X",  # 0
    "FADD R1, R1, R2",  # 1: a loop without loads, first and longer than the inner loop
    "FADD R1, R1, R2",
    "FADD R1, R1, R2",
    "FADD R1, R1, R2",
    "FADD R1, R1, R2",
    "FADD R1, R1, R2",
    "FADD R1, R1, R2",
    "FADD R1, R1, R2",
    "FADD R1, R1, R2",
    "ISETP.GE.AND P2, PT, R1, R3, PT",
    "@!P2 BRA @1",  # 11
    "MOV R2, RZ",  # 12: outer loop starts here
    "IADD3 R3, R0, 0x1, RZ",  # 13: inner loop starts here
    "@!P0 LDG.E.128 R4, desc[UR4][R8.64]",  # 14
    "LDG.E.U16 R12, desc[UR4][R10.64]",  # 15
    "MUFU.EX2 R5, R4",  # 16
    "MUFU.EX2 R6, R5",  # 17
    "MUFU.LG2 R7, R6",  # 18
    "NOP",  # 19: padding, not counted
    "CALL.REL.NOINC @30",  # 20
    "ISETP.GE.AND P0, PT, R3, R1, PT",  # 21
    "@!P0 BRA @13",  # 22: inner back edge
    "STG.E.64 desc[UR4][R14.64], R4",  # 23
    "@P1 BRA @12",  # 24: outer back edge
    "STG.E desc[UR4][R14.64], R1",  # 25
    "EXIT",  # 26
    "BRA @27",  # 27: the trap after EXIT, not a loop
    "NOP",  # 28
    "NOP",  # 29
    "RET.REL.NODEC R20 @0",  # 30: the called subroutine
])


def test_hot_loop_is_the_innermost_loop_that_loads():
    profile = prof.analyze(NESTED)
    assert profile.loop_found
    assert (profile.start, profile.end) == (13 * 16, 22 * 16)
    assert profile.loops_found == 2  # the FADD loop and the inner one (the outer loop is not
    # innermost). Lines 13-22 less the NOP: 9 instructions, the back-edge BRA counted once
    assert profile.instructions == 9
    assert profile.global_loads == {128: 1, 16: 1}
    assert profile.load_bits == 144
    assert profile.global_stores == {}
    assert profile.mufu == {"MUFU.EX2": 2, "MUFU.LG2": 1}
    assert profile.calls == 1 and profile.software_transcendentals == 1
    # 31 lines, 3 NOPs and the trap excluded: 27 executable instructions, 9 of them the loop
    assert profile.instructions_outside == 27 - 9
    assert profile.unroll is None  # no PTX given


def test_find_loops_keeps_innermost_and_ignores_the_trap():
    loops = prof.find_loops(prof.parse_sass(NESTED))
    assert [(loop.start, loop.end) for loop in loops] == [(1 * 16, 11 * 16), (13 * 16, 22 * 16)]


LOADS_ONLY = _listing([
    "LDG.E R0, desc[UR4][R2.64]",
    "LDG.E.64 R0, desc[UR4][R2.64]",
    "LDG.E.128 R0, desc[UR4][R2.64]",
    "LDG.E.128.CONSTANT R0, desc[UR4][R2.64]",
    "LDG.E.LTC128B.128 R0, desc[UR4][R2.64]",  # LTC128B is an L2 hint, not a width
    "LDG.E.LTC128B R0, desc[UR4][R2.64]",
    "LDG.E.U16 R0, desc[UR4][R2.64]",
    "LDG.E.S16 R0, desc[UR4][R2.64]",
    "LDG.E.U8 R0, desc[UR4][R2.64]",
    "LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR4][R2.64]",
    "STG.E.U16 desc[UR4][R2.64], R0",
    "STG.E.128 desc[UR4][R2.64], R0",
    "STL.64 [R1+0x8], R4",
    "LDL R4, [R1+0x8]",
    "EXIT",
])


def test_load_and_store_widths_without_a_loop():
    profile = prof.analyze(LOADS_ONLY)
    assert not profile.loop_found and profile.loops_found == 0
    assert profile.global_loads == {32: 2, 64: 1, 128: 4, 16: 2, 8: 1}
    assert profile.global_stores == {16: 1, 128: 1}
    assert profile.instructions == 15 and profile.instructions_outside == 0
    assert prof._local_memory_bytes(prof.parse_sass(LOADS_ONLY)) == (8, 4)


UNROLLED = _listing([
    "MOV R0, RZ",
    "LDG.E.128 R4, desc[UR4][R2.64]",  # 1: loop, 4 loads per iteration
    "LDG.E.128 R8, desc[UR4][R2.64+0x800]",
    "LDG.E.128 R12, desc[UR4][R2.64+0x1000]",
    "LDG.E.128 R16, desc[UR4][R2.64+0x1800]",
    "@!P0 BRA @1",
    "EXIT",
])
PTX_LOOP = """
.visible .entry fake_kernel(
\t.param .u64 .ptr .global .align 1 fake_kernel_param_0
)
{
\t@%p1 bra \t$L__BB0_3;
$L__BB0_2:                              // %.lr.ph
\t// begin inline asm
\tmov.u32 %r8, 0x0;
\t@%p2 ld.global.L1::evict_last.v4.b32 { %r8, %r9, %r10, %r11 }, [ %rd4 + 0 ];
\t// end inline asm
\tex2.approx.ftz.f32 \t%r14, %r8;
\t@%p3 bra \t$L__BB0_2;
$L__BB0_3:                              // %._crit_edge
\tst.global.v4.b32 [ %rd5 + 0 ], { %r20, %r21, %r22, %r23 };
\tret;
}
"""


def test_unroll_is_sass_load_bits_over_ptx_load_bits():
    assert prof.analyze(UNROLLED, PTX_LOOP).unroll == 4
    assert prof.analyze(UNROLLED, PTX_LOOP.replace(".v4.b32", ".v2.b32")).unroll == 8
    assert prof.analyze(UNROLLED, PTX_LOOP.replace("ld.global", "ld.shared")).unroll is None
    per = prof.per_element(prof.analyze(UNROLLED, PTX_LOOP), 512, 128)
    assert per.elements_per_thread == 16 and per.load_bits == 32


# ---- occupancy --------------------------------------------------------------------------------

@pytest.mark.parametrize("registers, shared, warps, programs, limited_by", [
    # 128 x 32 = 4096 registers a warp; 65536 / 4096 = 16 warps = 4 programs of 4 warps
    (128, 0, 4, 4, "registers"),
    # 32 x 32 = 1024 a warp: 64 warps by registers, and 64 is also the warp limit: 16 programs
    (32, 0, 4, 16, None),
    # 33 rounds up to 40: 1280 a warp, 65536 // 1280 = 51 warps, 12 programs of 4 (unrounded:
    # 1056 a warp, 62 warps, 15 programs)
    (33, 0, 4, 12, "registers"),
    # 255 rounds to 256: 8192 a warp, 8 warps, 2 programs
    (255, 0, 4, 2, "registers"),
    # 1-warp programs with few registers: 64 by warps, but at most 32 blocks per SM
    (16, 0, 1, 32, "blocks"),
    # 100 KB + 1 KB reserved = 103424 bytes a program; 233472 (228 KB) // 103424 = 2
    (32, 100 * 1024, 4, 2, "shared"),
    # 227 KB, the per-block maximum, + 1 KB reserved = all 228 KB: one program
    (32, 227 * 1024, 4, 1, "shared"),
    # 114 KB + 1 KB = 117760 a program: one fits, two (235520) don't; without the reserved
    # 1 KB two would
    (32, 114 * 1024, 4, 1, "shared"),
    # 45600 bytes round up to 45696 (128-byte units), + 1 KB = 46720: 233472 // 46720 = 4
    # (unrounded, 46624 a program, 5 would fit)
    (32, 45600, 4, 4, "shared"),
    # 8 warps x 64 registers: 2048 a warp, 32 warps, 4 programs
    (64, 0, 8, 4, "registers"),
])
def test_occupancy_known_values(registers, shared, warps, programs, limited_by):
    result = prof.occupancy(registers, shared, warps)
    assert result.programs_per_sm == programs
    assert result.warps_per_sm == programs * warps
    assert result.fraction == programs * warps / 64
    if limited_by is not None:
        assert result.limited_by == limited_by


def test_occupancy_rejects_what_cannot_launch():
    with pytest.raises(ValueError):
        prof.occupancy(256, 0, 4)
    with pytest.raises(ValueError):
        prof.occupancy(32, 227 * 1024 + 1, 4)
    with pytest.raises(ValueError):
        prof.occupancy(32, 0, 4, arch=75)


def test_bytes_in_flight_per_sm():
    # 4 programs, each loading a 512-float tile (2 KB) per iteration
    assert prof.bytes_in_flight_per_sm(4, 512 * 4) == 8192


if __name__ == "__main__":
    _compile_cases(sys.argv[1])
