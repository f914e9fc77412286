"""A free set of unique reflections kept out of minimisation (dials.scale
`scaling_options.use_free_set`, `free_set_percentage`, `free_set_offset`), and the work/free
merging statistics that cross-validation compares (dials-scaling.md 2.8).

Membership: every int(100 / free_set_percentage)-th unique reflection, fold `free_set_offset`.
DIALS takes every k-th group in the order of its set of ASU indices; here the fold is a hash
of the ASU index, so the same reflection is free in every run whichever rows are present
(outliers, exclusions) and the folds 0..k-1 partition the unique reflections exactly.

Free observations still get g from the models, take part in outlier rejection and the error
model; they only leave the minimisation subset (DIALS also leaves them out of the global
Ih table for those two).
"""

from __future__ import annotations

import numpy as np

from .. import flags
from ..backends import rank_local
from ..model.base import param
from .algorithm import ScalingRun

_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def fold_interval(free_set_percentage: float) -> int:
    if not 0 < free_set_percentage <= 50:
        raise ValueError("free_set_percentage must be in (0, 50]")
    return int(100.0 / free_set_percentage)


def free_fold_of(asu_index) -> np.ndarray:
    """A well-mixed uint64 per ASU index (splitmix64 of the packed index)."""
    h = np.asarray(asu_index, dtype=np.int64).reshape(-1, 3) + 1024
    x = ((h[:, 0] << 22) | (h[:, 1] << 11) | h[:, 2]).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * _MIX_1
        x = (x ^ (x >> np.uint64(27))) * _MIX_2
        x = x ^ (x >> np.uint64(31))
    return x


def free_set_mask(asu_index, free_set_percentage: float = 10.0, offset: int = 0) -> np.ndarray:
    interval = fold_interval(free_set_percentage)
    return (free_fold_of(asu_index) % np.uint64(interval)) == np.uint64(offset % interval)


class FreeSetScalingRun(ScalingRun):
    """ScalingRun whose minimisation subset leaves out the free set."""

    def select_reflections(self):
        super().select_reflections()
        percentage = float(param(self.params, "scaling_options.free_set_percentage", 10.0))
        offset = int(param(self.params, "scaling_options.free_set_offset", 0))
        n_free = 0
        for state in self.states:
            free = free_set_mask(state.asu, percentage, offset)
            state.selected &= ~free
            n_free += int(free.sum())
        # issue 11: the observations of all ranks (a rank-local job holds its own rows)
        n_free = rank_local.total(n_free)
        self.summary["free_set"] = {"percentage": percentage, "offset": offset,
                                    "n_free_observations": n_free}
        self.log(f"Free set ({percentage:g}%, offset {offset}): {n_free} observations "
                 "left out of minimisation")


def work_free_statistics(table, experiments, free_set_percentage=10.0, offset=0, n_bins=20):
    """[work Rmeas, free Rmeas, Rmeas gap, work CC1/2, free CC1/2, CC1/2 gap] of the scaled
    rows of an output table (non-anomalous, as DIALS's work_free_stats).

    A rank-local job's table (rank_local.holds_own_rows: this rank's rows, whole unique
    reflections) gives the statistics of all ranks' rows, computed by every rank together
    (merging/rank_merge.py: per-group values gathered in the one-process group order,
    cctbx's half-split stream reproduced), the one-process values bit for bit. The free set
    is whole unique reflections too, so each half is whole groups on every rank."""
    from ..backends.rank_local import holds_own_rows
    from ..geometry import median_unit_cell, space_group
    from ..merging.rank_merge import rank_merging_statistics
    from ..merging.statistics import merging_statistics
    from .ih_table import map_indices_to_asu

    sg = space_group(experiments[0])
    cell = median_unit_cell(experiments)
    scaled = table.get_flags(flags.scaled)
    hkl = np.asarray(table["miller_index"])[scaled]
    g = np.asarray(table["inverse_scale_factor"], dtype=np.float64)[scaled]
    intensity = np.asarray(table["intensity.scale.value"], dtype=np.float64)[scaled] / g
    sigma = np.sqrt(np.asarray(table["intensity.scale.variance"], dtype=np.float64)[scaled]) / g
    free = free_set_mask(map_indices_to_asu(hkl, sg, False), free_set_percentage, offset)
    statistics = rank_merging_statistics if holds_own_rows(table) else merging_statistics
    stats = {}
    for name, rows in (("work", ~free), ("free", free)):
        result = statistics(hkl[rows], intensity[rows], sigma[rows], sg, cell, n_bins,
                            anomalous=False, suggest_cut=False)
        stats[name] = (float(result.overall.r_meas or 0.0), float(result.overall.cc_half))
    (work_r, work_cc), (free_r, free_cc) = stats["work"], stats["free"]
    return [work_r, free_r, free_r - work_r, work_cc, free_cc, work_cc - free_cc]
