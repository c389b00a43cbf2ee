"""Keep the memory a process frees, instead of handing every large buffer back to the kernel.

glibc serves an allocation above its mmap threshold (128 KiB to start) with a fresh mmap and unmaps it on free,
and trims the heap's top whenever more than its trim threshold is free. A convnet's activations for one batch are
tens of MB, so under those defaults every batch of a feature pass or a training step faults in fresh pages that the
kernel must zero, and a small network spends a large share of its pass there. glibc raises the mmap threshold by
itself after large frees, but never above 32 MiB: a process that has trained runs its feature pass faster than one
that never has (a feature-pool actor), and neither as fast as one that keeps its pages. Setting both thresholds
once, at import, keeps them mapped: the process's resident size stays at its peak instead of following each batch.
The measured effect is `benchmarks/bench_allocator.py`'s section of benchmarks/RESULTS.md.

`raydc/__init__.py` calls it, so every process that imports raydc (the driver, Ray Train workers, pool and shard
actors) gets it. A user's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ (or the same in GLIBC_TUNABLES)
wins (glibc already read them), and RAYDC_MALLOC=default leaves glibc's defaults alone. Other C libraries (musl,
macOS, Windows) are left as they are.
"""
from __future__ import annotations

import ctypes
import os

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# An allocation below this comes from the heap and goes back to it: a batch's activations at the batch sizes raydc
# uses fit far below; a tensor above it (a whole dataset's features) still gets its own mapping.
MMAP_THRESHOLD = 512 << 20
# Free memory the heap keeps at its top before returning it to the kernel.
TRIM_THRESHOLD = 1 << 30

_applied: str | None = None


def glibc_version() -> str | None:
    """'2.36' under glibc, None under any other C library."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION")  # 'glibc 2.36'
    except (AttributeError, ValueError, OSError):
        return None
    if not name or not name.startswith("glibc"):
        return None
    return name.split()[-1]


def retain_freed_memory(environ: dict | None = None) -> str:
    """Raise glibc's mmap and trim thresholds once per process; returns what is in force, for the metrics row:
    'retain' (set here), 'user' (the user's MALLOC_* variables), 'default' (RAYDC_MALLOC=default) or
    'unsupported' (not glibc, or mallopt refused)."""
    global _applied
    env = os.environ if environ is None else environ
    if env.get("RAYDC_MALLOC", "").strip().lower() == "default":
        return "default"
    if env.get("MALLOC_MMAP_THRESHOLD_") or env.get("MALLOC_TRIM_THRESHOLD_") or any(
            t in env.get("GLIBC_TUNABLES", "") for t in ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")):
        return "user"
    if _applied is not None:
        return _applied
    if glibc_version() is None:
        _applied = "unsupported"
        return _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD,
                                                                                  TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        ok = False
    _applied = "retain" if ok else "unsupported"
    return _applied
