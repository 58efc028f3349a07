"""What the compiler emits for an H100, turned into numbers, without a GPU.

A Triton kernel is compiled for sm_90 (Triton's compiler and the ptxas bundled with it run on
the CPU), the cubin is disassembled with the bundled ``cuobjdump``, and the SASS is read:

* resources, from the binary itself: registers per thread, stack and local bytes (``cuobjdump
  -res-usage``), spill bytes (the STL/LDL instructions in the SASS: the same sums ptxas -v
  prints as "bytes spill stores/loads"), shared memory (Triton's allocation, from the metadata);
* the hot loop (see :func:`find_loops` for the rule) and, per iteration of it: instructions,
  MUFU instructions by kind, global loads and stores by width, calls and software logarithms;
* from those, per element handled, and the occupancy the resources allow (:func:`occupancy`).

What these numbers are: a static proxy read from the compiler's output. Instructions per
element, MUFU per element, load width and resident warps are what decide the speed of a
memory- or issue-bound kernel, so a change that lowers them is likely to help and one that
raises them needs a reason. What they are not: a measurement. They count instructions once,
whatever their latency; they don't see caches, DRAM bandwidth, stalls or branches not taken.
Only a run on a GPU measures speed.

Triton must not be in interpreter mode when a kernel is decorated (``TRITON_INTERPRET=1``
makes ``@triton.jit`` return an interpreted function that cannot be compiled); the tests compile
in a subprocess with ``TRITON_INTERPRET=0`` for that reason.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import triton

__all__ = [
    "Compiled", "Instruction", "Loop", "LoopProfile", "PerElement", "Occupancy",
    "compile_for_target", "disassemble", "resource_usage", "parse_sass", "find_loops",
    "analyze", "per_element", "occupancy", "bytes_in_flight_per_sm",
]

DIVISIBILITY_16 = [["tt.divisibility", 16]]


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------

@dataclass
class Compiled:
    """One kernel compiled for one target: the binary, its text forms and its resources."""

    name: str
    arch: int
    num_warps: int
    cubin: bytes
    ptx: str
    sass: str  # cuobjdump -sass output, unedited
    registers: int  # per thread, from cuobjdump -res-usage
    stack_bytes: int  # per thread (spills live here with current ptxas)
    local_bytes: int  # per thread
    spill_store_bytes: int  # static sum of STL widths in the SASS
    spill_load_bytes: int  # static sum of LDL widths in the SASS
    shared_bytes: int  # per program: Triton's (dynamic) allocation + static shared

    @property
    def threads(self) -> int:
        return self.num_warps * 32


def _tool(name: str) -> str:
    """Path of a CUDA tool Triton ships (cuobjdump, nvdisasm), through Triton's own knobs when
    this version has them, else the bin folder next to the bundled ptxas."""
    try:
        from triton import knobs
        return getattr(knobs.nvidia, name).path
    except (ImportError, AttributeError):
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if not path.is_file():
            raise FileNotFoundError(f"{name} is not bundled with this Triton ({path})")
        return str(path)


def _run_on_cubin(cubin: bytes, args: List[str]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([_tool("cuobjdump"), *args, str(path)], capture_output=True,
                              text=True, check=True)
    return done.stdout


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, as ``cuobjdump -sass`` prints it."""
    return _run_on_cubin(cubin, ["-sass"])


