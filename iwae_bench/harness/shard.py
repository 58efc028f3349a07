"""Splitting the suite's work lists across processes, for the launchers people already use.

A ``Shard`` is "part I of N": it takes every N-th item of a work list, starting at I, from a
list every shard builds the same way (sweep problems, experiment runs, SNR cells), so the
parts are disjoint and together the whole list, whichever machine runs which. It comes from
``--shard I/N``, or else from the launcher's environment:

    torchrun            RANK, WORLD_SIZE (and LOCAL_RANK: the process's GPU on its node)
    SLURM job arrays    SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT (less SLURM_ARRAY_TASK_MIN,
                        over SLURM_ARRAY_TASK_STEP: ``--array=0-30:2`` is 16 shards)

Each shard writes its own folder (``shard-I-of-N`` under the output folder), so no two shards
write one file; ``python -m iwae_bench merge`` puts the parts back together.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str = "--shard"        # --shard, torchrun or slurm
    local_rank: int | None = None  # torchrun: the GPU of this process on its node

    def __post_init__(self):
        if not (isinstance(self.count, int) and self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {self.index}/{self.count}")

    @property
    def name(self) -> str:
        return f"shard-{self.index:03d}-of-{self.count:03d}"

    def take(self, items: Sequence[T]) -> list[T]:
        """This shard's part of a work list: items I, I + N, I + 2N, ..."""
        return list(items[self.index::self.count])

    def folder(self, out: Path) -> Path:
        return Path(out) / self.name

    def device(self, device: torch.device) -> torch.device:
        """cuda:LOCAL_RANK for a torchrun process on a node with several GPUs, made the current
        device too: Triton launches on the current device and ``do_bench`` times there, so a
        rank that only placed its tensors on its GPU would launch and time on cuda:0."""
        if device.type == "cuda" and self.local_rank is not None and torch.cuda.device_count() > 1:
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device

    def as_dict(self) -> dict:
        return asdict(self)


def parse(text: str) -> Shard:
    """``I/N`` -> Shard(I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise ValueError(f"--shard must be I/N (e.g. 0/4), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def from_environment(env: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard a launcher gave this process, or None outside one (or a launch of one)."""
    if "WORLD_SIZE" in env and "RANK" in env:
        count = int(env["WORLD_SIZE"])
        local = env.get("LOCAL_RANK")
        return None if count == 1 else Shard(int(env["RANK"]), count, "torchrun",
                                            int(local) if local is not None else None)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        offset = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        index, off_step = divmod(offset, step)
        if off_step or not 0 <= index < count:
            raise ValueError(
                f"the SLURM array task {env['SLURM_ARRAY_TASK_ID']} is not one of {count} evenly "
                f"spaced tasks (an --array list with gaps?); give each task --shard I/{count}")
        return None if count == 1 else Shard(index, count, "slurm")
    return None


def resolve(flag: str | None, env: Mapping[str, str] = os.environ) -> Shard | None:
    """``--shard`` when given, else the launcher's; None when the work is not split."""
    if flag:
        shard = parse(flag)
        return None if shard.count == 1 else shard
    return from_environment(env)


def wait_for_all(shard: Shard | None) -> bool:
    """Under torchrun, a barrier across the shards (gloo, so it works on CPUs and GPUs alike);
    True on the process that should merge (rank 0). Elsewhere, False: nothing to wait for."""
    if shard is None or shard.source != "torchrun":
        return False
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    merge_here = dist.get_rank() == 0
    dist.destroy_process_group()
    return merge_here
