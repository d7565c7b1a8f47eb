"""Which precision a run computes in: ``train.precision`` resolved for the device it runs on.

``auto`` is bf16 autocast (float32 master weights, gradients and AdamW state; matrix products in
bfloat16) on CUDA and on a CPU that multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), and
float32 on any other CPU, where bf16 is emulated and several times slower than float32. On 2 cores
of an AMD EPYC with AVX512-BF16 a SmolLM2-135M training step runs about 2x faster under bf16
autocast than in float32 (BENCHMARKS.md); the gap it measures agrees within its interval
(docs/lm.md). The choice is recorded in every results.json (``precision``) and the reports.

``MYOPIA_NATIVE_BF16=0`` (or ``1``) overrides the CPU detection, e.g. to run the float32 path of
``auto`` on a CPU that has bf16 units (the tests do, to cover both paths on one machine).
"""

from __future__ import annotations

import contextlib
import os
import platform
import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX or AVX512-BF16; overridden by
    ``MYOPIA_NATIVE_BF16=0|1``). Without either, bf16 autocast on the CPU is emulated: 7-25x slower
    than float32 (SmolLM2-135M on an AVX2 AMD EPYC, 2026-12-03)."""
    forced = os.environ.get("MYOPIA_NATIVE_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False  # not x86 (Apple silicon, Graviton): torch reports no bf16 units here; stay in float32
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """``fp32`` or ``bf16``: what ``precision`` (auto | fp32 | bf16) means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    return "bf16" if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()) else "fp32"


def describe(device: torch.device | str, precision: str) -> dict:
    """What results.json records: the setting, what it resolved to, and why."""
    resolved = resolve_precision(device, precision)
    kind = torch.device(device).type
    if precision != "auto":
        reason = f"train.precision {precision}"
    elif kind == "cuda":
        reason = "auto: bf16 autocast on CUDA"
    elif resolved == "bf16":
        reason = "auto: this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)"
    else:
        reason = "auto: this CPU has no bf16 matrix units (bf16 would be emulated, slower than float32)"
    return {"setting": precision, "resolved": resolved, "device": kind, "reason": reason}


_warned_slow_bf16 = False


def autocast_for(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (a no-op for float32). Asking for bf16 on
    a CPU without bf16 units warns once per process: it works, slowly."""
    global _warned_slow_bf16
    if resolve_precision(device, precision) != "bf16":
        return contextlib.nullcontext()
    if device.type == "cpu" and not _warned_slow_bf16 and not cpu_has_native_bf16():
        _warned_slow_bf16 = True
        warnings.warn("train.precision bf16 on a CPU without AMX or AVX512-BF16: bf16 is emulated here and runs "
                      "several times slower than float32; use --train.precision fp32 (or auto)", stacklevel=2)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


__all__ = ["PRECISIONS", "autocast_for", "cpu_has_native_bf16", "describe", "resolve_precision"]
