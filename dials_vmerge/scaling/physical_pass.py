"""One fused target+gradient pass for physical models (dials-scaling.md 4.3-4.6, 5.3).

The generic pass (target.target_gradient_kernel) reads g and a K-slot ELL Jacobian that the
models wrote for every observation beforehand. For the physical model the Jacobian has so
much structure that it need not exist: the two 1D smoothers touch 3 consecutive parameters
each, so an observation needs only its 3 scale weights, its 3 decay weights (already divided
by 2 d^2) and the first parameter of each run; g, Ih, the residuals and the gradient are then
formed in registers in one walk over the group-sorted observations:

    g = S * exp(B) * A * F,   S = sum_j ws_j p[s0 + j],   B = sum_j wd_j q[d0 + j],
    A = 1 + sum_lm c_lm C[a0 + lm] (absorption),  F = fixed factor (analytical correction),
    dPhi/dp = sum -2 w r Ih dg/dp   (Ih is optimal for fixed g: no dIh/dp term).

Per observation the pass streams one record [I, w, ws0..2, wd0..2] (64 B) and the two first-
parameter indices (8 B); with absorption also its coefficients (8 B each) and first index
(4 B); with an analytical correction its factor (8 B).

Parameters are indexed in the "full" vector: every dataset's complete parameter vector,
concatenated in dataset order, then the guard [0, 0, 1, 0, 0]. A smoother with fewer than 3
parameters pads its weights with zeros, whose slots may point up to 2 past its run (into
the guard's zeros at worst). A model without a scale term gets weights (1, 0, 0) on the
guard's 1; one without decay gets zero decay weights; gradients landing in the guard are
dropped.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..kernels.size_dispatch import parallel_when_large

from ..kernels.flat import split_positions

GUARD = np.array([0.0, 0.0, 1.0, 0.0, 0.0])
GUARD_ONE = 2  # offset of the 1.0 in GUARD (the constant "scale" of a model without one)
INTENSITY, WEIGHT, SCALE_W, DECAY_W = 0, 1, 2, 5  # record columns
RECORD_WIDTH = 8


@parallel_when_large
def physical_target_gradient_kernel(record, first_param, absorption_coefficients,
                                    absorption_first, fixed_factor, parameters, group_start,
                                    chunk_start, max_group_size, phi_partial, grad_partial):
    """Per chunk of groups: sum w r^2 into phi_partial[c], dPhi/dp_full into grad_partial[c].

    record (n, 8): I, w, 3 scale weights, 3 decay weights; first_param (n, 2): full index of
    the first scale and decay parameter. Absorption and the fixed factor are passed as None
    when absent: numba then compiles a version without their branches.
    """
    n_chunks = chunk_start.size - 1
    n_full = grad_partial.shape[1]
    # Unsigned indices: numba wraps negative signed indices around, a test and an add on
    # every one of the ~20 array reads per observation (10% of the pass).
    one = np.uint64(1)
    two = np.uint64(2)
    for c in prange(n_chunks):
        grad = np.zeros(n_full)
        g_buf = np.empty(max_group_size)
        scale_other = np.empty(max_group_size)  # dg/dS
        absorption_other = np.empty(max_group_size)  # dg/dA
        phi = 0.0
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            lo = np.uint64(group_start[grp])
            hi = np.uint64(group_start[grp + 1])
            s_wgi = 0.0
            s_wgg = 0.0
            i = lo
            while i < hi:
                p0 = np.uint64(first_param[i, 0])
                q0 = np.uint64(first_param[i, 1])
                s = (record[i, 2] * parameters[p0] + record[i, 3] * parameters[p0 + one]
                     + record[i, 4] * parameters[p0 + two])
                e = math.exp(record[i, 5] * parameters[q0] + record[i, 6] * parameters[q0 + one]
                             + record[i, 7] * parameters[q0 + two])
                a = 1.0
                if absorption_coefficients is not None:
                    a0 = np.uint64(absorption_first[i])
                    for k in range(absorption_coefficients.shape[1]):
                        a += absorption_coefficients[i, k] * parameters[a0 + np.uint64(k)]
                f = 1.0
                if fixed_factor is not None:
                    f = fixed_factor[i]
                g = s * e * a * f
                j = i - lo
                g_buf[j] = g
                scale_other[j] = e * a * f
                if absorption_coefficients is not None:
                    absorption_other[j] = s * e * f
                wg = record[i, 1] * g
                s_wgi += wg * record[i, 0]
                s_wgg += wg * g
                i += one
            if s_wgg <= 0.0:
                continue
            ih = s_wgi / s_wgg
            i = lo
            while i < hi:
                j = i - lo
                g = g_buf[j]
                r = record[i, 0] - g * ih
                wr = record[i, 1] * r
                phi += wr * r
                factor = -2.0 * wr * ih
                p0 = np.uint64(first_param[i, 0])
                q0 = np.uint64(first_param[i, 1])
                fs = factor * scale_other[j]
                grad[p0] += fs * record[i, 2]
                grad[p0 + one] += fs * record[i, 3]
                grad[p0 + two] += fs * record[i, 4]
                fd = factor * g
                grad[q0] += fd * record[i, 5]
                grad[q0 + one] += fd * record[i, 6]
                grad[q0 + two] += fd * record[i, 7]
                if absorption_coefficients is not None:
                    a0 = np.uint64(absorption_first[i])
                    fa = factor * absorption_other[j]
                    for k in range(absorption_coefficients.shape[1]):
                        grad[a0 + np.uint64(k)] += fa * absorption_coefficients[i, k]
                i += one
        phi_partial[c] = phi
        for k in range(n_full):  # not a slice assignment: its error message compiles slowly
            grad_partial[c, k] = grad[k]


class PhysicalPassInputs:
    """The per-observation arrays of the fused pass, in IhTable observation order.

    Built from the models' `pass_inputs(rows)` (physical and dose_decay models) and the
    table's I and w (None: the model inputs alone, for the family kernel); `full_offsets[d]`
    is where dataset d's parameters start in the full vector.
    """

    def __init__(self, models, dataset_id, loc_index, intensity, weight):
        self.models = list(models)
        sizes = [m.n_parameters for m in self.models]
        self.full_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_full = int(self.full_offsets[-1])
        n = dataset_id.size
        self.record = np.empty((n, RECORD_WIDTH))
        self.record[:, INTENSITY:WEIGHT + 1] = 0.0
        if intensity is not None:  # None: model inputs only (kernels/physical_family.py)
            self.record[:, INTENSITY] = intensity
            self.record[:, WEIGHT] = weight
        self.first_param = np.empty((n, 2), dtype=np.int32)
        per_dataset = []
        for model, obs in zip(self.models, split_positions(dataset_id, len(self.models))):
            per_dataset.append((obs, model.pass_inputs(loc_index[obs])))
        n_abs = {inp["absorption"][0].shape[1] for _, inp in per_dataset if "absorption" in inp}
        with_abs = sum("absorption" in inp for _, inp in per_dataset)
        if len(n_abs) > 1 or 0 < with_abs < len(per_dataset):
            raise ValueError("fused physical pass: datasets have different absorption terms")
        self.absorption_coefficients = None
        self.absorption_first = None
        if with_abs:
            self.absorption_coefficients = np.empty((n, n_abs.pop()))
            self.absorption_first = np.empty(n, dtype=np.int32)
        self.fixed_factor = None
        if any("fixed" in inp for _, inp in per_dataset):
            self.fixed_factor = np.ones(n)
        guard_one = self.n_full + GUARD_ONE
        # each input is stacked over the datasets and placed in one assignment (per-dataset
        # fancy assignments cost more than the inputs at hundreds of small datasets)
        order = np.concatenate([obs for obs, _ in per_dataset]) if per_dataset else \
            np.zeros(0, np.int64)
        in_order = bool(np.array_equal(order, np.arange(n)))

        def place(target, pieces):
            # one dataset (a sweep): its piece is placed as it is, not first copied by
            # concatenate (~60 blocks of the final expansion place 6 inputs each)
            stacked = pieces[0] if len(pieces) == 1 else (
                np.concatenate(pieces) if pieces else np.zeros(0))
            if in_order:
                target[...] = stacked
            else:
                target[order] = stacked

        scale_w, decay_w, first_scale, first_decay, absorption, absorption_first = \
            [], [], [], [], [], []
        for d, (obs, inp) in enumerate(per_dataset):
            offset = self.full_offsets[d]
            if "scale" in inp:
                scale_w.append(inp["scale"][0])
                first_scale.append(inp["scale"][1] + offset)
            else:
                scale_w.append(np.tile([1.0, 0.0, 0.0], (obs.size, 1)))
                first_scale.append(np.full(obs.size, guard_one, dtype=np.int32))
            if "decay" in inp:
                decay_w.append(inp["decay"][0])
                first_decay.append(inp["decay"][1] + offset)
            else:
                decay_w.append(np.zeros((obs.size, 3)))
                first_decay.append(np.full(obs.size, self.n_full, dtype=np.int32))
            if with_abs:
                absorption.append(inp["absorption"][0])
                absorption_first.append(inp["absorption"][1] + offset)
        place(self.record[:, SCALE_W:SCALE_W + 3], scale_w)
        place(self.record[:, DECAY_W:DECAY_W + 3], decay_w)
        place(self.first_param[:, 0], first_scale)
        place(self.first_param[:, 1], first_decay)
        del scale_w, decay_w, first_scale, first_decay
        if with_abs:
            place(self.absorption_coefficients, absorption)
            place(self.absorption_first, absorption_first)
            del absorption, absorption_first
        if self.fixed_factor is not None:
            place(self.fixed_factor, [inp["fixed"] if "fixed" in inp else np.ones(obs.size)
                                      for obs, inp in per_dataset])

    @property
    def n_obs(self):
        return self.record.shape[0]

    def full_parameters(self):
        """Every model's current parameter vector, concatenated, then the guard."""
        parts = [np.asarray(m.parameter_vector(), dtype=np.float64) for m in self.models]
        parts.append(GUARD)
        return np.concatenate(parts)

    def bytes_per_observation(self):
        total = self.record.shape[1] * 8 + self.first_param.shape[1] * 4
        if self.absorption_coefficients is not None:
            total += self.absorption_coefficients.shape[1] * 8 + 4
        if self.fixed_factor is not None:
            total += 8
        return total


