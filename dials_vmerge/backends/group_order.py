"""Where a rank's groups lie in the one-process group order (issue 11, rank-local jobs).

A layout grouped by the NON-anomalous ASU index holds, on each rank, a contiguous run of the
one-process groups (the read-time key ranges), so per-group values gathered in rank order are
the one-process per-group arrays. A layout grouped by the ANOMALOUS index does not: in
(h, k, l) order I(-) of a reflection sorts far from its I(+), so the order interleaves the
ranks' groups; and the scaling run's anomalous layout (ih_table.GroupLayout.friedel_ordered)
holds its groups in (unique reflection, hand) order, not ascending in (h, k, l).
`GroupOrder` covers all: "the one-process group order" here is always the (h, k, l) order of
the groups' indices (rank_partition.packed_keys, the order ih_table.pack_indices sorts by).
It finds from each rank's first and last group key and whether its keys ascend (4 integers
per rank) whether the ranks' groups in rank order are that order, and only otherwise gathers
every group's key (8 B per group) and sorts them. So the group-level choices made on
gathered arrays (selection's random draws, E^2 shells) are those of the (h, k, l) order
whatever order a layout keeps its groups in.

In one process (or outside a rank-local job) the local groups are all groups and every method
is the identity.
"""

from __future__ import annotations

import numpy as np

from . import rank_local
from .rank_partition import packed_keys


class GroupOrder:
    """The one-process positions of this rank's groups (group_asu: the layout's per-group
    ASU indices, ascending in (h, k, l))."""

    def __init__(self, group_asu):
        group_asu = np.asarray(group_asu).reshape(-1, 3)
        self.n_local = group_asu.shape[0]
        keys = packed_keys(group_asu) if self.n_local else np.zeros(0, dtype=np.int64)
        ascending = bool(np.all(keys[1:] > keys[:-1]))
        ends = np.array([[self.n_local, keys[0] if self.n_local else 0,
                          keys[-1] if self.n_local else 0, ascending]], dtype=np.int64)
        ends = rank_local.gather_in_rank_order(ends).reshape(-1, 4)
        self.n_groups = int(ends[:, 0].sum())
        self.offset = int(ends[:_own_row(ends.shape[0]), 0].sum())
        held = ends[ends[:, 0] > 0]
        # rank order is the one-process order when each rank's keys ascend and the ranks'
        # ranges follow one another
        self.in_rank_order = bool(np.all(held[:, 3] == 1)
                                  and np.all(held[1:, 1] > held[:-1, 2]))
        # local_of's look-up: own positions ascending, and the local group of each
        self._sorted_local = None
        if self.in_rank_order:
            self.order = None
            self.own_positions = np.arange(self.offset, self.offset + self.n_local,
                                           dtype=np.int64)
        else:
            all_keys = rank_local.gather_in_rank_order(keys)
            # rank-order index -> one-process position, and back
            self.order = np.argsort(all_keys, kind="stable")
            position = np.empty(self.n_groups, dtype=np.int64)
            position[self.order] = np.arange(self.n_groups, dtype=np.int64)
            self.own_positions = position[self.offset:self.offset + self.n_local]
            if not ascending:
                self._sorted_local = np.argsort(self.own_positions, kind="stable")

    def gather(self, values):
        """Per-group values of every rank's groups, in the one-process group order."""
        gathered = rank_local.gather_in_rank_order(np.ascontiguousarray(values))
        return gathered if self.order is None else gathered[self.order]

    def own(self, global_values):
        """This rank's part of values over all groups in the one-process order."""
        if self.order is None:
            return global_values[self.offset:self.offset + self.n_local]
        return global_values[self.own_positions]

    def positions(self, local_groups):
        """One-process positions of this rank's groups `local_groups` (local numbers)."""
        return self.own_positions[local_groups]

    def local_of(self, positions):
        """(owned, local): which one-process positions are this rank's groups, and their
        local numbers (valid where owned)."""
        positions = np.asarray(positions, dtype=np.int64)
        sorted_positions = self.own_positions if self._sorted_local is None else \
            self.own_positions[self._sorted_local]
        local = np.searchsorted(sorted_positions, positions)
        clipped = np.minimum(local, max(self.n_local - 1, 0))
        owned = (local < self.n_local) & (sorted_positions[clipped] == positions) \
            if self.n_local else np.zeros(positions.shape, dtype=bool)
        if self._sorted_local is not None:  # a layout whose keys do not ascend
            clipped = self._sorted_local[clipped] if self.n_local else clipped
        return owned, clipped


def _own_row(n_ranks_gathered):
    """This rank's row among the `n_ranks_gathered` rows a rank-order gather returned (one
    row, its own, outside a rank-local job)."""
    if n_ranks_gathered <= 1:
        return 0
    from . import mpi_world

    return mpi_world.rank()
