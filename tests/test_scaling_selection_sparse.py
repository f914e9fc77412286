"""Quasi-random reflection selection over several datasets (scaling/selection.py) with
sparse (group, dataset) pairs picks exactly what the dense datasets x groups implementation
it replaced picked (kept below as the independent reference): same groups, same random
draws, on synthetic tables of 3 to 40 datasets."""

import numpy as np
import pytest

import dials_vmerge  # noqa: F401
from dials_vmerge.scaling import selection
from dials_vmerge.scaling.ih_table import build_ih_table

SEED = 42


def dense_quasi_random_multi(table, n_datasets, preselected, min_groups=2000,
                              min_reflections=50000, isigma_cutoff=1.0, seed=SEED):
    """The implementation before the sparse pairs: a dense datasets x groups matrix."""
    rng = np.random.default_rng(seed)
    grp = table.group_of_observation()
    mult = table.multiplicity()
    eligible = (selection._group_mean_isigma(table) > isigma_cutoff) & (mult > 1)
    if not eligible.any():
        eligible = (selection._group_mean_isigma(table) > 0) & (mult > 1)
    if not eligible.any():
        return np.ones(table.n_obs, dtype=bool)
    mean_mult = mult[mult > 1].mean()
    total_target = max(mean_mult * min_groups, min_reflections)
    target_qr = min(1000, min_groups) * mean_mult
    # dataset x group membership counts
    counts = np.zeros((n_datasets, table.n_groups), dtype=np.int64)
    np.add.at(counts, (table.dataset_id, grp), 1)
    span = (counts > 0).sum(axis=0)
    chosen = np.zeros(table.n_groups, dtype=bool)
    per_dataset = np.zeros(n_datasets, dtype=np.int64)
    share = target_qr / (n_datasets * 4.0)
    order = np.flatnonzero(eligible)
    order = order[np.argsort(-span[order], kind="stable")]
    used = 0
    for grp_id in order:  # loop over candidate groups, not reflections
        if used > 1.2 * target_qr or (per_dataset >= share).all():
            break
        neediest = int(np.argmin(per_dataset))
        if counts[neediest, grp_id] == 0 and per_dataset[neediest] < share:
            continue
        chosen[grp_id] = True
        per_dataset += counts[:, grp_id]
        used += mult[grp_id]
    # within each dataset: random eligible groups until its share is reached
    per_dataset_target = (total_target - used) / (2.0 * n_datasets)
    for d in range(n_datasets):
        in_d = np.flatnonzero(eligible & (counts[d] > 1) & ~chosen)
        rng.shuffle(in_d)
        cumulative = np.cumsum(counts[d, in_d])
        take = in_d[: int(np.searchsorted(cumulative, per_dataset_target)) + 1]
        chosen[take] = True
        used += int(mult[take].sum())
    # across datasets: random groups to reach the total target
    rest = np.flatnonzero(eligible & ~chosen)
    if used < total_target and rest.size:
        rng.shuffle(rest)
        cumulative = np.cumsum(mult[rest])
        take = rest[: int(np.searchsorted(cumulative, total_target - used)) + 1]
        chosen[take] = True
    return chosen[grp] & preselected


def _table(n_datasets, n_obs, n_unique, rng):
    asus, intensities, variances = [], [], []
    for d in range(n_datasets):
        n = int(rng.integers(n_obs // 2, n_obs))
        hkl = rng.integers(0, n_unique, n)
        asus.append(np.stack([hkl % 17, (hkl // 17) % 17, hkl // 289], axis=1))
        variances.append(rng.uniform(0.5, 2.0, n))
        intensities.append(rng.normal(2.0, 1.0, n) * np.sqrt(variances[-1]))
    ones = [np.ones(i.size) for i in intensities]
    return build_ih_table(asus, intensities, variances, ones, ones)


@pytest.mark.parametrize("n_datasets, n_obs, n_unique, min_groups, min_reflections", [
    (3, 4000, 1500, 200, 2000),
    (12, 1500, 2500, 300, 3000),
    (40, 400, 3000, 100, 5000),
    (40, 400, 3000, 2000, 50000),  # targets above the data: every eligible group
])
def test_sparse_pairs_pick_what_the_dense_matrix_picked(n_datasets, n_obs, n_unique,
                                                        min_groups, min_reflections):
    rng = np.random.default_rng(n_datasets)
    table = _table(n_datasets, n_obs, n_unique, rng)
    preselected = rng.random(table.n_obs) < 0.9
    for cutoff in (1.0, 0.5):
        new = selection.select_quasi_random_multi(table, n_datasets, preselected, min_groups,
                                                  min_reflections, cutoff)
        old = dense_quasi_random_multi(table, n_datasets, preselected, min_groups,
                                       min_reflections, cutoff)
        assert 0 < new.sum() <= preselected.sum()
        np.testing.assert_array_equal(new, old)
