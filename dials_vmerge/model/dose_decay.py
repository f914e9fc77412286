"""The DIALS dose_decay model (DoseDecay, dials-scaling.md 2.1 and 4.9), for multi-crystal
rotation data:

    g = S(z * s_norm_fac) * exp(C z / d^n) * exp(B_rel / (2 d^2)) [* g_abs] [* analytical]

S: the smooth scale along the rotation (default interval 2 degrees); C: the dose-decay rate
(`decay`, shared by all sweeps by default, `share.decay`); B_rel: one relative B per sweep
(`relative_B`); g_abs: spherical-harmonic absorption, off by default (lmax 4, surface weight
1e6). Only the absorption surface is restrained.

Component (and JSON) order is DIALS's constructor order: scale, decay, relative_B, absorption,
analytical; the configdict's `corrections` list keeps DIALS's from_data order (scale,
relative_B, decay, absorption, analytical). Refinement order [[scale, relative_B, decay],
[absorption]]. A stored model is reloaded with only `correction.fix` taken from a new run,
as DIALS's `update` does.
"""

from __future__ import annotations

import numpy as np

from .absorption_sh import n_sh_parameters
from .base import param
from .dose_term import DoseDecayTerm
from .kb import SingleB
from .physical import (
    SmoothRotationModel,
    finish_limit_image_range,
    new_parameter_offset,
    osc_range_for_new_images,
    scan_oscillation_range,
)
from .smoother import initialise_smooth_input

DEFAULTS = dict(
    scale_interval=2.0, relative_B_correction=True, decay_correction=True, share_decay=True,
    resolution_dependence="quadratic", absorption_correction=False, lmax=4,
    surface_weight=1e6, fix_initial=True,
)


