"""SharedRowViews (many datasets configuring from columns read once) against RowView."""

import numpy as np

import dials_vmerge  # noqa: F401
from dials_vmerge.table import ReflectionTable, RowView, SharedRowViews


def test_shared_views_read_what_row_views_read(tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    table = ReflectionTable(n)
    table["d"] = rng.uniform(1.5, 30.0, n)
    table["xyzobs.px.value"] = rng.uniform(0, 100, (n, 3))
    table["flags"] = rng.integers(0, 1 << 20, n).astype(np.uint64)
    table.spill(["d", "xyzobs.px.value"], str(tmp_path))  # read from the scratch file
    dataset = rng.integers(0, 25, n)
    rows = [np.flatnonzero(dataset == k) for k in range(25)]
    rows[7] = rows[7][::2]  # only some rows of a dataset, as its suitable rows
    shared = SharedRowViews(table, rows)
    for k, r in enumerate(rows):
        plain, view = RowView(table, r), shared.view(k)
        assert view.nrows == plain.nrows == r.size
        for name in ("d", "xyzobs.px.value"):
            assert np.array_equal(view[name], plain[name])
            some = np.arange(0, r.size, 3)
            assert np.array_equal(view.peek(name, some), plain.peek(name, some))
        for all_bits in (True, False):
            assert np.array_equal(view.get_flags(0b1011, all=all_bits),
                                  plain.get_flags(0b1011, all=all_bits))
        given = view["d"]
        given[:] = -1.0  # a model changing what it was given changes nothing shared
        assert np.array_equal(shared.view(k)["d"], plain["d"])
