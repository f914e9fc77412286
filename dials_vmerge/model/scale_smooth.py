"""Smooth scale along the rotation (DIALS SmoothScaleComponent1D): g = S(x; p), p initially 1."""

from __future__ import annotations

import numpy as np

from .component import Component
from .smoother import Smoother1D, ell_values


class ScaleSmooth1D(Component):
    name = "scale"
    null_parameter_value = 1.0
    n_deriv_columns = 3

    def __init__(self, parameters, est_standard_devs=None):
        super().__init__(parameters, est_standard_devs)
        self._smoother = Smoother1D(np.zeros(0), max(self.n_parameters, 2))

    def configure(self, normalised_x) -> None:
        """`normalised_x` = z_obs * s_norm_fac for the observations this component serves."""
        self._smoother = Smoother1D(normalised_x, self.n_parameters)
        self.n_configured = self._smoother.n_rows

    def evaluate(self, parameters=None, rows=None):
        p = self._params(parameters)
        weights, index = self._smoother.ell(rows)
        return ell_values(weights, index, p), weights, index

    def values(self, parameters=None, rows=None):
        """g without a derivative table of all rows."""
        return self._smoother.value(self._params(parameters), rows)

    def smoother_rows(self, rows):
        """(weights (n, 3), first parameter index (n,)) for the fused pass: a 1D smoother's
        parameters are consecutive from the first (zero-weight padding after them)."""
        weights, index = self._smoother.ell(rows)
        return weights, np.ascontiguousarray(index[:, 0])