class DoseDecayScalingModel(SmoothRotationModel):
    id_ = "dose_decay"
    stored_components = ("scale", "decay", "relative_B", "absorption")
    consecutive_refinement_order = [["scale", "relative_B", "decay"], ["absorption"]]

    def _add_resolution_terms(self, setups: dict, corrections) -> None:
        if "decay" in corrections:
            self.components["decay"] = DoseDecayTerm(
                *setups["decay"],
                resolution_dependence=self.configdict.get("resolution_dependence", "quadratic"))
        if "relative_B" in corrections:
            self.components["relative_B"] = SingleB(*setups["relative_B"])

    def shared_component(self):
        """"decay" (one dose rate for all sweeps) unless it is fixed (DIALS) or absent
        (decay_correction=False)."""
        if ("decay" in self.configdict.get("shared", []) and "decay" in self.components
                and "decay" not in self.fixed_components):
            return "decay"
        return None

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def from_data(cls, params, experiment, table):
        p = param(params, "dose_decay")

        def option(name, dotted=None):
            value = param(p, dotted or name)
            return DEFAULTS[name] if value is None else value

        (osc_start, osc_end), osc_width = scan_oscillation_range(experiment)
        configdict = {"corrections": [], "valid_osc_range": [osc_start, osc_end]}
        if option("share_decay", "share.decay"):
            configdict["shared"] = ["decay"]
        setups = {}
        configdict["corrections"].append("scale")
        n_scale, s_norm_fac, scale_spacing = initialise_smooth_input(
            (osc_start, osc_end), osc_width, float(option("scale_interval")))
        configdict["s_norm_fac"] = s_norm_fac
        configdict["scale_rot_interval"] = scale_spacing
        setups["scale"] = (np.ones(n_scale), None)
        if option("relative_B_correction"):
            configdict["corrections"].append("relative_B")
            setups["relative_B"] = (np.zeros(1), None)
        if option("decay_correction"):
            configdict["corrections"].append("decay")
            configdict["resolution_dependence"] = str(option("resolution_dependence"))
            setups["decay"] = (np.zeros(1), None)
        if option("absorption_correction"):
            lmax = int(option("lmax"))
            configdict["corrections"].append("absorption")
            configdict["lmax"] = lmax
            configdict["abs_surface_weight"] = float(option("surface_weight"))
            setups["absorption"] = (np.zeros(n_sh_parameters(lmax)), None)
        if param(p, "analytical_correction", False):
            cls._add_analytical_correction(configdict, table, "dose_decay")
        model = cls(setups, configdict, fix_initial=option("fix_initial"))
        model.fixed_components = list(param(p, "correction.fix", None) or [])
        return model

    def update(self, params) -> None:
        """Options of a new run for a stored model: only `correction.fix` (DIALS `update`)."""
        p = param(params, "dose_decay")
        fixed = param(p, "correction.fix", None)
        if fixed:
            self.fixed_components = list(fixed)
        fix_initial = param(p, "fix_initial", None)
        if fix_initial is not None:
            self.fix_initial = bool(fix_initial)

    # -- data -----------------------------------------------------------------------------
    def _configure_resolution_terms(self, table, z_obs, params) -> None:
        d = np.ascontiguousarray(table["d"], dtype=np.float64)
        if "decay" in self.components:
            self.components["decay"].configure(z_obs, d)
        if "relative_B" in self.components:
            self.components["relative_B"].configure(d)

    def _exponent_g_inputs(self, rows, slices):
        """exp(C z/d^n) then exp(B_rel / 2d^2), as the components form them: per row z/d^n
        and 1/(2 d^2), the parameters C and B_rel (-1: no such term)."""
        if "decay" not in self.components and "relative_B" not in self.components:
            return None
        inputs = np.zeros((rows.size, 2))
        first = [-1, -1]
        if "decay" in self.components:
            inputs[:, 0] = self.components["decay"].per_row_input(rows)
            first[0] = slices["decay"].start
        if "relative_B" in self.components:
            inputs[:, 1] = 1.0 / (2.0 * self.components["relative_B"]._d[rows] ** 2)
            first[1] = slices["relative_B"].start
        return "dose and B", inputs, 0, tuple(first)

    def _exponent_rows(self, rows, slices):
        """exp(C z/d^n) exp(B_rel / 2d^2) = exp(E): weights z/d^n on C and 1/(2 d^2) on
        B_rel. The two parameters are consecutive (component order decay, relative_B), so
        one run of 3 weights starts at the first of them; the third weight is 0."""
        terms = [name for name in ("decay", "relative_B") if name in self.components]
        if not terms:
            return None
        weights = np.zeros((rows.size, 3))
        for slot, name in enumerate(terms):
            if name == "decay":
                weights[:, slot] = self.components["decay"].per_row_input(rows)
            else:
                d = self.components["relative_B"]._d[rows]
                weights[:, slot] = 1.0 / (2.0 * d * d)
        if len(terms) == 2 and slices["relative_B"].start != slices["decay"].start + 1:
            raise ValueError("dose_decay: decay and relative_B parameters are not consecutive")
        first = np.full(rows.size, slices[terms[0]].start, dtype=np.int32)
        return weights, first

    # -- image range ----------------------------------------------------------------------
    def limit_image_range(self, new_first: int, new_last: int) -> None:
        """Fewer scale parameters for a shorter range (DIALS); the dose term uses raw z and
        needs no change."""
        conf = self.configdict
        new_osc, one_osc = osc_range_for_new_images(conf, new_first, new_last)
        if "scale" in self.components:
            cur_first = conf["valid_image_range"][0]
            n_new, norm_fac, spacing = initialise_smooth_input(
                new_osc, one_osc, conf["scale_rot_interval"])
            comp = self.components["scale"]
            conf["scale_rot_interval"] = spacing
            conf["s_norm_fac"] = norm_fac
            offset = new_parameter_offset(cur_first, new_first, norm_fac, comp.n_parameters, n_new)
            comp.replace_parameters(comp.parameters[offset: offset + n_new])
        finish_limit_image_range(conf, new_first, new_last, one_osc)
