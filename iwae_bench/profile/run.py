"""``python -m iwae_bench profile``: the compiled-kernel profile table, written to a folder.

    profile.csv    one row per (kernel, logits dtype, validate shape, autotune config)
    profile.md     the table, the static targets and which rows meet them, the compiler
    machine.json   which machine and compiler made it

Runs with the Triton interpreter off (the kernels must be decorated for compiling); the CLI
starts it in a subprocess with TRITON_INTERPRET=0 on a machine where the interpreter is on.
A proxy read from the compiler's output, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

COMMAND = [sys.executable, "-m", "iwae_bench.profile.run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90: H100)")
    p.add_argument("--sms", type=int, default=132,
                   help="SMs the launch plan and bytes in flight are computed for (default 132: H100 SXM)")
    p.add_argument("--kernel", help="only the kernels whose name contains this text (e.g. 'fused forward')")
    p.add_argument("--max-configs", type=int,
                   help="compile at most this many autotune configs per launch (default: every config kept after pruning)")
    p.add_argument("--out", type=Path, default=Path("results") / "runs" / "profile",
                   help="output folder (default results/runs/profile)")


def write(rows: list[dict], out: Path, arch: int, sms: int, record, run: dict) -> Path:
    import pandas as pd
    import triton

    from ..files import write_csv, write_text
    from .kernels import COLUMNS, SMALL_INPUTS, TARGET_IN_FLIGHT, TARGET_INSTRUCTIONS, TARGET_MUFU

    write_csv(out / "profile.csv", rows, COLUMNS)
    record.finish(run, rows=len(rows))
    frame = pd.DataFrame(rows, columns=COLUMNS)
    big = frame[(frame["input_bytes"] >= SMALL_INPUTS) & ~frame["meets_static_targets"].str.startswith("n/a")]
    best = (big.assign(met=big["meets_static_targets"] == "yes")
            .groupby(["kernel", "dtype", "shape"], sort=False)["met"].any())
    lines = [
        "# Compiled-kernel profile\n",
        f"Every kernel of the package compiled for sm_{arch} by triton {triton.__version__} and its bundled "
        "ptxas, on this machine, with the specialization a real launch gets, for each autotune config "
        f"kept at the validate shapes (launch plans for {sms} SMs). Counts are for one iteration of "
        "each kernel's hot loop, per element of its tile. **A proxy read from the compiler's output, "
        "not a measurement**: only a GPU run measures speed.\n",
        f"Static targets, for inputs of 2 MB or more: forward <= {TARGET_INSTRUCTIONS['forward']:g} and backward "
        f"<= {TARGET_INSTRUCTIONS['backward']:g} instructions per element, MUFU per element <= "
        f"{TARGET_MUFU['forward']:g} (logsumexp <= {TARGET_MUFU['reduction']:g}), no software transcendental in "
        f"the loop, >= {TARGET_IN_FLIGHT // 1024} KB of loads in flight per SM, no spills.\n",
        f"{int(best.sum())} of {len(best)} (kernel, dtype, shape) combinations have at least one config "
        "meeting all of them.\n",
        "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    write_text(out / "profile.md", "\n".join(lines) + "\n")
    return out / "profile.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iwae_bench profile", description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    args = parser.parse_args(argv)
    from kernels import interpreted

    if interpreted():
        parser.error("the profile compiles kernels: run it with TRITON_INTERPRET=0 "
                     "(python -m iwae_bench profile does)")
    import torch
    import triton

    from ..harness.machine import MachineRecord
    from .kernels import profile_rows

    args.out.mkdir(parents=True, exist_ok=True)
    record = MachineRecord.open(args.out / "machine.json", torch.device("cpu"))
    record.machine.update(compiler=f"triton {triton.__version__} with its bundled ptxas, for sm_{args.arch}",
                          sms_planned_for=args.sms)
    run = record.start_run(command="python -m iwae_bench profile " + " ".join(argv if argv is not None else sys.argv[1:]))
    rows = profile_rows(args.arch, args.sms, args.kernel, args.max_configs,
                        log=lambda text: print(text, file=sys.stderr))
    if not rows:
        parser.error(f"no kernel matches --kernel {args.kernel!r}")
    print(f"wrote {write(rows, args.out, args.arch, args.sms, record, run)} and {args.out / 'profile.csv'}")
    return 0


def run_subprocess(argv: list[str]) -> int:
    """The profile in a fresh process with the interpreter off (kernels decorated to compile)."""
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.run([*COMMAND, *argv], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
