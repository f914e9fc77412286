"""Reference intensities for targeted scaling (dials.scale `reference=`, dials-scaling.md 2.5).

- `.mtz` (or a data `.cif`): merged intensities, or amplitudes squared (I = F^2,
  sigma_I = 2 F sigma_F, cctbx `as_intensity_array`); reflections with sigma <= 0 are dropped.
- `.pdb` or a model `.cif`: |F_model|^2 from the structure, computed as DIALS does with mmtbx:
  atomic scattering at the data's wavelength, a flat bulk-solvent model (`k_sol`, `b_sol`)
  and the resolution limit `d_min`; no sigmas.

The result is a ReferenceIntensities: ASU indices (non-anomalous unless asked for), one
intensity per unique reflection (equivalents averaged) and its variance (None for a model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import FileFormatError

MODEL_EXTENSIONS = (".pdb", ".ent", ".cif", ".mmcif")
DATA_EXTENSIONS = (".mtz",)


@dataclass
class ReferenceIntensities:
    path: str
    miller_index: np.ndarray  # (n, 3) int32, ASU of the data's space group
    intensity: np.ndarray  # (n,) float64
    variance: Optional[np.ndarray]  # (n,) float64, None for intensities from a model
    is_model: bool

    @property
    def n(self) -> int:
        return int(self.intensity.size)


def check_reference_path(path) -> None:
    """A readable file with a supported extension, or a FileFormatError naming it."""
    if not os.path.isfile(path):
        raise FileFormatError(f"reference={path}: no such file")
    if not str(path).lower().endswith(DATA_EXTENSIONS + MODEL_EXTENSIONS):
        raise FileFormatError(
            f"reference={path}: expected a .mtz (merged data) or a .pdb/.cif (model) file")


def read_reference(path, space_group, anomalous=False, d_min=None, wavelength=None,
                   k_sol=0.35, b_sol=46.0) -> ReferenceIntensities:
    """Intensities from a reference file, in the ASU of `space_group` (cctbx space_group)."""
    check_reference_path(path)
    lower = path.lower()
    if lower.endswith(".mtz"):
        array, is_model = _mtz_intensities(path), False
    elif lower.endswith(MODEL_EXTENSIONS):
        array = _cif_data_intensities(path) if lower.endswith(".cif") else None
        is_model = array is None
        if is_model:
            array = model_intensities(_xray_structure(path), d_min, wavelength, k_sol, b_sol)
    else:
        raise FileFormatError(
            f"reference={path}: expected a .mtz (merged data) or a .pdb/.cif (model) file")
    return _to_reference(path, array, space_group, anomalous, is_model)


def _mtz_intensities(path):
    from iotbx import mtz

    try:
        arrays = mtz.object(path).as_miller_arrays()
    except Exception as e:  # iotbx raises RuntimeError/Sorry for damaged files
        raise FileFormatError(f"reference={path}: not a readable MTZ file ({e})") from None
    for wanted in ("is_xray_intensity_array", "is_xray_amplitude_array"):
        for array in arrays:
            if getattr(array, wanted)() and array.sigmas() is not None:
                return array.as_intensity_array()
    for wanted in ("is_xray_intensity_array", "is_xray_amplitude_array"):
        for array in arrays:
            if getattr(array, wanted)():
                return array.as_intensity_array()
    raise FileFormatError(f"reference={path}: no intensity or amplitude column")


def _cif_data_intensities(path):
    """A data cif's intensities, or None when the cif holds a model."""
    from iotbx import cif

    try:
        arrays = cif.reader(file_path=path).as_miller_arrays()
    except Exception:
        return None
    for array in arrays:
        if array.is_xray_intensity_array() or array.is_xray_amplitude_array():
            return array.as_intensity_array()
    return None


def _xray_structure(path):
    import iotbx.pdb

    try:
        return iotbx.pdb.input(file_name=path).xray_structure_simple()
    except Exception as e:
        raise FileFormatError(f"reference={path}: not a readable model ({e})") from None


def model_intensities(xray_structure, d_min, wavelength=None, k_sol=0.35, b_sol=46.0):
    """|F_model|^2 with a flat bulk solvent (mmtbx fmodel, as DIALS's reference reader)."""
    from mmtbx.utils import fmodel_from_xray_structure

    try:
        from mmtbx.programs.fmodel import master_phil as fmodel_phil
    except ImportError:  # pragma: no cover - older cctbx
        from mmtbx.command_line.fmodel import (
            fmodel_from_xray_structure_master_params as fmodel_phil)
    xray_structure = xray_structure.deep_copy_scatterers()
    if wavelength:
        xray_structure.set_inelastic_form_factors(photon=wavelength, table="sasaki")
    params = fmodel_phil.extract()
    if d_min:
        params.high_resolution = float(d_min)
    params.fmodel.k_sol = float(k_sol)
    params.fmodel.b_sol = float(b_sol)
    if wavelength:
        params.wavelength = float(wavelength)
    fmodel = fmodel_from_xray_structure(xray_structure, params=params)
    return fmodel.f_model.as_intensity_array()


def _to_reference(path, array, space_group, anomalous, is_model) -> ReferenceIntensities:
    from cctbx import crystal

    array = array.customized_copy(
        crystal_symmetry=crystal.symmetry(unit_cell=array.unit_cell(), space_group=space_group))
    if not anomalous:
        array = array.as_non_anomalous_array()
    array = array.map_to_asu()
    if not array.is_unique_set_under_symmetry():
        array = array.merge_equivalents().array()
    intensity = np.array(array.data(), dtype=np.float64)
    index = np.array(array.indices(), dtype=np.int32).reshape(-1, 3)
    variance = None
    if not is_model and array.sigmas() is not None:
        variance = np.array(array.sigmas(), dtype=np.float64) ** 2
        keep = variance > 0
        if not keep.any():
            raise FileFormatError(f"reference={path}: no reflection with a positive sigma")
        intensity, index, variance = intensity[keep], index[keep], variance[keep]
    if intensity.size == 0:
        raise FileFormatError(f"reference={path}: no reflections")
    return ReferenceIntensities(path, index, intensity, variance, is_model)
