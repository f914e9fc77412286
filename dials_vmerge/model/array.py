"""The DIALS array model: 2D decay grid (resolution x time), 3D absorption grid (detector x,
detector y, time) and 2D detector modulation (dials-scaling.md 4.7). No restraints."""

from __future__ import annotations

import numpy as np

from ..errors import VmergeError
from .array_grid import SmoothGrid2D, SmoothGrid3D
from .base import ScalingModel, param
from .component import AnalyticalComponent
from .physical import (
    finish_limit_image_range,
    new_parameter_offset,
    osc_range_for_new_images,
    scan_oscillation_range,
)
from .smoother import calc_n_param_from_bins, initialise_smooth_input


class ArrayScalingModel(ScalingModel):
    id_ = "array"
    stored_components = ("decay", "absorption", "modulation")
    consecutive_refinement_order = [["decay"], ["absorption"], ["modulation"]]

    def __init__(self, setups: dict, configdict: dict):
        super().__init__({}, configdict)
        corrections = configdict["corrections"]
        if not any(c in corrections for c in ("decay", "absorption")):
            raise VmergeError("the array model needs a decay or an absorption correction")
        c = configdict
        if "decay" in corrections:
            self.components["decay"] = SmoothGrid2D(
                setups["decay"][0], (c["n_res_param"], c["n_time_param"]), setups["decay"][1],
                name="decay",
            )
        if "absorption" in corrections:
            self.components["absorption"] = SmoothGrid3D(
                setups["absorption"][0],
                (c["n_x_param"], c["n_y_param"], c["n_time_param"]),
                setups["absorption"][1],
                name="absorption",
            )
        if "modulation" in corrections:
            self.components["modulation"] = SmoothGrid2D(
                setups["modulation"][0], (c["n_x_mod_param"], c["n_y_mod_param"]),
                setups["modulation"][1], name="modulation",
            )
        if "analytical" in corrections:
            self.components["analytical"] = AnalyticalComponent()

    @classmethod
    def from_data(cls, params, experiment, table):
        p = param(params, "array")
        from ..backends import rank_local

        d = np.asarray(table["d"], dtype=np.float64)
        good = d > 0.0
        if not rank_local.any_rank(good.any()):
            raise VmergeError("array model: no reflections with d > 0 to set up the grids")
        xyz = np.asarray(table["xyzobs.px.value"], dtype=np.float64)[good]
        d = d[good]
        # the ranges of every rank's rows of the dataset in a rank-local job (issue 11)
        low = rank_local.minimum(np.array([xyz[:, 0].min(), xyz[:, 1].min(), d.min()])
                                 if d.size else np.full(3, np.inf))
        high = rank_local.maximum(np.array([xyz[:, 0].max(), xyz[:, 1].max(), d.max()])
                                  if d.size else np.full(3, -np.inf))
        (osc_start, osc_end), osc_width = scan_oscillation_range(experiment)
        configdict = {"corrections": [], "valid_osc_range": [osc_start, osc_end]}
        n_time, time_norm_fac, time_spacing = initialise_smooth_input(
            (osc_start, osc_end), osc_width, float(param(p, "decay_interval", 20.0))
        )
        xmax, xmin = float(high[0]) + 0.001, float(low[0]) - 0.001
        ymax, ymin = float(high[1]) + 0.001, float(low[1]) - 0.001
        setups = {}
        if param(p, "decay_correction", True):
            configdict["corrections"].append("decay")
            resmax = (1.0 / (float(low[2]) ** 2)) + 1e-6
            resmin = (1.0 / (float(high[2]) ** 2)) - 1e-6
            n_res, res_bin_width = calc_n_param_from_bins(
                resmin, resmax, int(param(p, "n_resolution_bins", 10))
            )
            configdict.update(
                {
                    "n_res_param": n_res,
                    "n_time_param": n_time,
                    "resmin": resmin,
                    "res_bin_width": res_bin_width,
                    "time_norm_fac": time_norm_fac,
                    "time_rot_interval": time_spacing,
                }
            )
            setups["decay"] = (np.ones(n_res * n_time), None)
        if param(p, "absorption_correction", True):
            configdict["corrections"].append("absorption")
            n_bins = int(param(p, "n_absorption_bins", 3))
            n_x, x_bin_width = calc_n_param_from_bins(xmin, xmax, n_bins)
            n_y, y_bin_width = calc_n_param_from_bins(ymin, ymax, n_bins)
            configdict.update(
                {
                    "n_x_param": n_x,
                    "n_y_param": n_y,
                    "xmin": xmin,
                    "ymin": ymin,
                    "x_bin_width": x_bin_width,
                    "y_bin_width": y_bin_width,
                    "n_time_param": n_time,
                    "time_norm_fac": time_norm_fac,
                    "time_rot_interval": time_spacing,
                }
            )
            setups["absorption"] = (np.ones(n_x * n_y * n_time), None)
        if param(p, "modulation_correction", False):
            configdict["corrections"].append("modulation")
            n_bins = int(param(p, "n_modulation_bins", 20))
            n_x, x_width = calc_n_param_from_bins(xmin, xmax, n_bins)
            n_y, y_width = calc_n_param_from_bins(ymin, ymax, n_bins)
            configdict.update(
                {
                    "n_x_mod_param": n_x,
                    "n_y_mod_param": n_y,
                    "xmin": xmin,
                    "ymin": ymin,
                    "x_det_bin_width": x_width,
                    "y_det_bin_width": y_width,
                }
            )
            setups["modulation"] = (np.ones(n_x * n_y), None)
        if param(p, "analytical_correction", False):
            cls._add_analytical_correction(configdict, table, "array")
        model = cls(setups, configdict)
        model.fixed_components = list(param(p, "correction.fix", None) or [])
        return model

    def update(self, params) -> None:
        self.fixed_components = list(param(params, "array.correction.fix", None) or [])

    def configure(self, table, experiment=None, params=None) -> None:
        c = self.configdict
        xyz = np.asarray(table["xyzobs.px.value"], dtype=np.float64)
        time = xyz[:, 2] * c["time_norm_fac"] if "time_norm_fac" in c else None
        if "decay" in self.components:
            res = ((1.0 / np.asarray(table["d"], dtype=np.float64) ** 2) - c["resmin"]) / c[
                "res_bin_width"
            ]
            self.components["decay"].configure(res, time)
        if "absorption" in self.components:
            x = (xyz[:, 0] - c["xmin"]) / c["x_bin_width"]
            y = (xyz[:, 1] - c["ymin"]) / c["y_bin_width"]
            self.components["absorption"].configure(x, y, time)
        if "modulation" in self.components:
            x = (xyz[:, 0] - c["xmin"]) / c["x_det_bin_width"]
            y = (xyz[:, 1] - c["ymin"]) / c["y_det_bin_width"]
            self.components["modulation"].configure(x, y)
        self._configure_analytical(table)
        self.n_configured = int(xyz.shape[0])

    def limit_image_range(self, new_first: int, new_last: int) -> None:
        conf = self.configdict
        new_osc, one_osc = osc_range_for_new_images(conf, new_first, new_last)
        n_time, time_norm_fac, time_spacing = initialise_smooth_input(
            new_osc, one_osc, conf["time_rot_interval"]
        )
        if "decay" in self.components:
            dec = self.components["decay"]
            n_old_time = dec.n_parameters // dec.shape[0]
        else:
            ab = self.components["absorption"]
            n_old_time = ab.n_parameters // (ab.shape[0] * ab.shape[1])
        offset = new_parameter_offset(
            conf["valid_image_range"][0], new_first, time_norm_fac, n_old_time, n_time
        )
        if "absorption" in self.components:
            ab = self.components["absorption"]
            per_time = ab.shape[0] * ab.shape[1]
            start = offset * per_time
            ab.replace_grid(
                ab.parameters[start : start + n_time * per_time], (ab.shape[0], ab.shape[1], n_time)
            )
        if "decay" in self.components:
            dec = self.components["decay"]
            start = offset * dec.shape[0]
            dec.replace_grid(
                dec.parameters[start : start + n_time * dec.shape[0]], (dec.shape[0], n_time)
            )
        conf["n_time_param"] = n_time
        conf["time_norm_fac"] = time_norm_fac
        conf["time_rot_interval"] = time_spacing
        finish_limit_image_range(conf, new_first, new_last, one_osc)