_RES_USAGE = re.compile(r"Function\s+([\w$.]+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)"
                        r"\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes, name: Optional[str] = None) -> Dict[str, int]:
    """Registers, stack, static shared and local bytes of one function of a cubin, from
    ``cuobjdump -res-usage`` (the first function when ``name`` is None)."""
    found = {m.group(1): m for m in _RES_USAGE.finditer(_run_on_cubin(cubin, ["-res-usage"]))}
    if not found:
        raise ValueError("cuobjdump -res-usage reported no function")
    match = found[name] if name is not None else next(iter(found.values()))
    reg, stack, shared, local = (int(match.group(i)) for i in range(2, 6))
    return {"registers": reg, "stack_bytes": stack, "static_shared_bytes": shared,
            "local_bytes": local}


def _attrs_for(indices: Iterable[int]) -> dict:
    """The ``attrs`` ASTSource takes to mark arguments 16-divisible, as a launch does.

    Triton >= 3.3 (3.6 on the GPU machines, 3.9 here) takes a dict from the argument's path, a
    tuple of indices, to a list of [attribute, value] pairs: ``{(i,): [["tt.divisibility",
    16]]}`` (``JITFunction._pack_args`` builds it from ``backend.parse_attr("D")``; the format
    is the same in both). Triton <= 3.2 took an ``AttrsDescriptor`` object instead."""
    import triton.backends.compiler as backends_compiler

    if hasattr(backends_compiler, "AttrsDescriptor"):
        raise NotImplementedError(f"Triton {triton.__version__} takes an AttrsDescriptor; "
                                  "this module supports Triton >= 3.3")
    return {(index,): [list(pair) for pair in DIVISIBILITY_16] for index in indices}


def compile_for_target(fn, signature: Mapping[str, str], constexprs: Optional[Mapping] = None, *,
                       aligned: Iterable[str] = (), num_warps: int = 4, num_stages: int = 3,
                       arch: int = 90, **options) -> Compiled:
    """Compile a ``@triton.jit`` function for ``GPUTarget("cuda", arch, 32)`` and read back its
    binary, PTX, SASS and resources.

    ``signature`` maps each runtime argument to its Triton type ("*fp32", "i32", "fp32", ...);
    arguments named in ``constexprs`` may be left out (they become "constexpr"). The
    specialization a real launch applies must be given explicitly:

    * ``aligned``: arguments marked ``tt.divisibility = 16``, as a launch marks a pointer whose
      address is 16-byte aligned (every fresh PyTorch CUDA tensor) and an integer divisible by
      16. Without it, loads don't vectorize (32-bit LDG instead of 128-bit).
    * ``constexprs``: besides the ``tl.constexpr`` parameters, integers a launch turns into
      constants; recent Triton (3.3+) specializes an integer argument equal to 1 (a unit
      stride) this way, so pass ``{"stride_x": 1}`` to see the code such a launch runs.

    ``options`` go to the compiler (``maxnreg``, ``enable_fp_fusion``...); fp fusion is on by
    default, as at a launch.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{getattr(fn, '__name__', fn)!r} is not a compilable @triton.jit function "
                        "(was it decorated with TRITON_INTERPRET=1?)")
    constexprs = dict(constexprs or {})
    names = list(fn.arg_names)
    unknown = (set(signature) | set(constexprs) | set(aligned)) - set(names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no argument(s) {sorted(unknown)}")
    full_signature = {}
    for name in names:  # in parameter order: the code generator reads it positionally
        if name in constexprs:
            full_signature[name] = "constexpr"
        elif name in signature:
            full_signature[name] = signature[name]
        else:
            raise ValueError(f"{fn.__name__}: no type or constexpr value for argument {name!r}")
    for name in aligned:
        if full_signature[name] == "constexpr":
            raise ValueError(f"{name!r} is a constexpr; it cannot also carry a divisibility hint")
    attrs = _attrs_for(names.index(name) for name in aligned)
    # Constant keys as index tuples: accepted by every Triton >= 3.3 (names only by some).
    constants = {(names.index(name),): value for name, value in constexprs.items()}
    source = ASTSource(fn, full_signature, constants, attrs)
    target = GPUTarget("cuda", arch, 32)
    compile_options = {"num_warps": num_warps, "num_stages": num_stages,
                       "enable_fp_fusion": True, **options}
    kernel = triton.compile(source, target=target, options=compile_options)

    cubin = kernel.asm["cubin"]
    kernel_name = kernel.metadata.name
    sass = disassemble(cubin)
    resources = resource_usage(cubin, kernel_name)
    spill_store, spill_load = _local_memory_bytes(parse_sass(sass, kernel_name))
    return Compiled(
        name=kernel_name, arch=arch, num_warps=num_warps, cubin=cubin, ptx=kernel.asm["ptx"],
        sass=sass, registers=resources["registers"], stack_bytes=resources["stack_bytes"],
        local_bytes=resources["local_bytes"], spill_store_bytes=spill_store,
        spill_load_bytes=spill_load,
        shared_bytes=int(getattr(kernel.metadata, "shared", 0) or 0)
        + resources["static_shared_bytes"],
    )


# ---------------------------------------------------------------------------------------------
# Reading SASS
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with its modifiers, e.g. "LDG.E.128"; no predicate
    operands: str
    predicate: str = ""  # e.g. "@!P0"

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^(@!?U?P(?:T|\d+))\s+")
_HEX_TARGET = re.compile(r"(?:^|[\s,])(0x[0-9a-fA-F]+)\s*$")


def parse_sass(sass: str, function: Optional[str] = None) -> List[Instruction]:
    """The instructions of one function of a ``cuobjdump -sass`` listing (the first one when
    ``function`` is None), in address order."""
    instructions: List[Instruction] = []
    current, wanted_seen = None, False
    for line in sass.splitlines():
        header = _FUNCTION.match(line)
        if header:
            if wanted_seen:
                break
            current = header.group(1)
            wanted_seen = function is None or current == function
            continue
        if not wanted_seen:
            continue
        match = _LINE.match(line)
        if not match:
            continue
        text = match.group(2)
        predicate = _PREDICATE.match(text)
        if predicate:
            text = text[predicate.end():]
        opcode, _, operands = text.partition(" ")
        instructions.append(Instruction(int(match.group(1), 16), opcode, operands.strip(),
                                        predicate.group(1) if predicate else ""))
    if not instructions:
        raise ValueError(f"no SASS instructions found for function {function or '(first)'}")
    return instructions


def _branch_target(instruction: Instruction) -> Optional[int]:
    if instruction.base != "BRA":
        return None
    match = _HEX_TARGET.search(instruction.operands)
    return int(match.group(1), 16) if match else None


def _width_bits(opcode: str) -> int:
    """Bits one thread moves with a load or store, from its modifiers: LDG.E (32), LDG.E.64,
    LDG.E.128, LDG.E.U16/.S16/.16 (16), LDG.E.U8/.S8 (8). Other modifiers (.E, .CONSTANT,
    .EL, .LTC128B: an L2 prefetch hint, not a width, ...) don't change it."""
    modifiers = set(opcode.split(".")[1:])
    for token, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("16", 16),
                        ("U8", 8), ("S8", 8)):
        if token in modifiers:
            return bits
    return 32


