"""Shared host-side helpers for the kernels: interpreter switch, launch sizing, input checks.

Input checks live here, once, so the Triton entry points and the PyTorch variants in
``iwae_bench`` reject bad input with the same messages.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def interpreted() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def target_programs(device: torch.device) -> int:
    """How many programs a launch wants so every SM has work (a few per SM on a GPU).

    Under the interpreter programs run one after another, so a small number is as fast
    as any and still exercises the split paths.
    """
    if device.type == "cuda" and not interpreted():
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# --------------------------------------------------------------------------- input checks


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_float_tensor(name: str, t, ndim: int | None = None, layout: str = "") -> None:
    """A floating tensor with ``ndim`` dimensions, or a TypeError/ValueError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got shape {_shape(t)}")


def check_bound_inputs(x, logits, z, mu, logvar) -> tuple[int, int, int, int]:
    """Validate the five bound inputs; return (B, k, D, d).

    x [B, D], logits [B, k, D], z [B, k, d], mu [B, d], logvar [B, d]; floating dtypes (they
    may differ: float16/bfloat16 logits beside float32 latents is the usual mix); one device.
    """
    check_float_tensor("x", x, 2, "[B, D]")
    check_float_tensor("logits", logits, 3, "[B, k, D]")
    check_float_tensor("z", z, 3, "[B, k, d]")
    check_float_tensor("mu", mu, 2, "[B, d]")
    check_float_tensor("logvar", logvar, 2, "[B, d]")
    B, k, D = logits.shape
    d = z.shape[2]
    if k < 1:
        raise ValueError(f"k must be >= 1: logits has shape {_shape(logits)} (k = {k})")
    if D < 1:
        raise ValueError(f"logits must have D >= 1, got shape {_shape(logits)}")
    if d < 1:
        raise ValueError(f"z must have a latent width d >= 1, got shape {_shape(z)}")
    expected = {
        "x": (B, D),
        "z": (B, k, d),
        "mu": (B, d),
        "logvar": (B, d),
    }
    given = {"x": x, "z": z, "mu": mu, "logvar": logvar}
    for name, want in expected.items():
        if tuple(given[name].shape) != want:
            raise ValueError(
                f"{name} must have shape [{', '.join(map(str, want))}] to match "
                f"logits {_shape(logits)} and z {_shape(z)}, got {_shape(given[name])}"
            )
    devices = {name: t.device for name, t in
               (("x", x), ("logits", logits), ("z", z), ("mu", mu), ("logvar", logvar))}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {dev}" for n, dev in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")
    return B, k, D, d


def check_log_weights(name: str, t, allow_empty: bool = False) -> int:
    """``t`` is a floating [..., k] tensor with k >= 1 (or k = 0 if ``allow_empty``); return k."""
    check_float_tensor(name, t)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension [..., k], got a 0-d tensor")
    k = t.shape[-1]
    if k < 1 and not allow_empty:
        raise ValueError(f"k must be >= 1: {name} has shape {_shape(t)} (k = {k})")
    return k


# --------------------------------------------------------------------------- launching


def autotune_enabled() -> bool:
    """Autotune on a GPU unless IWAE_BENCH_AUTOTUNE=0 (the correctness suite sets it: it
    checks numbers, and tuning every test shape would only cost time)."""
    return os.environ.get("IWAE_BENCH_AUTOTUNE", "1") != "0"


class Tunable:
    """A Triton kernel autotuned on a GPU, or launched with one fixed config.

    The fixed config serves under the CPU interpreter (where timing configs would measure
    numpy) and when autotuning is switched off; the host function passes block sizes for both.
    """

    def __init__(self, fn, configs, key, prune=None):
        import triton

        self.fn = fn
        self.tuned = None
        if not interpreted():
            prune_by = {"early_config_prune": prune} if prune is not None else None
            self.tuned = triton.autotune(configs=configs, key=key, prune_configs_by=prune_by)(fn)

    def launch(self, grid, *args, interpreter_meta: dict, default_meta: dict, **kwargs):
        if self.tuned is None:
            return self.fn[grid](*args, **kwargs, **interpreter_meta)
        if not autotune_enabled():
            return self.fn[grid](*args, **kwargs, **default_meta)
        return self.tuned[grid](*args, **kwargs)
