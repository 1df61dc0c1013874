"""Handing the heap memory a training step freed back to the system, when it is much (glibc).

On the CPU, a step's activations are freed once backward is done, but glibc keeps the freed blocks
of its heap for later allocations, and the next step's tensors, allocated in another order, do not
fit the holes the last one left: on long rows resident memory then climbs over the first steps well
above what any one step holds at a time. ``malloc_trim`` returns every free page of the heap to the
system, so the next step starts from the memory that is live; the price is faulting those pages in
again, which on short rows (a few hundred MiB freed per step, a step of well under a second) costs
more time than the memory is worth. So the heap is trimmed only when it holds more than
:data:`RELEASE_ABOVE` free. Elsewhere (no glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache
from typing import Any

RELEASE_ABOVE = 1 << 30
"""Free heap bytes above which a step's end hands them back (a long row's activations, not a short batch's)."""


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33 and later)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library when it is glibc with ``malloc_trim`` and ``mallinfo2``, else ``None``."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim") or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc


def free_heap_bytes() -> int | None:
    """Bytes the heap holds free (glibc's ``fordblks``), or ``None`` without glibc."""
    libc = _libc()
    return None if libc is None else int(libc.mallinfo2().fordblks)


def release_freed_heap(above: int = RELEASE_ABOVE) -> bool:
    """Return the heap's free pages to the system when it holds more than ``above`` bytes free;
    whether it did."""
    free = free_heap_bytes()
    if free is None or free <= above:
        return False
    _libc().malloc_trim(0)
    return True
