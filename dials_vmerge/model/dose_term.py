"""The dose-decay term of the dose_decay model (DIALS LinearDoseDecay/QuadraticDoseDecay,
dials-scaling.md 4.9).

g = exp(C z / d^n) with z the raw observed frame coordinate (xyzobs.px z, not normalised), d in
Angstrom and n = 2 (quadratic, the default) or 1 (linear); one parameter C (initially 0),
dg/dC = g z / d^n. No restraint. Radiation damage makes C negative: later frames are weaker,
more so at high resolution.
"""

from __future__ import annotations

import numpy as np

from .component import Component, take_rows

RESOLUTION_POWERS = {"quadratic": 2, "linear": 1}


class DoseDecayTerm(Component):
    name = "decay"
    null_parameter_value = 0.0
    n_deriv_columns = 1

    def __init__(self, parameters=(0.0,), est_standard_devs=None, resolution_dependence="quadratic"):
        super().__init__(parameters, est_standard_devs)
        if self.n_parameters != 1:
            raise ValueError("the dose-decay term has exactly one parameter")
        if resolution_dependence not in RESOLUTION_POWERS:
            raise ValueError(
                f"resolution_dependence={resolution_dependence}: choose quadratic or linear")
        self.resolution_dependence = resolution_dependence
        self._dose_over_d_n = np.zeros(0)

    def configure(self, z_obs, d) -> None:
        """z_obs: observed frame coordinate (images); d: resolution (Angstrom)."""
        power = RESOLUTION_POWERS[self.resolution_dependence]
        d = np.asarray(d, dtype=np.float64)
        self._dose_over_d_n = np.ascontiguousarray(
            np.asarray(z_obs, dtype=np.float64) / d ** power)
        self.n_configured = self._dose_over_d_n.size

    def per_row_input(self, rows=None):
        """z / d^n of each row: with C, all the term needs (g = exp(C x), dg/dC = x g)."""
        return take_rows(self._dose_over_d_n, rows)

    def evaluate(self, parameters=None, rows=None):
        p = self._params(parameters)
        x = take_rows(self._dose_over_d_n, rows)
        values = np.exp(p[0] * x)
        n = values.size
        return values, (values * x).reshape(n, 1), np.zeros((n, 1), dtype=np.int32)

    def values(self, parameters=None, rows=None):
        return np.exp(self._params(parameters)[0] * take_rows(self._dose_over_d_n, rows))
