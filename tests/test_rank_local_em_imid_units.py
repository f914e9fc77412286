"""The pieces that make the Imid search and the error model rank-local (issue 11), checked in
one process (tests/test_mpi_rank_local_em_imid.py runs them under mpiexec):

- the likelihood's split kernels (local units, sums continued from part to part) have the
  bits of the one-pass kernels whatever the split;
- friedel_pair_layout holds the anomalous groups GroupLayout holds, ordered by (unique
  reflection, hand), and the layout of the rows of a key range is the matching contiguous
  run of the layout of all rows (what lets a rank continue the one-process sums);
- the avg candidate's block-tree mean agrees with np.mean to rounding and its bits do not
  depend on the threads or on how the blocks' groups are split.
"""

import dials_vmerge  # noqa: F401  (before numba)
import numpy as np
import pytest

from dials_vmerge.kernels import error_model_ml as kernels
from dials_vmerge.scaling import combine as comb
from dials_vmerge.scaling import error_model as em
from dials_vmerge.scaling.ih_table import GroupLayout, map_indices_to_asu


def likelihood_problem(seed=3, n_groups=700):
    rng = np.random.default_rng(seed)
    size = rng.integers(2, 9, n_groups)  # no singletons (their unit is clamped)
    group = np.repeat(np.arange(n_groups), size).astype(np.int64)
    n = group.size
    intensity = rng.exponential(400.0, n)
    variance = intensity + rng.uniform(5.0, 50.0, n)
    g = rng.uniform(0.5, 2.0, n)
    u = g * g / variance
    share = u / np.bincount(group, u)[group]
    residual_sq = rng.normal(0.0, 1.0, n) ** 2 * variance / g ** 2
    return intensity, variance, g, share, group, residual_sq, n_groups, size


@pytest.mark.parametrize("b, fixed_a_sq", [(0.0, -1.0), (0.031, -1.0), (0.05, 1.7)])
def test_split_likelihood_sums_have_the_one_pass_bits(b, fixed_a_sq):
    intensity, variance, g, share, group, residual_sq, n_groups, size = likelihood_problem()
    n = group.size
    a_sq_one, cost_one = kernels.a_sq_and_cost_kernel(
        intensity, variance, g, share, group, residual_sq, n_groups, b, fixed_a_sq,
        np.empty(n))
    slope_one = kernels.cost_slope_kernel(intensity, variance, g, share, group, residual_sq,
                                          n_groups, b, fixed_a_sq, np.empty(n), np.empty(n))
    # parts cut at group boundaries (as ranks hold whole groups), one of them empty
    starts = np.concatenate([[0], np.cumsum(size)])
    cuts = [0, int(starts[200]), int(starts[200]), int(starts[555]), n]
    parts = list(zip(cuts[:-1], cuts[1:]))
    units, slopes = [], []
    for lo, hi in parts:
        local_group = group[lo:hi] - (group[lo] if hi > lo else 0)
        k = int(local_group.max()) + 1 if hi > lo else 0
        unit, unit_slope = np.empty(hi - lo), np.empty(hi - lo)
        kernels.unit_and_slope_kernel(intensity[lo:hi], variance[lo:hi], g[lo:hi],
                                      share[lo:hi], local_group, k, b, unit, unit_slope)
        plain = np.empty(hi - lo)
        kernels.unit_kernel(intensity[lo:hi], variance[lo:hi], g[lo:hi], share[lo:hi],
                            local_group, k, b, plain)
        assert np.array_equal(plain, unit)
        units.append(unit)
        slopes.append(unit_slope)
    ratio = np.zeros(1)
    for (lo, hi), unit in zip(parts, units):
        kernels.add_ratio_sum(residual_sq[lo:hi], unit, ratio)
    a_sq = fixed_a_sq if fixed_a_sq >= 0 else ratio[0] / n
    logs, slope_sums = np.zeros(1), np.zeros(2)
    for (lo, hi), unit, unit_slope in zip(parts, units, slopes):
        kernels.add_log_sum(unit, a_sq, logs)
        kernels.add_slope_sums(residual_sq[lo:hi], unit, unit_slope, slope_sums)
    assert a_sq == a_sq_one
    assert logs[0] + ratio[0] / a_sq == cost_one
    # the terms computed first, then only added part after part (what the ranks do)
    ratio_2, logs_2 = np.zeros(1), np.zeros(1)
    for (lo, hi), unit in zip(parts, units):
        terms = np.empty(hi - lo)
        kernels.ratio_terms(residual_sq[lo:hi], unit, terms)
        kernels.add_sum(terms, ratio_2)
    for (lo, hi), unit in zip(parts, units):
        terms = np.empty(hi - lo)
        kernels.log_terms(unit, a_sq, terms)
        kernels.add_sum(terms, logs_2)
    assert ratio_2[0] == ratio[0] and logs_2[0] == logs[0]
    assert slope_sums[0] - slope_sums[1] / a_sq == slope_one
    # and not by accident: the same terms added in another order change the last bits
    shuffled = np.zeros(1)
    for (lo, hi), unit in reversed(list(zip(parts, units))):
        kernels.add_ratio_sum(residual_sq[lo:hi], unit, shuffled)
    assert shuffled[0] != ratio[0]


