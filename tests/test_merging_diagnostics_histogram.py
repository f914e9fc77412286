"""merging.diagnostics._histogram bins by numpy's equal-width arithmetic: its counts must be
those of binning against the edges themselves (np.histogram(bins=edges)), values lying exactly
on an edge, one ulp either side of it, outside the range and NaN included."""

import numpy as np
import pytest

from dials_vmerge.merging.diagnostics import DELTA_BINS, DELTA_RANGE, _histogram


@pytest.mark.parametrize("lo,hi,n_bins", [(-DELTA_RANGE, DELTA_RANGE, DELTA_BINS),
                                          (0.7312, 1.9377, 50), (-1e-3, 3e5, 17),
                                          (2.0, 2.0, 10)])  # empty range: edges path
def test_histogram_counts_equal_binning_against_the_edges(lo, hi, n_bins):
    rng = np.random.default_rng(n_bins)
    edges = np.linspace(lo, hi, n_bins + 1)
    values = np.concatenate([
        rng.uniform(lo - 0.1 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1), 200_000),
        edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf), [np.nan]])
    rng.shuffle(values)
    out = _histogram(values, lo, hi, n_bins)
    with np.errstate(invalid="ignore"):
        expected = np.histogram(values[np.isfinite(values)], bins=edges)[0]
    assert out["edges"] == edges.tolist()
    assert out["counts"] == expected.astype(np.int64).tolist()
    assert out["below"] == int((values < lo).sum()) and out["above"] == int((values > hi).sum())
