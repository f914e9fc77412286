"""The LBFGS round (scitbx.lbfgs under our stopping rule) on small least-squares targets with
independently known minima, and the import cost it is there to avoid."""

import subprocess
import sys

import numpy as np
import pytest

from dials_vmerge.scaling import minimisers


class LeastSquares:
    """phi = sum r^2 for residuals r(x) with Jacobian J(x); the target protocol of
    target.ScalingTarget (value_and_gradient, rmsd, n_par, n_equations)."""

    def __init__(self, residuals, jacobian, n_par, n_obs):
        self.residuals, self.jacobian = residuals, jacobian
        self.n_par, self.n_obs, self.n_equations = n_par, n_obs, n_obs
        self.evaluated_at = []

    def value_and_gradient(self, x):
        self.evaluated_at.append(np.array(x, dtype=float))
        r = self.residuals(x)
        return float(r @ r), 2.0 * self.jacobian(x).T @ r

    def rmsd(self, phi):
        return float(np.sqrt(phi / self.n_obs))


def linear_problem(noise=0.1, seed=3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(60, 4)) * [1.0, 3.0, 0.3, 10.0]  # unequal scales: not one step
    y = a @ np.array([1.5, -2.0, 0.7, 0.05]) + noise * rng.normal(size=60)
    return LeastSquares(lambda x: a @ x - y, lambda x: a, 4, 60), a, y


def decay_problem(seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 4.0, 400)
    y = 3.0 * np.exp(-1.3 * t) + 0.5 + rng.normal(0.0, 0.02, t.size)

    def residuals(x):
        return x[0] * np.exp(-x[1] * t) + x[2] - y

    def jacobian(x):
        e = np.exp(-x[1] * t)
        return np.stack([e, -x[0] * t * e, np.ones_like(t)], axis=1)

    return LeastSquares(residuals, jacobian, 3, t.size), t, y


def relative_changes(history):
    h = np.asarray(history)
    return np.abs(np.diff(h)) / h[:-1]


def test_linear_least_squares_reaches_the_normal_equations_solution():
    target, a, y = linear_problem()
    x_ref = np.linalg.lstsq(a, y, rcond=None)[0]
    result = minimisers.lbfgs(target, np.zeros(4), rmsd_tolerance=1e-12)
    # at a 1e-12 relative RMSD change phi is within ~1e-12 relative of its minimum, which
    # puts x within ~1e-6 of it on this conditioning (x_ref itself is exact to rounding)
    assert np.allclose(result.x, x_ref, atol=1e-5)
    assert result.phi == pytest.approx(float(np.sum((a @ x_ref - y) ** 2)), rel=1e-9)
    assert result.converged


def test_rmsd_stopping_rule_and_history():
    target, _, _ = decay_problem()
    tol = 1e-4
    result = minimisers.lbfgs(target, [1.0, 0.5, 0.0], rmsd_tolerance=tol)
    changes = relative_changes(result.rmsd_history)
    assert result.message == "RMSD converged" and result.converged
    # one entry for the start and one per iteration; only the last step is below tolerance
    assert len(result.rmsd_history) == result.n_iterations + 1
    assert changes[-1] < tol and np.all(changes[:-1] >= tol)
    assert result.rmsd == result.rmsd_history[-1]
    # the models are left at the returned parameters (the last evaluation was there)
    assert np.array_equal(target.evaluated_at[-1], result.x)
    assert result.phi == target.value_and_gradient(result.x)[0]


def test_two_small_steps_in_a_row():
    target, _, _ = decay_problem()
    tol = 1e-4
    result = minimisers.lbfgs(target, [1.0, 0.5, 0.0], rmsd_tolerance=tol, small_steps_to_stop=2)
    changes = relative_changes(result.rmsd_history)
    assert result.message == "RMSD converged"
    assert changes[-1] < tol and changes[-2] < tol
    assert not np.any((changes[:-2] < tol) & (changes[1:-1] < tol))


def test_nonlinear_minimum_agrees_with_gauss_newton_solution():
    """Reference: our Levenberg-Marquardt to a 1e-12 RMSD change, i.e. the least-squares
    minimum; LBFGS at the same tolerance reaches it to 1e-6 in every parameter."""
    target, _, _ = decay_problem()
    x0 = [1.0, 0.5, 0.0]
    result = minimisers.lbfgs(target, x0, rmsd_tolerance=1e-12)
    reference = minimisers.levenberg_marquardt(NormalEquations(target), x0,
                                               rmsd_tolerance=1e-12)
    assert np.allclose(result.x, reference.x, atol=1e-6)
    assert np.allclose(result.x, [3.0, 1.3, 0.5], atol=0.03)  # the simulated truth


class NormalEquations(LeastSquares):
    def __init__(self, target):
        super().__init__(target.residuals, target.jacobian, target.n_par, target.n_obs)

    def normal_equations(self, x):
        r, j = self.residuals(x), self.jacobian(x)
        return float(r @ r), j.T @ r, j.T @ j


def test_max_iterations():
    target, _, _ = decay_problem()
    result = minimisers.lbfgs(target, [1.0, 0.5, 0.0], max_iterations=3, rmsd_tolerance=1e-12)
    assert result.n_iterations == 3
    assert result.message == "max iterations" and not result.converged
    assert len(result.rmsd_history) == 4


def test_gradient_test_at_an_exact_fit():
    # a zero-residual fit: the RMSD keeps halving (large relative changes), so only the
    # gradient test |g| <= 1e-5 max(1, |x|) can stop it
    target, a, _ = linear_problem(noise=0.0)
    result = minimisers.lbfgs(target, np.zeros(4), rmsd_tolerance=1e-4)
    assert result.message == "gradient test" and result.converged
    _, grad = target.value_and_gradient(result.x)
    assert np.linalg.norm(grad) <= 1e-5 * max(1.0, np.linalg.norm(result.x))
    assert np.allclose(result.x, [1.5, -2.0, 0.7, 0.05], atol=1e-5)


def test_start_at_the_minimum_and_no_parameters():
    target, a, y = linear_problem(noise=0.0)
    result = minimisers.lbfgs(target, [1.5, -2.0, 0.7, 0.05])
    assert (result.n_iterations, result.message) == (0, "gradient test")
    empty = LeastSquares(lambda x: np.ones(3), lambda x: np.zeros((3, 0)), 0, 3)
    result = minimisers.lbfgs(empty, np.zeros(0))
    assert (result.n_iterations, result.message, result.phi) == (0, "no free parameters", 3.0)


def test_line_search_failure_returns_the_best_point():
    """A gradient of the wrong sign makes every search direction an ascent direction:
    scitbx reports it, and the round ends at the best point seen instead of raising."""
    target, _, _ = decay_problem()
    wrong = LeastSquares(target.residuals, lambda x: -target.jacobian(x), 3, target.n_obs)
    x0 = np.array([1.0, 0.5, 0.0])
    phi0 = wrong.value_and_gradient(x0)[0]
    result = minimisers.lbfgs(wrong, x0)
    assert not result.converged
    assert "lbfgs error" in result.message
    assert result.phi <= phi0
    assert result.phi == wrong.value_and_gradient(result.x)[0]


def test_scaling_imports_neither_scipy_optimize_nor_scipy_stats():
    # together ~45 MB of RSS for every run (see minimisers and error_model)
    code = ("import dials_vmerge.scaling.algorithm, sys; "
            "print([m for m in sys.modules if m.startswith(('scipy.optimize', 'scipy.stats'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
