"""The DIALS physical model: smooth scale x smooth B x spherical-harmonic absorption
(dials-scaling.md 4.3-4.6). Components in JSON order: scale, decay, absorption, analytical."""

from __future__ import annotations

import math

import numpy as np

from ..backends import rank_local
from ..errors import VmergeError
from .absorption_sh import (
    SHAbsorption,
    configure_absorption_from_geometry,
    n_sh_parameters,
)
from .base import ScalingModel, is_auto, param
from .component import AnalyticalComponent
from .decay_smooth import DecaySmooth1D
from .scale_smooth import ScaleSmooth1D
from .smoother import initialise_smooth_input

ABSORPTION_LEVELS = {"low": (4, 5e5), "medium": (6, 5e4), "high": (6, 5e3)}
AUTO_ABSORPTION_MIN_RANGE_DEG = 60.0
# Absorption is pointless when every 2theta is below this (DIALS issue 2316, electrons)
MIN_SCATTERING_ANGLE_RAD = math.acos(0.999)


def auto_intervals(osc_range_deg: float):
    """DIALS's automatic (scale_interval, decay_interval) in degrees for a rotation range."""
    if osc_range_deg < 5.0:
        return 1.0, 1.5
    if osc_range_deg < 10.0:
        return 2.0, 3.0
    if osc_range_deg < 25.0:
        return 4.0, 5.0
    if osc_range_deg < 90.0:
        return 8.0, 10.0
    return 15.0, 20.0


def scan_oscillation_range(experiment):
    """(start, end) rotation range in degrees of the whole scan."""
    from .. import geometry

    first, last = geometry.image_range(experiment)
    start, width = geometry.oscillation(experiment)
    return (start, start + (last - first + 1) * width), width


def max_scattering_angle_rad(experiment, s1) -> float:
    """Largest angle between s1 and the incident beam over rows with a non-zero s1."""
    from .. import geometry

    from ..kernels.scattering_angle import max_scattering_angle_kernel

    s1 = np.ascontiguousarray(s1, dtype=np.float64).reshape(-1, 3)
    beam = np.ascontiguousarray(geometry.s0(experiment), dtype=np.float64)
    angle, n_good = max_scattering_angle_kernel(s1, beam, float(np.linalg.norm(beam)))
    if rank_local.active():  # every rank's rows of the dataset (issue 11)
        n_good = rank_local.total(n_good)
        nan = rank_local.any_rank(math.isnan(angle))
        angle = math.nan if nan else rank_local.maximum(float(angle))
    return math.inf if n_good == 0 else float(angle)


def absorption_settings(physical_params):
    """(lmax, surface_weight): absorption_level presets override explicit values."""
    level = param(physical_params, "absorption_level")
    if level:
        if level not in ABSORPTION_LEVELS:
            raise VmergeError(f"physical.absorption_level: unknown level '{level}'")
        return ABSORPTION_LEVELS[level]
    lmax = param(physical_params, "lmax")
    weight = param(physical_params, "surface_weight")
    return (4 if is_auto(lmax) else int(lmax)), (5e5 if is_auto(weight) else float(weight))


