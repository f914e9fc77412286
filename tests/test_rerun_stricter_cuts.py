"""A stricter cut given on a rerun acts on the rerun's rows (issue 15).

A rerun (`dials.vmerge scaled.expt scaled.refl`) keeps the previous preparation's exclusions
and undoes this run's `excluded_for_scaling` on the rows the previous run kept: the previous
run judged split partials as pieces, the rerun would judge their sums. Before the fix that
undo also took back a stricter cut_data.min_isigi given on the rerun (helper h11rr: 5680 rows
flagged, 272 left). Now a min_isigi above its default stays on the rows whose I/sigma is
below it (dials.scale, on a rerun, clears every scaling flag and cuts its input's rows
afresh: algorithm.prepare_input, scaler_factory.filter_bad_reflections).

First run: two simulated files (split partials, partial_id from 0 in each). Reruns on its
output: no option (must reproduce the first run bit for bit), cut_data.min_isigi=3,
cut_data.partiality_cutoff=0.95. The expected flags are computed here from the first run's
scaled.refl columns.
"""

import numpy as np
import pytest

from dials_vmerge import flags
from dials_vmerge.io import read_reflections
from test_reruns import run_program

MIN_ISIGI = 3.0
PARTIALITY_CUTOFF = 0.95
RERUNS = {
    "none": [],
    "min_isigi": [f"cut_data.min_isigi={MIN_ISIGI}"],
    "partiality": [f"cut_data.partiality_cutoff={PARTIALITY_CUTOFF}"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("rerun_stricter_cuts")
    for prefix, seed in (("a", 21), ("b", 22)):
        run_program("simulate", ["n_obs_target=6000", "rotation.n_sweeps=2", f"seed={seed}",
                                 f"output.prefix={prefix}"], work)
    first = work / "first"
    first.mkdir()
    run_program("vmerge", ["../a.expt", "../a.refl", "../b.expt", "../b.refl"], first)
    tables = {"first": read_reflections(str(first / "scaled.refl"))}
    for name, options in RERUNS.items():
        d = work / name
        d.mkdir()
        run_program("vmerge", ["../first/scaled.expt", "../first/scaled.refl", *options], d)
        tables[name] = read_reflections(str(d / "scaled.refl"))
    return tables


def _flag(table, bit):
    return np.asarray(table.get_flags(bit))


def _kept(table):
    return ~(_flag(table, flags.excluded_for_scaling)
             | _flag(table, flags.user_excluded_in_scaling))


def _same_rows(a, b):
    assert a.nrows == b.nrows
    for name in ("miller_index", "id", "partial_id"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))


def test_rerun_without_options_reproduces_the_first_run(runs):
    first, rerun = runs["first"], runs["none"]
    _same_rows(first, rerun)
    np.testing.assert_array_equal(np.asarray(first["flags"]), np.asarray(rerun["flags"]))
    for name in ("inverse_scale_factor", "inverse_scale_factor_variance",
                 "intensity.scale.value", "intensity.scale.variance"):
        np.testing.assert_array_equal(np.asarray(rerun[name]), np.asarray(first[name]),
                                      err_msg=name)


def test_stricter_min_isigi_flags_the_rows_below_it(runs):
    first, rerun = runs["first"], runs["min_isigi"]
    _same_rows(first, rerun)
    # the initial filter with intensity_choice=combine checks summation and profile I/sigma
    below = np.zeros(first.nrows, dtype=bool)
    for kind in ("sum", "prf"):
        value = np.asarray(first[f"intensity.{kind}.value"], dtype=np.float64)
        variance = np.asarray(first[f"intensity.{kind}.variance"], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            below |= value / np.sqrt(variance) < MIN_ISIGI
    newly = _kept(first) & below
    assert newly.sum() > 500  # the cut has work to do
    expected = _flag(first, flags.excluded_for_scaling) | newly
    np.testing.assert_array_equal(_flag(rerun, flags.excluded_for_scaling), expected)
    np.testing.assert_array_equal(_flag(rerun, flags.user_excluded_in_scaling),
                                  _flag(first, flags.user_excluded_in_scaling))
    # the newly cut rows are out of scaling (no `scaled`) and the scales moved
    _assert_out_of_scaling_and_rescaled(first, rerun, newly)


def _assert_out_of_scaling_and_rescaled(first, rerun, newly):
    """The rows a rerun's stricter cut newly flagged are out of scaling (no `scaled`), and
    the scales of the rows still scaled moved."""
    assert not _flag(rerun, flags.scaled)[newly].any()
    g0 = np.asarray(first["inverse_scale_factor"])
    g1 = np.asarray(rerun["inverse_scale_factor"])
    still = _kept(rerun)
    assert np.max(np.abs(g1[still] / g0[still] - 1)) > 1e-4


def test_stricter_partiality_cutoff_flags_the_rows_below_it(runs):
    first, rerun = runs["first"], runs["partiality"]
    _same_rows(first, rerun)
    partiality = np.asarray(first["partiality"])
    newly = _kept(first) & (partiality < PARTIALITY_CUTOFF)
    assert newly.sum() > 100
    np.testing.assert_array_equal(
        _flag(rerun, flags.user_excluded_in_scaling),
        _flag(first, flags.user_excluded_in_scaling) | (partiality < PARTIALITY_CUTOFF))
    np.testing.assert_array_equal(_flag(rerun, flags.excluded_for_scaling),
                                  _flag(first, flags.excluded_for_scaling))
    _assert_out_of_scaling_and_rescaled(first, rerun, newly)


def test_restart_undoes_only_the_summation_effect_unless_a_stricter_min_isigi():
    # Five rows as this rerun's preparation leaves them, all flagged excluded_for_scaling by
    # its initial filter; rows 0-3 were kept by the previous preparation, row 4 was not.
    # Row 0 (I/sigma -6 on the summed row, below the default -5) and row 1 (I/sigma 1) are
    # what the undo is for at the default cut; under min_isigi=3 rows 0, 1 (sum 1) and 2
    # (prf 2) are below the new cut and stay flagged; row 3 (I/sigma 4 and 5) fails for another
    # reason (the previous run judged its pieces) and is always undone.
    from dials_vmerge.scaling.rerun import SuitableBefore, restart_prepared_table
    from dials_vmerge.table import ReflectionTable

    def prepared():
        t = ReflectionTable(5)
        t["id"] = np.zeros(5, dtype=np.int32)
        t["original_index"] = np.arange(5, dtype=np.uint64)
        t["intensity.sum.value"] = np.array([-6.0, 1.0, 9.0, 4.0, 10.0])
        t["intensity.sum.variance"] = np.ones(5)
        t["intensity.prf.value"] = np.array([-6.0, 1.0, 2.0, 5.0, 10.0])
        t["intensity.prf.variance"] = np.ones(5)
        t["variance"] = np.ones(5)
        t["flags"] = np.full(5, flags.integrated_sum | flags.integrated_prf
                             | flags.excluded_for_scaling, dtype=np.uint64)
        return t

    before = SuitableBefore(np.array([True, True, True, True, False]))
    for min_isigi, still_flagged in ((None, [4]), (-5.0, [4]), (-6.5, [4]),
                                     (MIN_ISIGI, [0, 1, 2, 4])):
        t = prepared()
        restart_prepared_table(t, before, "combine", min_isigi)
        assert np.flatnonzero(t.get_flags(flags.excluded_for_scaling)).tolist() == \
            still_flagged, min_isigi
        np.testing.assert_array_equal(t["inverse_scale_factor"], np.ones(5))
    # profile only: row 2's prf I/sigma 2 is checked; summation only: row 2 (sum 9) passes
    for choice, still_flagged in (("profile", [0, 1, 2, 4]), ("sum", [0, 1, 4])):
        t = prepared()
        restart_prepared_table(t, before, choice, MIN_ISIGI)
        assert np.flatnonzero(t.get_flags(flags.excluded_for_scaling)).tolist() == \
            still_flagged, choice
