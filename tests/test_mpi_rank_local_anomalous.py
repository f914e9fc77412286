"""anomalous=True scaling on each MPI rank's own rows (issue 11, session 12).

The scaling run groups observations by the ANOMALOUS ASU index. Its groups are held in
(unique reflection, hand) order (ih_table.GroupLayout.friedel_ordered): I(+) then I(-) of one
non-anomalous index, so an MPI rank's groups (whole non-anomalous groups of its key range)
are one contiguous run of the one-process groups and the sums over groups go by the job's
key blocks. Group-level choices (selection's draws, E^2 shells, the likelihood's resolution
bins) still take the (h, k, l) order of the anomalous indices (backends/group_order.py).

Unit tests (one process): the reordered layout equals error_model.friedel_pair_layout (an
independent construction of the same order from per-row keys) and its non-anomalous indices
cctbx's; GroupOrder of a layout whose keys do not ascend gives the (h, k, l) order; the
selection masks and the likelihood's bins of the (unique reflection, hand) table equal those
of the (h, k, l) table row for row.

Program runs: `dials.vmerge anomalous=True` at N = 1, 2 and 3 on a 3-sweep rotation and on 200
stills simulated with an anomalous signal (defaults: Imid search, outlier rejection with E^2,
basic error model; and with quasi-random / random selection and the likelihood target):
scaled.refl, merged.mtz, scaled.expt and dials.vmerge.json byte for byte equal, the ranks
really scaling their own rows (the log's rank-local line). And an anomalous run gives the
read-time partition's row keys back when its datasets are set up.
"""

import os

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba/scipy.special)

import mpi_helpers

TIMEOUT_S = 300
OUTPUTS = ("scaled.refl", "merged.mtz", "scaled.expt", "dials.vmerge.json")
RANK_LOCAL_LINE = "MPI: scaling each rank's own unique reflections (rows per rank "


# -- one process: the reordered layout and what is chosen on it -----------------------------

def _space_group(symbol):
    from cctbx import sgtbx

    return sgtbx.space_group_info(symbol).group()


def _random_indices(rng, n, limit=9):
    hkl = rng.integers(-limit, limit + 1, size=(n, 3)).astype(np.int32)
    hkl[np.all(hkl == 0, axis=1)] = (1, 2, 3)
    return hkl


@pytest.mark.parametrize("symbol", ["P 43 21 2", "P 1 21 1", "P 3 2 1", "P 1"])
def test_friedel_ordered_layout_equals_friedel_pair_layout(symbol):
    from dials_vmerge.scaling import error_model as em
    from dials_vmerge.scaling.ih_table import GroupLayout, map_indices_to_asu, pack_indices

    sg = _space_group(symbol)
    rng = np.random.default_rng(3)
    miller = [_random_indices(rng, n) for n in (700, 1, 0, 450)]
    anomalous = [map_indices_to_asu(m, sg, True) if m.size else np.zeros((0, 3), np.int32)
                 for m in miller]
    merged = [map_indices_to_asu(m, sg, False) if m.size else np.zeros((0, 3), np.int32)
              for m in miller]
    hkl_layout = GroupLayout(anomalous)
    layout = hkl_layout.friedel_ordered(sg)
    expected = em.friedel_pair_layout(anomalous, merged)
    for name in ("order", "group_start", "group_asu", "dataset_id", "loc_index", "offsets"):
        np.testing.assert_array_equal(getattr(layout, name), getattr(expected, name), name)
    # the order really differs from (h, k, l) (else the test shows nothing) and holds the
    # same groups
    keys = pack_indices(layout.group_asu)
    assert np.any(np.diff(keys) < 0)
    np.testing.assert_array_equal(np.sort(keys), pack_indices(hkl_layout.group_asu))
    np.testing.assert_array_equal(layout.key_asu,
                                  map_indices_to_asu(layout.group_asu, sg, False))
    # pairs: consecutive groups of one non-anomalous index, I(+) (the index itself) first
    same = np.all(layout.key_asu[1:] == layout.key_asu[:-1], axis=1)
    assert same.any()
    assert np.all(np.any(layout.group_asu[1:][same] != layout.key_asu[1:][same], axis=1))
    np.testing.assert_array_equal(layout.group_asu[:-1][same], layout.key_asu[:-1][same])
    # a subset of the reordered layout (its key_asu follows) = the pair layout of the rows
    masks = [rng.random(a.shape[0]) < 0.6 for a in anomalous]
    sub = layout.subset(masks)
    rows = [np.flatnonzero(m) for m in masks]
    expected_sub = em.friedel_pair_layout(anomalous, merged, rows=rows,
                                          full_sizes=[a.shape[0] for a in anomalous])
    for name in ("order", "group_start", "group_asu", "dataset_id", "loc_index"):
        np.testing.assert_array_equal(getattr(sub, name), getattr(expected_sub, name), name)
    np.testing.assert_array_equal(sub.key_asu, map_indices_to_asu(sub.group_asu, sg, False))
    # the IhTable carries the key indices through table() and select()
    values = [rng.random(a.shape[0]) + 1 for a in anomalous]
    table = layout.table(values, values, values, values)
    np.testing.assert_array_equal(table.block_key_asu, layout.key_asu)
    picked = table.select(np.arange(table.n_obs) % 3 == 0)
    np.testing.assert_array_equal(picked.block_key_asu,
                                  map_indices_to_asu(picked.asu_index, sg, False))


