"""Parallel kernels whose parallel build is compiled only where a call is large enough to use
it (issue 15: cold-start compile time).

`@parallel_when_large` replaces `@njit(cache=True, parallel=True)` on a kernel written as
independent chunks (`for c in prange(n_chunks)`, each chunk writing only its own outputs, no
prange reduction). It keeps two builds of the one Python function: a serial one (prange is
then range) and a parallel one, each compiled on its first use and cached on disk. A call
goes to the parallel build when its largest leading array dimension is at least
`PARALLEL_MIN_ROWS` and numba has more than one thread; otherwise to the serial build.

Why: numba's parallel pipeline (parfor conversion and the gufunc built around the loop)
costs about 1.4x the compile time of the serial build (measured on the quartz example: 21 s
against 15 s of compile CPU time with every kernel serial), and there every kernel is
compiled for a run whose kernels take a fraction of a second. Large runs compile only the
parallel builds they call. Because the chunks are independent and write disjoint outputs,
both builds give bit-identical results (tests/test_size_dispatch.py; the quartz example's
scaled.refl and merged.mtz are byte-identical either way).

The two builds get their own cache files: the serial one is compiled from a copy of the
function with the qualified name `<name>__serial`, as numba's cache files are named by
qualified name and line and do not record the parallel flag.
"""

from __future__ import annotations

import functools
import types

import numba
from numba import njit

# Below this many rows (observations, reflections, groups) a kernel call takes well under a
# millisecond serially, so threads would gain nothing worth a parallel compile.
PARALLEL_MIN_ROWS = 50_000
SERIAL_SUFFIX = "__serial"


def _largest_leading_dimension(args) -> int:
    rows = 0
    for value in args:
        shape = getattr(value, "shape", None)
        if shape:
            rows = max(rows, shape[0])
    return rows


class SizeDispatchedKernel:
    """A kernel with a serial and a parallel numba build; calls choose one by size."""

    def __init__(self, py_func, min_rows: int = PARALLEL_MIN_ROWS):
        functools.update_wrapper(self, py_func)
        self.py_func = py_func
        self.min_rows = min_rows
        self.parallel = njit(cache=True, parallel=True)(py_func)
        serial_func = types.FunctionType(py_func.__code__, py_func.__globals__,
                                         py_func.__name__, py_func.__defaults__,
                                         py_func.__closure__)
        serial_func.__qualname__ = py_func.__qualname__ + SERIAL_SUFFIX
        serial_func.__module__ = py_func.__module__
        self.serial = njit(cache=True)(serial_func)
        self.dispatchers = (self.serial, self.parallel)

    def use_parallel(self, args) -> bool:
        return (_largest_leading_dimension(args) >= self.min_rows
                and numba.get_num_threads() > 1)

    def __call__(self, *args, **kwargs):
        build = self.parallel if self.use_parallel((*args, *kwargs.values())) else self.serial
        return build(*args, **kwargs)


def parallel_when_large(py_func=None, *, min_rows: int = PARALLEL_MIN_ROWS):
    """Decorator: `@parallel_when_large` or `@parallel_when_large(min_rows=...)`."""
    if py_func is None:
        return lambda f: SizeDispatchedKernel(f, min_rows)
    return SizeDispatchedKernel(py_func, min_rows)
