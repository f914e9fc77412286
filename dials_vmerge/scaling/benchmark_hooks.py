"""Entry points for the benchmark harness (benchmarks/): one target+gradient pass of the core.

make_target_evaluator(experiments, table, nproc) groups every observation with usable
summation (else profile) intensity by ASU index, attaches KB-form derivatives (one scale and
one B per experiment: g = K exp(B/(2 d^2)) at K = 1, B = 0, so g = 1) and returns a callable
that runs the target/gradient kernel once over all observations, exactly the pass every
LBFGS iteration makes. Model evaluation is not timed: it belongs to the model package.

bytes_read_per_pass(...) is what that kernel streams per call: per observation I, w, g
(3 x 8 B) plus K derivative slots of value (8 B) and column (4 B), plus one 8 B group offset
per group. With K = 2 (KB) that is 48 B per observation.
"""

from __future__ import annotations

import numpy as np

from .ih_table import build_ih_table, chunk_bounds, map_indices_to_asu, set_num_threads
from .target import target_gradient_kernel

KB_SLOTS = 2


def _intensities(table):
    for kind in ("sum", "prf"):
        if f"intensity.{kind}.value" in table:
            return table[f"intensity.{kind}.value"], table[f"intensity.{kind}.variance"]
    raise KeyError("the table has no intensity.sum or intensity.prf columns")


class TargetEvaluator:
    """Call it to run one target+gradient pass; returns (phi, gradient)."""

    def __init__(self, ih_table, deriv_values, deriv_col, n_par, nproc):
        self.table = ih_table
        self.deriv_values = deriv_values
        self.deriv_col = deriv_col
        self.n_par = n_par
        self.nproc = set_num_threads(nproc)
        self.chunks = chunk_bounds(ih_table.group_start, self.nproc)
        self.phi_partial = np.zeros(self.chunks.size - 1)
        self.grad_partial = np.zeros((self.chunks.size - 1, n_par))

    @property
    def n_obs(self):
        return self.table.n_obs

    @property
    def n_groups(self):
        return self.table.n_groups

    @property
    def n_slots(self):
        return self.deriv_values.shape[1]

    def __call__(self):
        t = self.table
        self.grad_partial[:] = 0.0
        target_gradient_kernel(t.intensity, t.weight, t.g, self.deriv_values, self.deriv_col,
                               t.group_start, self.chunks, self.phi_partial, self.grad_partial)
        phi = 0.0
        for value in self.phi_partial:
            phi += float(value)
        return phi, self.grad_partial.sum(axis=0)


def make_target_evaluator(experiments, table, nproc=1):
    from .. import geometry

    intensity, variance = _intensities(table)
    usable = (variance > 0) & (table["id"] >= 0)
    ids = table["id"][usable]
    dataset_ids = np.unique(ids)
    position = np.searchsorted(dataset_ids, ids)
    asu = map_indices_to_asu(table["miller_index"][usable], geometry.space_group(experiments[0]),
                             False)
    half_dstar_sq = 0.5 / table["d"][usable] ** 2
    ih = build_ih_table([asu], [intensity[usable]], [variance[usable]],
                        [1.0 / variance[usable]], [np.ones(int(usable.sum()))],
                        extra={"half_dstar_sq": [half_dstar_sq], "position": [position]})
    n = ih.n_obs
    deriv_values = np.empty((n, KB_SLOTS))
    deriv_values[:, 0] = 1.0  # dg/dK at K = 1, B = 0
    deriv_values[:, 1] = ih.extra["half_dstar_sq"]  # dg/dB = g / (2 d^2)
    pos = ih.extra["position"].astype(np.int32)
    deriv_col = np.stack([2 * pos, 2 * pos + 1], axis=1).astype(np.int32)
    return TargetEvaluator(ih, deriv_values, deriv_col, 2 * dataset_ids.size, nproc)


def bytes_read_per_pass(evaluator_or_n_obs, n_groups=None, n_slots=KB_SLOTS):
    """Bytes one kernel pass reads: an evaluator, or (n_obs, n_groups, n_slots)."""
    if isinstance(evaluator_or_n_obs, TargetEvaluator):
        ev = evaluator_or_n_obs
        n_obs, n_groups, n_slots = ev.n_obs, ev.n_groups, ev.n_slots
    else:
        n_obs = int(evaluator_or_n_obs)
        n_groups = int(n_groups if n_groups is not None else n_obs)
    return n_obs * (3 * 8 + n_slots * (8 + 4)) + (n_groups + 1) * 8
