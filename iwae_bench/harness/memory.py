"""Peak memory of one call on a CPU, where torch keeps no allocator statistics.

``AllocationTracker`` is a ``TorchDispatchMode``: every tensor an aten op creates during the
call is counted by its storage (a view adds nothing) until the last tensor on that storage is
freed, and the peak of the bytes alive is kept. What it sees: every tensor torch ops and the
kernels' host code allocate (the Triton kernels' outputs, workspaces and saved tensors
included). What it does not: memory inside one fused op, the Triton interpreter's numpy
copies, and torch.compile's generated code, which allocates outside the dispatcher (so
compiled variants get no CPU figure rather than a wrong one). On a GPU the allocator's own
counters are used instead (``timing.peak_extra_memory``).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.tensors_on: dict[int, int] = {}   # storage address -> tracked tensors alive on it
        self.bytes_of: dict[int, int] = {}
        self.alive = 0
        self.peak = 0
        self.largest = 0  # the largest single storage created (bytes)

    def _release(self, address: int) -> None:
        self.tensors_on[address] -= 1
        if self.tensors_on[address] == 0:
            del self.tensors_on[address]
            self.alive -= self.bytes_of.pop(address)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # an output on the storage of an argument (a view, an in-place op, set_) is not new memory
        given = {_address(a) for a in tree_leaves((args, kwargs or {}))} - {None}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            address, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or (address in given and address not in self.tensors_on):
                continue
            if address not in self.tensors_on:
                self.tensors_on[address] = 0
                self.bytes_of[address] = nbytes
                self.alive += nbytes
                self.peak = max(self.peak, self.alive)
                self.largest = max(self.largest, nbytes)
            self.tensors_on[address] += 1
            weakref.finalize(t, self._release, address)
        return out


def _address(value) -> int | None:
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        return value.untyped_storage().data_ptr()
    if isinstance(value, (torch.UntypedStorage, torch.TypedStorage)):
        return value.data_ptr()
    return None


def cpu_peak_extra_memory(fn: Callable[[], object]) -> int:
    """Bytes alive at the peak of one call beyond what existed before it (see the module)."""
    with AllocationTracker() as tracker:
        result = fn()
        del result
    return tracker.peak
