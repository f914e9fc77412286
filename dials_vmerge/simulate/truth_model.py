"""True scale models: draw parameters, evaluate g per observation, describe them as DIALS JSON.

Each model is evaluated here with the simulator's own small code (not dials_vmerge.model),
in the DIALS forms of dials-scaling.md section 4:
- physical: g = S(z * s_norm_fac) * exp(B(z * d_norm_fac) / (2 d^2)) * g_abs, with S and B
  1-D Gaussian smoothers and g_abs the spherical-harmonic surface (4.4, 4.6);
- array: g = D(dstar_sq, t) * A(x, y, t), smoothers on a grid (4.7);
- KB: g = K exp(B / (2 d^2)) (4.8);
- dose_decay: g = S(z * s_norm_fac) * exp(C z / d^2) * exp(B_rel / (2 d^2)) (4.9): radiation
  damage with one dose rate C for all sweeps (B falls by dose_b_per_sweep over a sweep) and a
  relative B per sweep.
z is the observed frame coordinate (xyzobs.px z), as a DIALS model evaluates it. The smoother
origin is z = 0 (DIALS starts at the lowest observed z, which lies within a fraction of an
image of it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import numpy as np

from . import harmonics, smoothing

# DIALS absorption restraint for the default lmax 4 preset ("low"); recorded, not used here.
DEFAULT_SURFACE_WEIGHT = 5e5


@dataclass
class TrueModel:
    """One experiment's true scale model."""

    kind: str
    parameters: Dict[str, np.ndarray]
    configuration: Dict = field(default_factory=dict)

    def scaling_model_dict(self) -> Dict:
        """The model in the DIALS `scaling_model` JSON layout (dials-scaling.md 4.10)."""
        out = {"__id__": self.kind}
        nulls = {"scale": 1.0, "decay": 0.0, "absorption": 0.0, "relative_B": 0.0}
        if self.kind == "array":
            nulls = {"decay": 1.0, "absorption": 1.0}
        names = self.configuration["corrections"]
        if self.kind == "dose_decay":  # DIALS writes its components in constructor order
            names = [n for n in ("scale", "decay", "relative_B", "absorption") if n in names]
        for name in names:
            values = self.parameters[name]
            # grids are stored x fastest (DIALS idx = i + j Nx + k Nx Ny)
            flat = np.asarray(values).ravel(order="F")
            out[name] = {
                "n_parameters": int(flat.size),
                "parameters": [float(v) for v in flat],
                "null_parameter_value": nulls[name],
            }
        out["configuration_parameters"] = self.configuration
        return out


def _random_walk(rng, n: int) -> np.ndarray:
    steps = rng.standard_normal(n)
    walk = np.cumsum(steps) / np.sqrt(max(n, 1))
    return walk - walk.mean()


