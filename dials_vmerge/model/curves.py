"""The fitted scaling models as curves and maps for the JSON and the report (fixed size):

- physical model, per dataset (the first MAX_CURVE_DATASETS): the smooth scale and the
  relative B (A^2) against the rotation angle, sampled at CURVE_POINTS frame positions over
  the range scaling used: DIALS's smoothers are set up on the data (shifted to their
  lowest normalised z = z * norm_fac, the range rounded up), so the curve is evaluated between
  the lowest and highest z of the dataset's rows used in scaling (not excluded), which gives
  exactly the scaling's values; without a table, over the valid image range); for the first
  MAX_SURFACE_DATASETS with absorption, the absorption surface
  1 + sum_lm C_lm Y'_lm(theta, phi) on a SURFACE_STEP_DEG grid of polar angle theta (0-180)
  and azimuth phi (-180-180) in the crystal frame;
- array model, per dataset (the first MAX_SURFACE_DATASETS): its parameter grids as maps,
  decay (time x resolution grid points), absorption averaged over time (detector y x x grid
  points) and modulation (detector y x x); the smoothers' parameters are the grid values
  (index i + j n_i (+ k n_i n_j), i fastest);
- KB model (stills, wedges): the scale and B of every dataset (6 significant digits), for
  their distributions.
"""

from __future__ import annotations

import numpy as np

MAX_CURVE_DATASETS = 20
MAX_SURFACE_DATASETS = 4
CURVE_POINTS = 200
SURFACE_STEP_DEG = 5.0


def _parameters(model_dict, name):
    component = model_dict.get(name)
    if not component or name not in model_dict.get("configuration_parameters", {}).get(
            "corrections", [name]):
        return None
    return np.asarray(component["parameters"], dtype=np.float64)


def scaled_z_extremes(table, experiments) -> dict:
    """{experiment identifier: (lowest, highest) z_obs of its rows used in scaling}, for the
    given experiments (one scan of the table each: pass only the few whose curves are drawn;
    all 5000 of a stills run took 22 s)."""
    from .. import flags

    if table is None or "xyzobs.px.value" not in table or "id" not in table or not experiments:
        return {}
    key_of_identifier = {ident: key for key, ident in table.identifiers.items()}
    ids = table.peek("id")
    z = table.peek("xyzobs.px.value")[:, 2]
    used = np.ones(len(z), bool)
    if "flags" in table:
        excluded = np.uint64(flags.excluded_for_scaling | flags.user_excluded_in_scaling)
        used = (table.peek("flags") & excluded) == 0
    out = {}
    for e in experiments:
        if e.identifier not in key_of_identifier:
            continue  # as before: an experiment without rows has no range
        rows = used & (ids == key_of_identifier[e.identifier])
        if rows.any():
            out[e.identifier] = (float(z[rows].min()), float(z[rows].max()))
    return out


def physical_curves(experiment, model_dict, z_range=None) -> dict:
    from .. import geometry
    from .smoother import Smoother1D

    config = model_dict["configuration_parameters"]
    if z_range is None:
        first, last = config.get("valid_image_range") or geometry.image_range(experiment)
        z_range = (first - 1, last)
    z = np.linspace(z_range[0], z_range[1], CURVE_POINTS)
    out = {"identifier": experiment.identifier, "image": z.tolist(),
           "phi_deg": geometry.rotation_angle_deg(experiment, z).tolist()}
    scale = _parameters(model_dict, "scale")
    if scale is not None:
        out["scale"] = Smoother1D(z * config["s_norm_fac"], scale.size).value(scale).tolist()
    decay = _parameters(model_dict, "decay")
    if decay is not None:
        out["B"] = Smoother1D(z * config["d_norm_fac"], decay.size).value(decay).tolist()
    return out


def absorption_surface(model_dict) -> dict:
    from .absorption_sh import real_harmonics

    parameters = _parameters(model_dict, "absorption")
    lmax = int(model_dict["configuration_parameters"]["lmax"])
    theta = np.arange(0.0, 180.0 + 1e-9, SURFACE_STEP_DEG)
    phi = np.arange(-180.0, 180.0 + 1e-9, SURFACE_STEP_DEG)
    grid_theta, grid_phi = np.meshgrid(np.radians(theta), np.radians(phi), indexing="ij")
    values = 1.0 + real_harmonics(grid_theta.ravel(), grid_phi.ravel(), lmax) @ parameters
    return {"theta_deg": theta.tolist(), "phi_deg": phi.tolist(),
            "values": np.round(values.reshape(len(theta), len(phi)), 6).tolist()}