def _local_memory_bytes(instructions: Iterable[Instruction]) -> Tuple[int, int]:
    """Bytes written and read by STL/LDL instructions, each counted once: what ptxas -v calls
    "bytes spill stores" and "bytes spill loads" (Triton kernels use local memory for nothing
    but spills)."""
    stores = loads = 0
    for ins in instructions:
        if ins.base == "STL":
            stores += _width_bits(ins.opcode) // 8
        elif ins.base == "LDL":
            loads += _width_bits(ins.opcode) // 8
    return stores, loads


def _is_software_log(ins: Instruction) -> bool:
    """The exponent split of a software logarithm: ``LOP3.LUT d, x, 0xff800000, RZ, 0xc0``
    (d = x AND 0xff800000, sign and exponent bits of the range-reduced argument).

    ``tl.log`` and ``tl.log2`` on float32 are not one MUFU.LG2 but an inlined software routine
    (libdevice ``__nv_logf``/``__nv_log2f`` style): subtract the bits of the reduction
    constant (0x3f2aaaab = 2/3 for log, log10, log1p; 0x3f3504f3 = 1/sqrt 2 for log2), mask
    with 0xff800000, convert the exponent (I2FP), then a ~10-term FFMA polynomial. The
    constant differs between the functions; the mask is the one step they all share, exactly
    once per evaluation, and MUFU-based code (exp, exp2, rcp, fast_logf) never has it."""
    if ins.opcode != "LOP3.LUT":
        return False
    operands = [part.strip() for part in ins.operands.split(",")]
    return "0xff800000" in operands and "0xc0" in operands


# ---------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction (the back edge's target)
    end: int  # address of the back edge (the last BRA to start)

    def contains(self, other: "Loop") -> bool:
        return self != other and self.start <= other.start and other.end <= self.end


