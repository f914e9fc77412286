"""Smooth B-factor along the rotation (DIALS SmoothBScaleComponent1D).

B = S(x; q) with q initially 0, and g = exp(B / (2 d^2)) on the inverse scale, so
dg/dq_i = g * (dB/dq_i) / (2 d^2). Restrained towards 0 by sum w q_i^2 (decay_restraint).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..kernels.size_dispatch import parallel_when_large

from .component import Component, take_rows
from .smoother import Smoother1D


@parallel_when_large
def b_factor_values_and_derivatives(weights, index, parameters, d):
    """g = exp(B/(2d^2)) with B the smoothed value, and dg/dq in the same ELL layout."""
    n, k = weights.shape
    values = np.empty(n, dtype=np.float64)
    derivs = np.empty((n, k), dtype=np.float64)
    for r in prange(n):
        b = 0.0
        for j in range(k):
            b += weights[r, j] * parameters[index[r, j]]
        prefactor = 1.0 / (2.0 * d[r] * d[r])
        g = math.exp(b * prefactor)
        values[r] = g
        for j in range(k):
            derivs[r, j] = weights[r, j] * g * prefactor
    return values, derivs


@parallel_when_large
def b_factor_values(weights, index, parameters, d):
    """g = exp(B/(2d^2)) alone (same operations as b_factor_values_and_derivatives)."""
    n, k = weights.shape
    values = np.empty(n, dtype=np.float64)
    for r in prange(n):
        b = 0.0
        for j in range(k):
            b += weights[r, j] * parameters[index[r, j]]
        prefactor = 1.0 / (2.0 * d[r] * d[r])
        values[r] = math.exp(b * prefactor)
    return values


class DecaySmooth1D(Component):
    name = "decay"
    null_parameter_value = 0.0
    n_deriv_columns = 3

    def __init__(self, parameters, est_standard_devs=None, restraint_weight=0.1):
        super().__init__(parameters, est_standard_devs)
        self.set_restraint(restraint_weight)
        self._smoother = Smoother1D(np.zeros(0), max(self.n_parameters, 2))
        self._d = np.zeros(0)

    def set_restraint(self, weight: float) -> None:
        self.restraint_weights = np.full(self.n_parameters, float(weight))

    def configure(self, normalised_x, d) -> None:
        """`normalised_x` = z_obs * d_norm_fac; `d` the resolution (Angstrom) per observation."""
        self._smoother = Smoother1D(normalised_x, self.n_parameters)
        self._d = np.ascontiguousarray(d, dtype=np.float64)
        self.n_configured = self._smoother.n_rows

    def evaluate(self, parameters=None, rows=None):
        p = self._params(parameters)
        weights, index = self._smoother.ell(rows)
        d = np.ascontiguousarray(take_rows(self._d, rows))
        values, derivs = b_factor_values_and_derivatives(weights, index, p, d)
        return values, derivs, index

    def values(self, parameters=None, rows=None):
        """g without a derivative table of all rows."""
        p = self._params(parameters)
        return self._smoother.map_blocks(
            lambda weights, index, block: b_factor_values(
                weights, index, p, np.ascontiguousarray(self._d[block])), rows)

    def smoother_rows(self, rows):
        """(weights / (2 d^2) (n, 3), first parameter index (n,)) for the fused pass, where
        g = exp(sum_j weight_j q_j) and dg/dq_j = g weight_j."""
        d = self._d[rows]
        weights, index = self._smoother.ell(rows)
        weights *= (1.0 / (2.0 * d * d))[:, None]
        return weights, np.ascontiguousarray(index[:, 0])
