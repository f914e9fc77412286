"""The least-squares scaling target, its gradient and its normal matrix (dials-scaling.md 5.3).

    Phi = sum_h sum_l w_l (I_l - g_l Ih_h)^2 + sum_k wr_k p_k^2,  Ih_h = sum w g I / sum w g^2

Derivatives of g come from the models in ELL form: for observation i, deriv_values[i, k] is
dg_i/dp_c with c = deriv_col[i, k] a column of the free parameter vector (-1: unused slot or
a fixed parameter). No per-reflection sparse matrix is ever built.

Gradient: Ih minimises Phi for fixed g, so dPhi/dp needs no dIh/dp term:
    dPhi/dp = sum -2 w r Ih dg/dp.
Normal matrix (Gauss-Newton/LevMar): J = dr/dp = -(Ih dg/dp + g dIh/dp) with
    dIh/dp = sum_l w (I - 2 g Ih) dg/dp / sum_l w g^2,
accumulated per group over the union of the columns its observations touch.

Each kernel walks fixed blocks of groups (one per thread) into per-block partial sums that
backends/block_sums.py adds as a tree over the blocks, over MPI ranks too: the bits depend on
the data alone, not on nproc or the number of ranks.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ..kernels.physical_family import DERIVATIVE_BLOCK_ROWS
from ..kernels.size_dispatch import parallel_when_large
from ..kernels.variance_of_g import variance_of_g_row

from ..backends import mpi_world, rank_local
from ..backends.block_sums import (batch_blocks_for, blockwise_sum, fixed_block_bounds,
                                   key_block_sum, rank_group_range)
from ..backends.rank_partition import key_blocks_of_groups
from .family import KBFamily, ModelFamilies
from .ih_table import chunk_bounds, group_weighted_sums
from .physical_pass import (PhysicalPassInputs, physical_target_gradient_partials,
                            uses_fused_physical_pass)


@parallel_when_large
def target_gradient_kernel(intensity, weight, g, deriv_values, deriv_col, group_start,
                           chunk_start, phi_partial, grad_partial):
    """Per chunk: sum w r^2 into phi_partial[c] and -2 w r Ih dg into grad_partial[c, :]."""
    n_chunks = chunk_start.size - 1
    n_slots = deriv_values.shape[1]
    n_par = grad_partial.shape[1]
    for c in prange(n_chunks):
        # a thread-local gradient: rows of grad_partial share cache lines across threads
        grad = np.zeros(n_par)
        phi = 0.0
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            lo = group_start[grp]
            hi = group_start[grp + 1]
            s_wgi, s_wgg = group_weighted_sums(intensity, weight, g, lo, hi)
            if s_wgg <= 0.0:
                continue
            ih = s_wgi / s_wgg
            for i in range(lo, hi):
                r = intensity[i] - g[i] * ih
                wr = weight[i] * r
                phi += wr * r
                factor = -2.0 * wr * ih
                for k in range(n_slots):
                    col = deriv_col[i, k]
                    if col >= 0:
                        grad[col] += factor * deriv_values[i, k]
        phi_partial[c] = phi
        # element loops, not slice assignments: those compile numba's shape-mismatch error
        # message (string formatting), about a second of every cold start
        for a in range(n_par):
            grad_partial[c, a] = grad[a]


@parallel_when_large
def normal_matrix_kernel(intensity, weight, g, deriv_values, deriv_col, group_start,
                         chunk_start, phi_partial, rhs_partial, normal_partial):
    """Per chunk: phi, J^T W r and J^T W J with the dIh/dp term of J included."""
    n_chunks = chunk_start.size - 1
    n_slots = deriv_values.shape[1]
    n_par = rhs_partial.shape[1]
    for c in prange(n_chunks):
        local_of_col = np.full(n_par, -1, dtype=np.int64)
        cols = np.empty(n_par, dtype=np.int64)
        dih = np.empty(n_par)
        jrow = np.empty(n_par)
        rhs = np.zeros(n_par)
        normal = np.zeros((n_par, n_par))
        phi = 0.0
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            lo = group_start[grp]
            hi = group_start[grp + 1]
            s_wgi, s_wgg = group_weighted_sums(intensity, weight, g, lo, hi)
            if s_wgg <= 0.0:
                continue
            ih = s_wgi / s_wgg
            n_local = 0
            for i in range(lo, hi):
                for k in range(n_slots):
                    col = deriv_col[i, k]
                    if col >= 0 and local_of_col[col] < 0:
                        local_of_col[col] = n_local
                        cols[n_local] = col
                        dih[n_local] = 0.0
                        n_local += 1
            for i in range(lo, hi):
                factor = weight[i] * (intensity[i] - 2.0 * g[i] * ih) / s_wgg
                for k in range(n_slots):
                    col = deriv_col[i, k]
                    if col >= 0:
                        dih[local_of_col[col]] += factor * deriv_values[i, k]
            for i in range(lo, hi):
                r = intensity[i] - g[i] * ih
                w = weight[i]
                phi += w * r * r
                for a in range(n_local):
                    jrow[a] = -g[i] * dih[a]
                for k in range(n_slots):
                    col = deriv_col[i, k]
                    if col >= 0:
                        jrow[local_of_col[col]] -= ih * deriv_values[i, k]
                for a in range(n_local):
                    wja = w * jrow[a]
                    if wja == 0.0:
                        continue
                    ca = cols[a]
                    rhs[ca] += wja * r
                    # J^T W J is symmetric: only its upper triangle (row <= column) is
                    # accumulated, then mirrored once per chunk (half the multiply-adds)
                    for b in range(a, n_local):
                        cb = cols[b]
                        if ca <= cb:
                            normal[ca, cb] += wja * jrow[b]
                        else:
                            normal[cb, ca] += wja * jrow[b]
            for a in range(n_local):
                local_of_col[cols[a]] = -1
        for a in range(n_par):
            for b in range(a + 1, n_par):
                normal[b, a] = normal[a, b]
        phi_partial[c] = phi
        for a in range(n_par):  # element loops: see target_gradient_kernel
            rhs_partial[c, a] = rhs[a]
            for b in range(n_par):
                normal_partial[c, a, b] = normal[a, b]


@parallel_when_large(min_rows=DERIVATIVE_BLOCK_ROWS)  # the expansion's blocks: threads
def variance_of_g_kernel(deriv_values, deriv_col, covariance, out):
    """var(g_i) = sum_kk' dg_i/dp_k cov[k, k'] dg_i/dp_k' over the free parameters."""
    for i in prange(deriv_values.shape[0]):
        out[i] = variance_of_g_row(deriv_values, deriv_col, i, covariance)