def find_loops(instructions: List[Instruction]) -> List[Loop]:
    """Innermost loops of a SASS function, in address order.

    A loop is a backward branch: a ``BRA`` at address b to a target t < b spans [t, b]
    (several back edges to one header make one loop, ending at the last). A ``BRA`` to its
    own address is the trap ptxas places after EXIT, not a loop. Only innermost loops (that
    contain no other) are kept: an outer loop's body would count its inner loop's body once
    per outer iteration."""
    ends: Dict[int, int] = {}
    for ins in instructions:
        target = _branch_target(ins)
        if target is not None and target < ins.address:
            ends[target] = max(ends.get(target, target), ins.address)
    loops = [Loop(start, end) for start, end in ends.items()]
    innermost = [loop for loop in loops if not any(loop.contains(other) for other in loops)]
    return sorted(innermost, key=lambda loop: loop.start)


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------

@dataclass
class LoopProfile:
    """Static counts for one iteration of the hot loop of a kernel (one thread's view).

    ``instructions`` counts every instruction of the loop body once, the back-edge BRA
    included (it issues every iteration), NOPs excluded (padding). A branch inside the body
    makes it the length of the longest path, not the average one. ``unroll`` is how many
    iterations of the source loop one SASS iteration does (ptxas unrolls loops): global-load
    bits per SASS iteration over global-load bits per iteration of the PTX loop, which is
    the source loop; None when it cannot be told (no PTX, no loads, not a whole ratio)."""

    loop_found: bool  # False: no loop; the counts are for the whole kernel
    start: int
    end: int
    instructions: int
    mufu: Dict[str, int]  # "MUFU.EX2" -> count
    global_loads: Dict[int, int]  # width in bits -> count (LDG and LDGSTS)
    global_stores: Dict[int, int]  # width in bits -> count (STG)
    calls: int  # CALL.REL / CALL.ABS in the body
    software_logs: int  # see _is_software_log
    instructions_outside: int  # prologue, epilogue and remainder code, NOPs excluded
    loops_found: int  # innermost loops in the kernel
    unroll: Optional[int] = None
    opcodes: Dict[str, int] = field(default_factory=dict)  # full histogram of the body

    @property
    def software_transcendentals(self) -> int:
        """Transcendentals not done by a MUFU: calls (slow paths, non-inlined libdevice) plus
        inlined software logarithms."""
        return self.calls + self.software_logs

    @property
    def load_bits(self) -> int:
        return sum(bits * count for bits, count in self.global_loads.items())

    @property
    def store_bits(self) -> int:
        return sum(bits * count for bits, count in self.global_stores.items())


def _count(body: List[Instruction]) -> dict:
    mufu, loads, stores = Counter(), Counter(), Counter()
    for ins in body:
        if ins.base == "MUFU":
            mufu[ins.opcode] += 1
        elif ins.base in ("LDG", "LDGSTS"):
            loads[_width_bits(ins.opcode)] += 1
        elif ins.base == "STG":
            stores[_width_bits(ins.opcode)] += 1
    return {
        "instructions": len(body),
        "mufu": dict(mufu),
        "global_loads": dict(loads),
        "global_stores": dict(stores),
        "calls": sum(1 for ins in body if ins.base == "CALL"),
        "software_logs": sum(1 for ins in body if _is_software_log(ins)),
        "opcodes": dict(Counter(ins.opcode for ins in body)),
    }


def _hot(loops: List[Loop], counts: List[dict]) -> int:
    """Index of the hot loop: the innermost loop that loads the most global bits per
    iteration, ties to the longer body. The loop that streams the data is the one whose trip
    count grows with the input; a loop without loads (a retry loop, a small setup loop) only
    wins when no loop loads."""
    return max(range(len(loops)),
               key=lambda i: (sum(b * n for b, n in counts[i]["global_loads"].items()),
                              counts[i]["instructions"]))


_PTX_LABEL = re.compile(r"^\s*(\$?[\w$]+):")
_PTX_BRANCH = re.compile(r"^\s*(?:@!?%\w+\s+)?bra(?:\.uni)?\s+(\$?[\w$]+)\s*;")
_PTX_LOAD = re.compile(r"\bld\.global\.([\w.:]+)")
_PTX_CP_ASYNC = re.compile(r"\bcp\.async\.\w+\.shared(?::\w+)?\.global[\w.:]*\s+[^,]+,\s*[^,]+,"
                           r"\s*(\w+)")


