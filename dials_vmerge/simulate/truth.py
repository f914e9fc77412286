"""The known truth of a simulation, and its HDF5 file (`truth.h5`).

Stable dataset names (read by checks outside the test suite):
  observations/inverse_scale_factor  true g, one per .refl row, same order
  reflections/miller_index           (N, 3) non-anomalous ASU indices
  reflections/intensity              true J (Friedel mean), same order
Also: observations/{true_intensity (J of the observed hand), unique_index (row of
reflections/), hand (0 = I(+), 1 = I(-)), is_outlier}; reflections/{centric, epsilon, d};
anomalous/{miller_index, intensity} (both hands) when the anomalous signal is on;
model/experiment_<i>/<component> parameter arrays with the DIALS-layout JSON of each model in
the attribute `scaling_model_json`; root attributes seed, settings_json, space group, cell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List

import h5py
import numpy as np

from ..io.atomic import atomic_output_path
from .crystal import TrueStructure
from .truth_model import TrueModel

TRUTH_FORMAT_VERSION = 1


@dataclass
class Truth:
    seed: int
    settings: Dict
    structure: TrueStructure
    models: List[TrueModel]
    identifiers: List[str]
    counts_scale: float
    unit_cell: tuple
    inverse_scale_factor: np.ndarray
    true_intensity: np.ndarray
    unique_index: np.ndarray
    hand: np.ndarray
    is_outlier: np.ndarray

    @property
    def miller_index(self) -> np.ndarray:
        return self.structure.miller_index

    @property
    def intensity(self) -> np.ndarray:
        return self.structure.mean_intensity

    def scaling_models(self) -> List[Dict]:
        return [m.scaling_model_dict() for m in self.models]

    def write(self, path: str) -> None:
        with atomic_output_path(path) as temp:
            # No timestamps, fixed layout: the same truth gives the same bytes.
            with h5py.File(temp, "w", track_order=False) as f:
                self._fill(f)

    def _fill(self, f) -> None:
        def dataset(group, name, values):
            group.create_dataset(name, data=np.ascontiguousarray(values), track_times=False)

        f.attrs["format_version"] = TRUTH_FORMAT_VERSION
        f.attrs["seed"] = int(self.seed)
        f.attrs["settings_json"] = json.dumps(self.settings, sort_keys=True)
        f.attrs["space_group_hall_symbol"] = self.structure.space_group.type().hall_symbol()
        f.attrs["space_group_symbol"] = str(self.structure.space_group.info())
        f.attrs["unit_cell"] = np.array(self.unit_cell, dtype=float)
        f.attrs["counts_scale"] = float(self.counts_scale)
        f.attrs["anomalous"] = bool(self.structure.anomalous)
        f.attrs["model"] = self.models[0].kind if self.models else ""
        obs = f.create_group("observations")
        dataset(obs, "inverse_scale_factor", self.inverse_scale_factor)
        dataset(obs, "true_intensity", self.true_intensity)
        dataset(obs, "unique_index", self.unique_index)
        dataset(obs, "hand", self.hand)
        dataset(obs, "is_outlier", self.is_outlier.astype(np.uint8))
        refl = f.create_group("reflections")
        dataset(refl, "miller_index", self.structure.miller_index.astype(np.int32))
        dataset(refl, "intensity", self.structure.mean_intensity)
        dataset(refl, "centric", self.structure.centric.astype(np.uint8))
        dataset(refl, "epsilon", self.structure.epsilon)
        dataset(refl, "d", self.structure.d)
        if self.structure.anomalous:
            index, intensity = self.structure.anomalous_arrays()
            anom = f.create_group("anomalous")
            dataset(anom, "miller_index", index)
            dataset(anom, "intensity", intensity)
        models = f.create_group("model")
        models.attrs["identifiers_json"] = json.dumps(self.identifiers)
        for i, model in enumerate(self.models):
            group = models.create_group(f"experiment_{i}")
            group.attrs["identifier"] = self.identifiers[i]
            group.attrs["kind"] = model.kind
            group.attrs["scaling_model_json"] = json.dumps(model.scaling_model_dict())
            for name, values in model.parameters.items():
                dataset(group, name, np.asarray(values, dtype=float))


def read_truth(path: str) -> Dict[str, np.ndarray]:
    """The truth file's main arrays and attributes as a flat dict (for tests and benchmarks)."""
    out: Dict = {}
    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            out[key] = value
        for group in ("observations", "reflections", "anomalous"):
            if group in f:
                for name, ds in f[group].items():
                    out[f"{group}/{name}"] = ds[()]
        out["scaling_models"] = [
            json.loads(f["model"][k].attrs["scaling_model_json"])
            for k in sorted(f["model"], key=lambda k: int(k.split("_")[1]))
        ]
    return out