class RankShare:
    """The observations whose inputs this MPI rank needs for the block sums of a table
    (backends/block_sums.py): the groups [group_lo, group_hi) of its blocks, i.e. the
    observations [obs_lo, obs_hi) of the table's group order. A rank that evaluates its
    models and kernels on these rows only does 1/N of the per-iteration work and holds 1/N
    of the derivative table (the ELL arrays), with the same bits: the kernels see the same
    values per block."""

    def __init__(self, group_start, n_par, key_blocks=None):
        block_bounds, rank_blocks = key_blocks if key_blocks is not None else (None, None)
        self.group_lo, self.group_hi = rank_group_range(group_start, n_par, block_bounds,
                                                        rank_blocks)
        self.obs_lo = int(group_start[self.group_lo])
        self.obs_hi = int(group_start[self.group_hi])
        # the groups' offsets into the rank's own rows
        self.group_start = np.asarray(group_start[self.group_lo:self.group_hi + 1],
                                      dtype=np.int64) - self.obs_lo

    def rows(self, array):
        return array[self.obs_lo:self.obs_hi]


def _kernel_groups(group_start, share):
    """(group offsets the kernel indexes the arrays with, first group of the arrays)."""
    if share is None:
        return group_start, 0
    return share.group_start, share.group_lo


def target_and_gradient(intensity, weight, g, deriv_values, deriv_col, group_start, n_par,
                        nproc=1, share=None, key_blocks=None):
    """(sum w r^2, gradient (n_par,)) of the data term; restraints are added by the caller.

    Summed per fixed block of groups and then as a tree over the blocks, over all MPI ranks
    (backends/block_sums.py): the bits do not depend on nproc or on the number of ranks.
    share (RankShare, MPI): the per-observation arrays hold this rank's rows only;
    group_start is the whole table's. key_blocks: (block bounds, rank block offsets) of
    the job's read-time key blocks (rank_partition.key_blocks_of_groups); default: blocks
    cut from this table's group sizes."""
    local_start, group_lo = _kernel_groups(group_start, share)

    def evaluate(chunks):
        phi_partial = np.zeros(chunks.size - 1)
        grad_partial = np.zeros((chunks.size - 1, n_par))
        target_gradient_kernel(intensity, weight, g, deriv_values, deriv_col, local_start,
                               chunks - group_lo if group_lo else chunks, phi_partial,
                               grad_partial)
        return [phi_partial, grad_partial]

    phi, grad = key_block_sum(group_start, evaluate, 1 + n_par, nproc, key_blocks, n_par)
    return float(phi), grad


