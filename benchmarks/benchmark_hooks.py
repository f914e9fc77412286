"""Entry points for the benchmark harness (benchmarks/run.py): one target+gradient pass of the core.

make_target_evaluator(experiments, table, nproc) groups every observation with usable
summation (else profile) intensity by ASU index, makes and configures a physical model per
experiment as dials.vmerge would (auto intervals, absorption when the sweep is long enough)
and returns a callable that runs the fused physical pass (physical_pass) once over all
observations: the pass every LBFGS iteration of dials.vmerge makes over its subset.
Model configuration is not timed: it happens once per run.

bytes_read_per_pass(evaluator) is what that pass streams per call: per observation the record
I, w, 3 scale and 3 decay weights (64 B) and two int32 first-parameter indices (8 B); with
absorption its coefficients (8 B each) and an int32 first index; with an analytical
correction its factor (8 B); plus one 8 B group offset per group (+1). Scale and decay
only: 72 B per observation.
"""

from __future__ import annotations

import numpy as np

import dials_vmerge  # noqa: F401  (cctbx before numba)
from dials_vmerge.scaling.ih_table import (build_ih_table, chunk_bounds, map_indices_to_asu,
                                          set_num_threads)
from dials_vmerge.scaling.physical_pass import PhysicalPassInputs, physical_target_and_gradient


def _intensities(table):
    for kind in ("sum", "prf"):
        if f"intensity.{kind}.value" in table:
            return table[f"intensity.{kind}.value"], table[f"intensity.{kind}.variance"]
    raise KeyError("the table has no intensity.sum or intensity.prf columns")


class TargetEvaluator:
    """Call it to run one target+gradient pass; returns (phi, gradient over the full
    parameter vectors of all models)."""

    def __init__(self, ih_table, inputs, nproc):
        self.table = ih_table
        self.inputs = inputs
        self.nproc = set_num_threads(nproc)
        self.chunks = chunk_bounds(ih_table.group_start, self.nproc)
        self.max_group_size = int(np.diff(ih_table.group_start).max()) if inputs.n_obs else 1
        self.parameters = inputs.full_parameters()

    @property
    def n_obs(self):
        return self.inputs.n_obs

    @property
    def n_groups(self):
        return self.table.n_groups

    @property
    def models(self):
        return self.inputs.models

    def set_nproc(self, nproc):
        self.nproc = set_num_threads(nproc)
        self.chunks = chunk_bounds(self.table.group_start, self.nproc)

    def set_parameters(self, full_vector):
        """New parameters for every model (the concatenated full vectors)."""
        for model, lo, hi in zip(self.models, self.inputs.full_offsets[:-1],
                                 self.inputs.full_offsets[1:]):
            model.set_parameter_vector(np.asarray(full_vector[lo:hi], dtype=np.float64))
        self.parameters = self.inputs.full_parameters()

    def __call__(self):
        return physical_target_and_gradient(self.inputs, self.table.group_start, self.chunks,
                                            self.max_group_size, self.parameters)

    def bytes_read_per_pass(self):
        return self.n_obs * self.inputs.bytes_per_observation() + (self.n_groups + 1) * 8


def make_target_evaluator(experiments, table, nproc=1, params=None):
    """The physical-model pass over every usable observation of `table`.

    params: model options (default: DIALS defaults, model.factory.default_model_params()).
    """
    from dials_vmerge import geometry
    from dials_vmerge.model.factory import default_model_params
    from dials_vmerge.model.physical import PhysicalScalingModel
    from dials_vmerge.table import RowView

    params = params or default_model_params()
    intensity, variance = _intensities(table)
    usable = (variance > 0) & (table["id"] >= 0)
    ids = table["id"]
    dataset_ids = np.unique(ids[usable])
    space_group = geometry.space_group(experiments[0])
    asus, values, variances, loc = [], [], [], []
    models = []
    for position, dataset in enumerate(dataset_ids):
        rows = np.flatnonzero(usable & (ids == dataset))
        view = RowView(table, rows)
        expt = _experiment_of(experiments, table, int(dataset), position)
        model = PhysicalScalingModel.from_data(params, expt, view)
        model.configure(view, expt)
        models.append(model)
        asus.append(map_indices_to_asu(table["miller_index"][rows], space_group, False))
        values.append(intensity[rows])
        variances.append(variance[rows])
        loc.append(np.arange(rows.size, dtype=np.int64))
    ih = build_ih_table(asus, values, variances, [1.0 / v for v in variances],
                        [np.ones(v.size) for v in variances], loc_indices=loc)
    inputs = PhysicalPassInputs(models, ih.dataset_id, ih.loc_index, ih.intensity, ih.weight)
    # the pass reads its own record of I and w: drop the table's copies and the model
    # configuration it no longer needs
    ih.intensity = ih.variance = ih.weight = ih.g = None
    return TargetEvaluator(ih, inputs, nproc)


class _TiledGroups:
    def __init__(self, group_start):
        self.group_start = group_start

    @property
    def n_groups(self):
        return self.group_start.size - 1


def tile_evaluator(evaluator, copies, nproc=1):
    """An evaluator whose pass streams `copies` copies of `evaluator`'s observation records,
    each copy forming its own unique reflections (the benchmark's 1e8 kernel-only point:
    the same per-observation work without simulating and configuring 1e8 observations)."""
    inputs = evaluator.inputs
    tiled = object.__new__(PhysicalPassInputs)
    tiled.__dict__.update(inputs.__dict__)
    tiled.record = np.tile(inputs.record, (copies, 1))
    tiled.first_param = np.tile(inputs.first_param, (copies, 1))
    for name in ("absorption_coefficients", "fixed_factor"):
        value = getattr(inputs, name)
        if value is not None:
            setattr(tiled, name, np.tile(value, (copies,) + (1,) * (value.ndim - 1)))
    if inputs.absorption_first is not None:
        tiled.absorption_first = np.tile(inputs.absorption_first, copies)
    start = evaluator.table.group_start
    n_obs = int(start[-1])
    group_start = np.concatenate(
        [start[:-1] + k * n_obs for k in range(copies)] + [np.array([copies * n_obs])]
    ).astype(start.dtype)
    return TargetEvaluator(_TiledGroups(group_start), tiled, nproc)


def _experiment_of(experiments, table, dataset_id, position):
    identifier = getattr(table, "identifiers", {}).get(dataset_id)
    for expt in experiments:
        if identifier is not None and getattr(expt, "identifier", None) == identifier:
            return expt
    return experiments[position] if position < len(experiments) else experiments[0]


def bytes_read_per_pass(evaluator):
    """Bytes one pass of `evaluator` reads (see the module docstring)."""
    return int(evaluator.bytes_read_per_pass())