def draw_physical(settings, rng, osc_start_deg, osc_width_deg, n_images) -> TrueModel:
    osc_range = osc_width_deg * n_images
    scale_interval, decay_interval = smoothing.auto_physical_intervals(osc_range)
    n_s, s_norm_fac, s_spacing = smoothing.smooth_layout(osc_range, osc_width_deg, scale_interval)
    n_d, d_norm_fac, d_spacing = smoothing.smooth_layout(osc_range, osc_width_deg, decay_interval)
    sweep_scale = np.exp(settings.sweep_scale_sigma * rng.standard_normal())
    scale = sweep_scale * np.exp(settings.scale_variation * _random_walk(rng, n_s))
    # Dose-like decay: B falls linearly along the sweep (in parameter units 0 .. n_intervals).
    n_intervals = max(n_d - 2, 1) if n_d > 3 else n_d - 1
    positions = np.arange(n_d) - (0.5 if n_d > 3 else 0.0)
    b_offset = settings.b_sigma * rng.standard_normal()
    decay = (b_offset - settings.dose_b_per_sweep * positions / n_intervals
             + 0.3 * settings.b_sigma * rng.standard_normal(n_d))
    use_absorption = settings.absorption == "on" or (
        settings.absorption == "auto" and osc_range > 60.0
    )
    corrections = ["scale", "decay"]
    parameters = {"scale": scale, "decay": decay}
    config = {
        "corrections": corrections,
        "valid_osc_range": [osc_start_deg, osc_start_deg + osc_range],
        "s_norm_fac": s_norm_fac,
        "scale_rot_interval": s_spacing,
        "d_norm_fac": d_norm_fac,
        "decay_rot_interval": d_spacing,
    }
    if use_absorption:
        lmax = settings.lmax
        degree = np.concatenate([np.full(2 * l + 1, l) for l in range(1, lmax + 1)])
        parameters["absorption"] = rng.standard_normal(len(degree)) * (
            settings.absorption_strength / degree
        )
        corrections.append("absorption")
        config["lmax"] = lmax
        config["abs_surface_weight"] = DEFAULT_SURFACE_WEIGHT
    config["valid_image_range"] = [1, int(n_images)]
    return TrueModel("physical", parameters, config)


def draw_array(settings, rng, osc_start_deg, osc_width_deg, n_images, d, x_px, y_px) -> TrueModel:
    osc_range = osc_width_deg * n_images
    _, decay_interval = smoothing.auto_physical_intervals(osc_range)
    n_t, t_norm_fac, t_spacing = smoothing.smooth_layout(osc_range, osc_width_deg, decay_interval)
    dstar_sq = 1.0 / d ** 2
    res_min = dstar_sq.min() - 1e-6
    res_max = dstar_sq.max() + 1e-6
    n_res = smoothing.n_param_from_bins(settings.n_resolution_bins)
    res_width = (res_max - res_min) / settings.n_resolution_bins
    n_xy = smoothing.n_param_from_bins(settings.n_absorption_bins)
    xmin, xmax = x_px.min() - 0.001, x_px.max() + 0.001
    ymin, ymax = y_px.min() - 0.001, y_px.max() + 0.001
    x_width = (xmax - xmin) / settings.n_absorption_bins
    y_width = (ymax - ymin) / settings.n_absorption_bins
    # Decay grid: a per-time scale times a dose-like B fall-off, evaluated at the grid nodes.
    res_offset = 0.5 if n_res > 3 else 0.0
    t_offset = 0.5 if n_t > 3 else 0.0
    node_dstar_sq = res_min + (np.arange(n_res) - res_offset) * res_width
    t_intervals = max(n_t - 2, 1) if n_t > 3 else n_t - 1
    node_t = (np.arange(n_t) - t_offset) / t_intervals
    sweep_scale = np.exp(settings.sweep_scale_sigma * rng.standard_normal())
    scale_t = sweep_scale * np.exp(settings.scale_variation * _random_walk(rng, n_t))
    b_t = settings.b_sigma * rng.standard_normal() - settings.dose_b_per_sweep * node_t
    decay = scale_t[None, :] * np.exp(b_t[None, :] * node_dstar_sq[:, None] / 2.0)
    absorption = 1.0 + settings.absorption_strength * rng.standard_normal((n_xy, n_xy, n_t))
    config = {
        "corrections": ["decay", "absorption"],
        "valid_osc_range": [osc_start_deg, osc_start_deg + osc_range],
        "n_res_param": n_res, "n_time_param": n_t, "resmin": res_min,
        "res_bin_width": res_width, "time_norm_fac": t_norm_fac, "time_rot_interval": t_spacing,
        "n_x_param": n_xy, "n_y_param": n_xy, "xmin": xmin, "ymin": ymin,
        "x_bin_width": x_width, "y_bin_width": y_width,
        "valid_image_range": [1, int(n_images)],
    }
    return TrueModel("array", {"decay": decay, "absorption": absorption}, config)