class SmoothRotationModel(ScalingModel):
    """What the physical and dose_decay models share: a smooth scale along the rotation,
    the model's own resolution-dependent terms, spherical-harmonic absorption and the
    analytical factor, in that component order, and `fix_initial` for the scale."""

    def __init__(self, setups: dict, configdict: dict, fix_initial=True):
        super().__init__({}, configdict)
        corrections = configdict["corrections"]
        if "scale" in corrections:
            self.components["scale"] = ScaleSmooth1D(*setups["scale"])
        self._add_resolution_terms(setups, corrections)
        if "absorption" in corrections:
            self.components["absorption"] = SHAbsorption(
                *setups["absorption"], surface_weight=configdict["abs_surface_weight"]
            )
        if "analytical" in corrections:
            self.components["analytical"] = AnalyticalComponent()
        self.fix_initial = bool(fix_initial)

    def _add_resolution_terms(self, setups: dict, corrections) -> None:
        raise NotImplementedError

    def _configure_resolution_terms(self, table, z_obs, params) -> None:
        raise NotImplementedError

    @property
    def supports_fix_initial(self) -> bool:
        return self.fix_initial and "scale" in self.components

    def configure(self, table, experiment, params=None) -> None:
        """Per-observation inputs for the rows of `table` (the suitable rows of one dataset)."""
        z_obs = np.ascontiguousarray(table["xyzobs.px.value"][:, 2], dtype=np.float64)
        if "scale" in self.components:
            self.components["scale"].configure(z_obs * self.configdict["s_norm_fac"])
        self._configure_resolution_terms(table, z_obs, params)
        if "absorption" in self.components:
            configure_absorption_from_geometry(self.components["absorption"], experiment,
                                               z_obs, table["s1"])
        self._configure_analytical(table)
        self.n_configured = int(z_obs.size)

    def pass_inputs(self, rows) -> dict:
        """Per-row inputs of the fused physical target pass (scaling.physical_pass) and of
        the smooth-rotation family kernel (kernels.physical_family).

        {"scale": (weights (n, 3), first parameter (n,)), "decay": (the exponent's weights
        (n, 3), first), "absorption": (coefficients (n, L), first), "fixed": analytical factor
        (n,)}, with parameter indices into this model's full parameter vector; g = S exp(E)
        A F with E = sum_j weight_j q[first + j] (the model's resolution-dependent terms).
        """
        rows = np.asarray(rows, dtype=np.int64)
        slices = self.parameter_slices()
        out = {}
        if "scale" in self.components:
            weights, first = self.components["scale"].smoother_rows(rows)
            out["scale"] = (weights, first.astype(np.int32) + np.int32(slices["scale"].start))
        exponent = self._exponent_rows(rows, slices)
        if exponent is not None:
            out["decay"] = exponent
        if "absorption" in self.components:
            coefficients = self.components["absorption"].coefficient_rows(rows)
            first = np.full(rows.size, slices["absorption"].start, dtype=np.int32)
            out["absorption"] = (coefficients, first)
        if "analytical" in self.components:
            out["fixed"] = self.components["analytical"].evaluate(rows=rows)[0]
        return out

    def _exponent_rows(self, rows, slices):
        """(weights (n, 3), first parameter (n,) int32) of the exponent E, or None."""
        raise NotImplementedError

    def g_inputs(self, rows) -> dict:
        """Per-row inputs of g alone (kernels.physical_family.smooth_rotation_g_kernel):
        {"scale": (smoother coordinates (n,), n_values, first parameter), "exponent":
        (kind, inputs (n, 2), n_values, (first, second parameter)), "absorption": values
        (n,) at the current parameters, "fixed": analytical factor (n,)}, parameter
        indices into this model's full parameter vector."""
        rows = np.asarray(rows, dtype=np.int64)
        slices = self.parameter_slices()
        out = {}
        if "scale" in self.components:
            smoother = self.components["scale"]._smoother
            out["scale"] = (smoother.coordinates[0][rows], smoother.n_values,
                            slices["scale"].start)
        exponent = self._exponent_g_inputs(rows, slices)
        if exponent is not None:
            out["exponent"] = exponent
        if "absorption" in self.components:
            out["absorption"] = self.components["absorption"].values(rows=rows)
        if "analytical" in self.components:
            out["fixed"] = self.components["analytical"].evaluate(rows=rows)[0]
        return out

    def _exponent_g_inputs(self, rows, slices):
        raise NotImplementedError

    def pass_signature(self):
        """Models with equal signatures can share one fused pass."""
        return tuple(self.components), self.configdict.get("lmax")


