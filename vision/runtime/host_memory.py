"""Keep freed host memory in the process instead of handing it back to the kernel after every op.

A detector's activations on a CPU are tens of megabytes each.  glibc serves blocks that large with
fresh ``mmap`` pages and unmaps them on ``free`` (always above 32 MiB, its largest dynamic mmap
threshold), so every forward pass faults in (and the kernel zero-fills) the same memory again, once
per page: at 800 px a few hundred thousand page faults per image.  PyTorch has no caching allocator
for host memory, and the usual cure, preloading jemalloc or tcmalloc, has to happen before Python
starts.  ``mallopt`` can do the equivalent from inside the process: no ``mmap`` for large blocks
and no trimming of the heap's top, so freed activations are reused as they are.  The cost is that
the process keeps its peak memory until it exits, which is what a training or prediction run does
anyway.

Only glibc has these knobs; elsewhere this is a no-op.  ``VISION_RETAIN_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied: list[bool] = []


def retain_freed_memory() -> bool:
    """Tune glibc's malloc once per process (see the module docstring); True when it took effect."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get("VISION_RETAIN_FREED_MEMORY", "1") != "0" and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
            mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            gnu = hasattr(libc, "gnu_get_libc_version")
            # mallopt returns 1 on success; musl has a stub that does nothing
            ok = gnu and bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
        except (OSError, AttributeError):
            ok = False
    log.debug("retain freed host memory: %s", ok)
    _applied.append(ok)
    return ok