DOSE_DECAY_SCALE_INTERVAL_DEG = 2.0  # the DIALS default of dose_decay.scale_interval


def draw_dose_decay(settings, rng, osc_start_deg, osc_width_deg, n_images) -> TrueModel:
    """Radiation damage as the dose_decay model describes it: C = -dose_b_per_sweep / (2 N)
    (the same for every sweep of N images), so exp(C z / d^2) = exp(B(z) / (2 d^2)) with B
    falling linearly by dose_b_per_sweep over the sweep; a relative B per sweep."""
    osc_range = osc_width_deg * n_images
    n_s, s_norm_fac, s_spacing = smoothing.smooth_layout(
        osc_range, osc_width_deg, DOSE_DECAY_SCALE_INTERVAL_DEG)
    sweep_scale = np.exp(settings.sweep_scale_sigma * rng.standard_normal())
    scale = sweep_scale * np.exp(settings.scale_variation * _random_walk(rng, n_s))
    relative_b = settings.b_sigma * rng.standard_normal()
    dose_rate = -settings.dose_b_per_sweep / (2.0 * n_images)
    config = {
        "corrections": ["scale", "relative_B", "decay"],
        "valid_osc_range": [osc_start_deg, osc_start_deg + osc_range],
        "shared": ["decay"],
        "s_norm_fac": s_norm_fac,
        "scale_rot_interval": s_spacing,
        "resolution_dependence": "quadratic",
        "valid_image_range": [1, int(n_images)],
    }
    parameters = {"scale": scale, "relative_B": np.array([relative_b]),
                  "decay": np.array([dose_rate])}
    return TrueModel("dose_decay", parameters, config)


def draw_kb(settings, rng) -> TrueModel:
    scale = np.exp(settings.sweep_scale_sigma * rng.standard_normal())
    b = settings.kb_b_sigma * rng.standard_normal()
    return TrueModel("KB", {"scale": np.array([scale]), "decay": np.array([b])},
                     {"corrections": ["scale", "decay"]})


def evaluate(model: TrueModel, z_obs, d, phi_rad=None, s1=None, instrument=None,
             x_px=None, y_px=None) -> np.ndarray:
    """The inverse scale factor g of every observation."""
    p = model.parameters
    c = model.configuration
    if model.kind == "KB":
        return p["scale"][0] * np.exp(p["decay"][0] / (2.0 * d * d))
    if model.kind == "physical":
        g = smoothing.smooth_1d(z_obs * c["s_norm_fac"], p["scale"])
        b = smoothing.smooth_1d(z_obs * c["d_norm_fac"], p["decay"])
        g = g * np.exp(b / (2.0 * d * d))
        if "absorption" in p:
            g = g * harmonics.absorption_surface(
                phi_rad, np.ascontiguousarray(s1),
                -instrument.s0 / np.linalg.norm(instrument.s0),
                np.ascontiguousarray(instrument.setting_rotation, dtype=float),
                instrument.unit_rotation_axis,
                np.ascontiguousarray(instrument.fixed_rotation, dtype=float),
                p["absorption"], int(c["lmax"]),
            )
        return g
    if model.kind == "dose_decay":
        g = smoothing.smooth_1d(z_obs * c["s_norm_fac"], p["scale"])
        return g * np.exp(p["decay"][0] * z_obs / (d * d) + p["relative_B"][0] / (2.0 * d * d))
    if model.kind == "array":
        t = z_obs * c["time_norm_fac"]
        x_res = (1.0 / (d * d) - c["resmin"]) / c["res_bin_width"]
        g = smoothing.smooth_2d(x_res, t, p["decay"])
        xx = (x_px - c["xmin"]) / c["x_bin_width"]
        yy = (y_px - c["ymin"]) / c["y_bin_width"]
        return g * smoothing.smooth_3d(xx, yy, t, p["absorption"])
    raise ValueError(f"unknown model kind {model.kind}")
