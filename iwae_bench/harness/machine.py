"""Which machine made a run: device, CPU, versions, commit, and its measured copy bandwidth.

``machine.json`` beside every results folder is built here and only here (``MachineRecord``):
``{"machine": describe(device), "runs": [{"command", "started", "finished", ...}, ...]}``,
one run entry per command that wrote into the folder (a resumed sweep adds one).

The copy bandwidth is the yardstick for every GB/s figure: a device-to-device copy of a large
buffer (counting the bytes read and the bytes written), timed the same way as the variants.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

from ..files import read_json, write_json


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """A folder name for a device: 'cpu', or e.g. 'nvidia-h100-80gb-hbm3'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        if out.returncode != 0:
            return None
        # "-dirty" speaks of the code that makes the numbers (the packages and their
        # dependencies), not of results, docs or tests being edited beside a run
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "iwae_bench", "kernels", "pyproject.toml"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe(device: torch.device) -> dict:
    """Everything a reader needs to know which machine and software produced the numbers."""
    import triton

    from kernels import interpreted
    from kernels._common import autotune_enabled

    info = {
        "device": device.type,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_threads_available": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA torch's CPU kernels run
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "triton_interpreted": interpreted(),
        "triton_autotune": device.type == "cuda" and not interpreted() and autotune_enabled(),
        "commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
            "gpu_memory_bytes": props.total_memory,
            "sm_count": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
        })
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def copy_bandwidth_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """GB/s (1e9 bytes) of a device-to-device copy, counting read + write bytes."""
    from .timing import time_call

    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)  # 1 GiB, or 128 MiB on CPU
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: str = "float32") -> float:
    """TFLOP/s (1e12) of a large square matmul in ``dtype``: the yardstick for the decoder head's
    flops, timed the same way as the variants. float32 follows torch's TF32 setting, as the
    head's own float32 matmuls do."""
    from .timing import time_call

    n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, generator=gen, device=device).to(getattr(torch, dtype))
    timing = time_call(lambda: a @ b, device)
    return 2 * n ** 3 / (timing.median_ms * 1e-3) / 1e12


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join([Path(sys.executable).name, "-m", "iwae_bench", *sys.argv[1:]])


def with_commit(run: dict, machine: dict) -> dict:
    """A run entry with its commit: entries from before runs recorded their own take that of
    the machine record they were read with (the last process that wrote it: exact for a folder
    one process wrote), marked ``commit_from`` so the guess is not taken for a record."""
    return run if "commit" in run else {**run, "commit": machine.get("commit"), "commit_from": "machine"}


SAME_MACHINE = ("device", "device_name", "cpu_model", "cpu_capability", "platform", "python", "torch", "triton",
                "cuda", "driver")  # what tells two machines (or software stacks) apart; not the commit


def same_machine(a: dict, b: dict) -> bool:
    """Whether two machine descriptions name the same device (``device_name``) and agree on
    every other key of ``SAME_MACHINE`` both have."""
    shared = [key for key in SAME_MACHINE if key in a and key in b]
    return "device_name" in shared and all(a[key] == b[key] for key in shared)


def made_by(record: dict, index: int = 0) -> tuple[dict, dict]:
    """A results folder's run entry ``index`` (the first: the command that made it) and the
    machine it ran on with that run's commit ("?" where none is known), for a report's "Made
    by" line. The first run's machine is the first of ``machines`` where the folder has
    several; a later one's, the last writer's."""
    machines = record.get("machines") or [record.get("machine", {})]
    run = with_commit((record.get("runs") or [{}])[index], record.get("machine", {}))
    machine = machines[0] if index == 0 else record.get("machine", {})
    return run, {**machine, "commit": run["commit"] or "?"}


def missing_cells(record: dict) -> list[str]:
    """The cells (or runs) a results folder lacks: its last run entry's ``missing_cells``, since
    the last command to write a folder (a merge, a resume that finished it, an update that
    carried the note) speaks for all of it. Empty for a complete folder."""
    return list(((record.get("runs") or [{}])[-1]).get("missing_cells") or [])


class MachineRecord:
    """machine.json of one results folder: the machine, and one entry per run written into it."""

    def __init__(self, path: Path, machine: dict, runs: list[dict] | None = None,
                 earlier_machine: dict | None = None):
        self.path = Path(path)
        self.machine = machine
        self.runs = list(runs or [])
        self.earlier_machine = earlier_machine or {}  # what a resumed folder's record said
        self.machines: list[dict] = []  # a merged folder: every machine its rows came from

    @classmethod
    def open(cls, path: Path, device: torch.device, resume: bool = False) -> "MachineRecord":
        """This machine's record; a resumed folder keeps the earlier runs' entries and, once
        another machine has written into it, the list of every machine (``machines``, as a
        merged folder has; the earlier ones first)."""
        earlier = read_json(path) if resume else {}
        previous = earlier.get("machine", {})
        runs = [with_commit(run, previous) for run in earlier.get("runs", [])]
        record = cls(path, describe(device), runs, previous)
        machines = list(earlier.get("machines") or ([previous] if previous else []))
        if machines and not any(same_machine(seen, record.machine) for seen in machines):
            machines.append(record.machine)
        record.machines = machines if len(machines) > 1 or earlier.get("machines") else []
        return record

    def start_run(self, command: str | None = None, **fields) -> dict:
        """Add a run entry (command line, the code's commit and start time, ``finished`` None
        until ``finish``): the top-level machine is the last process's, so each run keeps its own."""
        run = {"command": command or command_line(), "commit": git_commit(), "started": now(), "finished": None,
               **fields}
        self.runs.append(run)
        self.write()
        return run

    def finish(self, run: dict, **fields) -> None:
        run.update(fields, finished=now())
        self.write()

    def as_dict(self) -> dict:
        return {"machine": self.machine, **({"machines": self.machines} if self.machines else {}),
                "runs": self.runs}

    def write(self) -> None:
        write_json(self.path, self.as_dict())
