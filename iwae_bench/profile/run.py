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


SUMMARY_COLUMNS = ["kernel", "dtype", "shapes meeting the targets", "instructions per element",
                   "MUFU per element", "registers", "KB in flight per SM", "what the best config misses"]


def _span(values, fmt="{:g}") -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def summarize(frame):
    """One row per (kernel, dtype): at each shape of 2 MB of inputs or more, its best config
    (one meeting every static target with the fewest instructions per element, else the one
    with the fewest misses, then the fewest instructions), and across those shapes how many
    meet the targets and the range of each count."""
    import pandas as pd

    from .kernels import SMALL_INPUTS

    big = frame[frame["input_bytes"] >= SMALL_INPUTS].copy()
    big["_met"] = big["meets_static_targets"] == "yes"
    big["_misses"] = big["misses"].fillna("").map(lambda text: len([m for m in text.split("; ") if m]))
    best = (big.sort_values(["_met", "_misses", "loop_instructions_per_element"], ascending=[False, True, True])
            .groupby(["kernel", "dtype", "shape"], sort=False).head(1))
    order = {key: i for i, key in enumerate(dict.fromkeys(zip(frame["kernel"], frame["dtype"])))}
    best = best.sort_values(["kernel", "dtype"], key=lambda _: [order[k] for k in zip(best["kernel"], best["dtype"])],
                            kind="stable")
    rows = []
    for (kernel, dtype), part in best.groupby(["kernel", "dtype"], sort=False):
        targeted = ~part["meets_static_targets"].str.startswith("n/a")
        misses = sorted({m for text in part["misses"].fillna("") for m in text.split("; ") if m})
        rows.append({
            "kernel": kernel, "dtype": dtype,
            "shapes meeting the targets": f"{int(part['_met'].sum())} of {len(part)}" if targeted.all() else "no target",
            "instructions per element": _span(part["loop_instructions_per_element"]),
            "MUFU per element": _span(part["mufu_per_element"]),
            "registers": _span(part["registers"]),
            "KB in flight per SM": _span(part["bytes_in_flight_per_sm"] / 1024, "{:.0f}"),
            "what the best config misses": "; ".join(misses) if targeted.all() else "",
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _table(frame, columns) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(str(row[c]) for c in columns) + " |" for _, row in frame.iterrows()])


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
        "## Summary\n",
        "Per kernel and dtype, over the validate shapes with 2 MB of inputs or more, the best config "
        "at each shape (meeting every target with the fewest instructions, else missing the fewest):\n",
        *_table(summarize(frame), SUMMARY_COLUMNS),
        "\n## Every kernel, shape and config\n",
        *_table(frame, COLUMNS)]
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
