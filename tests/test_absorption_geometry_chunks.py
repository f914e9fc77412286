"""configure_absorption_from_geometry: the lookup cells formed chunk by chunk equal those of
all rows at once (the crystal-frame vectors of every row, then their cells)."""

import dials_vmerge  # noqa: F401  (import order: cctbx before numba/scipy)
import numpy as np

from dials_vmerge import flags
from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.model.absorption_sh import (SHAbsorption, crystal_frame_vectors,
                                              lookup_index, theta_phi)
import dials_vmerge.model.absorption_sh as sh

from conftest import data_path


def test_chunked_cells_equal_all_rows_at_once(monkeypatch):
    t = read_reflections(data_path("quartz_processed", "integrated.refl"))
    expt = read_experiments(data_path("quartz_processed", "integrated.expt"))[0]
    t = t.select(((t["flags"] & flags.integrated_sum) != 0) & (t["d"] > 0))
    z_obs = np.ascontiguousarray(t["xyzobs.px.value"][:, 2], dtype=np.float64)
    s1 = np.asarray(t["s1"])
    # the reference: every row's vectors, then the cells of the lookup table
    s0c, s1c = crystal_frame_vectors(expt, z_obs, s1)
    expected = np.concatenate([lookup_index(*theta_phi(s0c)), lookup_index(*theta_phi(s1c))])
    reference = SHAbsorption(np.zeros(24))
    reference.configure_lookup(expected[:z_obs.size], expected[z_obs.size:])

    monkeypatch.setattr(sh, "LOOKUP_THRESHOLD", 10)
    monkeypatch.setattr(sh, "GEOMETRY_CHUNK_ROWS", 37)  # many chunks and a ragged last one
    assert z_obs.size > 10 * 37
    chunked = SHAbsorption(np.zeros(24))
    sh.configure_absorption_from_geometry(chunked, expt, z_obs, s1)
    assert np.array_equal(chunked._table, reference._table)
    for ours, theirs in zip(chunked._cells, reference._cells):
        assert np.array_equal(ours, theirs)
    assert chunked.n_configured == z_obs.size
