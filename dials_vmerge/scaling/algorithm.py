"""The dials.scale algorithm on the numba core (dials-scaling.md 5.6, 11.1).

scale_table(experiments, table, dataset_rows, models, params, log) runs, for one or several
datasets refined concurrently, all in ONE prepared table (a dataset index per row, per-dataset
slices of the per-row arrays; models of one family evaluated for all datasets in one kernel,
scaling/family.py and kernels/):
  0. initial outlier rejection per dataset (models that were not scaled before),
  1. minimisation subset chosen once (section 8), LBFGS round,
  2. expand g to all suitable reflections, outlier rejection (standard/simple + E^2),
  3. profile/summation combination (Imid search), outlier rejection,
  4. LBFGS round,
  5. expand, outlier rejection, error-model refinement,
  6. full-matrix Levenberg-Marquardt (or LBFGS when full_matrix is off), then one more
     iteration with the first scale parameter fixed (tolerance rmsd_tolerance/4),
  7. expand with var(g) from the covariance, outlier rejection, final error model,
  8. prepare_output: the DIALS output columns and flags.
Rounds 2-5 are skipped when neither combination, outlier rejection nor an error model is
active. Models are configured once with each dataset's suitable rows.

Known difference: DIALS writes the covariance block of the fixed-first-parameter iteration
one index too early (5.7 quirk); we place it correctly, so var(g) differs slightly there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import flags
from ..backends import rank_local
from ..backends.group_order import GroupOrder
from ..kernels.flat import (dataset_keyed_indices, gather_by_dataset, scatter_mask,
                            split_positions)
from ..backends import rank_local
from ..errors import VmergeError
from ..memory import release_free_memory
from ..model.base import is_auto, param
from . import combine as comb
from . import error_model as em
from . import outliers as outl
from . import selection as sel
from .log_summary import MAX_LISTED, summarise_per_dataset
from .ih_table import GroupLayout, build_ih_table, map_indices_to_asu, set_num_threads
from .likelihood import make_target, minimise_with_e_steps
from .minimisers import lbfgs, levenberg_marquardt
from .family import evaluate_all_rows
from .parameters import ParameterManager, first_fix_initial_dataset
from .prepare import DEFAULT_MIN_ISIGI, d_from_unit_cell, prepare_dataset, suitable_selection
from .target import ScalingTarget, variance_of_g
from ..table import RowView, SharedRowViews

WORK_COLUMNS = ("intensity", "variance", "Esq", "s0c", "s1c", "s0", "prescaling_correction",
                "batch", "asu_miller_index")
OUTPUT_COLUMNS = ("inverse_scale_factor", "inverse_scale_factor_variance",
                  "intensity.scale.value", "intensity.scale.variance", "original_index")
DEFAULT_SMALL_SCALE_CUTOFF = 0.001
MAX_DATASETS_FOR_AUTO_FULL_MATRIX = 10
# more datasets than this, of at most this many suitable rows on average: models configure
# from columns read once for all datasets (table.SharedRowViews)
SHARED_READ_MIN_DATASETS = 16
SHARED_READ_MAX_MEAN_ROWS = 2000


def resolve_nproc(params):
    import numba

    nproc = param(params, "compute.nproc")
    if is_auto(nproc):
        nproc = param(params, "scaling_options.nproc")
    if is_auto(nproc):
        return numba.config.NUMBA_NUM_THREADS
    return max(1, int(nproc))


def _is_still(experiment):
    still = getattr(experiment, "is_still", None)
    if still is not None:
        return bool(still)
    return getattr(experiment, "scan", None) is None


@dataclass
class DatasetState:
    table: object
    experiment: object
    model: object
    suitable_rows: np.ndarray
    asu: np.ndarray
    intensity: np.ndarray
    variance: np.ndarray
    g: np.ndarray
    outlier: np.ndarray
    error_model: object = None
    selected: np.ndarray | None = None
    var_g: np.ndarray | None = None
    imid: float | None = None
    log: list = field(default_factory=list)
    # every row of this dataset in the table (suitable or not)
    dataset_rows: np.ndarray | None = None
    # ASU indices of the suitable rows with Friedel mates apart (the error model's
    # grouping), mapped once for the run's two error-model refinements (ScalingRun.
    # anomalous_asu); `asu` itself when the run is anomalous
    anomalous_asu: np.ndarray | None = None

    def weights(self):
        return em.error_model_weights(self.intensity, self.variance, self.error_model)


class ScalingRun:
    """One scaling job over ONE prepared reflection table holding every dataset.

    dataset_rows[d]: the ascending rows of dataset d in the table (datasets in experiment
    order, each dataset's rows contiguous or not). Per dataset a DatasetState keeps what is
    per dataset by nature (model, error model, Imid) and its suitable rows; the per-row arrays
    of all suitable rows are read once, for all datasets together, and each state holds its
    slice of them.
    """

    def __init__(self, experiments, table, dataset_rows, models, params, log):
        self.params = params
        self.log = log or (lambda *_: None)
        self.nproc = set_num_threads(resolve_nproc(params))
        self.anomalous = bool(param(params, "anomalous", False))
        from .. import geometry

        self.space_group = geometry.space_group(experiments[0])
        self.unit_cell = geometry.unit_cell(experiments[0])
        self.best_cell = geometry.median_unit_cell(experiments)  # the likelihood's d
        self.summary = {"dropped_datasets": [], "rounds": []}
        self.table = table
        self.dataset_rows = [np.asarray(r, dtype=np.int64) for r in dataset_rows]
        self.states = self._make_states(experiments, models)
        if not self.states:
            raise VmergeError("no reflections left to scale after filtering")
        self.global_uses_error_model_weights = len(self.states) == 1
        self._likelihood_em_started = False  # target=likelihood: a, b fitted in its E-steps

    # -- set-up ---------------------------------------------------------------------------
    def _make_states(self, experiments, models):
        table = self.table
        suitable = suitable_selection(table)
        kept = []
        # a rank-local job (issue 11): a dataset is dropped only when no rank has a suitable
        # row of it; a kept dataset's state may hold no row on a rank
        per_dataset = [rows[suitable[rows]] for rows in self.dataset_rows]
        n_suitable = rank_local.totals([r.size for r in per_dataset]) if per_dataset else []
        for position, (expt, rows, model) in enumerate(zip(experiments, self.dataset_rows,
                                                           models)):
            suitable_rows = per_dataset[position]
            if n_suitable[position] == 0:
                identifier = getattr(expt, "identifier", str(position))
                self.log(f"Dataset {identifier}: no suitable reflections; removed from scaling")
                self.summary["dropped_datasets"].append(identifier)
                continue
            kept.append((expt, model, suitable_rows, rows))
        if not kept:
            return []
        all_rows = np.concatenate([k[2] for k in kept])
        bounds = np.concatenate([[0], np.cumsum([k[2].size for k in kept])]).astype(np.int64)
        # issue 11: the read-time partition already mapped these rows (non-anomalous)
        from ..backends.rank_partition import partition_asu_of_rows, release_partition_keys

        asu = None if self.anomalous else partition_asu_of_rows(table, all_rows)
        if self.anomalous:
            release_partition_keys()
        if asu is None:
            asu = map_indices_to_asu(table.peek("miller_index", all_rows), self.space_group,
                                     self.anomalous)
        intensity = table.peek("intensity", all_rows)
        variance = table.peek("variance", all_rows)
        g = np.array(table.peek("inverse_scale_factor", all_rows), dtype=np.float64)
        other = np.flatnonzero(~suitable)
        del suitable
        self.unsuitable = (other, table.peek("intensity", other), table.peek("variance", other))
        table.del_column("intensity")
        table.del_column("variance")
        # The other columns the table holds in memory (summed partials' intensities,
        # prescaling correction, output columns) are read again only by the intensity
        # combination and for the output: a scratch file holds them meanwhile. Flags stay:
        # scaling sets them. Spilled before the models read their columns, the largest
        # allocations of this set-up (1e6 sweep: 52 MB less at its peak RSS).
        table.spill([name for name in table.keys() if name != "flags"])
        states = []
        # many small datasets (stills): each column the models configure from is read once
        # for all, not once per dataset (20 000 file reads took ~30 s at 20 000 stills); not
        # for sweeps or wedges, whose models read several columns that would all be held
        shared = SharedRowViews(table, [k[2] for k in kept]) \
            if (len(kept) > SHARED_READ_MIN_DATASETS
                and rank_local.total(all_rows.size) <= SHARED_READ_MAX_MEAN_ROWS * len(kept)) \
            else None
        for n, (expt, model, rows, _) in enumerate(kept):
            model.configure(RowView(table, rows) if shared is None else shared.view(n), expt)
            a, b = bounds[n], bounds[n + 1]
            state = DatasetState(table, expt, model, rows, asu[a:b], intensity[a:b],
                                 variance[a:b], g[a:b], np.zeros(rows.size, dtype=bool))
            state.error_model = self._initial_error_model(expt)
            state.dataset_rows = kept[n][3]
            states.append(state)
        del shared
        if self._can_combine(table):
            # Datasets scaled before keep their Imid: one read per distinct value.
            by_imid = {}
            for state in states:
                stored = self._configdict(state.experiment).get("Imid")
                if stored is not None:
                    by_imid.setdefault(stored, []).append(state)
            for imid, members in by_imid.items():
                rows = np.concatenate([m.suitable_rows for m in members])
                values, variances = comb.apply_imid(table, imid, rows)
                start = 0
                for m in members:
                    stop = start + m.suitable_rows.size
                    m.imid = imid
                    m.intensity, m.variance = values[start:stop], variances[start:stop]
                    start = stop
        return states

    def _per_state_column(self, name, states=None, rows_of=None):
        """Column `name` at each state's suitable rows (or rows_of(state)): one read of the
        table for all states, split into per-state views."""
        states = self.states if states is None else states
        parts = [s.suitable_rows if rows_of is None else rows_of(s) for s in states]
        values = self.table.peek(name, np.concatenate(parts))
        return np.split(values, np.cumsum([p.size for p in parts])[:-1])

    @staticmethod
    def _configdict(expt):
        model_dict = getattr(expt, "scaling_model", None) or {}
        return model_dict.get("configuration_parameters", {}) if isinstance(model_dict, dict) else {}

    def _initial_error_model(self, expt):
        p = self.params
        if param(p, "weighting.error_model.error_model", "basic") in (None, "None"):
            return None
        a, b = em.DEFAULT_A, em.DEFAULT_B
        stored = self._configdict(expt).get("error_model_parameters")
        if stored and not param(p, "weighting.error_model.reset_error_model", False):
            a, b = float(stored[0]), float(stored[1])
        user_a = param(p, "weighting.error_model.basic.a")
        user_b = param(p, "weighting.error_model.basic.b")
        return em.BasicErrorModel(user_a if user_a is not None else a,
                                  user_b if user_b is not None else b)

    def _can_combine(self, table):
        return "intensity.prf.value" in table and "intensity.sum.value" in table

    # -- tables ---------------------------------------------------------------------------
    @property
    def layout(self):
        """The group sort of all suitable reflections (ASU indices never change in a run)."""
        if getattr(self, "_layout", None) is None:
            self._layout = GroupLayout([s.asu for s in self.states])
            if self.anomalous:
                # groups by the anomalous index in (unique reflection, hand) order: an MPI
                # rank's groups are one contiguous run of the one-process order (issue 11)
                self._layout = self._layout.friedel_ordered(self.space_group)
        return self._layout

    def anomalous_layout(self, positions, masks):
        """The anomalous group sort of the masked suitable reflections of some datasets
        (gather then takes the datasets' full suitable-row arrays).

        Built when needed and not kept: it serves two error-model refinements, and its
        indices would otherwise stay resident through the final, largest stages of a run.
        """
        rows = [np.flatnonzero(mask) for mask in masks]
        members = [self.states[d] for d in positions]
        # groups in (unique reflection, hand) order: an MPI rank's groups are then one
        # contiguous run of the one-process order (issue 11; error_model.friedel_pair_layout,
        # which reads the masked rows of the indices in place)
        return em.friedel_pair_layout(
            self.anomalous_asu(members), self._non_anomalous_asu(members), rows=rows,
            full_sizes=[self.states[d].suitable_rows.size for d in positions])

    def _non_anomalous_asu(self, members):
        """Per state of `members`: the non-anomalous ASU indices of all its suitable rows
        (the states' own grouping unless the run is anomalous; then mapped, not kept)."""
        if not self.anomalous:
            return [s.asu for s in members]
        indices = self._per_state_column("miller_index", members)
        merged = map_indices_to_asu(np.concatenate(indices), self.space_group, False)
        return np.split(merged, np.cumsum([m.suitable_rows.size for m in members])[:-1])

    def anomalous_asu(self, members):
        """Per state of `members`: the anomalous ASU indices of all its suitable rows.

        Mapped once per run (12 B per suitable row kept from the first error-model
        refinement to the last; the mapping of ~1e6 rows took ~0.1 s each time)."""
        if self.anomalous:
            return [s.asu for s in members]
        missing = [s for s in members if s.anomalous_asu is None]
        if missing:
            indices = self._per_state_column("miller_index", missing)
            asu_all = map_indices_to_asu(np.concatenate(indices), self.space_group, True)
            del indices
            for s, part in zip(missing, np.split(asu_all, np.cumsum(
                    [m.suitable_rows.size for m in missing])[:-1])):
                s.anomalous_asu = part
        return [s.anomalous_asu for s in members]

    def global_table(self, states=None, error_model_weights=None):
        use_em = self.global_uses_error_model_weights if error_model_weights is None else \
            error_model_weights
        if states is None or states == self.states:
            states = self.states
            weights = [s.weights() if use_em else 1.0 / s.variance for s in states]
            return self.layout.table([s.intensity for s in states], [s.variance for s in states],
                                     weights, [s.g for s in states])
        weights = [s.weights() if use_em else 1.0 / s.variance for s in states]
        return build_ih_table([s.asu for s in states], [s.intensity for s in states],
                              [s.variance for s in states], weights, [s.g for s in states])

    def minimisation_table(self):
        masks = [s.selected & ~s.outlier for s in self.states]
        return self.layout.subset(masks).table(
            [s.intensity for s in self.states], [s.variance for s in self.states],
            [s.weights() for s in self.states], [s.g for s in self.states])

    # -- steps ----------------------------------------------------------------------------
    def initial_outlier_rejection(self):
        """Each new dataset's outliers against its own merged intensities (DIALS).

        The z-tests look at one group at a time, so datasets small enough that the E^2 test
        is skipped for them (stills) share one table whose groups are (dataset, ASU index):
        one kernel call for all of them. Larger datasets run one by one, with E^2."""
        new = [s for s in self.states
               if not (self._configdict(s.experiment)
                       or getattr(s.experiment, "scaling_model", None))]
        # a model that was scaled before: DIALS skips this pass for it
        # (sizes over all ranks in a rank-local job: the E^2 test's threshold is global)
        sizes = rank_local.totals([s.suitable_rows.size for s in new]) if new else []
        small = [s for s, n in zip(new, sizes) if n <= outl.MIN_REFLECTIONS_FOR_NORMALISATION]
        for state, n in zip(new, sizes):
            if n > outl.MIN_REFLECTIONS_FOR_NORMALISATION:
                table = self.global_table([state], error_model_weights=True)
                state.outlier = self._outliers_to_states(table, [state], True)[0]
        if small:
            p = self.params
            table = build_ih_table([dataset_keyed_indices([s.asu for s in small])], [np.concatenate([s.intensity for s in small])],
                                   [np.concatenate([s.variance for s in small])],
                                   [np.concatenate([s.weights() for s in small])],
                                   [np.concatenate([s.g for s in small])])
            mask = outl.reject_outliers(table, param(p, "scaling_options.outlier_rejection",
                                                     "standard"),
                                        param(p, "scaling_options.outlier_zmax", 6.0), None,
                                        None, None, self.nproc, self._pass_device(table))
            flat = np.zeros(table.n_obs, dtype=bool)
            flat[table.loc_index[mask]] = True
            start = 0
            for state in small:
                stop = start + state.suitable_rows.size
                state.outlier = flat[start:stop].copy()
                start = stop

    def select_reflections(self):
        """The minimisation subset (scaling/selection.py). In a rank-local job (issue 11)
        the table holds this rank's groups; the selection functions give every rank the
        one-process mask of its own rows, and the method, the log line and the datasets
        dropped are decided from counts over all ranks."""
        p = self.params
        table = self.global_table(error_model_weights=True)
        method = sel.resolve_method(param(p, "reflection_selection.method", "auto"),
                                    all(_is_still(s.experiment) for s in self.states),
                                    rank_local.total(table.n_obs), len(self.states))
        isig_range = param(p, "reflection_selection.Isigma_range", (2.0, 0.0))
        min_p = param(p, "reflection_selection.min_partiality", 0.25)
        d_range = param(p, "reflection_selection.d_range")
        min_groups = param(p, "reflection_selection.random.min_groups", 2000)
        min_refl = param(p, "reflection_selection.random.min_reflections", 50000)
        cutoff = param(p, "reflection_selection.random.multi_dataset.Isigma_cutoff", 1.0)
        partiality = self._sorted_column(table, "partiality")
        d = self._sorted_column(table, "d")
        pre = sel.preselection(table, isig_range, min_p, d_range, d, partiality)
        groups = GroupOrder(table.asu_index) if method in ("random", "quasi_random") else None
        if method == "use_all":
            mask = np.ones(table.n_obs, dtype=bool)
        elif method == "random":
            mask = sel.select_random(table, min_groups, min_refl, cutoff, groups=groups)
        elif method == "intensity_ranges":
            # The preselection is per row; only E^2 is normalised per dataset, and only for
            # datasets above the size DIALS normalises at (stills are below it).
            mask = sel.e2_window_by_dataset(
                table, pre.copy(), len(self.states), self.space_group, self.unit_cell,
                tuple(param(p, "reflection_selection.E2_range", (0.8, 5.0))))
        elif len(self.states) == 1:
            mask = sel.select_single_dataset(table, pre, min_groups, min_refl, groups=groups)
        else:
            mask = sel.select_quasi_random_multi(table, len(self.states), pre, min_groups,
                                                 min_refl, cutoff, groups=groups)
        selected = scatter_mask(table.dataset_id, table.loc_index, mask,
                                [s.suitable_rows.size for s in self.states])
        for state, chosen in zip(self.states, selected):
            state.selected = chosen
        self.log(f"Reflection selection ({method}): "
                 + summarise_per_dataset(self._selected_counts().tolist()))
        self._remove_datasets_without_selection()

    def _selected_counts(self):
        """Selected rows per dataset over all ranks (a dataset may have no rows on a rank)."""
        return rank_local.totals([int(s.selected.sum()) for s in self.states])

    def _remove_datasets_without_selection(self):
        """As DIALS: a dataset the selection left with nothing to minimise on is removed
        from scaling (and from the output) with a warning; the run goes on without it.
        Decided from the counts over all ranks, never from a rank's own rows."""
        counts = self._selected_counts()
        if (counts > 0).all():
            return
        for state, count in zip(self.states, counts):
            if count > 0:
                continue
            identifier = getattr(state.experiment, "identifier", "")
            self.log(f"Warning: dataset {identifier}: reflection selection left nothing to "
                     "minimise on; removing it from scaling")
            self.summary["dropped_datasets"].append(identifier)
            self.summary.setdefault("dropped_reasons", {})[identifier] = (
                "reflection selection left nothing to minimise on")
        self.states = [s for s, count in zip(self.states, counts) if count > 0]
        self._layout = None
        if not self.states:
            raise VmergeError("reflection selection left no dataset with anything to "
                              "minimise on")

    def _sorted_column(self, table, name):
        if name not in self.table:
            return None
        values = [np.asarray(v, dtype=float) for v in self._per_state_column(name)]
        return gather_by_dataset(values, table.dataset_id, table.loc_index)

    def minimise(self, engine="LBFGS", fix_initial=False, final=False):
        p = self.params
        models = [s.model for s in self.states]
        fix_dataset = first_fix_initial_dataset(models) if fix_initial else None
        manager = ParameterManager(models, fix_dataset)
        if param(p, "scaling_options.target", "least_squares") == "likelihood":
            # the likelihood target has CPU kernels only (compute.device applies to least
            # squares)
            table = self.minimisation_table()
            error_models = self._likelihood_error_models()
            target = make_target(p, manager, table, self.nproc, self.space_group,
                                 self.best_cell, error_models,
                                 None if error_models is None else self._friedel_hand(table),
                                 fit_error_model=False)  # a, b: at refine_error_models
        else:
            # compute.device picks the CPU target or its CUDA twin (backends/run_device.py)
            from ..backends.run_device import target_for_run

            target = target_for_run(self, manager, self.minimisation_table())
        tolerance = param(p, "scaling_refinery.rmsd_tolerance", 1e-4)
        x0 = manager.get_free()
        if engine == "LBFGS":
            # Differs from DIALS on purpose: when LBFGS makes the final parameters (no full-matrix
            # round, e.g. stills), one tiny first step on the freshly reweighted problem is not
            # taken as convergence; two in a row are needed (KB stills truth: g error 2.1% ->
            # 0.75%). Earlier rounds keep DIALS's rule, which the quartz comparison relies on.
            result = minimise_with_e_steps(lbfgs, target, x0,
                                           param(p, "scaling_refinery.max_iterations"),
                                           tolerance, small_steps_to_stop=2 if final else 1)
        else:
            max_it = param(p, "scaling_refinery.full_matrix_max_iterations")
            if fix_initial:
                max_it, tolerance = 1, tolerance / 4.0
            result = minimise_with_e_steps(levenberg_marquardt, target, x0, max_it, tolerance)
        manager.set_free(result.x)
        self._store_likelihood_error_models(target)
        self.summary["rounds"].append({"engine": engine, "fix_initial": fix_initial,
                                       "n_iterations": result.n_iterations,
                                       "rmsd": result.rmsd_history, "message": result.message})
        self.log(f"{engine}{' (first scale parameter fixed)' if fix_initial else ''}: "
                 f"{result.n_iterations} iterations, RMSD {result.rmsd_history[0]:.5g} -> "
                 f"{result.rmsd:.5g} ({result.message})")
        return manager, result

    def expand(self, manager=None, covariance=None):
        """g (and var(g) when a covariance is given) for every suitable reflection.

        g alone needs no Jacobian; var(g) takes it in chunks of rows, so no (n, K)
        derivative table of all reflections ever exists.
        """
        if manager is None:
            manager = ParameterManager([s.model for s in self.states])
        if getattr(self, "_compute_device", None) == "cuda":
            # compute.device=cuda: the model kernels of the scaling target, on every row
            from ..backends.cuda_expand import expand_on_device

            if expand_on_device(self.states, manager, covariance):
                return
        # one kernel call per model family and block of rows (scaling/family.py); each
        # state's g (and var(g)) is its slice of the one array
        sizes = [s.suitable_rows.size for s in self.states]
        g, var_g = evaluate_all_rows(manager, sizes, covariance, variance_of_g)
        bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        for d, state in enumerate(self.states):
            state.g = g[bounds[d]:bounds[d + 1]]
            if var_g is not None:
                state.var_g = var_g[bounds[d]:bounds[d + 1]]

    def _pass_device(self, table):
        """compute.device for a per-observation pass (backends/run_device.py)."""
        from ..backends.run_device import device_for_run

        return device_for_run(self, rank_local.total(table.n_obs))

    def _outliers_to_states(self, table, states, error_model_weights=None):
        p = self.params
        method = param(p, "scaling_options.outlier_rejection", "standard")
        device, resident = self._pass_device(table), None
        if device == "cuda":  # the table from the job's device-resident arrays (issue 12)
            from ..backends.cuda_job_table import outlier_columns

            resident = outlier_columns(self, table, states, error_model_weights)
        mask = outl.reject_outliers(table, method, param(p, "scaling_options.outlier_zmax", 6.0),
                                    param(p, "scaling_options.emax", 10.0), self.space_group,
                                    self.unit_cell, self.nproc, device, resident)
        return scatter_mask(table.dataset_id, table.loc_index, mask,
                            [s.suitable_rows.size for s in states])

    def outlier_rejection(self):
        if not self.outliers_active:
            return
        new = self._outliers_to_states(self.global_table(), self.states)
        for state, o in zip(self.states, new):
            state.outlier = o
        self.log("Outlier rejection: " + summarise_per_dataset(
            rank_local.totals([int(o.sum()) for o in new]).tolist()))

    @property
    def outliers_active(self):
        return param(self.params, "scaling_options.outlier_rejection", "standard") not in (
            None, "None", "none")

    @property
    def combine_active(self):
        return (param(self.params, "reflection_selection.intensity_choice", "combine") == "combine"
                and self._can_combine(self.table))

    @property
    def error_model_active(self):
        return param(self.params, "weighting.error_model.error_model", "basic") not in (
            None, "None")

    def combine_intensities(self):
        p = self.params
        user = param(p, "reflection_selection.combine.Imid")
        joint = param(p, "reflection_selection.combine.joint_analysis", True)
        t = self.table
        all_rows = _joined([s.suitable_rows for s in self.states])  # read only
        g_full = np.zeros(t.nrows)
        g_full[all_rows] = _joined([s.g for s in self.states])
        ok = np.zeros(t.nrows, dtype=bool)
        ok[all_rows[~_joined([s.outlier for s in self.states])]] = True
        usable = comb.combination_test_selection(t, g_full, ok)
        del ok
        # test rows in dataset order, ascending within a dataset (as the datasets' lists)
        position = np.flatnonzero(usable[all_rows])
        del usable
        test = all_rows[position]
        if self.anomalous:
            asu = map_indices_to_asu(t.peek("miller_index", test), self.space_group, False)
        else:  # test rows are suitable rows: their (non-anomalous) ASU indices are known
            asu = _joined([s.asu for s in self.states])[position]
        pooled = {"asu_index": asu, "i_prf": t.peek("intensity.prf.value", test),
                  "v_prf": t.peek("intensity.prf.variance", test),
                  "i_sum": t.peek("intensity.sum.value", test),
                  "v_sum": t.peek("intensity.sum.variance", test),
                  "partiality": (t.peek("partiality", test) if "partiality" in t
                                 else np.ones(test.size)),
                  "correction": t.peek("prescaling_correction", test),
                  "g": g_full[test]}
        # only `pooled` holds the test rows' arrays now: choose_imid releases them as it
        # sorts them (this step's peak)
        del g_full, test, asu
        user_list = list(user) if user else None
        few = len(self.states) <= comb.PER_DATASET_KEY_BLOCKS_MAX
        if joint:
            imid = comb.choose_imid([pooled], user_list, self.nproc, self.log,
                                    by_key_blocks=True)
            imids = [imid] * len(self.states)
        elif few:
            # few datasets: over the job's key blocks as the joint search (the same bits for
            # any number of MPI ranks and threads)
            state_bounds = np.cumsum([s.suitable_rows.size for s in self.states])
            cuts = np.searchsorted(position, state_bounds[:-1])
            datasets = [dict(zip(pooled, parts)) for parts in
                        zip(*(np.split(v, cuts) for v in pooled.values()))]
            del pooled
            imids = [comb.choose_imid([d], user_list, self.nproc, self.log,
                                      by_key_blocks=True) for d in datasets]
            del datasets
        else:
            # many datasets (stills): all at once, each dataset's sums one sequential pass
            # continued over the ranks (combine.choose_imids_per_dataset)
            state_bounds = np.cumsum([s.suitable_rows.size for s in self.states])
            rows_per_dataset = np.diff(np.searchsorted(position, state_bounds), prepend=0)
            imids = comb.choose_imids_per_dataset(pooled, rows_per_dataset, user_list,
                                                  self.log)
        del position
        if joint:
            values, variances = comb.apply_imid(t, imids[0], all_rows)
            per_state = zip(np.split(values, np.cumsum([s.suitable_rows.size
                                                        for s in self.states])[:-1]),
                            np.split(variances, np.cumsum([s.suitable_rows.size
                                                           for s in self.states])[:-1]))
        else:
            per_state = (comb.apply_imid(t, imid, s.suitable_rows)
                         for s, imid in zip(self.states, imids))
        for state, imid, (values, variances) in zip(self.states, imids, per_state):
            state.imid = imid
            state.intensity, state.variance = values, variances
            if hasattr(state.model, "record_intensity_combination_Imid"):
                state.model.record_intensity_combination_Imid(imid)
        self.global_uses_error_model_weights = True
        if joint:
            self.log(f"Intensity combination: Imid {imids[0]:g} (all datasets)")
        else:
            self.log("Intensity combination: Imid " + summarise_per_dataset(imids, "{:g}"))

    # -- issue 14: a, b fitted inside the marginal likelihood (scaling/likelihood.py) ------
    def _likelihood_error_models(self, refine_step=False):
        """The error models of the likelihood target, None to keep the table's weights: as
        in DIALS's round order, a, b are first fitted at the error-model step, on scales
        already refined (fitted from the first round, on the unscaled data, they came out
        inflated, a = 1.98 at a true 1.3, and the dose_decay scales then ran away); later
        rounds weight by them with Ihat = g E[J]."""
        if not self.error_model_active or not (refine_step or self._likelihood_em_started):
            return None
        self._likelihood_em_started = True
        return [s.error_model for s in self.states]

    def _friedel_hand(self, table):
        """1 where an observation of an Ih table is the Friedel mate of its ASU reflection
        (its anomalous ASU index differs from the Friedel-merged one), else 0."""
        # the table row of every observation, for all datasets at once (a scan of all
        # observations per dataset took O(observations x datasets))
        suitable = np.concatenate([s.suitable_rows for s in self.states])
        start = np.concatenate([[0], np.cumsum([s.suitable_rows.size
                                                for s in self.states])[:-1]]).astype(np.int64)
        rows = suitable[start[np.asarray(table.dataset_id, dtype=np.int64)]
                        + np.asarray(table.loc_index, dtype=np.int64)]
        hkl = self.table.peek("miller_index", rows)
        merged = map_indices_to_asu(hkl, self.space_group, False)
        apart = map_indices_to_asu(hkl, self.space_group, True)
        return np.any(np.asarray(merged) != np.asarray(apart), axis=1).astype(np.int64)

    def _store_likelihood_error_models(self, target):
        models = getattr(target, "fitted_error_models", lambda: None)()
        if models is None:
            return
        for state, model in zip(self.states, models):
            state.error_model = model
        self.global_uses_error_model_weights = True

    def refine_error_models_by_likelihood(self):
        """a, b by maximum marginal likelihood at the current scales (target=likelihood)."""
        manager = ParameterManager([s.model for s in self.states])
        table = self.minimisation_table()
        target = make_target(self.params, manager, table, self.nproc, self.space_group,
                             self.best_cell, self._likelihood_error_models(refine_step=True),
                             self._friedel_hand(table))
        target.e_step(manager.get_free())
        self._store_likelihood_error_models(target)
        fitted = {(m.a, m.b) for m in target.fitted_error_models()}
        for a, b in sorted(fitted)[:MAX_LISTED]:
            self.log(f"Error model (marginal likelihood): a = {a:.5f}, b = {b:.5f}")

    def refine_error_models(self):
        if not self.error_model_active:
            return
        p = self.params
        if param(p, "scaling_options.target", "least_squares") == "likelihood":
            return self.refine_error_models_by_likelihood()
        groups = em.error_model_groups(
            len(self.states), param(p, "weighting.error_model.grouping", "combined"),
            param(p, "weighting.error_model.error_model_group"))
        multi = len(self.states) > 1
        refined, failures = [], []
        # the anomalous group sort below is the step's largest allocation: give the heap
        # holes of the step's earlier temporaries back first (memory.py; once, not per group)
        release_free_memory(collect_cycles=False)
        for group in groups:
            members = [self.states[d] for d in group]
            masks = [~s.outlier for s in members]
            partialities = None
            stills = None
            if all(_is_still(s.experiment) for s in members):
                stills = (param(p, "weighting.error_model.basic.stills.min_Isigma", 2.0),
                          param(p, "weighting.error_model.basic.stills.min_multiplicity", 4))
            min_partiality = param(p, "reflection_selection.min_partiality", 0.25)
            if (multi or stills) and "partiality" in self.table:
                partialities = self._per_state_column("partiality", members)
                if min_partiality is not None:
                    # the partiality cut as part of the layout subset: one table fewer
                    masks = [m & (pr > min_partiality) for m, pr in zip(masks, partialities)]
            try:
                # the table is built here and the layout, masks and partialities let go, so
                # that only its columns (consumed by the filters) stay through the refinement
                ih_table = em.unfiltered_table(
                    None, [s.intensity for s in members], [s.variance for s in members],
                    [s.g for s in members], partialities, self.anomalous_layout(group, masks))
                del partialities, masks
                model = em.refine_error_model(
                    None,
                    [s.intensity for s in members],
                    [s.variance for s in members],
                    [s.g for s in members],
                    members[0].error_model, None, min_partiality,
                    param(p, "weighting.error_model.basic.min_Ih", 25.0),
                    param(p, "weighting.error_model.basic.n_bins", 10),
                    param(p, "weighting.error_model.basic.minimisation", "auto"),
                    param(p, "weighting.error_model.basic.a"),
                    param(p, "weighting.error_model.basic.b"),
                    stills=stills, ih_table=ih_table,
                    deviation=param(p, "weighting.error_model.basic.deviation", "unbiased"))
            except (em.ErrorModelError, ValueError, FloatingPointError) as e:
                failures.append(str(e))
                continue
            for s in members:
                s.error_model = em.BasicErrorModel(model.a, model.b)
            refined.append((model.a, model.b))
        if len(groups) <= MAX_LISTED:
            for message in failures:
                self.log(f"Error model refinement failed: {message}; keeping the current model")
            for a, b in refined:
                self.log(f"Error model: a = {a:.5f}, b = {b:.5f}")
        else:
            if failures:
                self.log(f"Error model refinement failed for {len(failures)} of {len(groups)} "
                         f"groups (first: {failures[0]}); keeping their current models")
            if refined:
                values = np.array(refined)
                self.log(f"Error model ({len(refined)} groups): a = "
                         + summarise_per_dataset(values[:, 0].tolist(), "{:.5f}")
                         + "; b = " + summarise_per_dataset(values[:, 1].tolist(), "{:.5f}"))
        self.global_uses_error_model_weights = True

    def full_matrix_wanted(self):
        value = param(self.params, "scaling_options.full_matrix")
        if is_auto(value):
            return not (any(_is_still(s.experiment) for s in self.states)
                        or len(self.states) > MAX_DATASETS_FOR_AUTO_FULL_MATRIX)
        return bool(value)

    # -- the round order ------------------------------------------------------------------
    def run(self):
        step = self._step
        step(self.initial_outlier_rejection)
        step(self.select_reflections)
        step(self.minimise, "LBFGS")
        if self.combine_active or self.outliers_active or self.error_model_active:
            step(self.expand)
            step(self.outlier_rejection)
            if self.combine_active:
                step(self.combine_intensities)
                step(self.outlier_rejection)
            step(self.minimise, "LBFGS")
            step(self.expand)
            step(self.outlier_rejection)
            step(self.refine_error_models)
        covariance_manager = None
        covariance = None
        if self.full_matrix_wanted():
            manager, result = step(self.minimise, "LevMar")
            covariance_manager, covariance = manager, result.covariance
            if first_fix_initial_dataset([s.model for s in self.states]) is not None:
                manager, result = step(self.minimise, "LevMar", fix_initial=True)
                covariance_manager, covariance = manager, result.covariance
            self._store_esds(covariance_manager, covariance)
        else:
            step(self.minimise, "LBFGS", final=True)
        step(self.expand, covariance_manager, covariance)
        step(self.outlier_rejection)
        # no step after this one uses the group sort (the error model builds its own
        # anomalous one; the likelihood's refinement does use it): let it go before the
        # run's last two, largest steps
        if param(self.params, "scaling_options.target", "least_squares") != "likelihood":
            self._layout = None
        step(self.refine_error_models)
        return step(self.finish)

    @staticmethod
    def _step(function, *args, **kwargs):
        # Each step's temporaries are freed when it returns; give their pages back before
        # the next step allocates, so the peak RSS is that of the largest step, not the sum
        # of heap holes left behind (memory.py).
        release_free_memory(collect_cycles=False)
        return function(*args, **kwargs)

    def _store_esds(self, manager, covariance):
        if covariance is None:
            return
        esds_free = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
        for d, state in enumerate(self.states):
            if hasattr(state.model, "set_est_standard_devs"):
                state.model.set_est_standard_devs(manager.full_vector(d, esds_free))

    def finish(self):
        cutoff = param(self.params, "cut_data.small_scale_cutoff")
        cutoff = DEFAULT_SMALL_SCALE_CUTOFF if is_auto(cutoff) else float(cutoff)
        for state in self.states:
            if state.error_model is not None and hasattr(state.model, "set_error_model"):
                state.model.set_error_model("BasicErrorModel", state.error_model.parameters)
        table = self.table
        # finish is the last step: the group sorts and the error model's anomalous indices
        # are done with, and would otherwise stay resident through the output columns
        self._layout = None
        for state in self.states:
            state.anomalous_asu = None
        other, other_intensity, other_variance = self.unsuitable
        suitable_rows = _joined([s.suitable_rows for s in self.states])
        for name, other_values in (("intensity", other_intensity),
                                   ("variance", other_variance)):
            column = np.zeros(table.nrows, dtype=np.float64)
            for state in self.states:  # disjoint rows: no joined copy of the values
                column[state.suitable_rows] = getattr(state, name)
            column[other] = other_values
            table[name] = column
        # the output columns are the run's last large allocations (peak RSS of a 1e6 sweep):
        # return the holes the joins above and the last steps left in the heap first
        release_free_memory(collect_cycles=False)
        var_g = None
        if all(s.var_g is not None for s in self.states):
            var_g = _joined([s.var_g for s in self.states])
        table = prepare_output(table, suitable_rows,
                               _joined([s.g for s in self.states]), var_g,
                               _joined([s.outlier for s in self.states]),
                               PerRowErrorModel.of_datasets(
                                   table.nrows, [(s.dataset_rows, s.error_model)
                                                 for s in self.states]), cutoff)
        kept_rows = [s.dataset_rows for s in self.states]
        if sum(r.size for r in kept_rows) != table.nrows:
            # rows of datasets removed during scaling leave with their datasets
            table = table.select(np.sort(np.concatenate(kept_rows)))
        # counts over all ranks in a rank-local job
        counts = rank_local.totals(np.array(
            [[s.suitable_rows.size, int(s.selected.sum()), int(s.outlier.sum())]
             for s in self.states], dtype=np.int64).ravel()).reshape(-1, 3)
        self.summary["datasets"] = [{
            "identifier": getattr(s.experiment, "identifier", ""),
            "error_model": None if s.error_model is None else s.error_model.parameters,
            "Imid": s.imid, "n_suitable": int(n_suitable),
            "n_selected": int(n_selected), "n_outliers": int(n_outliers),
        } for s, (n_suitable, n_selected, n_outliers) in zip(self.states, counts)]
        self.summary["experiments"] = [s.experiment for s in self.states]
        return table, [s.model for s in self.states], self.summary


def _joined(parts):
    """np.concatenate(parts) for reading only: the one part itself when there is one (one
    sweep: no copy of a per-row array at the run's peak)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class PerRowErrorModel:
    """Each dataset's error model applied to its rows of the flat table (rows of datasets
    without one keep their variance). a, b and has_model are per-row arrays, or scalars when
    every row has the same model (the same arithmetic per element, without 17 B per row)."""

    def __init__(self, a, b, has_model):
        self.a, self.b, self.has_model = a, b, has_model

    @classmethod
    def of_datasets(cls, n_rows, rows_and_models):
        rows_and_models = list(rows_and_models)
        models = [(rows, model) for rows, model in rows_and_models if model is not None]
        if not models:
            return None
        parameters = {(float(model.a), float(model.b)) for _, model in models}
        if len(parameters) == 1 and sum(rows.size for rows, _ in models) == n_rows:
            (a, b), = parameters
            return cls(a, b, True)
        a, b = np.ones(n_rows), np.zeros(n_rows)
        has_model = np.zeros(n_rows, dtype=bool)
        for rows, model in rows_and_models:
            if model is not None:
                a[rows], b[rows] = model.a, model.b
                has_model[rows] = True
        if not has_model.any():
            return None
        return cls(a, b, has_model)

    def variance(self, intensity, variance):
        # a * a * (V + (b I)^2), evaluated in that order, in one buffer
        with np.errstate(invalid="ignore", over="ignore"):
            modelled = np.multiply(self.b, intensity)
            np.square(modelled, out=modelled)
            np.add(variance, modelled, out=modelled)
            np.multiply(self.a * self.a, modelled, out=modelled)
        if self.has_model is True:
            return modelled
        return np.where(self.has_model, modelled, variance)


def scaled_variance(intensity, variance, g, var_g, error_model):
    """DIALS output variance: a^2 (V + (b I)^2) (1 + sigma_g / g); a, b = 1, 0 without a model.

    Computed in one per-row buffer besides the result (this is the peak of a run's memory):
    the same operations in the same order as v * (1 + where(var_g > 0 & g != 0,
    sqrt(clip(var_g, 0)) / g, 0))."""
    v = variance if error_model is None else error_model.variance(intensity, variance)
    fractional = np.clip(var_g, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.sqrt(fractional, out=fractional)
        np.divide(fractional, g, out=fractional)
    fractional[~((var_g > 0) & (g != 0))] = 0.0
    fractional += 1.0
    return np.multiply(v, fractional, out=fractional)


def prepare_output(table, suitable_rows, g, var_g, outlier, error_model,
                   small_scale_cutoff=DEFAULT_SMALL_SCALE_CUTOFF, keep_columns=None):
    """Write the 11.1 output columns and flags on a prepared table; drop work columns.

    Suitable rows get the new g and var(g); other rows keep their input g and var(g) = 0.
    intensity.scale.value is the unscaled chosen intensity; the variance recipe applies to
    every row. keep_columns: the input column names; other non-output columns are dropped.
    """
    n = table.nrows
    g_all = np.array(table["inverse_scale_factor"], dtype=np.float64) if \
        "inverse_scale_factor" in table else np.ones(n)
    g_all[suitable_rows] = g
    var_all = np.zeros(n)
    if var_g is not None:
        var_all[suitable_rows] = var_g
    table["inverse_scale_factor"] = g_all
    table["inverse_scale_factor_variance"] = var_all
    table["intensity.scale.value"] = np.array(table["intensity"], dtype=np.float64)
    table["intensity.scale.variance"] = scaled_variance(table["intensity"], table["variance"],
                                                        g_all, var_all, error_model)
    outlier_rows = suitable_rows[outlier]
    table.unset_flags(slice(None), flags.outlier_in_scaling | flags.scaled)
    table.set_flags(outlier_rows, flags.outlier_in_scaling)
    small = np.zeros(n, dtype=bool)
    small[suitable_rows] = g < small_scale_cutoff
    table.set_flags(small, flags.excluded_for_scaling)
    bad = table.get_flags(flags.bad_for_scaling, all=False)
    table.set_flags(~bad, flags.scaled)
    for name in WORK_COLUMNS:
        table.del_column(name)
    if keep_columns is not None:
        for name in list(table.keys()):
            if name not in keep_columns and name not in OUTPUT_COLUMNS:
                table.del_column(name)
    return table


def scale_table(experiments, table, dataset_rows, models, params, log=None):
    """Scale every dataset of one prepared table concurrently.

    table: prepared with prepare.prepare_dataset (flags cleared, image exclusions applied by
    the caller); dataset_rows[d]: the rows of experiment d; models: one ScalingModel per
    experiment. Returns (table, models, summary): the table with the DIALS output columns and
    flags, without the rows of datasets removed during scaling; the models and
    summary["experiments"] of the datasets kept; the summary lists removed datasets,
    per-round minimiser details and, per dataset, the error model (a, b), Imid and counts.
    """
    if len(experiments) != len(dataset_rows) or len(dataset_rows) != len(models):
        raise VmergeError("scaling needs one experiment, row list and model per dataset")
    run_class = ScalingRun
    if param(params, "scaling_options.reference"):
        # reference= : scaling against fixed intensities (scaling/targeted.py)
        from .targeted import TargetedScalingRun as run_class
    elif param(params, "scaling_options.use_free_set", False):
        # a free set left out of minimisation (scaling/free_set.py, cross-validation)
        from .free_set import FreeSetScalingRun as run_class
    return run_class(experiments, table, dataset_rows, models, params, log).run()


def scale_datasets(experiments, tables, models, params, log=None):
    """scale_table for callers holding one table per dataset (raw integrated tables are
    prepared here with the params' cut_data settings); returns (one output table per dataset
    kept, models, summary)."""
    from .. import geometry
    from ..table import ReflectionTable

    if len(experiments) != len(tables) or len(tables) != len(models):
        raise VmergeError("scaling needs one experiment, reflection table and model per dataset")
    prepared = []
    for table in tables:
        if "intensity" not in table:
            d_values = None
            if param(params, "cut_data.d_min") is not None or \
                    param(params, "cut_data.d_max") is not None:
                d_values = d_from_unit_cell(table.peek("miller_index"),
                                            geometry.median_unit_cell(experiments))
            table = prepare_dataset(
                table, intensity_choice=param(params, "reflection_selection.intensity_choice",
                                              "combine"),
                partiality_cutoff=param(params, "cut_data.partiality_cutoff", 0.25),
                min_isigi=param(params, "cut_data.min_isigi", DEFAULT_MIN_ISIGI),
                d_min=param(params, "cut_data.d_min"), d_max=param(params, "cut_data.d_max"),
                d_values=d_values)
        prepared.append(table)
    sizes = [t.nrows for t in prepared]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = [np.arange(bounds[d], bounds[d + 1]) for d in range(len(prepared))]
    table = prepared[0] if len(prepared) == 1 else ReflectionTable.concatenate(prepared)
    table, kept_models, summary = scale_table(experiments, table, rows, models, params, log)
    if len(prepared) == 1:
        return [table], kept_models, summary
    kept = [i for i, e in enumerate(experiments)
            if any(e is k for k in summary["experiments"])]
    sizes = [sizes[i] for i in kept]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return (table.split([np.arange(bounds[d], bounds[d + 1]) for d in range(len(kept))]),
            kept_models, summary)