def friedel_problem(seed=4, n=6000):
    from cctbx import sgtbx

    rng = np.random.default_rng(seed)
    group = sgtbx.space_group_info("P 43 21 2").group()
    hkl = rng.integers(-9, 10, (n, 3)).astype(np.int32)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    anomalous = map_indices_to_asu(hkl, group, True)
    merged = map_indices_to_asu(hkl, group, False)
    return anomalous, merged


def test_friedel_pair_layout_groups_and_order():
    anomalous, merged = friedel_problem()
    cut = anomalous.shape[0] // 3
    parts_a = [anomalous[:cut], anomalous[cut:]]
    parts_m = [merged[:cut], merged[cut:]]
    rows = [np.arange(0, cut, 2), np.arange(0, anomalous.shape[0] - cut, 3)]
    layout = em.friedel_pair_layout(parts_a, parts_m, rows=rows,
                                    full_sizes=[p.shape[0] for p in parts_a])
    reference = GroupLayout([a[r] for a, r in zip(parts_a, rows)], loc_indices=rows,
                            full_sizes=[p.shape[0] for p in parts_a])
    # the same groups with the same observations in the same (dataset, row) order
    ours = {tuple(layout.group_asu[i]): layout.order[layout.group_start[i]:
                                                     layout.group_start[i + 1]].tolist()
            for i in range(layout.group_start.size - 1)}
    theirs = {tuple(reference.group_asu[i]): reference.order[reference.group_start[i]:
                                                             reference.group_start[i + 1]].tolist()
              for i in range(reference.group_start.size - 1)}
    assert ours == theirs
    assert np.array_equal(np.sort(layout.loc_index), np.sort(reference.loc_index))
    # ordered by (non-anomalous index, hand); the (h, k, l) order of the anomalous indices
    # is another order (the reason for this layout)
    flat_m = np.concatenate([m[r] for m, r in zip(parts_m, rows)])
    flat_a = np.concatenate([a[r] for a, r in zip(parts_a, rows)])
    position = layout.offsets[layout.dataset_id] + layout.loc_index  # == layout.order
    assert np.array_equal(position, layout.order)
    first = layout.group_start[:-1]
    # flat index of each group's first observation in the masked, joined arrays
    masked_offsets = np.concatenate([[0], np.cumsum([r.size for r in rows])])
    where = [np.searchsorted(rows[d], l) + masked_offsets[d]
             for d, l in zip(layout.dataset_id[first], layout.loc_index[first])]
    key_m = [tuple(flat_m[w]) for w in where]
    hand = [int(np.any(flat_a[w] != flat_m[w])) for w in where]
    assert [k + (h,) for k, h in zip(key_m, hand)] == sorted(k + (h,) for k, h in zip(key_m, hand))
    assert [tuple(a) for a in layout.group_asu] != [tuple(a) for a in reference.group_asu]


def test_friedel_pair_layout_of_a_key_range_is_a_run_of_the_whole():
    from dials_vmerge.backends.rank_partition import packed_keys

    anomalous, merged = friedel_problem(seed=9)
    whole = em.friedel_pair_layout([anomalous], [merged])
    keys = packed_keys(merged)
    bounds = np.quantile(keys, [0.0, 0.37, 0.81]).astype(np.int64).tolist() + [int(keys.max()) + 1]
    pieces = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mine = np.flatnonzero((keys >= lo) & (keys < hi))
        part = em.friedel_pair_layout([anomalous[mine]], [merged[mine]])
        pieces.append(mine[part.order])
    assert np.array_equal(np.concatenate(pieces), whole.order)
    # GroupLayout's anomalous (h, k, l) order is not a concatenation of the ranges' orders
    reference = GroupLayout([anomalous])
    pieces = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mine = np.flatnonzero((keys >= lo) & (keys < hi))
        pieces.append(mine[GroupLayout([anomalous[mine]]).order])
    assert not np.array_equal(np.concatenate(pieces), reference.order)


def test_friedel_pair_layout_of_no_rows():
    empty = np.zeros((0, 3), np.int32)
    layout = em.friedel_pair_layout([empty, empty], [empty, empty])
    assert layout.n_obs == 0 and layout.group_start.tolist() == [0]
    assert layout.group_asu.shape == (0, 3)


def test_candidate_mean_is_split_and_thread_invariant():
    rng = np.random.default_rng(2)
    size = rng.integers(1, 12, 30000)
    group_start = np.concatenate([[0], np.cumsum(size)]).astype(np.int64)
    n = int(group_start[-1])
    i_sum = rng.exponential(300.0, n) - 20.0
    partiality = np.where(rng.uniform(size=n) < 0.1, 0.0, rng.uniform(0.3, 1.0, n))
    expected = comb.candidate_imids(i_sum, partiality)
    values = [comb.candidate_imids_sorted(i_sum, partiality, group_start, nproc)
              for nproc in (1, 2)]
    assert values[0] == values[1]
    # the maximum and the candidates 0, 1 are exact; the mean agrees to rounding
    assert values[0][:2] == expected[:2] and values[0][3:] == expected[3:]
    assert values[0][2] == pytest.approx(expected[2], rel=1e-13)
    # over the key blocks of a partition, each "rank" summing its blocks' groups only: the
    # blocks' tree gives the bits of the undivided evaluation
    from dials_vmerge.backends.block_sums import fixed_block_bounds

    bounds = fixed_block_bounds(group_start)
    one = comb.candidate_imids_sorted(i_sum, partiality, group_start, 1,
                                      (bounds, np.array([0, bounds.size - 1])))
    assert one[2] == pytest.approx(expected[2], rel=1e-13)
