"""Keep freed memory for reuse: glibc's allocator tuned for a training loop on CPU.

A training step allocates the same large tensors every time (activations, gradients, the
optimizer's temporaries) and frees them again. glibc serves every request above 32 MB (and,
until its threshold has adapted, above 128 KB) with a fresh ``mmap`` and hands it back with
``munmap`` on free, so the next step pays a page fault per 4 KiB page again: about 60 ms for
a 134 MB gradient here, 10-20% of a CPU training step (``benchmarks/allocator.py``).
:func:`retain_freed_memory` turns that off for the process (and the loader workers it forks):
allocations come from the heap, and freed memory stays with the process for the next
step, as PyTorch's CUDA caching allocator keeps GPU memory. Peak memory moved by 0-5% in that
benchmark; memory freed after the peak is not returned to the system until the process ends.

Nothing is changed where the C library is not glibc, where ``MALLOC_MMAP_MAX_`` or
``MALLOC_TRIM_THRESHOLD_`` are already set (the user's choice wins), or with
``DEEPIMAGE_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_MAX = -4
_applied = False


def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def retain_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it (see the module docstring).
    Returns whether the setting is in force; applying it twice is harmless."""
    global _applied
    if _applied:
        return True
    if os.environ.get("DEEPIMAGE_MALLOC", "").lower() == "system":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    if not _is_glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1)) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        logger.debug("glibc malloc: large allocations from the heap, freed memory kept")
    _applied = ok
    return ok
