"""Scaling against a reference (dials.scale `reference=`; DIALS TargetScaler and
targeted_scaling_algorithm, dials-scaling.md 2.5 and 5.6).

The reference's intensities are the fixed merged intensities: each dataset is scaled so that
g I_ref matches its observations,

    Phi = sum_l w_l (I_l - g_l I_ref,h(l))^2 + restraints,   dPhi/dp = sum -2 w r I_ref dg/dp,

with J = -I_ref dg/dp for the full-matrix round (no dIh/dp term: the target does not move).
Observations of reflections the reference lacks get g from their model but do not take part
in minimisation or outlier rejection. DIALS puts the reference in as an extra dataset with a
fixed KB model and removes it again before output; here it never becomes a dataset, so no
output, statistic or log table ever sees it.

Round order (ScalingAlgorithm.scale + targeted_scaling_algorithm): initial per-dataset outlier
rejection of unscaled models; LBFGS; expand + outlier rejection against the target; LBFGS;
expand + outlier rejection;
error model; full matrix (LevMar) when wanted, else LBFGS; expand with var(g), outlier
rejection, final error model. No profile/summation combination (DIALS does none here).
`small_scale_cutoff=Auto` becomes round(1e-5 / (<I_ref> / <I_sum>), 12).

An overall B (or scale) difference between reference and data is absorbed by the models'
decay (scale) terms, as in DIALS: a reference with B higher by dB gives every dataset's B
higher by dB.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from numba import njit, prange

from .. import flags
from ..backends import rank_local
from ..backends.block_sums import key_block_sum
from ..backends.rank_partition import key_blocks_of_groups, packed_keys
from ..errors import VmergeError
from ..io.reference import read_reference
from ..model.base import is_auto, param
from . import outliers as outl
from .algorithm import ScalingRun
from .ih_table import friedel_group_order, map_indices_to_asu, pack_indices, permuted_group_rows
from .minimisers import lbfgs, levenberg_marquardt
from .parameters import ParameterManager
from .target import ModelTerms, _ordered_sum


@njit(cache=True, parallel=True)
def fixed_target_gradient_kernel(intensity, weight, g, target, deriv_values, deriv_col,
                                 chunk_start, phi_partial, grad_partial):
    """Per chunk of rows: sum w r^2 and -2 w r I_ref dg/dp, r = I - g I_ref."""
    n_chunks = chunk_start.size - 1
    n_slots = deriv_values.shape[1]
    n_par = grad_partial.shape[1]
    for c in prange(n_chunks):
        grad = np.zeros(n_par)
        phi = 0.0
        for i in range(chunk_start[c], chunk_start[c + 1]):
            r = intensity[i] - g[i] * target[i]
            wr = weight[i] * r
            phi += wr * r
            factor = -2.0 * wr * target[i]
            for k in range(n_slots):
                col = deriv_col[i, k]
                if col >= 0:
                    grad[col] += factor * deriv_values[i, k]
        phi_partial[c] = phi
        grad_partial[c, :] = grad


@njit(cache=True, parallel=True)
def fixed_normal_kernel(intensity, weight, g, target, deriv_values, deriv_col, chunk_start,
                        phi_partial, rhs_partial, normal_partial):
    """Per chunk of rows: phi, J^T W r and J^T W J with J = -I_ref dg/dp."""
    n_chunks = chunk_start.size - 1
    n_slots = deriv_values.shape[1]
    n_par = rhs_partial.shape[1]
    for c in prange(n_chunks):
        rhs = np.zeros(n_par)
        normal = np.zeros((n_par, n_par))
        phi = 0.0
        for i in range(chunk_start[c], chunk_start[c + 1]):
            r = intensity[i] - g[i] * target[i]
            w = weight[i]
            phi += w * r * r
            for a in range(n_slots):
                ca = deriv_col[i, a]
                if ca < 0:
                    continue
                wja = -w * target[i] * deriv_values[i, a]
                rhs[ca] += wja * r
                for b in range(n_slots):
                    cb = deriv_col[i, b]
                    if cb >= 0:
                        normal[ca, cb] += wja * (-target[i] * deriv_values[i, b])
        phi_partial[c] = phi
        rhs_partial[c, :] = rhs
        normal_partial[c, :, :] = normal


@njit(cache=True, parallel=True)
def prescale_sums_kernel(intensity, weight, predicted, dataset_id, chunk_start, num_partial,
                         den_partial):
    """Per chunk of rows: per dataset sum w I p and sum w p^2 (p = g I_ref)."""
    n_chunks = chunk_start.size - 1
    n_datasets = num_partial.shape[1]
    for c in prange(n_chunks):
        num = np.zeros(n_datasets)
        den = np.zeros(n_datasets)
        for i in range(chunk_start[c], chunk_start[c + 1]):
            wp = weight[i] * predicted[i]
            num[dataset_id[i]] += wp * intensity[i]
            den[dataset_id[i]] += wp * predicted[i]
        num_partial[c, :] = num
        den_partial[c, :] = den


def _grouped_sum(rows, kernel_arrays, kernel, partial_shapes, nproc):
    """Totals of a per-row-chunk kernel over the rows of `rows` (a _fixed_table result),
    summed per key block and as the block tree of backends/block_sums.py: the bits depend on
    the rows and the job's key blocks only, not on nproc or the number of MPI ranks (the
    rows of one key block are all on one rank, in the one-process order)."""
    group_start = rows.group_start

    def evaluate(chunks):
        n = chunks.size - 1
        partials = [np.zeros((n,) + shape) for shape in partial_shapes]
        kernel(*kernel_arrays, group_start[chunks], *partials)
        return partials

    size = sum(int(np.prod(shape)) for shape in partial_shapes)
    return key_block_sum(group_start, evaluate, size, nproc, rows.key_blocks)


class FixedTarget(ModelTerms):
    """The targeted least-squares problem for the models behind a ParameterManager
    (the interface of ScalingTarget that the minimisers use); Ih is the fixed reference, so
    rows need no Ih per group, but they are summed per group of equal ASU index in the job's
    key blocks (_grouped_sum) so that MPI ranks holding only their own rows (issue 11) get
    the one-process bits."""

    def value_and_gradient(self, x):
        g, values, cols = self._ell(x)
        t = self.table
        phi, grad = _grouped_sum(t, (t.intensity, t.weight, g, t.target, values, cols),
                                 fixed_target_gradient_kernel, [(), (self.n_par,)],
                                 self.nproc)
        wr = self.restraint_weights
        phi = float(phi) + float(np.sum(wr * x * x))
        return phi, grad + 2.0 * wr * x

    def normal_equations(self, x):
        g, values, cols = self._ell(x)
        t = self.table
        phi, rhs, normal = _grouped_sum(
            t, (t.intensity, t.weight, g, t.target, values, cols), fixed_normal_kernel,
            [(), (self.n_par,), (self.n_par, self.n_par)], self.nproc)
        wr = self.restraint_weights
        phi = float(phi) + float(np.sum(wr * x * x))
        return phi, rhs + wr * x, normal + np.diag(wr)


def match_to_reference(data_asu, reference_asu):
    """Per data row the reference row with the same ASU index, or -1."""
    keys = pack_indices(np.concatenate([reference_asu, data_asu]).astype(np.int32))
    ref_keys, data_keys = keys[:len(reference_asu)], keys[len(reference_asu):]
    order = np.argsort(ref_keys, kind="stable")
    sorted_keys = ref_keys[order]
    pos = np.clip(np.searchsorted(sorted_keys, data_keys), 0, max(sorted_keys.size - 1, 0))
    hit = sorted_keys.size > 0
    found = (sorted_keys[pos] == data_keys) if hit else np.zeros(data_keys.size, dtype=bool)
    return np.where(found, order[pos], -1)


def auto_small_scale_cutoff(reference_mean, states):
    """DIALS: round(1e-5 / (<I_ref> / <I_sum>), 12), <I_sum> over integrated_sum rows,
    the datasets' means weighted by their table sizes. The means are correctly rounded
    (rank_local.exact_sum), so they do not depend on how MPI ranks share the rows."""
    total, count = 0.0, 0
    for s in states:
        t = s.table
        if "intensity.sum.value" not in t:
            continue
        ok = t.get_flags(flags.integrated_sum)
        n_ok = rank_local.total(int(ok.sum()))
        if n_ok == 0:
            continue
        nrows = rank_local.total(t.nrows)
        total += rank_local.exact_sum(t.peek("intensity.sum.value")[ok]) / n_ok * nrows
        count += nrows
    if count == 0 or reference_mean <= 0:
        return None
    return round(1e-5 / (reference_mean / (total / count)), 12)


class TargetedScalingRun(ScalingRun):
    def __init__(self, experiments, table, dataset_rows, models, params, log):
        super().__init__(experiments, table, dataset_rows, models, params, log)
        from .. import geometry

        path = str(param(params, "scaling_options.reference"))
        d_min = param(params, "cut_data.d_min")
        if d_min is None:
            # over all ranks' rows (a rank may hold no suitable row of a dataset)
            d_min = rank_local.minimum(min(
                (float(np.min(s.table.peek("d", s.suitable_rows))) for s in self.states
                 if s.suitable_rows.size), default=np.inf))
        wavelength = float(np.mean([geometry.wavelength(e) for e in experiments]))
        reference = read_reference(
            path, self.space_group, self.anomalous, d_min, wavelength,
            param(params, "scaling_options.reference_model.k_sol", 0.35),
            param(params, "scaling_options.reference_model.b_sol", 46.0))
        ref_asu = map_indices_to_asu(reference.miller_index, self.space_group, self.anomalous)
        matched = 0
        for state in self.states:
            row = match_to_reference(state.asu, ref_asu)
            state.has_target = row >= 0
            state.target = np.where(state.has_target, reference.intensity[np.maximum(row, 0)],
                                    0.0)
            state.target_variance = np.zeros(row.size) if reference.variance is None else \
                np.where(state.has_target, reference.variance[np.maximum(row, 0)], 0.0)
            state.selected = state.has_target.copy()
            matched += int(state.has_target.sum())
        matched = rank_local.total(matched)
        if matched == 0:
            raise VmergeError(f"reference={path}: no reflection of the data is in the reference")
        self.reference = reference
        self.reference_mean = float(np.mean(reference.intensity))
        self.summary["reference"] = {"path": path, "n_reflections": reference.n,
                                     "model": reference.is_model, "n_matched": matched}
        self.log(f"Reference {path}: {reference.n} "
                 f"{'model' if reference.is_model else 'measured'} intensities; "
                 f"{matched} observations matched")

    def prescale(self):
        """Bring the problem to the data's overall scale, then start each unscaled model's
        scale term at the least-squares ratio of its data to the reference.

        Not in DIALS (its targeted scaler has a FIXME for exactly this). A reference on
        another absolute scale (a model's |F|^2 is ~10-100 times the counts of typical data)
        makes the scale parameters small next to the B parameters, and LBFGS then stops in
        the K-B valley short of the minimum: per-still K off by 1.6% (RMS) with a reference
        6.4 times the data, 0.13% with one 0.2 times it, on the same stills. So minimisation
        works with the reference times c (the global least-squares ratio of data to
        reference) and scale parameters divided by c, an exact reparametrisation that
        `_to_reference_units` undoes before output; every scale term used (KB, physical,
        dose_decay) is linear in its parameters. Models without a scale term (array) keep
        c = 1.
        """
        numerator, denominator = (_ordered_sum(v) for v in self._prescale_sums())
        scalable = all("scale" in s.model.components for s in self.states)
        c = numerator / denominator if scalable and denominator > 0 and numerator > 0 else 1.0
        self.internal_scale = c
        for state in self.states:
            state.target = state.target * c
            state.target_variance = state.target_variance * (c * c)
            if c != 1.0:
                self._rescale_model(state, 1.0 / c)
        numerator, denominator = self._prescale_sums()
        for d, state in enumerate(self.states):
            if self._configdict(state.experiment) or "scale" not in state.model.components:
                continue  # a stored (scaled) model starts where it ended
            if denominator[d] <= 0:
                continue
            k = float(numerator[d]) / float(denominator[d])
            if k > 0:
                self._rescale_model(state, k)

    def _prescale_sums(self):
        """Per dataset sum w I p and sum w p^2 (p = g I_ref) over the rows matched to the
        reference and not outliers, summed as the target is (_grouped_sum)."""
        rows = self._fixed_table()
        predicted = np.concatenate([s.g[s.has_target & ~s.outlier] *
                                    s.target[s.has_target & ~s.outlier]
                                    for s in self.states])[rows.order]
        return _grouped_sum(rows, (rows.intensity, rows.weight, predicted, rows.dataset_id),
                            prescale_sums_kernel, [(len(self.states),)] * 2, self.nproc)

    @staticmethod
    def _rescale_model(state, factor):
        """Multiply g by `factor` through the model's (linear) scale term."""
        component = state.model.components["scale"]
        component.set_parameters(component.parameters * factor)
        if component.est_standard_devs is not None:
            component.est_standard_devs = component.est_standard_devs * factor
        state.g = state.g * factor
        if state.var_g is not None:
            state.var_g = state.var_g * (factor * factor)

    def _to_reference_units(self):
        c = getattr(self, "internal_scale", 1.0)
        if c != 1.0:
            for state in self.states:
                self._rescale_model(state, c)
                state.target = state.target / c
                state.target_variance = state.target_variance / (c * c)
        self.internal_scale = 1.0

    def refine_error_models(self):
        """As without a reference, with g in the reference's units (min_Ih applies to the
        scaled intensities as in DIALS)."""
        c = getattr(self, "internal_scale", 1.0)
        internal_g = [s.g for s in self.states]
        for state in self.states:
            state.g = state.g * c
        try:
            super().refine_error_models()
        finally:
            for state, g in zip(self.states, internal_g):
                state.g = g

    def select_reflections(self):
        """Every suitable observation of a reference reflection (DIALS's targeted scaler
        minimises on the data matched to the target)."""
        for state in self.states:
            state.selected = state.has_target.copy()

    def _fixed_table(self):
        """The rows matched to the reference and not outliers, ordered by (ASU key, dataset,
        row) and grouped by ASU index (anomalous: by (ASU key, hand), see below): in a
        rank-local job each rank holds the groups of its own key blocks, in the one-process
        order of the same rows."""
        parts = []
        for d, state in enumerate(self.states):
            use = np.flatnonzero(state.has_target & ~state.outlier)
            parts.append((np.full(use.size, d, dtype=np.int64), use, state.intensity[use],
                          state.weights()[use], state.target[use], state.asu[use]))
        cat = [np.concatenate([p[k] for p in parts]) for k in range(6)]
        keys = packed_keys(cat[5])
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) \
            if keys.size else np.zeros(0, dtype=np.int64)
        group_start = np.concatenate([first, [keys.size]]).astype(np.int64)
        key_asu = cat[5][order[first]]
        if self.anomalous:
            # groups by the anomalous index in (unique reflection, hand) order, placed in the
            # key blocks by their non-anomalous index (as the run's layout: ih_table.
            # GroupLayout.friedel_ordered): a rank's groups are then its key blocks' groups
            permutation, key_asu = friedel_group_order(key_asu, self.space_group)
            rows, group_start = permuted_group_rows(group_start, permutation)
            order = order[rows]
        # None outside a job: blocks cut from these groups' sizes (key_block_sum)
        key_blocks = key_blocks_of_groups(key_asu)
        return SimpleNamespace(dataset_id=cat[0][order], loc_index=cat[1][order],
                               intensity=cat[2][order], weight=cat[3][order],
                               target=cat[4][order], n_obs=int(keys.size), order=order,
                               group_start=group_start, key_blocks=key_blocks)

    def minimise(self, engine="LBFGS", fix_initial=False, final=False):
        p = self.params
        manager = ParameterManager([s.model for s in self.states])
        target = FixedTarget(manager, self._fixed_table(), self.nproc)
        tolerance = param(p, "scaling_refinery.rmsd_tolerance", 1e-4)
        x0 = manager.get_free()
        if engine == "LBFGS":
            result = lbfgs(target, x0, param(p, "scaling_refinery.max_iterations"), tolerance,
                           small_steps_to_stop=2 if final else 1)
        else:
            result = levenberg_marquardt(
                target, x0, param(p, "scaling_refinery.full_matrix_max_iterations"), tolerance)
        manager.set_free(result.x)
        self.summary["rounds"].append({"engine": engine, "fix_initial": False, "targeted": True,
                                       "n_iterations": result.n_iterations,
                                       "rmsd": result.rmsd_history, "message": result.message})
        self.log(f"{engine} against the reference: {result.n_iterations} iterations, RMSD "
                 f"{result.rmsd_history[0]:.5g} -> {result.rmsd:.5g} ({result.message})")
        return manager, result

    def outlier_rejection(self):
        """|I - g I_ref| / sqrt(V + g^2 V_ref) > zmax against the fixed target (V with the
        error model)."""
        if not self.outliers_active:
            return
        zmax = param(self.params, "scaling_options.outlier_zmax", 6.0)
        counts = []
        for state in self.states:
            has = state.has_target
            outlier = np.zeros(has.size, dtype=bool)
            variance = 1.0 / state.weights()[has]
            outlier[has] = outl.targeted_outliers(state.intensity[has], variance, state.g[has],
                                                  state.target[has], state.target_variance[has],
                                                  zmax)
            state.outlier = outlier
            counts.append(int(outlier.sum()))
        counts = rank_local.totals(counts).tolist()
        self.log("Outlier rejection against the reference: " + ", ".join(map(str, counts)))

    def run(self):
        step = self._step
        step(self.initial_outlier_rejection)
        step(self.select_reflections)
        step(self.prescale)
        step(self.minimise, "LBFGS")  # dials.scale: one round before the targeted algorithm
        if self.outliers_active:
            step(self.expand)
            step(self.outlier_rejection)
            step(self.minimise, "LBFGS")
            step(self.expand)
            step(self.outlier_rejection)
            step(self.refine_error_models)
        covariance_manager = covariance = None
        if self.full_matrix_wanted():
            covariance_manager, result = step(self.minimise, "LevMar")
            covariance = result.covariance
            self._store_esds(covariance_manager, covariance)
        else:
            step(self.minimise, "LBFGS", final=True)
        step(self.expand, covariance_manager, covariance)
        step(self.outlier_rejection)
        step(self.refine_error_models)
        return step(self.finish)

    def finish(self):
        self._to_reference_units()
        cut = self.params.cut_data
        if is_auto(cut.small_scale_cutoff):
            value = auto_small_scale_cutoff(self.reference_mean, self.states)
            if value is not None:
                cut.small_scale_cutoff = value
                self.log(f"Small scale cutoff set to {value:g} (reference scaling)")
        return super().finish()
