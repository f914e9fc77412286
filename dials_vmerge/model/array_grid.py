"""Array-model grids (DIALS SmoothScaleComponent2D/3D): g is the smoothed value itself.

decay: 2D over (resolution, time); absorption: 3D over (detector x, detector y, time);
modulation: 2D over (detector x, detector y). Parameters initially 1, stored x fastest.
"""

from __future__ import annotations

import numpy as np

from .component import Component
from .smoother import Smoother2D, Smoother3D, ell_values


class _Grid(Component):
    null_parameter_value = 1.0

    def __init__(self, parameters, shape, est_standard_devs=None):
        super().__init__(parameters, est_standard_devs)
        self.shape = tuple(int(s) for s in shape)
        if int(np.prod(self.shape)) != self.n_parameters:
            raise ValueError(
                f"{self.name}: {self.n_parameters} parameters do not fill a grid of {self.shape}"
            )
        self._smoother = None

    def replace_grid(self, parameters, shape) -> None:
        self.replace_parameters(parameters)
        self.shape = tuple(int(s) for s in shape)
        if int(np.prod(self.shape)) != self.n_parameters:
            raise ValueError(f"{self.name}: parameters do not fill a grid of {self.shape}")

    def evaluate(self, parameters=None, rows=None):
        p = self._params(parameters)
        if self._smoother is None:
            return np.zeros(0), np.zeros((0, self.n_deriv_columns)), np.zeros(
                (0, self.n_deriv_columns), dtype=np.int32)
        weights, index = self._smoother.ell(rows)
        return ell_values(weights, index, p), weights, index

    def values(self, parameters=None, rows=None):
        """g without a derivative table of all rows."""
        if self._smoother is None:
            return np.zeros(0)
        return self._smoother.value(self._params(parameters), rows)


class SmoothGrid2D(_Grid):
    name = "decay"
    n_deriv_columns = 9

    def __init__(self, parameters, shape, est_standard_devs=None, name="decay"):
        self.name = name
        super().__init__(parameters, shape, est_standard_devs)

    def configure(self, normalised_x, normalised_y) -> None:
        self._smoother = Smoother2D(normalised_x, normalised_y, *self.shape)
        self.n_configured = self._smoother.n_rows


class SmoothGrid3D(_Grid):
    name = "absorption"
    n_deriv_columns = 27

    def __init__(self, parameters, shape, est_standard_devs=None, name="absorption"):
        self.name = name
        super().__init__(parameters, shape, est_standard_devs)

    def configure(self, normalised_x, normalised_y, normalised_z) -> None:
        self._smoother = Smoother3D(normalised_x, normalised_y, normalised_z, *self.shape)
        self.n_configured = self._smoother.n_rows
