"""The DIALS KB model: g = K exp(B / (2 d^2)) (dials-scaling.md 4.8).

As in DIALS, `corrections` lists "decay" before "scale" while the components (and so the
JSON blocks and the parameter vector) are scale first."""

from __future__ import annotations

import numpy as np

from .base import ScalingModel, param
from .component import AnalyticalComponent
from .kb import SingleB, SingleScale


class KBScalingModel(ScalingModel):
    id_ = "KB"
    stored_components = ("scale", "decay")
    consecutive_refinement_order = [["scale", "decay"]]

    def __init__(self, setups: dict, configdict: dict):
        super().__init__({}, configdict)
        corrections = configdict["corrections"]
        if "scale" in corrections:
            self.components["scale"] = SingleScale(*setups["scale"])
        if "decay" in corrections:
            self.components["decay"] = SingleB(*setups["decay"])
        if "analytical" in corrections:
            self.components["analytical"] = AnalyticalComponent()

    @classmethod
    def from_data(cls, params, experiment=None, table=None):
        p = param(params, "KB")
        configdict = {"corrections": []}
        setups = {}
        if param(p, "decay_correction", True):
            configdict["corrections"].append("decay")
            setups["decay"] = (np.zeros(1), None)
        configdict["corrections"].append("scale")
        setups["scale"] = (np.ones(1), None)
        if param(p, "analytical_correction", False):
            cls._add_analytical_correction(configdict, table, "KB")
        model = cls(setups, configdict)
        model.fixed_components = list(param(p, "correction.fix", None) or [])
        return model

    def update(self, params) -> None:
        self.fixed_components = list(param(params, "KB.correction.fix", None) or [])

    def configure(self, table, experiment=None, params=None) -> None:
        n = int(table.nrows) if hasattr(table, "nrows") else len(table["d"])
        if "scale" in self.components:
            self.components["scale"].configure(n)
        if "decay" in self.components:
            self.components["decay"].configure(table["d"])
        self._configure_analytical(table)
        self.n_configured = n

    def family_description(self) -> dict:
        """What the KB family kernel (kernels/kb_family.py) needs of this dataset: per
        configured row 1/(2 d^2) and the fixed analytical factor (None without one); the
        position of K and B in this model's parameter vector (-1: no such component)."""
        slices = self.parameter_slices()
        decay = self.components.get("decay")
        analytical = self.components.get("analytical")
        return {
            "inv_two_d_sq": (1.0 / (2.0 * decay._d ** 2) if decay is not None
                             else np.zeros(self.n_configured)),
            "fixed": None if analytical is None else analytical._correction,
            "scale_index": slices["scale"].start if "scale" in slices else -1,
            "decay_index": slices["decay"].start if "decay" in slices else -1,
        }
