"""Sharding of groups over MPI ranks and the deterministic sum of partial targets.

Each rank owns a contiguous range of whole groups (an Ih needs all its observations), about
n_obs / n_ranks observations each. A rank evaluates the data term of the target on its shard;
the partial (phi, gradient) pairs are gathered on rank 0, added in rank order and broadcast,
so every rank holds the same bits and the result depends only on the data and n_ranks
(an MPI tree reduction of floats would not guarantee either).

mpi4py is optional and imported only by world_comm(); everything else takes any object with
mpi4py's pickle-based `gather(obj, root)` / `bcast(obj, root)` and `Get_rank()`/`Get_size()`.
"""

from __future__ import annotations

import numpy as np

from dials_vmerge.errors import VmergeError


def world_comm():
    """MPI.COMM_WORLD; a clear error if mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise VmergeError(
            "MPI run requested but mpi4py is not installed (pip install 'dials-vmerge[mpi]')"
        ) from e
    return MPI.COMM_WORLD


def shard_bounds(group_start, n_ranks):
    """Group offsets (n_ranks + 1) of the shards: each boundary is the group boundary nearest
    to its equal-observation target, so a shard is within one group's size of n_obs/n_ranks."""
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    group_start = np.asarray(group_start, dtype=np.int64)
    n_groups = group_start.size - 1
    n_obs = int(group_start[-1])
    targets = (np.arange(1, n_ranks, dtype=np.int64) * n_obs) / n_ranks
    above = np.searchsorted(group_start, targets, side="left")  # first boundary >= target
    below = np.maximum(above - 1, 0)
    distance_above = group_start[np.minimum(above, n_groups)] - targets
    take_below = (targets - group_start[below]) <= distance_above
    inner = np.where(take_below, below, above)
    bounds = np.concatenate([[0], inner, [n_groups]]).astype(np.int64)
    return np.maximum.accumulate(bounds)


def shard_groups(group_start, n_ranks, rank):
    """(obs_slice, group_slice) of rank's shard: contiguous, whole groups, balanced by count."""
    if not 0 <= rank < n_ranks:
        raise ValueError(f"rank {rank} outside 0..{n_ranks - 1}")
    bounds = shard_bounds(group_start, n_ranks)
    g_lo, g_hi = int(bounds[rank]), int(bounds[rank + 1])
    return slice(int(group_start[g_lo]), int(group_start[g_hi])), slice(g_lo, g_hi)


def shard_arrays(group_start, group_slice):
    """group_start of a shard, rebased to start at 0."""
    local = np.asarray(group_start[group_slice.start: group_slice.stop + 1], dtype=np.int64)
    return local - local[0]


def sum_in_rank_order(parts):
    """Sum of [(phi, gradient), ...] adding rank 0, 1, 2, ... in turn."""
    phi = 0.0
    gradient = np.zeros_like(np.asarray(parts[0][1], dtype=np.float64))
    for part_phi, part_gradient in parts:
        phi += float(part_phi)
        gradient += part_gradient
    return phi, gradient


def allreduce_target(phi, gradient, comm):
    """Total (phi, gradient) over all ranks, identical bits on every rank.

    comm None means a single process: the inputs are returned unchanged.
    """
    if comm is None:
        return float(phi), np.asarray(gradient, dtype=np.float64)
    parts = comm.gather((float(phi), np.asarray(gradient, dtype=np.float64)), root=0)
    total = sum_in_rank_order(parts) if comm.Get_rank() == 0 else None
    return comm.bcast(total, root=0)


def sharded_target_and_gradient(intensity, weight, g, deriv_values, deriv_index, group_start,
                                n_params, comm, evaluate=None):
    """Data term of the target over all ranks, each rank evaluating its own shard.

    The arrays are the full problem (every rank holding it, or views of it); evaluate has the
    signature of scaling.target.target_and_gradient (default: that, single-threaded per rank;
    pass backends.cuda_target.evaluate_target_cuda for one GPU per rank). Restraint terms
    must be added once, by the caller, after this returns.
    """
    if evaluate is None:
        from dials_vmerge.scaling.target import target_and_gradient as evaluate
    n_ranks = 1 if comm is None else comm.Get_size()
    rank = 0 if comm is None else comm.Get_rank()
    obs, groups = shard_groups(group_start, n_ranks, rank)
    local_start = shard_arrays(group_start, groups)
    phi, gradient = evaluate(intensity[obs], weight[obs], g[obs], deriv_values[obs],
                             deriv_index[obs], local_start, n_params)
    return allreduce_target(phi, gradient, comm)
