"""Quasi-normalised intensities E^2 = I / N(d) (dials-scaling.md 8.3).

Negative intensities count as 0 in the shell means; 10, 15 or 20 shells (<= 15k, <= 20k,
> 20k reflections) in equal d*^2 steps over the data range widened by 1e-6 of its span;
N(d) is cctbx's intensity_quasi_normalisations (shell mean of I/epsilon, interpolated in d*).
"""

from __future__ import annotations

import numpy as np


def n_shells(n_reflections):
    if n_reflections > 20000:
        return 20
    if n_reflections > 15000:
        return 15
    return 10


def grouped_quasi_normalised_e_squared(group_asu, group_start, intensity, space_group,
                                       unit_cell):
    """E^2 of observations sorted into groups of one ASU index (group_asu (G, 3), offsets
    group_start, intensity per observation in group order).

    N(d) depends on an observation only through its index, so the shells, epsilons and the
    interpolation are done once per group by cctbx; only the shell means of I/epsilon run
    over observations (numpy sums per group, then per shell). Equal to cctbx's
    intensity_quasi_normalisations on every observation (as DIALS) up to the order of
    summation (~1e-16 relative; tests/test_scaling_normalisation.py), without its ~80 bytes
    per observation of cctbx temporaries.
    """
    from cctbx import crystal, miller, uctbx
    from cctbx.array_family import flex

    from ..backends import rank_local
    from ..merging.groups import flex_indices

    # A rank-local job (issue 11): each rank holds whole groups; the shells' range and
    # count are the global ones and the shell sums one pass over all groups in rank order
    # (= group order), so every rank gets the one-process values.
    n_obs = rank_local.total(intensity.size)
    multiplicity = np.diff(group_start)
    symmetry = crystal.symmetry(unit_cell=unit_cell, space_group=space_group)
    groups = miller.set(symmetry, flex_indices(group_asu), anomalous_flag=False)
    d_star_sq = groups.d_star_sq().data().as_numpy_array()
    lo = rank_local.minimum(float(d_star_sq.min()) if d_star_sq.size else np.inf)
    hi = rank_local.maximum(float(d_star_sq.max()) if d_star_sq.size else -np.inf)
    span = hi - lo
    lo = max(lo - span * 1e-6, 1e-12)
    hi += span * 1e-6
    binner = groups.setup_binner_d_star_sq_step(auto_binning=False,
                                                d_max=uctbx.d_star_sq_as_d(lo),
                                                d_min=uctbx.d_star_sq_as_d(hi),
                                                d_star_sq_step=(hi - lo) / n_shells(n_obs))
    bin_of_group = binner.bin_indices().as_numpy_array().astype(np.int64)
    epsilon = groups.epsilons().data().as_double().as_numpy_array()
    clipped_sum = np.add.reduceat(np.maximum(intensity, 0.0), group_start[:-1]) \
        if intensity.size else np.zeros(0)
    n_bins_all = binner.n_bins_all()
    if rank_local.active():
        terms = clipped_sum / epsilon

        def add_shell_terms(values):
            # np.add.at adds in index order: the bincount's sequential pass, continued
            np.add.at(values, bin_of_group, terms)

        shell_sum = rank_local.sequential_over_ranks(np.zeros(n_bins_all), add_shell_terms)
        shell_count = rank_local.totals(np.bincount(
            bin_of_group, weights=multiplicity, minlength=n_bins_all).astype(np.int64)
        ).astype(np.float64)
    else:
        shell_sum = np.bincount(bin_of_group, weights=clipped_sum / epsilon,
                                minlength=n_bins_all)
        shell_count = np.bincount(bin_of_group, weights=multiplicity, minlength=n_bins_all)
    used = list(binner.range_used())
    means = [shell_sum[b] / shell_count[b] if shell_count[b] > 0 else 0.0 for b in used]
    per_group = binner.interpolate(flex.double(means), 1).as_numpy_array()
    normalisation = np.repeat(per_group, multiplicity)
    # np.where(normalisation > 0, intensity / normalisation, 0) written into the repeated
    # array: the same values without two more arrays of all observations (issue 10, memory)
    positive = normalisation > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(intensity, normalisation, out=normalisation)
    normalisation[~positive] = 0.0
    return normalisation
