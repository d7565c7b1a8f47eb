"""The process's memory allocator, tuned for training on a CPU: freed memory is kept for reuse.

A training step on a CPU allocates and frees the same large tensors every step (SmolLM2-135M: the
49,152 × 576 head's casts and gradients, 56-113 MB each). glibc serves every block over 32 MB with
its own ``mmap`` and returns it to the kernel on ``free``, and returns the top of its heap once
more than 128 KB is free there, so every step faults the same memory back in, page by page.
On a virtual machine that hands freed pages back to its host (free page reporting, as in a
Firecracker VM) each fault is slow: measured on 2 cores of an AMD EPYC VM, a fresh 113 MB float32
copy took 100-200 ms inside a training process against 6 ms for a reused one, and a SmolLM2 step of
2,048 tokens faulted in 2.4 GB (600,000 pages). :func:`keep_freed_memory` tells glibc to serve every
block from its heap and never to shrink it: steady-state steps then fault nothing, and the step is
10-25% faster (BENCHMARKS.md). Within one phase (an arm's training, a model's scoring) the peak
resident memory is the same; across phases the kept heap fragments (measured: a SmolLM2 run's peak
grew by one model's size, 0.5 GiB, with every seed), so :func:`release_freed_memory` hands the
heap's free pages back between phases (``malloc_trim``: one call, a few ms; the next phase faults
in what it uses once, not every step). The runner calls it before each arm (after the last one's
scoring) and before scoring one.

The ``myopia`` command line calls it at start (``MYOPIA_MALLOC=system`` leaves glibc's defaults); a
library user may call it once, early. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_applied: list[bool] = []


@functools.cache
def _glibc():
    """glibc, or None (not Linux, or a libc without mallopt/malloc_trim: musl, macOS)."""
    if platform.system() != "Linux":
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt, lib.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return lib


def keep_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and never return freed memory to the kernel;
    True if applied (glibc on Linux, and ``MYOPIA_MALLOC`` is not ``system``)."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get("MYOPIA_MALLOC", "").strip().lower() != "system" and platform.system() == "Linux":
        libc = _glibc()
        if libc is not None:
            mallopt = libc.mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _applied.append(ok)
    return ok


def release_freed_memory() -> bool:
    """Return the free pages of every glibc heap to the kernel (``malloc_trim(0)``), e.g. between
    an arm's training and the next model's; True if glibc did it. Live memory is untouched."""
    libc = _glibc()
    if libc is None or not _applied or not _applied[0]:
        return False  # glibc's defaults already return large blocks on free
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    gc.collect()  # tensors held only by reference cycles (a finished arm's graph) go first
    libc.malloc_trim(0)
    return True


__all__ = ["keep_freed_memory", "release_freed_memory"]
