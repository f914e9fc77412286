"""Quicker forms of three small steps of a 1e6 sweep's run (issue 10, session 9), each
checked against the numpy (or Python) computation it replaced."""

import json
import math

import numpy as np
import pytest

from dials_vmerge.kernels.scattering_angle import max_scattering_angle_kernel
from dials_vmerge.merging.batch_statistics import unique_batches
from dials_vmerge.pipeline import json_ready


@pytest.mark.parametrize("batch", [
    np.random.default_rng(0).integers(1, 144, 200_000),   # one sweep's images
    np.random.default_rng(1).integers(-5, 3, 1000),       # negative batch numbers
    np.array([7]),
    np.array([3, 3, 3]),
    np.array([], dtype=np.int64),
    np.random.default_rng(2).integers(0, 2 ** 40, 1000),  # too wide a range: numpy's path
    np.array([10 ** 6, 1, 10 ** 6, 5]),                   # gaps wider than the rows
])
def test_unique_batches_equals_numpy_unique(batch):
    batch = np.asarray(batch, dtype=np.int64)
    values, index = unique_batches(batch)
    expected_values, expected_index = np.unique(batch, return_inverse=True)
    assert values.dtype == expected_values.dtype and np.array_equal(values, expected_values)
    assert index.dtype == np.int64 and np.array_equal(index, expected_index.reshape(-1))


def _numpy_max_angle(s1, beam):
    """The previous numpy form of model.physical.max_scattering_angle_rad."""
    lengths = np.linalg.norm(s1, axis=1)
    good = lengths > 0
    if not good.any():
        return math.inf
    cosines = (s1[good] @ beam) / (lengths[good] * np.linalg.norm(beam))
    return float(np.max(np.arccos(np.clip(cosines, -1.0, 1.0))))


@pytest.mark.parametrize("seed", range(6))
def test_max_scattering_angle_kernel_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    s1 = rng.normal(size=(20_000, 3)) * (1e-3 if seed % 2 else 1.0)
    s1[::7] = 0.0  # rows without s1 are left out
    beam = np.array([0.0, 0.0, -1.0 / 0.9795]) if seed < 3 else rng.normal(size=3)
    angle, n_good = max_scattering_angle_kernel(s1, beam, float(np.linalg.norm(beam)))
    assert n_good == np.count_nonzero(np.linalg.norm(s1, axis=1) > 0)
    # the dot product's order may differ from BLAS's: equal to the last bits
    assert angle == pytest.approx(_numpy_max_angle(s1, beam), rel=4e-16, abs=0)


def test_max_scattering_angle_of_a_beam_like_cone():
    # rows at known angles to the beam: the largest is found exactly enough
    angles = np.array([0.0, 0.01, 0.04, 0.02])
    s1 = np.stack([np.sin(angles), np.zeros(4), np.cos(angles)], axis=1) * 2.0
    angle, n_good = max_scattering_angle_kernel(s1, np.array([0.0, 0.0, 1.0]), 1.0)
    assert n_good == 4 and angle == pytest.approx(0.04, rel=1e-12)


def test_max_scattering_angle_kernel_no_rows_and_nan():
    beam = np.array([0.0, 0.0, 1.0])
    assert max_scattering_angle_kernel(np.zeros((3, 3)), beam, 1.0)[1] == 0
    s1 = np.array([[0.0, 0.1, 1.0], [np.nan, 0.0, 1.0]])
    assert max_scattering_angle_kernel(s1, beam, 1.0)[1] == 1  # NaN length: not > 0
    angle, _ = max_scattering_angle_kernel(s1, beam * 0.0, 0.0)  # 0/0 cosine: NaN, as numpy
    assert math.isnan(angle) and math.isnan(_numpy_max_angle(s1, beam * 0.0))


