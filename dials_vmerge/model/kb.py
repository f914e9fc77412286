"""The two one-parameter components of the KB model (DIALS SingleScaleFactor/SingleBScaleFactor).

scale: g = K (initially 1), dg/dK = 1.  decay: g = exp(B / (2 d^2)) (B initially 0),
dg/dB = g / (2 d^2). No restraints.
"""

from __future__ import annotations

import numpy as np

from .component import Component, take_rows


class SingleScale(Component):
    name = "scale"
    null_parameter_value = 1.0
    n_deriv_columns = 1

    def __init__(self, parameters=(1.0,), est_standard_devs=None):
        super().__init__(parameters, est_standard_devs)
        if self.n_parameters != 1:
            raise ValueError("a single scale factor has exactly one parameter")

    def configure(self, n_observations: int) -> None:
        self.n_configured = int(n_observations)

    def evaluate(self, parameters=None, rows=None):
        p = self._params(parameters)
        n = self.n_configured if rows is None else len(rows)
        return (
            np.full(n, p[0]),
            np.ones((n, 1)),
            np.zeros((n, 1), dtype=np.int32),
        )


class SingleB(Component):
    name = "decay"
    null_parameter_value = 0.0
    n_deriv_columns = 1

    def __init__(self, parameters=(0.0,), est_standard_devs=None):
        super().__init__(parameters, est_standard_devs)
        if self.n_parameters != 1:
            raise ValueError("a single B factor has exactly one parameter")
        self._d = np.zeros(0)

    def configure(self, d) -> None:
        self._d = np.ascontiguousarray(d, dtype=np.float64)
        self.n_configured = self._d.size

    def evaluate(self, parameters=None, rows=None):
        p = self._params(parameters)
        prefactor = 1.0 / (2.0 * take_rows(self._d, rows) ** 2)
        values = np.exp(p[0] * prefactor)
        n = values.size
        return values, (values * prefactor).reshape(n, 1), np.zeros((n, 1), dtype=np.int32)
