"""Keep freed memory in the process heap (glibc malloc), so CPU steps stop page-faulting."""

from __future__ import annotations

import ctypes

# mallopt parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
# glibc's largest allowed mmap threshold on 64-bit; blocks above it are still mapped per call.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Free space kept at the top of the heap before it is handed back to the kernel.
TRIM_THRESHOLD_BYTES = 1 << 30
# A thread's arena grows in 64 MB heaps, and an emptied heap is unmapped unless less than the top
# pad would be left free; Ray Train runs the training loop in a thread. The pad is address space
# reserved at each growth, not memory touched.
TOP_PAD_BYTES = 64 * 1024 * 1024


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the kernel; returns
    whether it took (False off glibc, e.g. on macOS or musl).

    PyTorch's CPU allocator mallocs and frees every activation each step; with glibc's dynamic
    thresholds large freed blocks go back to the kernel and the next step page-faults them in
    again (1.1-1.2x a step's speed without; docs/performance.md). The heap keeps its peak size
    instead, as a caching allocator would."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl's mallopt does nothing
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Fixing the mmap threshold also turns off glibc's dynamic adjustment of both thresholds.
    return all(
        mallopt(param, value)
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