class PhysicalScalingModel(SmoothRotationModel):
    id_ = "physical"
    stored_components = ("scale", "decay", "absorption")
    consecutive_refinement_order = [["scale", "decay"], ["absorption"]]

    def __init__(self, setups: dict, configdict: dict, decay_restraint=0.1, fix_initial=True):
        self._initial_decay_restraint = decay_restraint  # read by _add_resolution_terms
        super().__init__(setups, configdict, fix_initial=fix_initial)

    def _add_resolution_terms(self, setups: dict, corrections) -> None:
        if "decay" in corrections:
            self.components["decay"] = DecaySmooth1D(
                *setups["decay"], restraint_weight=self._initial_decay_restraint
            )

    def shared_component(self):
        if "absorption" in self.configdict.get("shared", []) and (
            "absorption" not in self.fixed_components
        ):
            return "absorption"
        return None

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def from_data(cls, params, experiment, table):
        p = param(params, "physical")
        (osc_start, osc_end), osc_width = scan_oscillation_range(experiment)
        osc_span = abs(osc_end - osc_start)
        configdict = {"corrections": [], "valid_osc_range": [osc_start, osc_end]}
        setups = {}

        scale_interval = param(p, "scale_interval")
        decay_interval = param(p, "decay_interval")
        auto_scale, auto_decay = auto_intervals(osc_span)
        scale_interval = auto_scale if is_auto(scale_interval) else float(scale_interval)
        decay_interval = auto_decay if is_auto(decay_interval) else float(decay_interval)

        # DIALS always has the scale term; our PHIL can switch it off (alias scale_term)
        if param(p, "scale_correction", True):
            configdict["corrections"].append("scale")
            n_scale, s_norm_fac, scale_spacing = initialise_smooth_input(
                (osc_start, osc_end), osc_width, scale_interval
            )
            configdict["s_norm_fac"] = s_norm_fac
            configdict["scale_rot_interval"] = scale_spacing
            setups["scale"] = (np.ones(n_scale), None)

        if param(p, "decay_correction", True):
            configdict["corrections"].append("decay")
            n_decay, d_norm_fac, decay_spacing = initialise_smooth_input(
                (osc_start, osc_end), osc_width, decay_interval
            )
            configdict["d_norm_fac"] = d_norm_fac
            configdict["decay_rot_interval"] = decay_spacing
            setups["decay"] = (np.zeros(n_decay), None)

        absorption = param(p, "absorption_correction")
        if is_auto(absorption):
            absorption = osc_span > AUTO_ABSORPTION_MIN_RANGE_DEG
            if table is not None and "s1" in table and rank_local.total(table.nrows):
                if max_scattering_angle_rad(experiment, table["s1"]) < MIN_SCATTERING_ANGLE_RAD:
                    absorption = False
        if absorption or param(p, "absorption_level"):
            configdict["corrections"].append("absorption")
            if param(p, "share.absorption", False):
                configdict["shared"] = ["absorption"]
            lmax, surface_weight = absorption_settings(p)
            configdict["lmax"] = lmax
            configdict["abs_surface_weight"] = surface_weight
            setups["absorption"] = (np.zeros(n_sh_parameters(lmax)), None)

        if param(p, "analytical_correction", False):
            cls._add_analytical_correction(configdict, table, "physical")

        model = cls(
            setups,
            configdict,
            decay_restraint=param(p, "decay_restraint", 0.1),
            fix_initial=param(p, "fix_initial", True),
        )
        model.fixed_components = list(param(p, "correction.fix", None) or [])
        return model

    def update(self, params) -> None:
        """Apply options of a new run to a model read from a file (DIALS `update`)."""
        p = param(params, "physical")
        self.fixed_components = list(param(p, "correction.fix", None) or [])
        self.fix_initial = bool(param(p, "fix_initial", True))
        if "decay" in self.components:
            self.components["decay"].set_restraint(param(p, "decay_restraint", 0.1))
        if "absorption" not in self.components:
            return
        new_lmax = None
        if param(p, "absorption_level"):
            lmax, weight = absorption_settings(p)
            self.configdict["abs_surface_weight"] = weight
            if lmax != self.configdict["lmax"]:
                new_lmax = lmax
        else:
            weight = param(p, "surface_weight")
            if not is_auto(weight):
                self.configdict["abs_surface_weight"] = float(weight)
            lmax = param(p, "lmax")
            if not is_auto(lmax) and int(lmax) != self.configdict["lmax"]:
                new_lmax = int(lmax)
        if new_lmax:
            old = self.components["absorption"].parameters
            new = np.zeros(n_sh_parameters(new_lmax))
            keep = min(old.size, new.size)
            new[:keep] = old[:keep]
            self.configdict["lmax"] = new_lmax
            self.components["absorption"] = SHAbsorption(
                new, np.zeros(new.size), surface_weight=self.configdict["abs_surface_weight"]
            )
        else:
            self.components["absorption"].set_restraint(self.configdict["abs_surface_weight"])
        if param(p, "share.absorption", False):
            self.configdict["shared"] = ["absorption"]

    # -- data -----------------------------------------------------------------------------
    def _configure_resolution_terms(self, table, z_obs, params) -> None:
        if "decay" not in self.components:
            return
        if params is not None:
            self.components["decay"].set_restraint(
                param(params, "physical.decay_restraint", 0.1)
            )
        self.components["decay"].configure(z_obs * self.configdict["d_norm_fac"], table["d"])

    def _exponent_g_inputs(self, rows, slices):
        """The smooth B: its smoother coordinate and 1/(2 d^2) per row."""
        if "decay" not in self.components:
            return None
        decay = self.components["decay"]
        d = decay._d[rows]
        inputs = np.empty((rows.size, 2))
        inputs[:, 0] = decay._smoother.coordinates[0][rows]
        inputs[:, 1] = 1.0 / (2.0 * d * d)  # as b_factor_values forms it
        return "smooth B", inputs, decay._smoother.n_values, (slices["decay"].start, -1)

    def _exponent_rows(self, rows, slices):
        """The smooth B along the rotation: its 3 smoother weights over 2 d^2."""
        if "decay" not in self.components:
            return None
        weights, first = self.components["decay"].smoother_rows(rows)
        return weights, first.astype(np.int32) + np.int32(slices["decay"].start)

    # -- image range ----------------------------------------------------------------------
    def limit_image_range(self, new_first: int, new_last: int) -> None:
        conf = self.configdict
        new_osc, one_osc = osc_range_for_new_images(conf, new_first, new_last)
        cur_first = conf["valid_image_range"][0]
        for name, norm_key, interval_key in (
            ("scale", "s_norm_fac", "scale_rot_interval"),
            ("decay", "d_norm_fac", "decay_rot_interval"),
        ):
            if name not in self.components:
                continue
            n_new, norm_fac, spacing = initialise_smooth_input(new_osc, one_osc, conf[interval_key])
            comp = self.components[name]
            conf[interval_key] = spacing
            conf[norm_key] = norm_fac
            offset = new_parameter_offset(cur_first, new_first, norm_fac, comp.n_parameters, n_new)
            comp.replace_parameters(comp.parameters[offset : offset + n_new])
        finish_limit_image_range(conf, new_first, new_last, one_osc)