def normal_equations(intensity, weight, g, deriv_values, deriv_col, group_start, n_par,
                     nproc=1, share=None, key_blocks=None):
    """(sum w r^2, J^T W r (n_par,), J^T W J (n_par, n_par)) of the data term (share,
    key_blocks: as target_and_gradient)."""
    local_start, group_lo = _kernel_groups(group_start, share)

    def evaluate(chunks):
        n_chunks = chunks.size - 1
        phi_partial = np.zeros(n_chunks)
        rhs_partial = np.zeros((n_chunks, n_par))
        normal_partial = np.zeros((n_chunks, n_par, n_par))
        normal_matrix_kernel(intensity, weight, g, deriv_values, deriv_col, local_start,
                             chunks - group_lo if group_lo else chunks, phi_partial,
                             rhs_partial, normal_partial)
        return [phi_partial, rhs_partial, normal_partial]

    # as many blocks per call as keep the batch's n_par^2 partials within the block sums'
    # buffer limit (all blocks for a physical sweep's ~50 parameters)
    phi, rhs, normal = key_block_sum(group_start, evaluate, 1 + n_par + n_par * n_par, nproc,
                                     key_blocks, n_par)
    return float(phi), rhs, normal


def _batch_blocks(nproc, partial_size):
    """Blocks per kernel call for partials of a phi and a partial_size gradient."""
    return batch_blocks_for(1 + int(partial_size), nproc)


def variance_of_g(deriv_values, deriv_col, covariance):
    out = np.empty(deriv_values.shape[0])
    variance_of_g_kernel(deriv_values, deriv_col, np.ascontiguousarray(covariance), out)
    return out


def _ordered_sum(values):
    total = 0.0
    for v in values:  # a handful of chunks; fixed order keeps the result deterministic
        total += float(v)
    return total


def _ordered_rows_sum(partials):
    total = partials[0].copy()
    for row in partials[1:]:
        total += row
    return total


class ModelTerms:
    """What every scaling target shares: the models behind a ParameterManager evaluated at
    the rows of a table (dataset_id/loc_index point into the rows each model was configured
    with) as g and its ELL derivatives over the free parameters, and the restraints
    wr_k p_k^2 on the free parameters (absolute weights, as in DIALS)."""

    def __init__(self, manager, table, nproc=1):
        self.manager = manager
        self.table = table
        self.nproc = nproc
        self.restraint_weights = manager.restraint_weights()
        self.n_restraints = int(np.count_nonzero(self.restraint_weights))
        # the observations of all ranks in a rank-local job (RMSD, degrees of freedom)
        self._n_obs = rank_local.total(table.n_obs)
        # KB models: one family kernel over all rows of the table (scaling/family.py).
        self.family = None
        if KBFamily.applies(manager.models):
            self.family = KBFamily(manager.models, manager.column_of_parameter,
                                   table.dataset_id, table.loc_index)
        # other models: one kernel call per model family (scaling/family.py), built when
        # first asked for (the fused physical pass needs no derivative table)
        self._families = None

    @property
    def n_par(self):
        return self.manager.n_free

    @property
    def n_obs(self):
        return self._n_obs

    @property
    def n_equations(self):
        return self.n_obs + self.n_restraints

    def _ell(self, x):
        if self.family is not None:
            # The models' own parameters are set once, by the caller, from the result.
            return self.family.evaluate(x)
        self.manager.set_free(x)  # as the models' own evaluation left them
        if self._families is None:
            self._families = ModelFamilies(self.manager, self.table.dataset_id,
                                           self.table.loc_index,
                                           getattr(self, "fused", None))
        return self._families.evaluate(x)

    def rmsd(self, phi):
        """DIALS's RMSD_I = sqrt(phi / n_refl)."""
        return float(np.sqrt(phi / max(self.n_obs, 1)))


