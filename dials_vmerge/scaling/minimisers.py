"""Minimisers for the scaling target (dials-scaling.md 5.4) and parameter ESDs (5.7).

Both take a target with value_and_gradient(x), normal_equations(x), rmsd(phi) and
n_equations / n_par (see target.ScalingTarget).

LBFGS: scitbx.lbfgs (memory 5, More-Thuente line search with ftol 1e-4, gtol 0.9, first step
1/|grad|), the minimiser dials.scale drives with its default core parameters. It stops, like the
DIALS refinery, when the relative RMSD change between iterations falls below rmsd_tolerance, on
the traditional gradient test |grad| <= 1e-5 max(1, |x|), or at max_iterations; a failed line
search ends the round at the best point seen, with scitbx's message.

Levenberg-Marquardt: normal equations (N + mu I) dx = -b with mu0 = 1e-3 max(diag N);
accepted steps (rho > 0) scale mu by max(1/3, 1 - (2 rho - 1)^3), rejected ones by nu
(nu doubling, giving up at nu >= 8192). Stops on the RMSD test or after max_iterations
(100 when None). The covariance is reduced chi^2 (N + mu I)^-1 from the last solve, with
reduced chi^2 = phi / (n_equations - n_par), restraint equations counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scitbx.lbfgs
from scitbx.array_family import flex

GRADIENT_EPS = 1e-5
LEVMAR_DEFAULT_MAX_ITERATIONS = 100
LBFGS_DEFAULT_MAX_ITERATIONS = 1000
LBFGS_MEMORY = 5  # scitbx.lbfgs core_parameters default, as dials.scale runs it


@dataclass
class MinimisationResult:
    x: np.ndarray
    phi: float
    rmsd: float
    n_iterations: int
    converged: bool
    message: str = ""
    covariance: np.ndarray | None = None
    rmsd_history: list = field(default_factory=list)

    @property
    def esds(self):
        if self.covariance is None:
            return None
        return np.sqrt(np.clip(np.diag(self.covariance), 0.0, None))


# scitbx's line-search failures ("lbfgs error: ...") end the round at the best point seen
# instead of raising; errors from the target itself still raise.
_KEEP_GOING = dict(ignore_line_search_failed_rounding_errors=True,
                   ignore_line_search_failed_step_at_lower_bound=True,
                   ignore_line_search_failed_step_at_upper_bound=True,
                   ignore_line_search_failed_maxfev=True,
                   ignore_line_search_failed_xtol=True,
                   ignore_search_direction_not_descent=True)


class _LbfgsEvaluator:
    """The target_evaluator protocol of scitbx.lbfgs.run (x, compute_functional_and_gradients,
    callback_after_step) around a ScalingTarget; the callback applies our stopping rule."""

    def __init__(self, target, x0, max_iterations, rmsd_tolerance, small_steps_to_stop,
                 history):
        self.target = target
        self.x = flex.double(x0)
        self.max_iterations = max_iterations
        self.rmsd_tolerance = rmsd_tolerance
        self.small_steps_to_stop = small_steps_to_stop
        self.history = history
        self.n_steps = 0
        self.small_steps = 0
        self.message = ""
        self.converged = False
        self.last_x = None

    def compute_functional_and_gradients(self):
        x = self.x.as_numpy_array()
        phi, grad = self.target.value_and_gradient(x)
        self.last_x, self.phi, self.grad = x, float(phi), np.asarray(grad, dtype=np.float64)
        return self.phi, flex.double(self.grad)

    def callback_after_step(self, minimizer):
        # scitbx calls this once per completed iteration, the target last evaluated at the
        # accepted point, so phi and grad here belong to self.x.
        self.n_steps += 1
        rmsd = self.target.rmsd(self.phi)
        previous = self.history[-1]
        self.history.append(rmsd)
        small = previous > 0 and abs(rmsd - previous) / previous < self.rmsd_tolerance
        self.small_steps = self.small_steps + 1 if small else 0
        if self.small_steps >= self.small_steps_to_stop:
            self.message, self.converged = "RMSD converged", True
            return True
        if _gradient_test(self.last_x, self.grad):
            self.message, self.converged = "gradient test", True
            return True
        if self.n_steps >= self.max_iterations:
            self.message = "max iterations"
            return True
        return False


def _gradient_test(x, grad):
    return np.linalg.norm(grad) <= GRADIENT_EPS * max(1.0, np.linalg.norm(x))


def lbfgs(target, x0, max_iterations=None, rmsd_tolerance=1e-4, small_steps_to_stop=1):
    """LBFGS with DIALS's stopping rule: stop once the relative RMSD change of a step is below
    rmsd_tolerance (`small_steps_to_stop` such steps in a row; DIALS uses 1)."""
    x0 = np.asarray(x0, dtype=np.float64)
    if target.n_par == 0:
        phi, _ = target.value_and_gradient(x0)
        return MinimisationResult(x0, phi, target.rmsd(phi), 0, True, "no free parameters")
    phi0, grad0 = target.value_and_gradient(x0)
    history = [target.rmsd(phi0)]
    if _gradient_test(x0, grad0):
        return MinimisationResult(x0, phi0, history[0], 0, True, "gradient test", None, history)
    maxiter = max_iterations if max_iterations else LBFGS_DEFAULT_MAX_ITERATIONS
    evaluator = _LbfgsEvaluator(target, x0, maxiter, rmsd_tolerance, small_steps_to_stop,
                                history)
    # The callback makes every stop but a line-search failure; scitbx's own max_iterations
    # is a backstop one beyond ours.
    minimizer = scitbx.lbfgs.run(
        target_evaluator=evaluator,
        core_params=scitbx.lbfgs.core_parameters(m=LBFGS_MEMORY),
        termination_params=scitbx.lbfgs.termination_parameters(
            traditional_convergence_test_eps=GRADIENT_EPS, max_iterations=maxiter + 1),
        exception_handling_params=scitbx.lbfgs.exception_handling_parameters(**_KEEP_GOING))
    x = evaluator.x.as_numpy_array()
    if np.array_equal(x, evaluator.last_x):
        phi = evaluator.phi
    else:  # a failed line search restored the best point: leave the models there
        phi, _ = target.value_and_gradient(x)
    message, converged = evaluator.message, evaluator.converged
    if minimizer.error:
        message = str(minimizer.error)
    elif not message:  # scitbx stopped by itself: its gradient test (in C++ arithmetic)
        converged = _gradient_test(evaluator.last_x, evaluator.grad)
        message = "gradient test" if converged else "stopped by scitbx.lbfgs"
    return MinimisationResult(x, phi, target.rmsd(phi), evaluator.n_steps, converged, message,
                              None, history)


def levenberg_marquardt(target, x0, max_iterations=None, rmsd_tolerance=1e-4):
    x = np.asarray(x0, dtype=np.float64).copy()
    n_par = target.n_par
    max_iterations = max_iterations or LEVMAR_DEFAULT_MAX_ITERATIONS
    phi, rhs, normal = target.normal_equations(x)
    history = [target.rmsd(phi)]
    if n_par == 0:
        return MinimisationResult(x, phi, history[0], 0, True, "no free parameters",
                                  np.zeros((0, 0)), history)
    mu = 1e-3 * float(np.max(np.diag(normal)))
    nu = 2.0
    damped = normal + mu * np.eye(n_par)
    converged = False
    message = "max iterations"
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        accepted = False
        while True:
            damped = normal + mu * np.eye(n_par)
            try:
                step = -_cholesky_solve(damped, rhs)
            except np.linalg.LinAlgError:
                message = "normal matrix not positive definite"
                break
            predicted = float(step @ (mu * step - rhs))  # = phi(x) - model(x + step)
            new_phi, new_grad = target.value_and_gradient(x + step)
            actual = phi - new_phi
            rho = actual / predicted if predicted > 0 else -1.0
            if rho > 0:
                x = x + step
                mu *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
                nu = 2.0
                accepted = True
                break
            mu *= nu
            nu *= 2.0
            if nu >= 8192:
                message = "step rejected (nu limit)"
                break
        if not accepted:
            target.value_and_gradient(x)  # models back at the best parameters
            break
        previous = history[-1]
        phi_new, rhs_new, normal_new = target.normal_equations(x)
        history.append(target.rmsd(phi_new))
        phi, rhs, normal = phi_new, rhs_new, normal_new
        if previous > 0 and abs(history[-1] - previous) / previous < rmsd_tolerance:
            converged, message = True, "RMSD converged"
            break
    covariance = reduced_chi_squared(phi, target.n_equations, n_par) * _inverse(damped)
    return MinimisationResult(x, phi, history[-1], iterations, converged, message, covariance,
                              history)


def reduced_chi_squared(phi, n_equations, n_par):
    dof = n_equations - n_par
    return phi / dof if dof > 0 else 0.0


def _cholesky_solve(matrix, rhs):
    factor = np.linalg.cholesky(matrix)
    y = np.linalg.solve(factor, rhs)
    return np.linalg.solve(factor.T, y)


def _inverse(matrix):
    try:
        factor = np.linalg.cholesky(matrix)
        inv_factor = np.linalg.inv(factor)
        return inv_factor.T @ inv_factor
    except np.linalg.LinAlgError:
        return np.linalg.pinv(matrix)