def osc_range_for_new_images(conf, new_first, new_last):
    """The new rotation span, measured from the current first image, and one image's width."""
    if "valid_image_range" not in conf:
        raise VmergeError("cannot limit the image range of a model with no valid_image_range")
    cur_first, cur_last = conf["valid_image_range"]
    osc0, osc1 = conf["valid_osc_range"]
    one_osc = (osc1 - osc0) / (cur_last - (cur_first - 1))
    new_osc = ((new_first - cur_first) * one_osc, (new_last - cur_first + 1) * one_osc)
    return new_osc, one_osc


def new_parameter_offset(cur_first, new_first, new_norm_fac, n_old, n_new) -> int:
    """How many leading parameters to drop (DIALS calculate_new_offset)."""
    if n_old == 2:
        return 0  # cannot go below two parameters
    shift = (new_first - cur_first) * new_norm_fac
    n_shift = int(shift // 1)
    if shift % 1 > 0.5:
        n_shift += 1
    return min(n_old - n_new, n_shift)


def finish_limit_image_range(conf, new_first, new_last, one_osc) -> None:
    cur_first, cur_last = conf["valid_image_range"]
    osc0, osc1 = conf["valid_osc_range"]
    conf["valid_osc_range"] = [
        osc0 + (new_first - cur_first) * one_osc,
        osc1 + (new_last - cur_last) * one_osc,
    ]
    conf["valid_image_range"] = [int(new_first), int(new_last)]
