"""Quartz test data prepared the same way by several test modules (not a test module)."""

import numpy as np

from dials_vmerge import flags
from dials_vmerge.scaling.ih_table import map_indices_to_asu


def merged_scaled_intensities(table, space_group):
    """{ASU index: inverse-variance mean of I/g} over the rows flagged scaled, written with
    numpy alone so that it can judge both our output and DIALS's."""
    ok = table.get_flags(flags.scaled)
    asu = map_indices_to_asu(table["miller_index"][ok], space_group, False)
    keys, group = np.unique(asu, axis=0, return_inverse=True)
    group = group.ravel()
    i = table["intensity.scale.value"][ok] / table["inverse_scale_factor"][ok]
    w = table["inverse_scale_factor"][ok] ** 2 / table["intensity.scale.variance"][ok]
    return {tuple(k): v for k, v in zip(keys, np.bincount(group, w * i) / np.bincount(group, w))}
