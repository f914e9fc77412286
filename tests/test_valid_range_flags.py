"""flag_rows_outside_valid_ranges on many datasets (one kernel pass over all rows) against an
independent per-row recomputation in the test."""

from types import SimpleNamespace

import numpy as np

import dials_vmerge  # noqa: F401  (before numba)
from dials_vmerge import flags
from dials_vmerge.selection import flag_rows_outside_valid_ranges
from dials_vmerge.table import ReflectionTable


def many_datasets(n_datasets=400, seed=3):
    """Datasets with 1-3 valid ranges each (some stills, some with a stored empty list), ids
    shuffled, not contiguous and not in experiment order; plus rows of an id no experiment has."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(n_datasets) * 3 + 7)
    experiments, identifiers, expected_ranges = [], {}, {}
    for position, key in enumerate(ids):
        identifier = f"expt-{position}"
        identifiers[int(key)] = identifier
        still = position % 17 == 5
        n_images = int(rng.integers(5, 60))
        scan = None
        if not still:
            scan = {"image_range": [1, n_images]}
            kind = position % 4
            if kind == 1:  # stored ranges, several pieces
                cuts = np.sort(rng.choice(np.arange(1, n_images + 1), 4, replace=False))
                ranges = [[int(cuts[0]), int(cuts[1])], [int(cuts[2]), int(cuts[3])]]
                scan["valid_image_ranges"] = {identifier: ranges}
            elif kind == 2:  # stored range of another experiment only: the scan's own range
                scan["valid_image_ranges"] = {"someone-else": [[2, 3]]}
                ranges = [[1, n_images]]
            elif kind == 3 and position % 8 == 3:  # everything excluded
                scan["valid_image_ranges"] = {identifier: []}
                ranges = []
            else:
                ranges = [[1, n_images]]
            expected_ranges[int(key)] = (ranges, n_images)
        experiments.append(SimpleNamespace(identifier=identifier, is_still=still, scan=scan))
    return experiments, identifiers, expected_ranges, rng


def test_flags_match_a_per_row_recomputation_on_many_datasets():
    experiments, identifiers, expected_ranges, rng = many_datasets()
    keys = np.array(sorted(identifiers), dtype=np.int64)
    n_rows = 60_000
    row_id = np.concatenate([rng.choice(keys, n_rows), np.full(50, 2, np.int64)])  # id 2: none
    z = rng.uniform(-2.0, 62.0, row_id.size)
    z[:200] = np.round(z[:200])  # exact image boundaries
    table = ReflectionTable(row_id.size, identifiers)
    table["id"] = row_id.astype(np.int32)
    table["xyzobs.px.value"] = np.column_stack([np.zeros_like(z), np.zeros_like(z), z])
    prior = rng.integers(0, 2, row_id.size).astype(np.uint64) * np.uint64(flags.integrated_sum)
    table["flags"] = prior.copy()

    flag_rows_outside_valid_ranges(experiments, table)

    expected = np.zeros(row_id.size, dtype=bool)
    for i in range(row_id.size):
        key = int(row_id[i])
        if key not in expected_ranges:  # stills and rows of no experiment
            continue
        ranges, _ = expected_ranges[key]
        expected[i] = not any(first - 1 <= z[i] <= last for first, last in ranges)
    got = (table["flags"] & np.uint64(flags.user_excluded_in_scaling)) != 0
    assert expected.sum() > 1000 and (~expected).sum() > 1000
    np.testing.assert_array_equal(got, expected)
    # other flag bits untouched
    np.testing.assert_array_equal(table["flags"] & ~np.uint64(flags.user_excluded_in_scaling),
                                  prior)