def _ptx_load_bits(line: str) -> int:
    match = _PTX_LOAD.search(line)
    if match:
        lanes, bits = 1, 32
        for token in match.group(1).split("."):
            if re.fullmatch(r"v\d+", token):
                lanes = int(token[1:])
            elif re.fullmatch(r"[bfsu]\d+", token):
                bits = int(token[1:])
        return lanes * bits
    match = _PTX_CP_ASYNC.search(line)
    return int(match.group(1), 0) * 8 if match else 0


def _ptx_hot_loop_load_bits(ptx: str) -> int:
    """Global-load bits of one iteration of the PTX loop that loads the most (the same rule as
    for SASS: innermost backward branches; Triton's PTX is not unrolled)."""
    lines = ptx.splitlines()
    labels = {}
    for number, line in enumerate(lines):
        match = _PTX_LABEL.match(line)
        if match:
            labels[match.group(1)] = number
    ends: Dict[int, int] = {}
    for number, line in enumerate(lines):
        match = _PTX_BRANCH.match(line)
        if match and labels.get(match.group(1), number) < number:
            start = labels[match.group(1)]
            ends[start] = max(ends.get(start, start), number)
    spans = list(ends.items())
    innermost = [(s, e) for s, e in spans
                 if not any((s, e) != (s2, e2) and s <= s2 and e2 <= e for s2, e2 in spans)]
    return max((sum(_ptx_load_bits(line) for line in lines[s:e + 1]) for s, e in innermost),
               default=0)


def analyze(compiled_or_sass: Union[Compiled, str], ptx: Optional[str] = None,
            function: Optional[str] = None, rank=None) -> LoopProfile:
    """Counts for one iteration of the hot loop (see :func:`find_loops` and :func:`_hot`).

    Takes a :class:`Compiled` (its SASS and PTX are used) or a SASS listing, with the PTX
    optional (it only serves to tell the unroll factor). A kernel without a loop gives a
    profile of the whole kernel with ``loop_found`` False. ``rank`` replaces the rule that
    picks the hot loop: a key over each innermost loop's counts (the dict of ``_count``), the
    largest wins; a caller who knows what its hot loop does (one exp per element, say) can
    tell it from a setup loop that loads as much."""
    if isinstance(compiled_or_sass, Compiled):
        sass, ptx, function = compiled_or_sass.sass, compiled_or_sass.ptx, compiled_or_sass.name
    else:
        sass = compiled_or_sass
    instructions = parse_sass(sass, function)
    # Executable code only: the self-branch trap after EXIT and the NOP padding are not run.
    code = [ins for ins in instructions if ins.base != "NOP" and _branch_target(ins) != ins.address]
    loops = find_loops(code)
    if not loops:
        counts = _count(code)
        return LoopProfile(loop_found=False, start=code[0].address, end=code[-1].address,
                           instructions_outside=0, loops_found=0, unroll=1, **counts)
    bodies = [[ins for ins in code if loop.start <= ins.address <= loop.end] for loop in loops]
    counts = [_count(body) for body in bodies]
    hot = _hot(loops, counts) if rank is None else max(range(len(loops)), key=lambda i: rank(counts[i]))
    unroll = None
    if ptx is not None and counts[hot]["global_loads"]:
        ptx_bits = _ptx_hot_loop_load_bits(ptx)
        sass_bits = sum(b * n for b, n in counts[hot]["global_loads"].items())
        ratio = Fraction(sass_bits, ptx_bits) if ptx_bits else None
        if ratio is not None and ratio.denominator == 1 and ratio >= 1:
            unroll = int(ratio)
    return LoopProfile(loop_found=True, start=loops[hot].start, end=loops[hot].end,
                       instructions_outside=len(code) - counts[hot]["instructions"],
                       loops_found=len(loops), unroll=unroll, **counts[hot])


@dataclass
class PerElement:
    """Loop counts divided by the elements one thread handles per SASS iteration."""

    elements_per_thread: float  # per SASS iteration: tile / threads x unroll
    instructions: float
    mufu: Dict[str, float]
    software_transcendentals: float
    load_bits: float


