"""Minimisers for the scaling target (dials-scaling.md 5.4) and parameter ESDs (5.7).

Both take a target with value_and_gradient(x), normal_equations(x), rmsd(phi) and
n_equations / n_par (see target.ScalingTarget).

LBFGS: scipy's L-BFGS-B with memory 5. It stops, like the DIALS refinery, when the relative
RMSD change between iterations falls below rmsd_tolerance, on the traditional gradient test
|grad| <= 1e-5 max(1, |x|), or at max_iterations.

Levenberg-Marquardt: normal equations (N + mu I) dx = -b with mu0 = 1e-3 max(diag N);
accepted steps (rho > 0) scale mu by max(1/3, 1 - (2 rho - 1)^3), rejected ones by nu
(nu doubling, giving up at nu >= 8192). Stops on the RMSD test or after max_iterations
(100 when None). The covariance is reduced chi^2 (N + mu I)^-1 from the last solve, with
reduced chi^2 = phi / (n_equations - n_par), restraint equations counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

GRADIENT_EPS = 1e-5
LEVMAR_DEFAULT_MAX_ITERATIONS = 100
LBFGS_DEFAULT_MAX_ITERATIONS = 1000


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


class _Stop(Exception):
    pass


def lbfgs(target, x0, max_iterations=None, rmsd_tolerance=1e-4, small_steps_to_stop=1):
    """LBFGS with DIALS's stopping rule: stop once the relative RMSD change of a step is below
    rmsd_tolerance (`small_steps_to_stop` such steps in a row; DIALS uses 1)."""
    x0 = np.asarray(x0, dtype=np.float64)
    if target.n_par == 0:
        phi, _ = target.value_and_gradient(x0)
        return MinimisationResult(x0, phi, target.rmsd(phi), 0, True, "no free parameters")
    cache = {}

    def fun(x):
        phi, grad = target.value_and_gradient(x)
        cache["x"], cache["phi"], cache["grad"] = x.copy(), phi, grad.copy()
        return phi, grad

    history = []
    state = {"message": "", "converged": False}
    phi0, grad0 = fun(x0)
    history.append(target.rmsd(phi0))
    if np.linalg.norm(grad0) <= GRADIENT_EPS * max(1.0, np.linalg.norm(x0)):
        return MinimisationResult(x0, phi0, history[0], 0, True, "gradient test", None, history)

    def callback(intermediate_result):
        x = intermediate_result.x
        phi = float(intermediate_result.fun)
        rmsd = target.rmsd(phi)
        previous = history[-1]
        history.append(rmsd)
        small = previous > 0 and abs(rmsd - previous) / previous < rmsd_tolerance
        state["small_steps"] = state.get("small_steps", 0) + 1 if small else 0
        if state["small_steps"] >= small_steps_to_stop:
            state["message"], state["converged"] = "RMSD converged", True
            raise StopIteration
        if "x" in cache and np.array_equal(cache["x"], x):
            if np.linalg.norm(cache["grad"]) <= GRADIENT_EPS * max(1.0, np.linalg.norm(x)):
                state["message"], state["converged"] = "gradient test", True
                raise StopIteration

    maxiter = max_iterations if max_iterations else LBFGS_DEFAULT_MAX_ITERATIONS
    result = minimize(fun, x0, jac=True, method="L-BFGS-B", callback=callback,
                      options={"maxcor": 5, "maxiter": maxiter, "ftol": 1e-15, "gtol": 0.0,
                               "maxls": 20})
    x = np.asarray(result.x, dtype=np.float64)
    phi, _ = target.value_and_gradient(x)  # leave the models at the returned parameters
    message = state["message"] or str(result.message)
    converged = state["converged"] or bool(result.success)
    return MinimisationResult(x, phi, target.rmsd(phi), int(result.nit), converged, message,
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
