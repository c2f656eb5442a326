"""The C allocator's settings for training on a CPU: freed large blocks are kept for reuse, not given back.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc's ``malloc`` serves a block above its mmap
threshold (128 KiB at first, rising with what the program frees, up to 32 MiB) with a fresh ``mmap``, and gives
the top of its heap back to the system once more than its trim threshold is free there. A training iteration
allocates and frees the same large tensors every time (activations, weight gradients, logits: megabytes each),
so under those defaults much of its memory is new to the process each iteration, and every page of it faults
when first written: the kernel zeroes it and maps it, a cost comparable to the matmul that writes it.

:func:`keep_freed_blocks` sets both thresholds once per process (``mallopt``): blocks up to
:data:`MMAP_THRESHOLD` come from the heap, and the heap is trimmed only beyond :data:`TRIM_THRESHOLD` free,
so the next iteration's tensors reuse the pages the last one freed. The process's peak memory is what its
largest iteration needs, as before; between iterations it holds on to that memory instead of returning part
of it. The agents call it when they run on a CPU; ``TEXTRL_MALLOC_TUNE=0`` leaves the allocator as it is.
Elsewhere than Linux with glibc it does nothing. ``benchmarks/cpu_kernels.py --iterations`` pairs iterations
with and without it (``--allocator``).

The same settings can be given to any process through glibc's environment variables
(``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``), which is how a benchmark applies
them to another program.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading

from textrl.kernels import switched_on

MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap (glibc's largest mmap threshold on 64-bit systems)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the top of the heap kept before any is given back to the system."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_lock = threading.Lock()
_done: dict[str, bool] = {}


def enabled() -> bool:
    """Whether the allocator may be tuned (``TEXTRL_MALLOC_TUNE``, :func:`textrl.kernels.switched_on`)."""
    return switched_on("TEXTRL_MALLOC_TUNE")


def keep_freed_blocks() -> bool:
    """Set glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`) once per process;
    True when they are set (now or before), False where this is not Linux with glibc, the switch is off, or
    ``mallopt`` refused."""
    if "ok" in _done:
        return _done["ok"]
    with _lock:
        if "ok" not in _done:
            _done["ok"] = _tune()
    return _done["ok"]


def _tune() -> bool:
    if not enabled() or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting either one turns glibc's sliding thresholds off for both
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