def physical_target_gradient_partials(inputs, group_start, chunks, max_group_size,
                                      parameters):
    """Per chunk: (sum w r^2 (n_chunks,), dPhi/dp (n_chunks, parameters.size) with the
    guard entry); the caller reduces the chunks (backends/block_sums.py under MPI)."""
    n_chunks = chunks.size - 1
    phi_partial = np.zeros(n_chunks)
    grad_partial = np.zeros((n_chunks, parameters.size))
    physical_target_gradient_kernel(
        inputs.record, inputs.first_param, inputs.absorption_coefficients,
        inputs.absorption_first, inputs.fixed_factor, parameters, group_start, chunks,
        max_group_size, phi_partial, grad_partial)
    return phi_partial, grad_partial


def physical_target_and_gradient(inputs, group_start, chunks, max_group_size,
                                 parameters=None):
    """(sum w r^2, dPhi/dp over the full vector without the guard) with fixed chunk order."""
    if parameters is None:
        parameters = inputs.full_parameters()
    phi_partial, grad_partial = physical_target_gradient_partials(
        inputs, group_start, chunks, max_group_size, parameters)
    phi = 0.0
    for value in phi_partial:  # fixed order: deterministic for a given nproc
        phi += float(value)
    grad = grad_partial[0].copy()
    for row in grad_partial[1:]:
        grad += row
    return phi, grad[:inputs.n_full]


def uses_fused_physical_pass(models):
    """True when every model can feed the fused pass (physical models with the same
    components and lmax)."""
    if not models or not all(hasattr(m, "pass_inputs") for m in models):
        return False
    return len({m.pass_signature() for m in models}) == 1
