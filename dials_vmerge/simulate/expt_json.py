"""The simulated experiments as an ExperimentList JSON dict (dials-formats.md 4.1-4.2)."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from .crystal import real_space_vectors
from .instrument import Instrument


def _floats(values) -> List[float]:
    return [float(v) for v in np.asarray(values, dtype=float).ravel()]


def beam_dict(instrument: Instrument) -> dict:
    unit = instrument.beam_direction / np.linalg.norm(instrument.beam_direction)
    return {
        "direction": _floats(unit),
        "wavelength": float(instrument.wavelength_a),
        "divergence": 0.0,
        "sigma_divergence": 0.0,
        "polarization_normal": _floats(instrument.polarization_normal),
        "polarization_fraction": float(instrument.polarization_fraction),
        "flux": 0.0,
        "transmission": 1.0,
    }


def _panel_like(name, fast, slow, origin, image_size, pixel_size, thickness, mu, material):
    return {
        "name": name,
        "type": "SENSOR_PAD",
        "fast_axis": _floats(fast),
        "slow_axis": _floats(slow),
        "origin": _floats(origin),
        "raw_image_offset": [0, 0],
        "image_size": [int(v) for v in image_size],
        "pixel_size": _floats(pixel_size),
        "trusted_range": [-1.0, 1e6] if name else [0.0, 0.0],
        "thickness": float(thickness),
        "material": material,
        "mu": float(mu),
        "identifier": "",
        "mask": [],
        "gain": 1.0,
        "pedestal": 0.0,
        "px_mm_strategy": {"type": "SimplePxMmStrategy"},
    }


def detector_dict(instrument: Instrument) -> dict:
    pixel = instrument.pixel_size_mm
    panel = _panel_like(
        "Panel", instrument.fast_axis, instrument.slow_axis, instrument.detector_origin,
        instrument.image_size_px, (pixel, pixel), instrument.sensor_thickness_mm,
        instrument.sensor_mu_per_mm, "Si" if instrument.sensor_thickness_mm > 0 else "",
    )
    hierarchy = _panel_like("", (1, 0, 0), (0, 1, 0), (0, 0, 0), (0, 0), (0.0, 0.0), 0.0, 0.0, "")
    hierarchy["children"] = [{"panel": 0}]
    return {"panels": [panel], "hierarchy": hierarchy}


def goniometer_dict(instrument: Instrument) -> dict:
    return {
        "rotation_axis": _floats(instrument.unit_rotation_axis),
        "fixed_rotation": _floats(instrument.fixed_rotation),
        "setting_rotation": _floats(instrument.setting_rotation),
    }


def scan_dict(identifier: str, osc_start_deg: float, osc_width_deg: float, n_images: int) -> dict:
    return {
        "image_range": [1, int(n_images)],
        "batch_offset": 0,
        "oscillation": [float(osc_start_deg), float(osc_width_deg)],
        "exposure_time": [0.1] * int(n_images),
        "epochs": [float(i) * 0.1 for i in range(int(n_images))],
        "valid_image_ranges": {identifier: [[1, int(n_images)]]},
    }


def crystal_dict(a_matrix: np.ndarray, hall_symbol: str) -> dict:
    real = real_space_vectors(a_matrix)
    return {
        "__id__": "crystal",
        "real_space_a": _floats(real[0]),
        "real_space_b": _floats(real[1]),
        "real_space_c": _floats(real[2]),
        "space_group_hall_symbol": hall_symbol,
    }


def experiment_list_dict(instrument: Instrument, identifiers, a_matrices, hall_symbol: str,
                         scans: Optional[list], image_names: List[str],
                         mosaicity_deg: float) -> dict:
    """One experiment per identifier; beam, detector (and goniometer) shared.

    scans: per experiment (osc_start_deg, osc_width_deg, n_images) or None for stills.
    """
    rotation = scans is not None
    experiments, imagesets, crystals, scan_list, profiles = [], [], [], [], []
    for i, identifier in enumerate(identifiers):
        entry = {"__id__": "Experiment", "identifier": identifier, "beam": 0, "detector": 0}
        if rotation:
            entry["goniometer"] = 0
            entry["scan"] = i
            scan_list.append(scan_dict(identifier, *scans[i]))
            imagesets.append({
                "__id__": "ImageSequence", "template": image_names[i], "mask": None,
                "gain": None, "pedestal": None, "dx": None, "dy": None,
                "params": {"dynamic_shadowing": "Auto", "multi_panel": False},
            })
            profiles.append({"__id__": "gaussian_rs", "n_sigma": 3.0,
                             "sigma_b": 0.02, "sigma_m": float(mosaicity_deg)})
        else:
            imagesets.append({"__id__": "ImageSet", "images": [image_names[i]], "mask": None,
                              "gain": None, "pedestal": None, "dx": None, "dy": None,
                              "params": {"dynamic_shadowing": "Auto", "multi_panel": False}})
        entry["crystal"] = i
        if rotation:
            entry["profile"] = i
        entry["imageset"] = i
        crystals.append(crystal_dict(a_matrices[i], hall_symbol))
        experiments.append(entry)
    return {
        "__id__": "ExperimentList",
        "experiment": experiments,
        "imageset": imagesets,
        "beam": [beam_dict(instrument)],
        "detector": [detector_dict(instrument)],
        "goniometer": [goniometer_dict(instrument)] if rotation else [],
        "scan": scan_list,
        "crystal": crystals,
        "profile": profiles,
        "scaling_model": [],
    }
