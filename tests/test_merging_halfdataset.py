"""Half-dataset cross-validation: a hand-computed example and seeded reproducibility."""

import math

import numpy as np
import pytest

from merging_simulation import simulate

from cctbx import sgtbx, uctbx

from dials_vmerge.merging.api import HalfDatasetMerger
from dials_vmerge.merging.halfdataset import half_dataset_statistics

HKL = np.array([[1, 2, 3], [2, 1, 1], [1, 1, 4], [3, 2, 1], [2, 3, 5]])
X = np.array([10.0, 20.0, 30.0, 40.0, 50.0])  # mean I in batch 1
Y = np.array([12.0, 18.0, 45.0, 39.0, 60.0])  # mean I in batch 2
D1 = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # I(+) - I(-) in batch 1
D2 = np.array([2.0, 1.0, 4.0, 3.0, 6.0])  # I(+) - I(-) in batch 2


def hand_example():
    """Each reflection: I(+) and I(-) once in batch 1 and once in batch 2, sigma 1."""
    hkl = np.concatenate([HKL, -HKL, HKL, -HKL])
    intensity = np.concatenate([X + D1 / 2, X - D1 / 2, Y + D2 / 2, Y - D2 / 2])
    batch = np.repeat([1, 1, 2, 2], len(HKL))
    return hkl, intensity, np.ones(len(hkl)), batch


def test_hand_computed_two_batches():
    hkl, intensity, sigma, batch = hand_example()
    result = half_dataset_statistics(
        hkl, intensity, sigma, batch, sgtbx.space_group_info("P 1").group(),
        uctbx.unit_cell((30, 40, 50, 90, 90, 90)), HalfDatasetMerger("classical"),
        repeats=3, seed=11, n_bins=1)
    # With two batches every split is {1} | {2}, so every repeat is the same: SD 0.
    # CC1/2 Pearson: x deviations -20,-10,0,10,20 (sum sq 1000); y mean 34.8, deviations
    # -22.8,-16.8,10.2,4.2,25.2 (sum sq 1558.8); cross sum 1170.
    half = result["cc_half"]["overall"]
    assert half["n"] == 5
    assert half["pearson_mean"] == pytest.approx(1170 / math.sqrt(1000 * 1558.8), rel=1e-12)
    # Spearman: ranks of y are 1,2,4,3,5, sum of squared rank differences 2: 1 - 6*2/(5*24)
    assert half["spearman_mean"] == pytest.approx(0.9, rel=1e-12)
    # (swapping the halves changes the last bit of the Pearson sum only)
    assert half["pearson_sd"] == pytest.approx(0.0, abs=1e-12)
    assert half["spearman_sd"] == pytest.approx(0.0, abs=1e-12)
    # CCanom: d1 deviations -2..2 (sum sq 10); d2 mean 3.2, deviations -1.2,-2.2,0.8,-0.2,
    # 2.8 (sum sq 14.8); cross sum 10. Spearman: ranks 2,1,4,3,5 -> 1 - 6*4/120 = 0.8
    anom = result["cc_anom"]["overall"]
    assert anom["n"] == 5
    assert anom["pearson_mean"] == pytest.approx(10 / math.sqrt(10 * 14.8), rel=1e-12)
    assert anom["spearman_mean"] == pytest.approx(0.8, rel=1e-12)
    assert result["cc_half"]["shells"][0]["pearson_mean"] == half["pearson_mean"]


@pytest.mark.parametrize("method", ["classical", "robust", "variational"])
def test_seeded_reproducibility(method):
    sim = simulate(seed=2, d_min=3.0, n_batches=40)

    def run(seed):
        return half_dataset_statistics(
            sim.miller_index, sim.intensity, sim.sigma, sim.batch, sim.space_group,
            sim.unit_cell, HalfDatasetMerger(method), repeats=4, seed=seed, n_bins=5)

    first, again, other = run(3), run(3), run(4)
    assert first == again
    assert first != other
    overall = first["cc_half"]["overall"]
    assert 0.9 < overall["pearson_mean"] <= 1.0 and overall["pearson_sd"] > 0