def per_element(profile: LoopProfile, elements_per_iteration: int, threads: int) -> PerElement:
    """Normalize a loop profile per element.

    ``elements_per_iteration`` is what one iteration of the source loop handles for the whole
    program (the tile, e.g. BLOCK_K for a loop over blocks of BLOCK_K), ``threads`` the
    program's threads (num_warps x 32). One thread handles tile / threads elements per source
    iteration and ``unroll`` source iterations per SASS iteration (1 when unknown). For a
    profile without a loop (``loop_found`` False) pass the elements the whole program handles."""
    unroll = profile.unroll or 1
    elements = elements_per_iteration / threads * unroll
    return PerElement(
        elements_per_thread=elements,
        instructions=profile.instructions / elements,
        mufu={kind: count / elements for kind, count in profile.mufu.items()},
        software_transcendentals=profile.software_transcendentals / elements,
        load_bits=profile.load_bits / elements,
    )


# ---------------------------------------------------------------------------------------------
# Occupancy
# ---------------------------------------------------------------------------------------------

# Per-SM limits by compute capability. Sources: CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability" (9.0: 64K 32-bit registers per SM, 255 per thread,
# 64 resident warps, 32 resident blocks, 228 KB shared memory per SM of which 227 KB per
# block), and the CUDA Occupancy Calculator's GPU data for 9.0 (registers allocated per warp
# in units of 256, shared memory in units of 128 bytes, 1 KB of shared memory reserved by the
# system per block, as on 8.x).
_SM_LIMITS = {
    90: {"registers": 65536, "register_unit": 256, "max_registers_per_thread": 255,
         "warps": 64, "blocks": 32, "shared": 228 * 1024, "shared_per_block": 227 * 1024,
         "shared_unit": 128, "shared_reserved_per_block": 1024},
}


@dataclass(frozen=True)
class Occupancy:
    programs_per_sm: int  # resident programs (CTAs)
    warps_per_sm: int
    limited_by: str  # "registers", "shared", "warps" or "blocks"
    max_warps_per_sm: int

    @property
    def fraction(self) -> float:
        """Resident warps over the SM's maximum (64 on sm_90)."""
        return self.warps_per_sm / self.max_warps_per_sm


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int = 90) -> Occupancy:
    """Programs and warps one SM keeps resident, from registers per thread, shared memory per
    program and warps per program (the CUDA occupancy calculator's rules)."""
    if arch not in _SM_LIMITS:
        raise ValueError(f"no SM limits for sm_{arch}; known: {sorted(_SM_LIMITS)}")
    limit = _SM_LIMITS[arch]
    if not 0 < registers <= limit["max_registers_per_thread"]:
        raise ValueError(f"{registers} registers per thread is not possible on sm_{arch}")
    if shared_bytes > limit["shared_per_block"]:
        raise ValueError(f"{shared_bytes} bytes of shared memory exceed the per-program limit")
    # A warp gets 32 x registers rounded up to the allocation unit (= registers rounded up to 8).
    registers_per_warp = _round_up(registers * 32, limit["register_unit"])
    by_registers = (limit["registers"] // registers_per_warp) // num_warps
    shared_per_block = (_round_up(shared_bytes, limit["shared_unit"])
                        + limit["shared_reserved_per_block"])
    by_shared = limit["shared"] // shared_per_block
    by_warps = limit["warps"] // num_warps
    candidates = {"registers": by_registers, "shared": by_shared, "warps": by_warps,
                  "blocks": limit["blocks"]}
    limited_by = min(candidates, key=lambda key: candidates[key])  # ties: the first listed
    programs = candidates[limited_by]
    return Occupancy(programs_per_sm=programs, warps_per_sm=programs * num_warps,
                     limited_by=limited_by, max_warps_per_sm=limit["warps"])


def bytes_in_flight_per_sm(programs_per_sm: int, bytes_loaded_per_iteration: int) -> int:
    """Bytes of global loads an SM can have outstanding at once, to first order: resident
    programs per SM x the bytes each program has outstanding in its hot loop: what it loads
    per iteration (all of a loop iteration's loads are issued before their first use), times
    the iterations a pipelined loop loads ahead. To stream at full bandwidth it
    must cover bandwidth x latency / SMs: roughly 3.35 TB/s x 0.6 us / 132, some 15 KB, on an
    H100 SXM (a rough figure: the latency under load is not a constant)."""
    return programs_per_sm * bytes_loaded_per_iteration