class ScalingTarget(ModelTerms):
    """The least-squares target over one IhTable (observations grouped by unique
    reflection, Ih free per group)."""

    def __init__(self, manager, ih_table, nproc=1):
        super().__init__(manager, ih_table, nproc)
        self.last_phi = None
        # issue 11: the job's read-time key blocks, the same for any number of ranks (None
        # outside a program's scaling job: blocks cut from this table's group sizes)
        self.key_blocks = key_blocks_of_groups(ih_table.block_key_asu)
        # Physical models: value and gradient in one fused pass (physical_pass), no ELL table
        self.fused = None
        if uses_fused_physical_pass(manager.models) and self.n_obs:
            self.fused = PhysicalPassInputs(manager.models, ih_table.dataset_id,
                                            ih_table.loc_index, ih_table.intensity,
                                            ih_table.weight)
            self.block_bounds = (self.key_blocks[0] if self.key_blocks is not None else
                                 fixed_block_bounds(ih_table.group_start,
                                                    self.fused.full_parameters().size))
            # (a rank of a rank-local job may hold no group of this table)
            self.max_group_size = int(np.diff(ih_table.group_start).max(initial=0))
            self.full_to_free = manager.full_to_free()
            self.free_entries = np.flatnonzero(self.full_to_free >= 0)
            # the full vector at x without setting every model's parameters per call
            self.full_base = self.fused.full_parameters()

    def value_and_gradient(self, x):
        t = self.table
        if self.fused is not None:
            # the models' own parameters are set once, by the caller, from the result
            parameters = self.full_base.copy()
            parameters[self.free_entries] = np.asarray(x, dtype=np.float64)[
                self.full_to_free[self.free_entries]]

            def evaluate(chunks):
                return list(physical_target_gradient_partials(
                    self.fused, t.group_start, chunks, self.max_group_size, parameters))

            phi, grad_full = blockwise_sum(t.group_start, evaluate,
                                           _batch_blocks(self.nproc, parameters.size),
                                           self.block_bounds, rank_blocks=self._rank_blocks())
            phi, grad_full = float(phi), grad_full[:self.fused.n_full]
            grad = np.zeros(self.n_par)
            # fixed order of the full entries; shared components add up here
            np.add.at(grad, self.full_to_free[self.free_entries], grad_full[self.free_entries])
        else:
            share = self._rank_share()
            g, values, cols = self._ell(x) if share is None else self._rank_ell(x, share)
            phi, grad = target_and_gradient(*self._rank_rows(share), g, values, cols,
                                            t.group_start, self.n_par, self.nproc, share,
                                            self.key_blocks)
        wr = self.restraint_weights
        phi += float(np.sum(wr * x * x))
        grad = grad + 2.0 * wr * x
        self.last_phi = phi
        return phi, grad

    def normal_equations(self, x):
        """(phi, b, N) with b = J^T W r + wr p and N = J^T W J + diag(wr)."""
        share = self._rank_share()
        g, values, cols = self._ell(x) if share is None else self._rank_ell(x, share)
        t = self.table
        phi, rhs, normal = normal_equations(*self._rank_rows(share), g, values, cols,
                                            t.group_start, self.n_par, self.nproc, share,
                                            self.key_blocks)
        wr = self.restraint_weights
        phi += float(np.sum(wr * x * x))
        rhs = rhs + wr * x
        normal = normal + np.diag(wr)
        return phi, rhs, normal

    # -- MPI: each rank evaluates the models at the rows of its own blocks only ----------
    def _rank_share(self):
        """This rank's RankShare of the table (None in one process: every row is used; None
        in a rank-local job too, whose table holds only this rank's groups: the whole table
        is its share, and the model families then reuse the fused pass's per-row inputs as
        in one process instead of a second copy of them)."""
        if mpi_world.n_ranks() == 1 or rank_local.active():
            return None
        if getattr(self, "_share", None) is None:
            self._share = RankShare(self.table.group_start, self.n_par, self.key_blocks)
        return self._share

    def _rank_blocks(self):
        return self.key_blocks[1] if self.key_blocks is not None else None

    def _rank_rows(self, share):
        t = self.table
        if share is None:
            return t.intensity, t.weight
        return share.rows(t.intensity), share.rows(t.weight)

    def _rank_ell(self, x, share):
        """(g, deriv_values, deriv_col) of the share's rows only."""
        t = self.table
        if getattr(self, "_rank_evaluator", None) is None:
            dataset_id, loc_index = share.rows(t.dataset_id), share.rows(t.loc_index)
            if self.family is not None:
                self._rank_evaluator = KBFamily(self.manager.models,
                                                self.manager.column_of_parameter,
                                                dataset_id, loc_index)
            else:
                self._rank_evaluator = ModelFamilies(self.manager, dataset_id, loc_index)
        if self.family is None:
            self.manager.set_free(x)  # as the models' own evaluation left them
        return self._rank_evaluator.evaluate(x)

