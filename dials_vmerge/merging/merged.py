"""The result of merging one set of groups: one value per unique reflection."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .groups import GroupedObservations


@dataclass
class MergedIntensities:
    asu_index: np.ndarray  # int32 (n, 3)
    intensity: np.ndarray  # float64 (n,): merged I (posterior mean of J for variational)
    sigma: np.ndarray  # float64 (n,)
    n_obs: np.ndarray  # int64 (n,): observations merged into each value
    centric: np.ndarray  # bool (n,)
    epsilon: np.ndarray  # float64 (n,)
    dstar_sq: np.ndarray  # float64 (n,)
    anomalous: bool
    method: str
    # Amplitudes: from French-Wilson (classical, robust) or the posterior (variational).
    # NaN where no amplitude was estimated (French-Wilson rejection).
    amplitude: Optional[np.ndarray] = None
    amplitude_sigma: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.intensity)

    @classmethod
    def from_groups(cls, groups: GroupedObservations, intensity, sigma, method: str, **kw):
        return cls(
            asu_index=groups.asu_index,
            intensity=np.asarray(intensity, dtype=np.float64),
            sigma=np.asarray(sigma, dtype=np.float64),
            n_obs=groups.multiplicity.astype(np.int64),
            centric=groups.centric,
            epsilon=groups.epsilon,
            dstar_sq=groups.dstar_sq,
            anomalous=groups.anomalous,
            method=method,
            **kw,
        )
