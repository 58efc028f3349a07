"""The GPU performance targets, checked against a sweep's CSV (never against typed numbers).

Definitions as in the sweep: bw_fraction is (fewest bytes the cell must move / median time)
over the device-to-device copy bandwidth measured in the same run; speedups compare medians of
the same cell. Targets are goals to report honestly, not thresholds a test enforces.
"""

from __future__ import annotations

import pandas as pd

from .harness.table import TIMED

BIG = 5e7  # B*k*D from which the bandwidth targets apply

# (mode, dtype) -> (fraction of copy bandwidth, speedup over torch.compile) for the fused bound
FUSED_TARGETS = {
    ("forward", "float32"): (0.85, 1.5),
    ("forward", "bfloat16"): (0.75, 2.5),
    ("backward", "float32"): (0.60, 3.0),
    ("backward", "bfloat16"): (0.60, 3.0),
}
REDUCTION_BW = {(16384, 1024): 0.80}
# the decoder head at the test-likelihood protocol's shape: fused_linear against the triton path
# (torch's matmul, then the fused bound on the logits), in bfloat16
HEAD_SHAPE = (20, 5000, 200)
HEAD_SPEEDUP = {"forward": 3.0, "backward": 2.0}
PEAK_BYTES_PER_SAMPLE = 16  # O(B*k): a few floats per sample, plus a MiB of slack
PEAK_SLACK = 1 << 20


def _cell(row) -> str:
    if row["family"] == "reduction":
        return f"reduction B={row['batch']} k={row['k']}"
    if row["family"] == "head":
        return f"head {row['mode']} {row['dtype']} B={row['batch']} k={row['k']} H={row['hidden']}"
    return f"{row['mode']} {row['dtype']} B={row['batch']} k={row['k']} d={row['latent']}"


def targets_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (target, cell) that the CSV can speak to, with the measurement and 'met'."""
    frame = frame[(frame["device"] == "cuda") & (frame["regime"] == "realistic")]
    keys = ["family", "mode", "dtype", "batch", "k", "latent", "data_dim", "hidden"]
    times = frame[frame["status"].isin(TIMED)].set_index(keys + ["variant"])["time_ms"]
    out = []

    def add(target, row, measured, goal, met, unit=""):
        out.append({"target": target, "cell": _cell(row), "measured": measured, "goal": goal,
                    "unit": unit, "met": "yes" if met else "no"})

    def speedup_over(row, baseline):
        key = tuple(row[c] for c in keys)
        if key + (baseline,) in times.index and row["status"] in TIMED:
            return times[key + (baseline,)] / row["time_ms"]
        return None

    def compile_speedup(row):
        return speedup_over(row, "compile")

    for _, row in frame[(frame["variant"] == "fused") & (frame["family"] == "bound")].iterrows():
        goals = FUSED_TARGETS.get((row["mode"], row["dtype"]))
        if goals is None:
            continue
        if row["status"] not in TIMED:
            add("fused runs", row, row["status"], "ok", False)
            continue
        if row["batch"] * row["k"] * row["data_dim"] >= BIG:
            add("fused: fraction of copy bandwidth", row, row["bw_fraction"], goals[0],
                row["bw_fraction"] >= goals[0])
        speedup = compile_speedup(row)
        if speedup is not None:
            add("fused: speedup over torch.compile", row, speedup, goals[1], speedup >= goals[1], "x")
        if row["mode"] == "forward" and pd.notna(row.get("peak_mem_bytes")):
            limit = PEAK_BYTES_PER_SAMPLE * row["batch"] * row["k"] + PEAK_SLACK
            add("fused: peak extra memory O(B*k)", row, row["peak_mem_bytes"], limit,
                row["peak_mem_bytes"] <= limit, "bytes")
    for _, row in frame[(frame["variant"] == "triton") & (frame["family"] == "reduction")].iterrows():
        if row["status"] not in TIMED:
            add("iwae_bound runs", row, row["status"], "ok", False)
            continue
        speedup = compile_speedup(row)
        if speedup is not None:
            add("iwae_bound: at least as fast as torch.compile", row, speedup, 1.0, speedup >= 1.0, "x")
        goal = REDUCTION_BW.get((row["batch"], row["k"]))
        if goal is not None:
            add("iwae_bound: fraction of copy bandwidth", row, row["bw_fraction"], goal,
                row["bw_fraction"] >= goal)
    heads = frame[(frame["variant"] == "fused_linear") & (frame["family"] == "head")]
    for _, row in heads.iterrows():
        if (row["batch"], row["k"], row["hidden"]) != HEAD_SHAPE or row["dtype"] != "bfloat16":
            continue
        if row["status"] not in TIMED:
            add("fused_linear runs", row, row["status"], "ok", False)
            continue
        speedup = speedup_over(row, "triton")
        if speedup is not None:
            goal = HEAD_SPEEDUP[row["mode"]]
            add("fused_linear: speedup over matmul + fused bound", row, speedup, goal, speedup >= goal, "x")
        if row["mode"] == "forward" and pd.notna(row.get("peak_mem_bytes")):
            limit = PEAK_BYTES_PER_SAMPLE * row["batch"] * row["k"] + PEAK_SLACK
            add("fused_linear: peak extra memory O(B*k)", row, row["peak_mem_bytes"], limit,
                row["peak_mem_bytes"] <= limit, "bytes")
    return pd.DataFrame(out, columns=["target", "cell", "measured", "goal", "unit", "met"])
