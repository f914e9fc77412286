"""Quartz test data prepared the same way by several test modules (not a test module)."""

import json
import os

import numpy as np

from dials_vmerge import flags, geometry
from dials_vmerge.io import read_experiments, read_reflections, write_reflections
from dials_vmerge.scaling.ih_table import map_indices_to_asu

QUARTZ = os.path.join(os.path.dirname(__file__), "data", "dials", "quartz_processed")


def quartz_scaled_observations():
    """DIALS's quartz scaled pair without the rows bad for scaling or with g <= 0:
    (table, I/g, sigma/g, space group, unit cell)."""
    table = read_reflections(os.path.join(QUARTZ, "scaled.refl"))
    experiments = read_experiments(os.path.join(QUARTZ, "scaled.expt"))
    g = table["inverse_scale_factor"]
    table = table.select(~table.get_flags(flags.bad_for_scaling, all=False) & (g > 0))
    g = table["inverse_scale_factor"]
    intensity = table["intensity.scale.value"] / g
    sigma = np.sqrt(table["intensity.scale.variance"]) / g
    return (table, intensity, sigma, geometry.space_group(experiments[0]),
            geometry.unit_cell(experiments[0]))


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


def two_quartz_sweep_paths(tmp_path):
    """([expt paths], [refl paths]) of the quartz integrated pair and a copy of it in
    tmp_path renamed "second-sweep", whose table also uses id 0."""
    d = json.load(open(os.path.join(QUARTZ, "integrated.expt")))
    d["experiment"][0]["identifier"] = "second-sweep"
    t = read_reflections(os.path.join(QUARTZ, "integrated.refl"))
    t.identifiers = {0: "second-sweep"}
    write_reflections(t, str(tmp_path / "b.refl"))
    (tmp_path / "b.expt").write_text(json.dumps(d))
    return ([os.path.join(QUARTZ, "integrated.expt"), str(tmp_path / "b.expt")],
            [os.path.join(QUARTZ, "integrated.refl"), str(tmp_path / "b.refl")])
