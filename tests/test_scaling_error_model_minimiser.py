"""The error model's b-step (bracket + Brent search) and normal quantiles without
scipy.optimize / scipy.stats, checked against those scipy routines as independent references."""

import numpy as np
import pytest
from scipy.optimize import minimize, minimize_scalar
from scipy.stats import norm

from dials_vmerge.scaling import error_model as em

from test_scaling_outliers_errormodel import _synthetic_error_model_data


@pytest.fixture(scope="module", params=[(1.6, 0.04, 11), (1.0, 0.0, 12), (1.0, 0.1, 3)])
def data(request):
    a_true, b_true, seed = request.param
    hkl, intensity, variance, g = _synthetic_error_model_data(a_true, b_true, seed)
    table = em.filter_for_error_model([hkl], [intensity], [variance], [g])
    return em.error_model_data(table), b_true


def test_quantiles_equal_scipy_stats_norm():
    n, lo, hi = 12345, 820, 11525
    em._QUANTILE_CACHE.clear()
    assert np.array_equal(em._normal_quantiles(n, lo, hi),
                          norm.ppf((np.arange(lo, hi) + 0.5) / n))
    assert em.ndtr(1.5) == norm.cdf(1.5) and em.ndtr(-1.5) == norm.cdf(-1.5)


@pytest.mark.parametrize("f, x_min, curvature, lo, hi", [
    (lambda x: (x - 0.0371) ** 2, 0.0371, 2.0, 0.0, 1.0),
    (lambda x: (x - 0.0371) ** 2 + 1.0, 0.0371, 2.0, 0.0, 1.0),
    (lambda x: x ** 4 - x, 0.25 ** (1.0 / 3.0), 3.0 * 0.25 ** (-1.0 / 3.0), 0.0, 3.0),
    (lambda x: np.cosh(x - 0.3), 0.3, 1.0, -2.0, 5.0),
    (lambda x: x * x, 0.0, 2.0, 0.0, 0.5),  # minimum on the lower end of the interval
])
def test_brent_finds_hand_computed_minima(f, x_min, curvature, lo, hi):
    x0 = lo + 0.8 * (hi - lo)
    x = em._brent_minimise(f, lo, hi, x0, f(x0))
    # The search's accuracy B_XATOL + sqrt(eps)|x|, plus what f itself can resolve: within
    # sqrt(2 eps |f_min| / f'') of the minimum f changes by less than one rounding of
    # f_min (1.5e-8 for the "+ 1" case). A factor 3 of slack for where the last step lands.
    resolution = np.sqrt(2.0 * np.finfo(float).eps * abs(f(x_min)) / curvature)
    assert abs(x - x_min) <= 3 * (em.B_XATOL + em._SQRT_EPS * abs(x_min) + resolution)


@pytest.mark.parametrize("x_min, x0", [(0.04, 0.02), (0.04, 0.0), (0.04, 0.5), (0.0, 0.3),
                                       (0.0, 0.0), (3.0, 0.01)])
def test_bracket_contains_the_minimum(x_min, x0):
    def f(x):
        return (x - x_min) ** 2
    lo, x, fx, hi = em._bracket_minimum(f, x0)
    assert 0.0 <= lo <= x < hi and fx == f(x)
    assert lo <= x_min <= hi
    assert fx <= f(hi) and (lo == 0.0 or fx <= f(lo))


def test_b_step_is_the_minimum_of_the_functional(data):
    data, _ = data
    for a in (0.9, 1.0, 1.4):
        # independent reference: scipy's bounded Brent, far tighter than ours
        ref = minimize_scalar(lambda b: em.b_functional(data, a, b), bounds=(0.0, 1.0),
                              method="bounded", options={"xatol": 1e-13}).x
        for b0 in (0.0, 0.02, 0.2, -0.05):
            b = em.b_step(data, a, b0)
            assert b >= 0.0
            # measured: |b - ref| <= 9e-10; the functional is flat near its minimum (and
            # only as precise as its float sums), so 1e-8 is the honest bound
            assert b == pytest.approx(ref, abs=1e-8)
            assert em.b_functional(data, a, b) <= em.b_functional(data, a, ref) + 1e-12


def test_b_step_agrees_with_the_previous_scipy_lbfgs_step(data):
    """What b_step did before (L-BFGS-B with finite-difference gradients, from b): the same
    minimum to that minimiser's own accuracy. Measured here: differences <= 6e-9, all on
    L-BFGS-B's side (it stops on a relative decrease of 2e-9 in f); where the minimum is
    b = 0 it stopped up to 6.5e-7 away (a = 0.83, b from 0.2), hence 1e-6."""
    data, _ = data
    for a in (1.0, 1.4):
        for b0 in (0.02, 0.2):
            old = minimize(lambda p: em.b_functional(data, a, float(p[0])), x0=[b0],
                           method="L-BFGS-B", options={"maxiter": 100})
            assert em.b_step(data, a, b0) == pytest.approx(abs(float(old.x[0])), abs=1e-6)


def test_refined_error_model_recovers_b(data):
    data, b_true = data
    a, b, _ = em.refine_individual(data)
    if b_true == 0.0:
        assert b < 1e-6  # the minimum sits on b = 0 and the search ends there
    else:
        assert b == pytest.approx(b_true, rel=0.25)