def _json_ready_reference(obj):
    """json_ready before its fast path for plain values (isinstance chain only)."""
    if isinstance(obj, dict):
        return {str(k): _json_ready_reference(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready_reference(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready_reference(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def test_json_ready_equals_reference():
    class Named:
        def __str__(self):
            return "named"

    report = {
        1: [1.5, math.nan, math.inf, -math.inf, 0.0, -0.0, 3, True, None, "s"],
        "numpy": {"f": np.float64(2.5), "nan": np.float64("nan"), "i": np.int32(4),
                  "b": np.bool_(True), "a": np.array([[1.0, np.nan], [np.inf, 2.0]]),
                  "ai": np.arange(3), "ab": np.array([True, False])},
        "tuple": (1, (2.0, float("nan"))),
        "other": Named(),
        "big": list(np.linspace(0, 1, 100)) + [float(x) for x in range(100)],
    }
    got, expected = json_ready(report), _json_ready_reference(report)
    assert json.dumps(got) == json.dumps(expected)
    # same Python types all the way down (np.float64 NaN stays NaN, a float NaN is None)
    assert got["numpy"]["nan"] != got["numpy"]["nan"] and got["1"][1] is None
    assert [type(v) for v in got["1"]] == [type(v) for v in expected["1"]]


def _find_indices_reference(needles, haystack):
    """Dictionary look-up of each needle row."""
    where = {tuple(row): i for i, row in enumerate(np.asarray(haystack).tolist())}
    return np.array([where.get(tuple(row), -1) for row in np.asarray(needles).tolist()],
                    dtype=np.int64)


def test_find_indices_of_sets_equals_one_lookup_per_set():
    from dials_vmerge.merging.lookup import find_indices, find_indices_of_sets

    rng = np.random.default_rng(3)
    haystack = np.unique(rng.integers(-12, 13, size=(3000, 3)), axis=0)
    rng.shuffle(haystack)
    needles = rng.integers(-15, 16, size=(2000, 3))
    sets = [needles, -needles, needles[:0], haystack[::-3]]
    found = find_indices_of_sets(sets, haystack)
    for got, n in zip(found, sets):
        expected = _find_indices_reference(n, haystack)
        assert got.dtype == np.int64 and np.array_equal(got, expected)
        assert np.array_equal(find_indices(n, haystack), expected)
    assert [len(x) for x in find_indices_of_sets([needles], haystack[:0])] == [2000]


def test_friedel_positions_memo_returns_copies_and_follows_the_arrays():
    import dials_vmerge.merging.lookup as lookup
    from dials_vmerge.merging.api import friedel_positions
    from dials_vmerge.merging.merged import MergedIntensities

    rng = np.random.default_rng(4)
    index = np.unique(rng.integers(-6, 7, size=(400, 3)), axis=0).astype(np.int32)
    anom_index = np.unique(np.concatenate([index[::2], -index[1::3]]), axis=0).astype(np.int32)
    rng.shuffle(anom_index)  # rows unique, as an anomalous merge's

    def merged_of(asu, anomalous):
        n = len(asu)
        return MergedIntensities(asu, np.ones(n), np.ones(n), np.ones(n, np.int64),
                                 rng.random(n) < 0.2, np.ones(n), np.ones(n), anomalous,
                                 "classical")

    merged, anom = merged_of(index, False), merged_of(anom_index, True)
    plus_ref = _find_indices_reference(index, anom_index)
    minus_ref = _find_indices_reference(-index, anom_index)
    minus_ref[merged.centric] = -1
    calls = []
    real = lookup.find_indices_of_sets
    lookup.find_indices_of_sets = lambda *a: calls.append(1) or real(*a)
    try:
        for _ in range(2):
            plus, minus = friedel_positions(merged, anom)
            assert np.array_equal(plus, plus_ref) and np.array_equal(minus, minus_ref)
            plus[:] = -7  # a caller's change does not reach the memo
        assert len(calls) == 1
        other = merged_of(anom_index[::-1].copy(), True)  # another anomalous merge
        plus, _ = friedel_positions(merged, other)
        assert len(calls) == 2
        assert np.array_equal(plus, _find_indices_reference(index, other.asu_index))
    finally:
        lookup.find_indices_of_sets = real


def test_column_bounds_equal_numpy_axis_reductions():
    from dials_vmerge.merging.lookup import column_bounds

    rng = np.random.default_rng(5)
    for dtype in (np.int32, np.int64):
        rows = rng.integers(-300, 200, size=(5000, 3)).astype(dtype)
        low, high = column_bounds(rows)
        assert low.dtype == high.dtype == np.int64
        assert np.array_equal(low, rows.min(axis=0)) and np.array_equal(high, rows.max(axis=0))
    with pytest.raises(TypeError):
        column_bounds(np.zeros((3, 3)))


def test_statistics_packed_keys_equal_the_concatenated_box():
    from dials_vmerge.merging.statistics import _packed

    rng = np.random.default_rng(6)
    hkl = rng.integers(-20, 31, size=(3000, 3)).astype(np.int32)
    for reference in (None, hkl[::5] * 2):
        source = np.concatenate([hkl, -hkl] if reference is None else [reference, -reference])
        lo = source.min(axis=0).astype(np.int64)
        size = source.max(axis=0).astype(np.int64) - lo + 1
        h = (hkl if reference is None else hkl).astype(np.int64) - lo
        expected = (h[:, 0] * size[1] + h[:, 1]) * size[2] + h[:, 2]
        assert np.array_equal(_packed(hkl, reference), expected)


@pytest.mark.parametrize("span_factor", [0.5, 1.0, 3.0])
def test_stable_key_order_equals_numpy_stable_argsort(span_factor):
    from dials_vmerge.merging.groups import _stable_key_order

    rng = np.random.default_rng(7)
    n = 20_000
    span = int(n * span_factor)
    keys = rng.integers(0, span, n).astype(np.int64)  # many ties: stability matters
    assert np.array_equal(_stable_key_order(keys, span), np.argsort(keys, kind="stable"))


def test_intensity_statistics_of_a_shell_mask_equals_its_positions_and_numpy():
    from types import SimpleNamespace

    from dials_vmerge.merging.statistics import ShellStatistics, _intensity_statistics

    rng = np.random.default_rng(8)
    n_groups = 5000
    prep = SimpleNamespace(
        n=rng.integers(1, 6, n_groups), group_d=rng.uniform(1.5, 20.0, n_groups),
        mean=rng.normal(100.0, 30.0, n_groups), merged_sigma=rng.uniform(-1.0, 10.0, n_groups),
        total=rng.uniform(50.0, 500.0, n_groups), abs_dev=rng.uniform(0.0, 40.0, n_groups),
        merger=None)
    complete = (np.linspace(1.4, 25.0, 9000), 1.0 / np.linspace(1.4, 25.0, 9000))
    mask = (prep.group_d > 3.0) & (prep.group_d < 4.0)
    by_mask, by_rows = ShellStatistics(d_max=0.0, d_min=0.0), ShellStatistics(d_max=0.0, d_min=0.0)
    assert _intensity_statistics(by_mask, prep, mask, None, complete)
    assert _intensity_statistics(by_rows, prep, np.flatnonzero(mask), None, complete)
    assert by_mask == by_rows
    # the masked numpy forms it replaced
    n, multi = prep.n[mask], prep.n[mask] > 1
    assert by_mask.n_obs == n.sum() and by_mask.n_uniq == mask.sum()
    assert by_mask.i_mean == float(prep.mean[mask].mean())
    assert by_mask.r_merge == float(prep.abs_dev[mask][multi].sum()) / float(
        prep.total[mask][multi].sum())
    positive = prep.merged_sigma[mask] > 0
    assert by_mask.i_over_sigma_mean == float(
        (prep.mean[mask][positive] / prep.merged_sigma[mask][positive]).mean())
    assert not _intensity_statistics(ShellStatistics(d_max=0.0, d_min=0.0), prep,
                                     np.zeros(n_groups, bool), None, complete)