def _tables(seed=11, n_datasets=3, n=4000):
    """The (h, k, l) and the (unique reflection, hand) IhTables of the same observations."""
    from dials_vmerge.scaling.ih_table import GroupLayout, map_indices_to_asu

    sg = _space_group("P 43 21 2")
    rng = np.random.default_rng(seed)
    anomalous = [map_indices_to_asu(_random_indices(rng, n, 14), sg, True)
                 for _ in range(n_datasets)]
    intensity = [rng.gamma(2.0, 50.0, n) - 5.0 for _ in range(n_datasets)]
    variance = [np.full(n, 25.0) + 0.1 * np.abs(i) for i in intensity]
    weight = [1.0 / v for v in variance]
    g = [rng.uniform(0.8, 1.2, n) for _ in range(n_datasets)]
    hkl_layout = GroupLayout(anomalous)
    tables = [layout.table(intensity, variance, weight, g)
              for layout in (hkl_layout, hkl_layout.friedel_ordered(sg))]
    return tables, sg


def _rows(table, mask):
    """The (dataset, row) pairs a mask over a table's observations selects, sorted."""
    pairs = np.stack([table.dataset_id[mask], table.loc_index[mask]], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def test_group_order_of_a_layout_whose_keys_do_not_ascend():
    from dials_vmerge.backends.group_order import GroupOrder
    from dials_vmerge.backends.rank_partition import packed_keys

    (hkl_table, table), _ = _tables()
    order = GroupOrder(table.asu_index)
    assert not order.in_rank_order
    assert GroupOrder(hkl_table.asu_index).in_rank_order
    values = np.arange(table.n_groups, dtype=np.float64) * 7.0
    gathered = order.gather(values)
    # gathered in the (h, k, l) order of the group indices
    np.testing.assert_array_equal(gathered, values[np.argsort(packed_keys(table.asu_index))])
    np.testing.assert_array_equal(order.own(gathered), values)
    np.testing.assert_array_equal(order.gather(table.asu_index), hkl_table.asu_index)
    # positions and their inverse
    local = np.array([5, 0, table.n_groups - 1, 17])
    positions = order.positions(local)
    np.testing.assert_array_equal(gathered[positions], values[local])
    owned, back = order.local_of(np.concatenate([positions, [table.n_groups + 3]]))
    np.testing.assert_array_equal(owned, [True] * local.size + [False])
    np.testing.assert_array_equal(back[:local.size], local)


@pytest.mark.parametrize("method", ["random", "single", "quasi_random"])
def test_selection_of_the_reordered_table_is_that_of_the_hkl_table(method):
    """The random draws run over groups in the (h, k, l) order in either layout: the same
    observations are chosen (so the anomalous selection did not change with the order)."""
    from dials_vmerge.scaling import selection as sel

    (hkl_table, table), _ = _tables()
    masks = []
    for t in (hkl_table, table):
        pre = sel.preselection(t)
        if method == "random":
            mask = sel.select_random(t, min_groups=150, min_reflections=1000)
        elif method == "single":
            mask = sel.select_single_dataset(t, pre, min_groups=150, min_reflections=1000)
        else:
            mask = sel.select_quasi_random_multi(t, 3, pre, min_groups=150,
                                                 min_reflections=1000)
        masks.append(mask)
    # a real subset, not everything
    assert 0 < masks[0].sum() < 0.9 * hkl_table.n_obs
    np.testing.assert_array_equal(_rows(hkl_table, masks[0]), _rows(table, masks[1]))


def test_e_squared_of_the_reordered_table_is_that_of_the_hkl_table():
    from cctbx import uctbx

    from dials_vmerge.scaling.normalisation import grouped_quasi_normalised_e_squared

    (hkl_table, table), sg = _tables()
    cell = uctbx.unit_cell((60.0, 60.0, 40.0, 90.0, 90.0, 90.0))
    e2 = [grouped_quasi_normalised_e_squared(t.asu_index, t.group_start, t.intensity, sg,
                                             cell) for t in (hkl_table, table)]
    key = [np.lexsort((t.loc_index, t.dataset_id)) for t in (hkl_table, table)]
    assert np.ptp(e2[0]) > 1.0
    # bit for bit: the shell sums run over the groups in the (h, k, l) order either way
    np.testing.assert_array_equal(e2[0][key[0]], e2[1][key[1]])


def test_likelihood_bins_ties_follow_the_hkl_order():
    """Equal d*^2 (I(+) and I(-) of one reflection, among others): with tie_key the bins of
    groups held in another order are those of the (h, k, l) order, group for group."""
    from dials_vmerge.backends.rank_partition import packed_keys
    from dials_vmerge.scaling.likelihood import resolution_bins

    (hkl_table, table), _ = _tables()
    dstar_sq = np.sum(table.asu_index.astype(np.float64) ** 2, axis=1)  # ties aplenty
    to_hkl = np.argsort(packed_keys(table.asu_index))
    reference, n_bins = resolution_bins(dstar_sq[to_hkl], 7)
    bins, n = resolution_bins(dstar_sq, 7, packed_keys(table.asu_index))
    assert n == n_bins == 7
    np.testing.assert_array_equal(bins[to_hkl], reference)
    # without the tie key a bin edge among ties depends on the order (what it fixes)
    plain, _ = resolution_bins(dstar_sq, 7)
    assert not np.array_equal(plain[to_hkl], reference)


# -- dials.vmerge anomalous=True at N = 1, 2, 3 -----------------------------------------------

@pytest.fixture(scope="module")
def simulations(tmp_path_factory):
    pytest.importorskip("mpi4py")
    return mpi_helpers.simulated_inputs(tmp_path_factory.mktemp("anomalous_inputs"), {
        # ~33 000 rows: 8 key blocks, each sweep above the E^2 normalisation threshold
        "rotation": ["rotation.n_sweeps=3", "n_obs_target=30000", "crystal.anomalous=True",
                     "seed=5"],
        # ~25 600 rows; at N = 3 some stills have no row on some rank
        "stills": ["mode=stills", "stills.n_images=200", "model=KB", "crystal.d_min=4",
                   "crystal.anomalous=True", "seed=4"],
    }, timeout_s=TIMEOUT_S)


def _run(inputs, directory, n_ranks, extra):
    directory.mkdir()
    done = mpi_helpers.run(["dials.vmerge", *inputs, "nproc=1", "anomalous=True", *extra],
                           cwd=directory, n_ranks=n_ranks, timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return directory


@pytest.mark.parametrize("name, extra", [
    ("rotation", []),
    ("rotation", ["reflection_selection.method=quasi_random"]),
    ("rotation", ["reflection_selection.method=random",
                  "reflection_selection.random.min_groups=500"]),
    ("rotation", ["scaling_options.target=likelihood"]),
    ("stills", []),
    ("stills", ["reflection_selection.method=quasi_random"]),
    ("stills", ["scaling_options.target=likelihood"]),
], ids=["rotation", "rotation_quasi_random", "rotation_random", "rotation_likelihood",
        "stills", "stills_quasi_random", "stills_likelihood"])
def test_anomalous_outputs_identical_at_one_two_three_ranks(simulations, tmp_path, name,
                                                             extra):
    inputs = simulations[name]
    runs = {n: _run(inputs, tmp_path / f"n{n}", None if n == 1 else n, extra)
            for n in (1, 2, 3)}
    for n in (2, 3):
        log = open(runs[n] / "dials.vmerge.log").read()
        assert RANK_LOCAL_LINE in log, f"N = {n} did not scale rank-local"
        line = log.split(RANK_LOCAL_LINE)[1].split(" of ")[0]
        rows = [int(r) for r in line.split(" / ")]
        assert len(rows) == n and min(rows) > 0, line
        for output in OUTPUTS:
            assert (runs[n] / output).read_bytes() == (runs[1] / output).read_bytes(), \
                f"{output} at N = {n}"
    one_log = open(runs[1] / "dials.vmerge.log").read()
    assert RANK_LOCAL_LINE not in one_log
    for option in extra:
        if option.startswith("reflection_selection.method="):
            assert f"Reflection selection ({option.split('=')[1]})" in one_log
    if "scaling_options.target=likelihood" in extra:
        assert "Error model (marginal likelihood): a = " in one_log
    else:
        assert "Error model: a = " in one_log
    _assert_anomalous_merge(runs[1] / "merged.mtz")


def _assert_anomalous_merge(path):
    """merged.mtz holds both hands, and they differ (the simulated anomalous signal)."""
    gemmi = pytest.importorskip("gemmi")
    mtz = gemmi.read_mtz_file(str(path))
    labels = [c.label for c in mtz.columns]
    assert {"I(+)", "I(-)", "SIGI(+)", "SIGI(-)", "IMEAN"} <= set(labels)
    plus, minus = (np.array(mtz.column_with_label(label), dtype=np.float64)
                   for label in ("I(+)", "I(-)"))
    both = np.isfinite(plus) & np.isfinite(minus)
    assert both.sum() > 100
    assert np.mean(plus[both] != minus[both]) > 0.9


def test_anomalous_grouping_is_in_effect(simulations, tmp_path):
    """The anomalous run's scales are not the non-anomalous run's (the groups are I(+) and
    I(-) apart), and the rank-local anomalous run differs from the rank-local default."""
    inputs = simulations["rotation"]
    anomalous = _run(inputs, tmp_path / "anomalous", 2, [])
    plain = tmp_path / "plain"
    plain.mkdir()
    done = mpi_helpers.run(["dials.vmerge", *inputs, "nproc=1"], cwd=plain, n_ranks=2,
                           timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    from dials_vmerge.io.refl import read_reflections

    g = [np.asarray(read_reflections(str(d / "scaled.refl"), ())["inverse_scale_factor"])
         for d in (anomalous, plain)]
    assert g[0].size == g[1].size
    assert np.max(np.abs(g[0] - g[1]) / g[1]) > 1e-6


@pytest.mark.parametrize("anomalous", [False, True])
def test_the_partition_keys_are_released_when_scaling_starts(simulations, tmp_path,
                                                             monkeypatch, anomalous):
    """The read-time partition's keys of every input row (8 B per row) are given back once
    the run's datasets are set up, also when the run groups by the anomalous index and never
    looks them up (before session 12 they were then held to the end of the job)."""
    from dials_vmerge.backends import rank_partition
    from dials_vmerge.command_line.vmerge import main
    from dials_vmerge.scaling.algorithm import ScalingRun

    seen = []
    original = ScalingRun.initial_outlier_rejection

    def probe(run):
        keys = rank_partition._active_keys[-1]
        seen.append((keys is not None, getattr(keys, "keys_by_file_row", None)))
        return original(run)

    monkeypatch.setattr(ScalingRun, "initial_outlier_rejection", probe)
    monkeypatch.chdir(tmp_path)
    inputs = simulations["rotation"]
    assert main([*inputs, "nproc=1", f"anomalous={anomalous}"]) in (0, None)
    # the job had keys to hand (the input is read lazily from its file), released by now
    assert len(seen) == 1
    held, keys = seen[0]
    assert held and keys is None
