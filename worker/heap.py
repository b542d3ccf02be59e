"""Large blocks go back to the system when freed, so one large job does not leave its size
behind in every process it passed through.

glibc's malloc serves blocks above a threshold with mmap (returned on free), but raises that
threshold to the largest block freed so far, up to 32 MiB: after one 20 MB message, the next
ones are carved from the heap, whose freed space a process keeps (measured: +61 MiB in a
worker's main process and +121 MiB in a pool process over 16 padded 20 MB jobs). Setting the
threshold explicitly keeps it fixed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number (malloc.h)."""

MMAP_THRESHOLD_BYTES = 1024 * 1024


def return_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process and those it forks; False where the C
    library is not glibc (nothing to do there)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.warning("could not set malloc's mmap threshold")
        return False
    return True
