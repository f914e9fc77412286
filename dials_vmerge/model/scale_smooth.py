"""Smooth scale along the rotation (DIALS SmoothScaleComponent1D): g = S(x; p), p initially 1."""

from __future__ import annotations

import numpy as np

from .component import Component, take_rows
from .smoother import Smoother1D, ell_values


class ScaleSmooth1D(Component):
    name = "scale"
    null_parameter_value = 1.0
    n_deriv_columns = 3

    def __init__(self, parameters, est_standard_devs=None):
        super().__init__(parameters, est_standard_devs)
        self._weights = np.zeros((0, 3))
        self._index = np.zeros((0, 3), dtype=np.int32)

    def configure(self, normalised_x) -> None:
        """`normalised_x` = z_obs * s_norm_fac for the observations this component serves."""
        smoother = Smoother1D(normalised_x, self.n_parameters)
        self._weights, self._index = smoother.weights, smoother.index
        self.n_configured = self._weights.shape[0]

    def evaluate(self, parameters=None, rows=None):
        p = self._params(parameters)
        weights = np.ascontiguousarray(take_rows(self._weights, rows))
        index = np.ascontiguousarray(take_rows(self._index, rows))
        return ell_values(weights, index, p), weights, index

    def values(self, parameters=None, rows=None):
        """g without copying the derivative table."""
        p = self._params(parameters)
        return ell_values(np.ascontiguousarray(take_rows(self._weights, rows)),
                          np.ascontiguousarray(take_rows(self._index, rows)), p)

    def smoother_rows(self, rows):
        """(weights (n, 3), first parameter index (n,)) for the fused pass: a 1D smoother's
        parameters are consecutive from the first (zero-weight padding after them)."""
        return self._weights[rows], self._index[rows, 0]
