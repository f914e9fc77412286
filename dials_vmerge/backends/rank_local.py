"""Issue 11: a scaling job whose MPI ranks hold only their own rows.

In a rank-local job each rank holds the input rows of its own unique reflections: a
contiguous range of the read-time key blocks (backends/rank_partition.py), so its groups are
a contiguous run of the one-process group order, and the ranks' runs in rank order are that
order. Every stage then gets the one-process result, bit for bit, from its own rows with the
primitives below:

- counts, any, min and max over ranks (exact in any order);
- per-group values gathered in rank order: the one-process group order, so group-level
  logic (random draws over groups, order statistics) runs unchanged on the gathered arrays
  and each rank takes its own part back (`own_part`);
- sums over observations: the key-block tree of backends/block_sums.py, or a sequential
  pass continued from rank to rank (`sequential_over_ranks`), which has the bits of one pass
  over all terms in group order.

Outside a rank-local job (one process, or programs that repeat a stage on every rank) every
primitive is the identity, so stage code calls them unconditionally and N = 1 runs the same
arithmetic as N > 1.

The contract the stages keep (pipeline.run_scaling_job enters the job):
- a rank's table holds the rows of its key range in the one-process row order; experiments,
  models, parameters and the scaling run's datasets are the same on every rank, and a
  dataset's per-row arrays may be empty on a rank: decide from totals, never from local
  emptiness;
- every decision and log line is taken from values identical on every rank;
- anomalous layouts are the exception to "rank order = group order" (I(+) and I(-) of one
  key sort apart): gather with explicit positions (backends/group_order.py) or order the
  groups by (key, hand) in every run (scaling/error_model.py friedel_pair_layout);
- the scaled table returned carries `output_order_key` (see holds_own_rows).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from . import mpi_world

_active = [False]


@contextmanager
def rank_local_job(enabled: bool = True):
    """The enclosed job's ranks hold only their own rows (when enabled and N > 1)."""
    _active.append(bool(enabled) and mpi_world.n_ranks() > 1)
    try:
        yield _active[-1]
    finally:
        _active.pop()


def active() -> bool:
    """True inside a rank-local job with more than one rank."""
    return _active[-1]


def total(count) -> int:
    """An integer count summed over ranks (exact)."""
    if not active():
        return int(count)
    return int(mpi_world.allgather_rows(np.array([int(count)], dtype=np.int64)).sum())


def totals(counts) -> np.ndarray:
    """Integer counts (a 1-d array of the same length on every rank) summed over ranks."""
    counts = np.asarray(counts, dtype=np.int64)
    if not active():
        return counts
    return mpi_world.allgather_rows(counts[None, :]).sum(axis=0)


def any_rank(flag) -> bool:
    return total(1 if flag else 0) > 0


def all_ranks(flag) -> bool:
    if not active():
        return bool(flag)
    return total(1 if flag else 0) == mpi_world.n_ranks()


def maximum(values, empty=-np.inf):
    """Elementwise maximum over ranks of a float (or 1-d float array); a rank without values
    passes `empty`."""
    return _extreme(values, np.max, empty)


def minimum(values, empty=np.inf):
    return _extreme(values, np.min, empty)


def _extreme(values, reduce, empty):
    scalar = np.ndim(values) == 0
    local = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if not active():
        return float(local[0]) if scalar else local
    gathered = mpi_world.allgather_rows(local[None, :])
    out = reduce(gathered, axis=0)
    return float(out[0]) if scalar else out


def gather_in_rank_order(values) -> np.ndarray:
    """Every rank's rows of `values` concatenated in rank order, on every rank (for per-group
    values: the one-process group order)."""
    if not active():
        return np.asarray(values)
    return mpi_world.allgather_rows(values)


def offset(n_local: int) -> int:
    """The number of rows (groups) the ranks before this one hold."""
    if not active():
        return 0
    counts = mpi_world.allgather_rows(np.array([int(n_local)], dtype=np.int64))
    return int(counts[:mpi_world.rank()].sum())


def own_part(global_values, n_local: int):
    """This rank's part of an array gathered in rank order."""
    start = offset(n_local)
    return global_values[start:start + n_local]


def sequential_over_ranks(values, add):
    """`add(values)` in place on a float64 array, each rank continuing from the values the
    rank before it left: the bits of one sequential pass over all ranks' terms in rank
    order; the result on every rank."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    if not active():
        add(values)
        return values
    result = mpi_world.pass_along_ranks(values, add)
    return mpi_world.broadcast_from_output_rank(result.ravel(), np.float64).reshape(
        values.shape)


def holds_own_rows(table) -> bool:
    """True when `table` (the scaled table run_scaling_job returned) holds only this rank's
    rows of a rank-local job: it carries `output_order_key` (int64,
    ascending on each rank; the ranks' keys merged in ascending order are the one-process
    scaled.refl row order) and the run has more than one rank. The stages after scaling
    (writing scaled.refl, merging, the report) then work on the rank's rows with collectives
    instead of on the whole table. Unlike `active()`, this is asked after the job has
    returned (the rank-local context is closed by then)."""
    return getattr(table, "output_order_key", None) is not None and mpi_world.n_ranks() > 1


# float64 v = m 2^e exactly with m an integer of at most 53 bits and e in [-1126, 971]
_EXPONENT_OFFSET = 1126
_N_EXPONENTS = 2100
_LOW_BITS = 26


def exact_sum(values) -> float:
    """The correctly rounded sum of `values` over all ranks (a float64 array each): every
    term is split into an integer mantissa and a power of two, the mantissas are added per
    exponent as int64 (exact: |high| < 2^27, 0 <= low < 2^26, so 2^36 terms fit), and the
    exact total is rounded once. The bits depend on the values alone, not on their order or
    on how the ranks share them. Non-finite values give their ordinary (rank-local) sum."""
    v = np.ascontiguousarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(v)):
        return float(total_float(np.sum(v)))
    m, e = np.frexp(v)
    mantissa = (m * float(1 << 53)).astype(np.int64)
    slot = (e.astype(np.int64) - 53) + _EXPONENT_OFFSET
    high = mantissa >> _LOW_BITS
    low = mantissa - (high << _LOW_BITS)
    sums = np.zeros(2 * _N_EXPONENTS, dtype=np.int64)
    for s in np.flatnonzero(np.bincount(slot, minlength=_N_EXPONENTS)):
        here = slot == s
        sums[s] = int(high[here].sum())
        sums[_N_EXPONENTS + s] = int(low[here].sum())
    sums = totals(sums)
    exact = 0
    for s in np.flatnonzero(sums[:_N_EXPONENTS] | sums[_N_EXPONENTS:]):
        exact += ((int(sums[s]) << _LOW_BITS) + int(sums[_N_EXPONENTS + s])) << int(s)
    try:
        return exact / (1 << _EXPONENT_OFFSET)
    except OverflowError:  # beyond the float64 range
        return math.inf if exact > 0 else -math.inf


def total_float(value) -> float:
    """A float summed over ranks in rank order (for non-finite totals only)."""
    if not active():
        return float(value)
    return float(mpi_world.allgather_rows(np.array([float(value)])).sum())
