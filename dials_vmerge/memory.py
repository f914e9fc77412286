"""Giving freed memory back to the operating system (glibc), so peak RSS tracks live data.

Two glibc behaviours keep freed numpy arrays in RSS:
  - the mmap threshold rises (up to 32 MiB) after large frees, so later large arrays come
    from the heap and stay there when freed. Fixed at 4 MiB, arrays that large are mmapped
    and go back to the OS when freed. Measured peak RSS / CPU on a 1e6-observation
    dials.vmerge run: default 817 MB / 12.1 s, 4 MiB 780 MB / 14.2 s, 64 KiB 754 MB /
    20.3 s (every smaller temporary of the minimiser loop is then mmapped and faulted in
    afresh). MALLOC_MMAP_THRESHOLD_ in the environment wins. Now that malloc_trim runs
    between steps, the threshold is fixed at 32 MiB instead (see MMAP_THRESHOLD_BYTES).
  - smaller arrays (one dataset's columns, per-thread arenas of the numba workers) leave
    free holes in the heaps that are only returned by malloc_trim. Measured at the start of
    merging a 1e6 run: 513 MB RSS, 345 MB after malloc_trim(0) (a few ms).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os

# 32 MiB (glibc's own upper limit for its moving threshold), fixed: arrays of a few 1e6
# values (8-24 MB) come from the heap, are reused by the next temporaries of the same size
# within a step instead of being mmapped and faulted in afresh every time, and go back to
# the OS by release_free_memory's malloc_trim between steps. Measured on a 1e6-observation
# physical sweep (issue 10, loaded 2-core machine): 4 MiB 1.06e6 page faults, 4.4 s system
# time, 526 MB peak; 32 MiB 2.3e5 faults, 1.9 s system time, 544 MB peak. Arrays of 1e7
# values stay mmapped and go back to the OS when freed, as before.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
_M_MMAP_THRESHOLD = -3

# glibc returns the free top of a heap to the OS at every free() once it exceeds its trim
# threshold (128 KiB by default): an array freed at the top and allocated again by the next
# temporary of a step is faulted in afresh, page by page. In the stages well below the run's
# peak RSS (reading and preparation, merging before its report diagnostics) up to
# HEAP_TOP_RETAINED_BYTES (merging: 16 MiB, merging/api.py) stay mapped instead
# (heap_top_retained), and release_free_memory's malloc_trim still returns everything between
# stages. Measured on
# a 1e6-observation sweep (issue 10, session 9): see README.
HEAP_TOP_RETAINED_BYTES = 32 * 1024 * 1024
GLIBC_TRIM_THRESHOLD_BYTES = 128 * 1024
_M_TRIM_THRESHOLD = -1


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc: nothing to tune


def return_large_frees_to_os() -> None:
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


_import_time_objects_frozen = False


def freeze_import_time_objects() -> None:
    """Move every object alive now (modules, classes, functions: ~75 000 after the programs'
    imports) out of the cyclic garbage collector's reach, once per process. Each full
    collection (release_free_memory between stages, and the automatic ones) then skips
    them: a collection of a 1e6 run took 110-160 ms, mostly traversing cctbx's, scipy's and
    numba's import-time objects (issue 10; gc.collect after the imports: 77 ms, after
    gc.freeze 0.001 ms). Frozen objects are never collected, so this is called once, at a
    program's start, before any data exist."""
    global _import_time_objects_frozen
    if not _import_time_objects_frozen:
        _import_time_objects_frozen = True
        gc.freeze()


def release_free_memory(collect_cycles: bool = True) -> None:
    """Return the heaps' free pages (and first collect reference cycles, unless told not to:
    a full collection costs tens of ms): call between stages, when a stage's temporaries are
    gone and the next stage's allocations have not begun."""
    if collect_cycles:
        gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@contextlib.contextmanager
def heap_top_retained(nbytes: int = HEAP_TOP_RETAINED_BYTES):
    """Within the block glibc keeps up to `nbytes` free at the top of each heap (fewer page
    faults when a step frees and allocates arrays of the same size in turn); glibc's default
    trimming again after it. A MALLOC_TRIM_THRESHOLD_ in the environment wins."""
    libc = None if "MALLOC_TRIM_THRESHOLD_" in os.environ else _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_TRIM_THRESHOLD, int(nbytes))
    try:
        yield
    finally:
        libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD_BYTES)
