"""Process resources for stage two: glibc's allocator, CPU threads, peak memory."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from typing import Any

import torch


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"device": "cuda", "peak_bytes": int(torch.cuda.max_memory_allocated(device))}
    return {
        "device": "cpu",
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _glibc() -> Any:
    """glibc's allocator entry points, or None where they are not there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def lean_malloc(threshold: int = 128 << 10) -> bool:
    """Serve every allocation above ``threshold`` bytes with its own mmap, returned to the OS when
    freed (glibc only; process-wide and permanent; False where it does not apply).

    By default glibc raises this threshold (up to 32 MB) each time such a block is freed, so later
    batch-sized buffers (decoded batches, activations, gradients) come from the heap and their
    pages stay resident after they are freed. Fixing it at glibc's initial 128 KiB lowers the
    peak RSS of a stage-two run (`python -m benchmarks.read_memory`), at the cost of page faults
    for every large buffer."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def trim_malloc() -> None:
    """Return the free pages inside glibc's heaps to the OS (``malloc_trim``; a no-op elsewhere).

    Buffers under the mmap threshold come from per-thread heaps; once freed, their pages stay
    resident, and over an epoch the holes that the loader's and the steps' small buffers leave
    add up. ``--low-memory`` trims after every training batch and before evaluating."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def cpu_threads(wanted: int) -> int:
    """Intra-op threads for training on CPU. Side networks run many small matrix products, and
    the loader decompresses and decodes on its own threads; on a loaded machine, more OpenMP
    threads mostly spin (on 2 busy cores READ burnt 12x the CPU time with 2 threads than with 1).
    """
    if wanted > 0:
        return wanted
    return max(1, len(os.sched_getaffinity(0)) // 2)
