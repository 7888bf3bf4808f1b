"""The process's heap allocator, set once where a training or inference process starts.

By default glibc serves every block above 128 KiB-32 MiB with a fresh ``mmap`` and unmaps it on
free, so each 28-56 MB activation of a 96^3 UNETR window is page-faulted in again at every layer:
a third of a CPU forward pass. ``--no-malloc_tuning`` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and other C libraries: nothing to tune
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory(enabled: bool = True) -> bool:
    """Keep freed heap memory in the process (``True``) or restore glibc's defaults (``False``).

    Serving all blocks from the heap and never trimming it removes the page faults; the process
    keeps its peak memory instead of returning it. Returns whether it applied.
    """
    libc = _glibc()
    if libc is None:
        return False
    if enabled:
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    restored = bool(libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD))
    libc.malloc_trim(0)
    return restored
