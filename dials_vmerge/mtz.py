"""MTZ output: merged (the dials.merge column set) and unmerged (as DIALS exports it).

Written with iotbx.mtz to a temporary file beside the target and renamed on success.
Missing values (e.g. I(-) of centric reflections, amplitudes French-Wilson rejected) are
written as MTZ missing numbers (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
from cctbx.array_family import flex
from iotbx import mtz

from .io.atomic import atomic_output_path

MERGED_COLUMNS = [
    ("FreeR_flag", "I"), ("IMEAN", "J"), ("SIGIMEAN", "Q"), ("N", "I"),
    ("F", "F"), ("SIGF", "Q"),
    ("I(+)", "K"), ("SIGI(+)", "M"), ("I(-)", "K"), ("SIGI(-)", "M"),
    ("N(+)", "I"), ("N(-)", "I"),
    ("F(+)", "G"), ("SIGF(+)", "L"), ("F(-)", "G"), ("SIGF(-)", "L"),
    ("DANO", "D"), ("SIGDANO", "Q"),
]


def _new_object(space_group, unit_cell, n_rows, title, crystal_name, project_name,
                dataset_name, wavelength):
    obj = mtz.object()
    obj.set_title(title)
    obj.set_space_group_info(space_group.info())
    obj.set_hkl_base(unit_cell)
    crystal = obj.add_crystal(crystal_name, project_name, unit_cell.parameters())
    dataset = crystal.add_dataset(dataset_name, float(wavelength))
    obj.adjust_column_array_sizes(int(n_rows))
    obj.set_n_reflections(int(n_rows))
    return obj, dataset


def _add(dataset, label, column_type, values):
    values = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(values)
    column = dataset.add_column(label, column_type)
    column.set_values(
        values=flex.float(np.where(valid, values, 0.0).astype(np.float32)),
        selection_valid=flex.bool(valid),
    )


def _write(obj, path):
    with atomic_output_path(path) as temp:
        obj.write(temp)


def free_r_flags(n: int, fraction: float = 0.05, seed: int = 0) -> np.ndarray:
    """CCP4-convention FreeR_flag: integers 0..1/fraction - 1, the free set being 0."""
    n_values = max(2, int(round(1.0 / fraction)))
    return np.random.default_rng(seed).integers(0, n_values, size=n)


def write_merged_mtz(path, space_group, unit_cell, miller_index, columns: Dict[str, np.ndarray],
                     wavelength=1.0, title="dials.vmerge merged", crystal_name="XTAL",
                     project_name="DIALS", dataset_name="NATIVE"):
    """Merged MTZ with H K L and the dials.merge columns present in `columns` (label ->
    values per row; NaN = missing), in the dials.merge order and types."""
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    obj, dataset = _new_object(space_group, unit_cell, len(miller_index), title, crystal_name,
                               project_name, dataset_name, wavelength)
    for i, label in enumerate("HKL"):
        _add(dataset, label, "H", miller_index[:, i])
    known = dict(MERGED_COLUMNS)
    for label, column_type in MERGED_COLUMNS:
        if label in columns:
            _add(dataset, label, column_type, columns[label])
    for label, values in columns.items():
        if label not in known:
            raise ValueError(f"unknown merged MTZ column {label}")
    _write(obj, path)


def write_unmerged_mtz(path, space_group, unit_cell, miller_index, isym, batch, intensity,
                       sigma, scale=None, scale_sigma=None, extra: Optional[dict] = None,
                       batch_ranges=None, wavelength=1.0, title="dials.vmerge unmerged",
                       crystal_name="XTAL", project_name="DIALS", dataset_name="NATIVE"):
    """Unmerged MTZ: H K L (ASU) M/ISYM BATCH I SIGI [SCALEUSED SIGSCALEUSED] and optional
    extra real columns (FRACTIONCALC XDET YDET ROT LP QE), rows as given."""
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    obj, dataset = _new_object(space_group, unit_cell, len(miller_index), title, crystal_name,
                               project_name, dataset_name, wavelength)
    for i, label in enumerate("HKL"):
        _add(dataset, label, "H", miller_index[:, i])
    _add(dataset, "M_ISYM", "Y", isym)
    _add(dataset, "BATCH", "B", batch)
    _add(dataset, "I", "J", intensity)
    _add(dataset, "SIGI", "Q", sigma)
    if scale is not None:
        _add(dataset, "SCALEUSED", "R", scale)
    if scale_sigma is not None:
        _add(dataset, "SIGSCALEUSED", "R", scale_sigma)
    for label in ("FRACTIONCALC", "XDET", "YDET", "ROT", "LP", "QE"):
        if extra and label in extra:
            _add(dataset, label, "R", extra[label])
    for b in np.unique(np.asarray(batch, dtype=np.int64)):
        obj.add_batch().set_num(int(b)).set_nbsetid(1)
    _write(obj, path)