def array_maps(model_dict) -> dict:
    config = model_dict["configuration_parameters"]
    out = {}
    decay = _parameters(model_dict, "decay")
    if decay is not None:
        grid = decay.reshape(int(config["n_time_param"]), int(config["n_res_param"]))
        out["decay"] = np.round(grid, 6).tolist()
    absorption = _parameters(model_dict, "absorption")
    if absorption is not None:
        grid = absorption.reshape(int(config["n_time_param"]), int(config["n_y_param"]),
                                  int(config["n_x_param"]))
        out["absorption_mean_over_time"] = np.round(grid.mean(axis=0), 6).tolist()
    modulation = _parameters(model_dict, "modulation")
    if modulation is not None:
        grid = modulation.reshape(int(config["n_y_mod_param"]), int(config["n_x_mod_param"]))
        out["modulation"] = np.round(grid, 6).tolist()
    return out


def drawn_physical_curves(experiments) -> list:
    """The experiments whose physical curves are drawn (only they need the z range)."""
    return [e for e in experiments if (e.scaling_model or {}).get("__id__") == "physical"
            and not e.is_still][:MAX_CURVE_DATASETS]


def scaled_z_extremes_over_ranks(table, experiments) -> dict:
    """scaled_z_extremes of all MPI ranks' rows (issue 11: a rank-local job's scaled table
    holds one rank's rows): each rank's extremes of the drawn experiments, then the least
    lowest and greatest highest over ranks (exact: min and max in any order). Every rank
    calls it (one collective) and gets the same dict."""
    from ..backends import mpi_world

    drawn = drawn_physical_curves(experiments)
    if not drawn:  # the same experiments on every rank: all skip the collective
        return {}
    local = scaled_z_extremes(table, drawn)
    ends = np.array([local.get(e.identifier, (np.inf, -np.inf)) for e in drawn],
                    dtype=np.float64).reshape(-1, 2)
    every = mpi_world.allgather_rows(ends[None, :, :])
    lowest, highest = every[:, :, 0].min(axis=0), every[:, :, 1].max(axis=0)
    return {e.identifier: (float(lo), float(hi))
            for e, lo, hi in zip(drawn, lowest, highest) if lo <= hi}


def model_curves(experiments, table=None, extremes=None) -> dict:
    """Curves of the experiments' scaling models; `table`: the scaled reflections (for the
    positions scaling used, see the module docstring), or `extremes`: their
    scaled_z_extremes made elsewhere (scaled_z_extremes_over_ranks)."""
    # only the curves drawn need the z range scaling used
    drawn = drawn_physical_curves(experiments)
    if extremes is None:
        extremes = scaled_z_extremes(table, drawn)
    physical, array, kb_scale, kb_b, kb_identifier = [], [], [], [], []
    for e in experiments:
        model = e.scaling_model or {}
        kind = model.get("__id__")
        if kind == "physical" and not e.is_still and len(physical) < MAX_CURVE_DATASETS:
            curves = physical_curves(e, model, extremes.get(e.identifier))
            if len(physical) < MAX_SURFACE_DATASETS and _parameters(model, "absorption") \
                    is not None:
                curves["absorption"] = absorption_surface(model)
            physical.append(curves)
        elif kind == "array" and len(array) < MAX_SURFACE_DATASETS:
            array.append(array_maps(model))
        elif kind == "KB":
            scale, decay = _parameters(model, "scale"), _parameters(model, "decay")
            kb_identifier.append(e.identifier)
            kb_scale.append(float(f"{scale[0]:.6g}") if scale is not None else None)
            kb_b.append(float(f"{decay[0]:.6g}") if decay is not None else None)
    out = {"physical": physical}
    if array:
        out["array"] = array
    if kb_identifier:
        out["kb"] = {"identifier": kb_identifier, "scale": kb_scale, "B": kb_b}
    return out
