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
from ..errors import VmergeError
from ..io.reference import read_reference
from ..model.base import is_auto, param
from . import outliers as outl
from .algorithm import ScalingRun
from .ih_table import map_indices_to_asu, pack_indices
from .minimisers import lbfgs, levenberg_marquardt
from .parameters import ParameterManager
from .target import ModelTerms, _ordered_rows_sum, _ordered_sum

ROWS_PER_CHUNK_MIN = 4096


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


def _row_chunks(n, nproc):
    n_chunks = max(1, min(int(nproc), n // ROWS_PER_CHUNK_MIN)) if n else 1
    return np.linspace(0, n, n_chunks + 1).astype(np.int64)


class FixedTarget(ModelTerms):
    """The targeted least-squares problem for the models behind a ParameterManager
    (the interface of ScalingTarget that the minimisers use); Ih is the fixed reference,
    so rows need no grouping and are summed in row chunks."""

    def __init__(self, manager, table, nproc=1):
        super().__init__(manager, table, nproc)
        self.chunks = _row_chunks(table.n_obs, nproc)

    def value_and_gradient(self, x):
        g, values, cols = self._ell(x)
        t = self.table
        n_chunks = self.chunks.size - 1
        phi_partial = np.zeros(n_chunks)
        grad_partial = np.zeros((n_chunks, self.n_par))
        fixed_target_gradient_kernel(t.intensity, t.weight, g, t.target, values, cols,
                                     self.chunks, phi_partial, grad_partial)
        wr = self.restraint_weights
        phi = _ordered_sum(phi_partial) + float(np.sum(wr * x * x))
        return phi, _ordered_rows_sum(grad_partial) + 2.0 * wr * x

    def normal_equations(self, x):
        g, values, cols = self._ell(x)
        t = self.table
        n_chunks = self.chunks.size - 1
        phi_partial = np.zeros(n_chunks)
        rhs_partial = np.zeros((n_chunks, self.n_par))
        normal_partial = np.zeros((n_chunks, self.n_par, self.n_par))
        fixed_normal_kernel(t.intensity, t.weight, g, t.target, values, cols, self.chunks,
                            phi_partial, rhs_partial, normal_partial)
        wr = self.restraint_weights
        phi = _ordered_sum(phi_partial) + float(np.sum(wr * x * x))
        return (phi, _ordered_rows_sum(rhs_partial) + wr * x,
                _ordered_rows_sum(normal_partial) + np.diag(wr))

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
    the datasets' means weighted by their table sizes."""
    total, count = 0.0, 0
    for s in states:
        t = s.table
        if "intensity.sum.value" not in t:
            continue
        ok = t.get_flags(flags.integrated_sum)
        if not ok.any():
            continue
        total += float(np.mean(t.peek("intensity.sum.value")[ok])) * t.nrows
        count += t.nrows
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
            d_min = min(float(np.min(s.table.peek("d", s.suitable_rows))) for s in self.states)
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
        numerator = denominator = 0.0
        for state in self.states:
            use = state.has_target & ~state.outlier
            w = state.weights()[use]
            predicted = state.g[use] * state.target[use]
            numerator += float(np.sum(w * state.intensity[use] * predicted))
            denominator += float(np.sum(w * predicted * predicted))
        scalable = all("scale" in s.model.components for s in self.states)
        c = numerator / denominator if scalable and denominator > 0 and numerator > 0 else 1.0
        self.internal_scale = c
        for state in self.states:
            state.target = state.target * c
            state.target_variance = state.target_variance * (c * c)
            if c != 1.0:
                self._rescale_model(state, 1.0 / c)
        for state in self.states:
            if self._configdict(state.experiment) or "scale" not in state.model.components:
                continue  # a stored (scaled) model starts where it ended
            use = state.has_target & ~state.outlier
            w = state.weights()[use]
            predicted = state.g[use] * state.target[use]
            denominator = float(np.sum(w * predicted * predicted))
            if denominator <= 0:
                continue
            k = float(np.sum(w * state.intensity[use] * predicted)) / denominator
            if k > 0:
                self._rescale_model(state, k)

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
        parts = []
        for d, state in enumerate(self.states):
            use = np.flatnonzero(state.has_target & ~state.outlier)
            parts.append((np.full(use.size, d, dtype=np.int64), use, state.intensity[use],
                          state.weights()[use], state.target[use]))
        cat = [np.concatenate([p[k] for p in parts]) for k in range(5)]
        return SimpleNamespace(dataset_id=cat[0], loc_index=cat[1], intensity=cat[2],
                               weight=cat[3], target=cat[4], n_obs=int(cat[0].size))

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
