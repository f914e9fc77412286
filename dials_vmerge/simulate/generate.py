"""The simulator driver: crystal -> predictions -> true scales -> noise -> table and truth.

Random streams are derived from the seed and a fixed key per stage (and per experiment and
chunk), so the output depends only on the settings, never on thread count or timing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from cctbx import uctbx
from scipy.special import ndtr

from ..table import ReflectionTable
from . import crystal as xtal
from . import expt_json, instrument as instr, observe, predict, truth_model
from .settings import SimulationSettings
from .truth import Truth

CHUNK_ROWS = 1 << 20
# Rows used to calibrate the counts scale to the requested mean I/sigma.
CALIBRATION_ROWS = 200_000
# Reflections close to the rotation axis cross the sphere slowly; cap their phi width.
MIN_ABS_ZETA = 0.05
SPOT_HALF_WIDTH_SIGMAS = 3.0
Z_CENTROID_SIGMA = 0.05

_STRUCTURE, _ORIENTATION, _MODEL, _GEOMETRY, _NOISE, _IDENTIFIER, _DAMAGE = range(1, 8)


def _stream(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


@dataclass
class _Rows:
    """Observations of one experiment before noise (one row per partial piece)."""

    hkl: np.ndarray
    s1: np.ndarray
    phi_cal: np.ndarray
    x_cal: np.ndarray
    y_cal: np.ndarray
    z_cal: np.ndarray
    zeta: Optional[np.ndarray]
    d: np.ndarray
    lp: np.ndarray
    qe: np.ndarray
    partiality: np.ndarray
    partial_id: np.ndarray
    z_lo: np.ndarray
    z_hi: np.ndarray
    x_obs: np.ndarray
    y_obs: np.ndarray
    z_obs: np.ndarray
    z_obs_variance: np.ndarray
    code: np.ndarray
    g: Optional[np.ndarray] = None

    @property
    def n(self) -> int:
        return len(self.d)


def _identifier(rng) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _scaled_cell(cell, space_group, d_min, target_unique):
    """The cell scaled isotropically so that about `target_unique` reflections lie within d_min."""
    from cctbx import crystal as cctbx_crystal, miller

    current = miller.build_set(
        cctbx_crystal.symmetry(unit_cell=cell, space_group=space_group), False, d_min=d_min
    ).remove_systematic_absences().size()
    factor = (target_unique / max(current, 1)) ** (1.0 / 3.0)
    p = cell.parameters()
    return uctbx.unit_cell((p[0] * factor, p[1] * factor, p[2] * factor) + tuple(p[3:]))


def _instrument(settings: SimulationSettings) -> instr.Instrument:
    instrument = instr.Instrument(
        wavelength_a=settings.wavelength,
        polarization_fraction=settings.polarization_fraction,
        pixel_size_mm=settings.pixel_size_mm,
        image_size_px=tuple(int(v) for v in settings.image_size),
        sensor_thickness_mm=settings.sensor_thickness_mm,
        sensor_mu_per_mm=settings.sensor_mu_per_mm,
    )
    instrument.distance_mm = (
        settings.distance_mm if settings.distance_mm else instrument.distance_for_resolution(settings.d_min)
    )
    return instrument


def _orientation(settings, rng):
    if settings.orientation is not None:
        return np.array(settings.orientation, dtype=float).reshape(3, 3)
    return xtal.random_rotation(rng)


def _common_columns(rows: _Rows, a_matrix, instrument, rotation: bool):
    rows.d = 1.0 / np.linalg.norm(rows.hkl.astype(float) @ a_matrix.T, axis=1)
    rows.lp = instr.lorentz_polarisation(instrument, rows.s1, rotation)
    rows.qe = instr.quantum_efficiency(instrument, rows.s1)


def _rotation_rows(settings, instrument, pred: predict.Predictions, a_matrix, n_images,
                   rng) -> _Rows:
    width_rad = np.radians(settings.osc_width_deg)
    phi0 = np.radians(settings.osc_start_deg)
    z_cal = (pred.phi_rad - phi0) / width_rad
    zeta = instr.zeta(instrument, pred.s1)
    sigma_z = np.radians(settings.mosaicity_deg) / (width_rad * np.maximum(np.abs(zeta), MIN_ABS_ZETA))
    lo = np.maximum(z_cal - SPOT_HALF_WIDTH_SIGMAS * sigma_z, 0.0)
    hi = np.minimum(z_cal + SPOT_HALF_WIDTH_SIGMAS * sigma_z, float(n_images))

    # Split a fraction of the reflections spanning a frame boundary into two partials, as
    # integration does for reflections shared between processing blocks.
    boundary = np.clip(np.round(z_cal), np.floor(lo) + 1.0, np.ceil(hi) - 1.0)
    below = ndtr((boundary - z_cal) / sigma_z) - ndtr((lo - z_cal) / sigma_z)
    above = ndtr((hi - z_cal) / sigma_z) - ndtr((boundary - z_cal) / sigma_z)
    # Both pieces must be genuine partials (DIALS sums only rows with partiality < 0.99).
    can_split = ((boundary > lo) & (boundary < hi) & (below > 0.01) & (above > 0.01)
                 & (below < 0.99) & (above < 0.99))
    split = can_split & (rng.random(pred.n) < settings.split_fraction)
    source = np.repeat(np.arange(pred.n), np.where(split, 2, 1))
    first_piece = np.ones(len(source), dtype=bool)
    first_piece[1:] = source[1:] != source[:-1]
    piece_lo = np.where(first_piece, lo[source], boundary[source])
    piece_hi = np.where(split[source] & first_piece, boundary[source], hi[source])

    centre = z_cal[source]
    sigma = sigma_z[source]
    partiality = ndtr((piece_hi - centre) / sigma) - ndtr((piece_lo - centre) / sigma)
    z_obs = observe.truncated_normal_mean(centre, sigma, piece_lo, piece_hi)
    z_obs = np.clip(z_obs + Z_CENTROID_SIGMA * rng.standard_normal(len(source)),
                    piece_lo, np.nextafter(piece_hi, -np.inf))
    x_cal = pred.x_mm / instrument.pixel_size_mm
    y_cal = pred.y_mm / instrument.pixel_size_mm
    pos_sigma = settings.position_sigma_px
    x_obs = x_cal[source] + pos_sigma * rng.standard_normal(len(source))
    y_obs = y_cal[source] + pos_sigma * rng.standard_normal(len(source))
    rows = _Rows(
        hkl=pred.miller_index[source], s1=pred.s1[source], phi_cal=pred.phi_rad[source],
        x_cal=x_cal[source], y_cal=y_cal[source], z_cal=z_cal[source], zeta=zeta[source],
        d=None, lp=None, qe=None, partiality=partiality, partial_id=source.astype(np.uint64),
        z_lo=piece_lo, z_hi=piece_hi, x_obs=x_obs, y_obs=y_obs, z_obs=z_obs,
        z_obs_variance=np.full(len(source), Z_CENTROID_SIGMA ** 2) + (sigma / 6.0) ** 2,
        code=pred.code[source],
    )
    _common_columns(rows, a_matrix, instrument, rotation=True)
    return rows


def _still_rows(settings, instrument, pred: predict.Predictions, a_matrix, rng) -> _Rows:
    dstar = np.linalg.norm(pred.miller_index.astype(float) @ a_matrix.T, axis=1)
    rs = _still_rs(settings, dstar)
    partiality = np.exp(-0.5 * (pred.excitation / rs) ** 2)
    keep = np.flatnonzero(partiality >= settings.still_min_partiality)
    n = len(keep)
    x_cal = pred.x_mm[keep] / instrument.pixel_size_mm
    y_cal = pred.y_mm[keep] / instrument.pixel_size_mm
    pos_sigma = settings.position_sigma_px
    rows = _Rows(
        hkl=pred.miller_index[keep], s1=pred.s1[keep], phi_cal=np.zeros(n),
        x_cal=x_cal, y_cal=y_cal, z_cal=np.zeros(n), zeta=None, d=None, lp=None, qe=None,
        partiality=partiality[keep], partial_id=np.arange(n, dtype=np.uint64),
        z_lo=np.zeros(n), z_hi=np.ones(n),
        x_obs=x_cal + pos_sigma * rng.standard_normal(n),
        y_obs=y_cal + pos_sigma * rng.standard_normal(n),
        z_obs=np.full(n, 0.5), z_obs_variance=np.zeros(n), code=pred.code[keep],
    )
    _common_columns(rows, a_matrix, instrument, rotation=False)
    return rows


def _still_rs(settings, dstar):
    """Reciprocal-space spot radius: domain-size term plus mosaic spread."""
    return 1.0 / settings.still_domain_size_a + dstar * np.radians(settings.still_mosaic_half_deg)


def _sweep_images(settings, space_group) -> int:
    if settings.n_images:
        return int(settings.n_images)
    equivalents = xtal.equivalents_per_unique(space_group)
    # Each P1 point crosses the sphere twice per turn; ~85% of the crossings are recorded
    # (blind region near the axis, panel edges).
    range_deg = settings.multiplicity * 180.0 / (equivalents * settings.n_sweeps * 0.85)
    range_deg = min(range_deg, 360.0)
    return max(1, int(round(range_deg / settings.osc_width_deg)))


def simulate_from_settings(settings: SimulationSettings):
    """Simulate a dataset. Returns (experiments_dict, ReflectionTable, Truth)."""
    settings.validate()
    seed = int(settings.seed)
    model_file = settings.true_intensities not in ("wilson", "random_structure")
    if model_file:
        xray_structure, space_group, cell = xtal.read_model_structure(settings.true_intensities)
    else:
        space_group, cell = xtal.make_symmetry(settings.space_group, settings.unit_cell)
    if settings.mode == "rotation" and settings.n_obs_target and not model_file:
        cell = _scaled_cell(cell, space_group, settings.d_min,
                            settings.n_obs_target / settings.multiplicity)
    if settings.true_intensities == "wilson":
        structure = xtal.draw_true_structure(
            space_group, cell, settings.d_min, settings.wilson_b, settings.anomalous,
            settings.bijvoet_ratio, _stream(seed, _STRUCTURE),
        )
    else:
        if not model_file:
            xray_structure = xtal.random_xray_structure(
                space_group, cell, settings.structure_n_atoms,
                int(_stream(seed, _STRUCTURE).integers(2 ** 31)))
        structure = xtal.structure_true_intensities(
            space_group, cell, settings.d_min, xray_structure, settings.wavelength,
            settings.k_sol, settings.b_sol)
    grid, box = xtal.build_lookup_grid(structure)
    instrument = _instrument(settings)
    hall = space_group.type().hall_symbol()
    id_rng = _stream(seed, _IDENTIFIER)

    rows_list: List[_Rows] = []
    a_matrices, models, scans, names, identifiers = [], [], [], [], []
    if settings.mode == "rotation":
        n_images = _sweep_images(settings, space_group)
        orientation_rng = _stream(seed, _ORIENTATION)
        a_matrices = [xtal.ub_matrix(cell, _orientation(settings, orientation_rng))
                      for _ in range(settings.n_sweeps)]

        def predict_all(n_img):
            span = np.radians(settings.osc_width_deg * n_img)
            return [predict.predict_rotation(instrument, a, grid, box, settings.d_min,
                                             np.radians(settings.osc_start_deg), span)
                    for a in a_matrices]

        predictions = predict_all(n_images)
        if not settings.n_images:
            # One correction of the sweep width towards the requested multiplicity.
            wanted = settings.multiplicity * structure.n_unique
            got = sum(p.n for p in predictions)
            ratio = wanted / max(got, 1)
            corrected = max(1, int(round(n_images * ratio)))
            corrected = min(corrected, int(360.0 / settings.osc_width_deg))
            if abs(corrected - n_images) / n_images > 0.05:
                n_images = corrected
                predictions = predict_all(n_images)
        for i, a in enumerate(a_matrices):
            rows = _rotation_rows(settings, instrument, predictions[i], a, n_images,
                                  _stream(seed, _GEOMETRY, i))
            predictions[i] = None  # memory: keep only one sweep's raw predictions alive
            model_rng = _stream(seed, _MODEL, i)
            if settings.model == "physical":
                model = truth_model.draw_physical(settings, model_rng, settings.osc_start_deg,
                                                  settings.osc_width_deg, n_images)
            elif settings.model == "array":
                model = truth_model.draw_array(settings, model_rng, settings.osc_start_deg,
                                               settings.osc_width_deg, n_images, rows.d,
                                               rows.x_obs, rows.y_obs)
            elif settings.model == "dose_decay":
                model = truth_model.draw_dose_decay(settings, model_rng, settings.osc_start_deg,
                                                    settings.osc_width_deg, n_images)
            else:
                model = truth_model.draw_kb(settings, model_rng)
            phi_obs = np.radians(settings.osc_start_deg) + rows.z_obs * np.radians(settings.osc_width_deg)
            rows.g = truth_model.evaluate(model, rows.z_obs, rows.d, phi_obs, rows.s1,
                                          instrument, rows.x_obs, rows.y_obs)
            if settings.damage_sweep == i + 1:
                _apply_damage(settings, rows, n_images, _stream(seed, _DAMAGE, i))
            rows_list.append(rows)
            models.append(model)
            scans.append((settings.osc_start_deg, settings.osc_width_deg, n_images))
            names.append(f"sweep_{i + 1}_#####.cbf")
            identifiers.append(_identifier(id_rng))
    else:
        n_stills = _number_of_stills(settings, instrument, cell, grid, box)
        orientation_rng = _stream(seed, _ORIENTATION)
        rs_max = _still_rs(settings, 1.0 / settings.d_min)
        max_excitation = rs_max * np.sqrt(-2.0 * np.log(settings.still_min_partiality))
        for i in range(n_stills):
            a = xtal.ub_matrix(cell, _orientation(settings, orientation_rng))
            pred = predict.predict_still(instrument, a, grid, box, settings.d_min, max_excitation)
            rows = _still_rows(settings, instrument, pred, a, _stream(seed, _GEOMETRY, i))
            model = truth_model.draw_kb(settings, _stream(seed, _MODEL, i))
            rows.g = truth_model.evaluate(model, rows.z_obs, rows.d)
            a_matrices.append(a)
            rows_list.append(rows)
            models.append(model)
            names.append(f"still_{i + 1:06d}.cbf")
            identifiers.append(_identifier(id_rng))
        scans = None

    counts_scale = _calibrate(settings, structure, rows_list)
    table, truth_rows = _measure(settings, structure, rows_list, identifiers, counts_scale,
                                 rotation=settings.mode == "rotation")
    structure = structure.scaled(counts_scale)
    experiments = expt_json.experiment_list_dict(
        instrument, identifiers, a_matrices, hall, scans, names, settings.mosaicity_deg
    )
    truth = Truth(
        seed=seed, settings=settings.as_dict(), structure=structure, models=models,
        identifiers=identifiers, counts_scale=counts_scale, unit_cell=cell.parameters(),
        **truth_rows,
    )
    return experiments, table, truth


def _apply_damage(settings, rows, n_images, rng) -> None:
    """Unmodellable damage over the sweep's last images: the true g of each observation
    there (its truth too) gets an independent log-normal factor."""
    damaged = rows.z_obs >= (1.0 - settings.damage_last_fraction) * n_images
    rows.g[damaged] *= np.exp(settings.damage_sd * rng.standard_normal(int(damaged.sum())))


def _number_of_stills(settings, instrument, cell, grid, box) -> int:
    if settings.n_stills:
        return int(settings.n_stills)
    if not settings.n_obs_target:
        return 100
    # Pilot: the mean number of recorded reflections on a few random stills.
    rng = _stream(settings.seed, _ORIENTATION, 999)
    rs_max = _still_rs(settings, 1.0 / settings.d_min)
    max_excitation = rs_max * np.sqrt(-2.0 * np.log(settings.still_min_partiality))
    counts = []
    for _ in range(8):
        a = xtal.ub_matrix(cell, xtal.random_rotation(rng))
        pred = predict.predict_still(instrument, a, grid, box, settings.d_min, max_excitation)
        dstar = np.linalg.norm(pred.miller_index.astype(float) @ a.T, axis=1)
        p = np.exp(-0.5 * (pred.excitation / _still_rs(settings, dstar)) ** 2)
        counts.append(int((p >= settings.still_min_partiality).sum()))
    per_still = max(np.mean(counts), 1.0)
    return max(1, int(round(settings.n_obs_target / per_still)))


def _unit_signal(rows: _Rows, structure) -> np.ndarray:
    uid = rows.code >> 1
    hand = rows.code & 1
    j = np.where(hand == 0, structure.intensity_plus[uid], structure.intensity_minus[uid])
    return rows.g * j * rows.qe / rows.lp, j


def _calibrate(settings, structure, rows_list) -> float:
    total = sum(r.n for r in rows_list)
    if total == 0:
        raise ValueError("the simulation predicted no reflections; check d_min and the geometry")
    step = max(1, total // CALIBRATION_ROWS)
    parts = [[], [], [], []]
    offset = 0
    for rows in rows_list:
        # every step-th row of the whole dataset, counted globally
        first = (-offset) % step
        take = np.arange(first, rows.n, step)
        offset += rows.n
        unit, _ = _unit_signal(rows, structure)
        n_fg, n_bg = observe.pixel_counts(rows.z_lo[take], rows.z_hi[take])
        parts[0].append(unit[take])
        parts[1].append(rows.partiality[take])
        parts[2].append(n_fg)
        parts[3].append(n_bg)
    unit, p, n_fg, n_bg = (np.concatenate(x) for x in parts)
    return observe.calibrate_counts_scale(unit, p, n_fg, n_bg, settings.background_per_pixel,
                                          settings.mean_i_over_sigma)


def _measure(settings, unit_structure, rows_list, identifiers, counts_scale, rotation: bool):
    """Noise and columns. `unit_structure` holds the intensities before the counts scale."""
    n = sum(r.n for r in rows_list)
    out: Dict[str, np.ndarray] = {
        "miller_index": np.empty((n, 3), np.int32),
        "id": np.empty(n, np.int32),
        "d": np.empty(n),
        "s1": np.empty((n, 3)),
        "xyzcal.px": np.empty((n, 3)),
        "xyzcal.mm": np.empty((n, 3)),
        "xyzobs.px.value": np.empty((n, 3)),
        "xyzobs.px.variance": np.empty((n, 3)),
        "xyzobs.mm.value": np.empty((n, 3)),
        "xyzobs.mm.variance": np.empty((n, 3)),
        "intensity.prf.value": np.empty(n),
        "intensity.prf.variance": np.empty(n),
        "intensity.sum.value": np.empty(n),
        "intensity.sum.variance": np.empty(n),
        "flags": np.empty(n, np.uint64),
        "lp": np.empty(n),
        "qe": np.empty(n),
        "partiality": np.empty(n),
        "partial_id": np.empty(n, np.uint64),
        "panel": np.zeros(n, np.uint64),
        "imageset_id": np.empty(n, np.int32),
        "entering": np.empty(n, bool),
        "bbox": np.empty((n, 6), np.int32),
        "background.mean": np.full(n, float(settings.background_per_pixel)),
    }
    if rotation:
        out["zeta"] = np.empty(n)
    truth = {
        "inverse_scale_factor": np.empty(n),
        "true_intensity": np.empty(n),
        "unique_index": np.empty(n, np.int64),
        "hand": np.empty(n, np.int8),
        "is_outlier": np.empty(n, bool),
    }
    pixel = settings.pixel_size_mm
    width_rad = np.radians(settings.osc_width_deg) if rotation else 0.0
    phi0 = np.radians(settings.osc_start_deg) if rotation else 0.0
    row0 = 0
    partial_offset = 0
    for e in range(len(rows_list)):
        rows = rows_list[e]
        unit, j_unit = _unit_signal(rows, unit_structure)
        j = j_unit * counts_scale
        for c, start in enumerate(range(0, rows.n, CHUNK_ROWS)):
            stop = min(start + CHUNK_ROWS, rows.n)
            sl = slice(start, stop)
            dst = slice(row0 + start, row0 + stop)
            rng = _stream(settings.seed, _NOISE, e, c)
            i_sum, v_sum, i_prf, v_prf, prf_ok, outlier = observe.simulate_measurements(
                rng, unit[sl], rows.partiality[sl], rows.z_lo[sl], rows.z_hi[sl],
                counts_scale, settings,
            )
            out["intensity.sum.value"][dst] = i_sum
            out["intensity.sum.variance"][dst] = v_sum
            out["intensity.prf.value"][dst] = i_prf
            out["intensity.prf.variance"][dst] = v_prf
            out["flags"][dst] = np.where(
                prf_ok, np.uint64(observe.INTEGRATED_FLAGS),
                np.uint64(observe.INTEGRATED_FLAGS & ~observe.dials_flags.integrated_prf),
            )
            truth["is_outlier"][dst] = outlier
        dst = slice(row0, row0 + rows.n)
        out["miller_index"][dst] = rows.hkl
        out["id"][dst] = e
        out["imageset_id"][dst] = e
        out["d"][dst] = rows.d
        out["s1"][dst] = rows.s1
        out["xyzcal.px"][dst] = np.column_stack([rows.x_cal, rows.y_cal, rows.z_cal])
        out["xyzcal.mm"][dst] = np.column_stack([rows.x_cal * pixel, rows.y_cal * pixel, rows.phi_cal])
        out["xyzobs.px.value"][dst] = np.column_stack([rows.x_obs, rows.y_obs, rows.z_obs])
        pos_var = np.full(rows.n, settings.position_sigma_px ** 2)
        out["xyzobs.px.variance"][dst] = np.column_stack([pos_var, pos_var, rows.z_obs_variance])
        phi_obs = (phi0 + rows.z_obs * width_rad) if rotation else np.zeros(rows.n)
        out["xyzobs.mm.value"][dst] = np.column_stack(
            [rows.x_obs * pixel, rows.y_obs * pixel, phi_obs])
        out["xyzobs.mm.variance"][dst] = np.column_stack(
            [pos_var * pixel ** 2, pos_var * pixel ** 2, rows.z_obs_variance * width_rad ** 2])
        out["lp"][dst] = rows.lp
        out["qe"][dst] = rows.qe
        out["partiality"][dst] = rows.partiality
        out["partial_id"][dst] = rows.partial_id + np.uint64(partial_offset)
        partial_offset += int(rows.partial_id.max()) + 1 if rows.n else 0
        if rotation:
            out["zeta"][dst] = rows.zeta
            out["entering"][dst] = rows.zeta < 0
        else:
            out["entering"][dst] = False
        x0 = np.floor(rows.x_obs).astype(np.int32) - 3
        y0 = np.floor(rows.y_obs).astype(np.int32) - 3
        out["bbox"][dst] = np.column_stack([
            x0, x0 + 7, y0, y0 + 7,
            np.floor(rows.z_lo).astype(np.int32),
            np.maximum(np.ceil(rows.z_hi), np.floor(rows.z_lo) + 1).astype(np.int32),
        ])
        truth["inverse_scale_factor"][dst] = rows.g
        truth["true_intensity"][dst] = j
        truth["unique_index"][dst] = rows.code >> 1
        truth["hand"][dst] = rows.code & 1
        row0 += rows.n
        rows_list[e] = None  # memory: this experiment's intermediate rows are now in `out`
    table = ReflectionTable(n, {i: ident for i, ident in enumerate(identifiers)})
    for name in sorted(out):
        table[name] = out[name]
    return table, truth
