"""What every scaling-model component has: parameters, ESDs, restraints, and an evaluation.

A component is configured once with per-observation numpy arrays and then evaluated for any
parameter vector, returning

    values       (n,)   float64  g_c for each configured observation
    deriv_values (n, k) float64  dg_c/dp for the k parameters that touch the observation
    deriv_index  (n, k) int32    the component-local index of each of those parameters

(unused slots: index 0, value 0). `rows` restricts the evaluation to a subset of the
configured observations (an integer index array).
"""

from __future__ import annotations

import numpy as np


class Component:
    name = "component"
    null_parameter_value = 1.0
    n_deriv_columns = 0

    def __init__(self, parameters, est_standard_devs=None):
        self.parameters = np.array(parameters, dtype=np.float64).ravel()
        self.est_standard_devs = (
            None if est_standard_devs is None else np.array(est_standard_devs, dtype=np.float64)
        )
        self.restraint_weights = None
        self.n_configured = 0

    @property
    def n_parameters(self) -> int:
        return int(self.parameters.size)

    def set_parameters(self, parameters) -> None:
        parameters = np.array(parameters, dtype=np.float64).ravel()
        if parameters.size != self.n_parameters:
            raise ValueError(
                f"{self.name}: expected {self.n_parameters} parameters, got {parameters.size}"
            )
        self.parameters = parameters

    def replace_parameters(self, parameters) -> None:
        """New parameters of possibly different length (image-range limiting); ESDs dropped."""
        self.parameters = np.array(parameters, dtype=np.float64).ravel()
        self.est_standard_devs = None
        if self.restraint_weights is not None and self.restraint_weights.size:
            self.restraint_weights = np.full(self.n_parameters, self.restraint_weights[0])

    def evaluate(self, parameters=None, rows=None):
        raise NotImplementedError

    def values(self, parameters=None, rows=None):
        """g_c alone; components override this to skip their derivative table."""
        return self.evaluate(parameters, rows=rows)[0]

    def _params(self, parameters):
        if parameters is None:
            return self.parameters
        parameters = np.asarray(parameters, dtype=np.float64)
        if parameters.shape != (self.n_parameters,):
            raise ValueError(f"{self.name}: expected {self.n_parameters} parameters")
        return parameters


def take_rows(array, rows):
    return array if rows is None else array[rows]


class AnalyticalComponent(Component):
    """A fixed per-observation factor (the `analytical_correction` column), no parameters."""

    name = "analytical"
    null_parameter_value = 1.0
    n_deriv_columns = 0

    def __init__(self):
        super().__init__(np.zeros(0))
        self._correction = np.zeros(0)

    def configure(self, correction) -> None:
        self._correction = np.ascontiguousarray(correction, dtype=np.float64)
        self.n_configured = self._correction.size

    def evaluate(self, parameters=None, rows=None):
        values = take_rows(self._correction, rows).copy()
        n = values.size
        return values, np.zeros((n, 0)), np.zeros((n, 0), dtype=np.int32)
