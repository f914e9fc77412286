"""A tiny KB-like model (g = K exp(B/(2 d^2))) and synthetic data for the scaling-core tests.

The real models live in dials_vmerge.model; this stand-in implements the same ScalingModel
interface so the core can be tested alone. Its own derivatives are checked here.
"""

import types

import numpy as np

from dials_vmerge.table import ReflectionTable


class ToyKB:
    """g = K exp(B s/2), s = 1/d^2; parameters [K, B]."""

    def __init__(self, k=1.0, b=0.0, fixed=(), restraint=(0.0, 0.0), fix_initial=False):
        self.p = np.array([k, b], dtype=np.float64)
        self.fixed = set(fixed)
        self.restraint = np.array(restraint, dtype=np.float64)
        self.fix_initial = fix_initial
        self.esds = None
        self.dstar_sq = np.zeros(0)

    def parameter_vector(self):
        return self.p.copy()

    def set_parameter_vector(self, p):
        self.p = np.array(p, dtype=np.float64)

    @property
    def supports_fix_initial(self):
        return self.fix_initial

    def free_parameter_mask(self, fix_initial=False):
        mask = np.ones(2, dtype=bool)
        for i in self.fixed:
            mask[i] = False
        if fix_initial and self.fix_initial:
            mask[0] = False
        return mask

    def restraint_weights(self):
        return self.restraint.copy()

    def set_est_standard_devs(self, esds):
        self.esds = None if esds is None else np.array(esds)

    def configure(self, table, experiment):
        self.dstar_sq = 1.0 / table["d"] ** 2

    def evaluate(self, rows=None):
        s = self.dstar_sq if rows is None else self.dstar_sq[rows]
        decay = np.exp(self.p[1] * s / 2.0)
        g = self.p[0] * decay
        values = np.empty((g.size, 2))
        values[:, 0] = decay
        values[:, 1] = g * s / 2.0
        index = np.empty((g.size, 2), dtype=np.int32)
        index[:, 0] = 0
        index[:, 1] = 1
        return g, values, index


CELL_A = 40.0


def make_dataset(rng, unique_hkl, true_j, k, b, n_obs, noise=1.0, dataset_id=0,
                 background=5.0):
    """One dataset of n_obs observations of random members of unique_hkl (P1 cubic cell).

    Returns (table, true g). Variances are counting-like: var = g J + background, and the
    observation noise has that variance times noise^2.
    """
    pick = rng.integers(0, len(unique_hkl), n_obs)
    hkl = unique_hkl[pick]
    d = CELL_A / np.sqrt((hkl.astype(float) ** 2).sum(axis=1))
    g = k * np.exp(b / (2.0 * d * d))
    mean = g * true_j[pick]
    var = np.maximum(mean, 0) + background
    obs = mean + rng.normal(size=n_obs) * np.sqrt(var) * noise
    t = ReflectionTable(n_obs, {dataset_id: f"toy-{dataset_id}"})
    t["miller_index"] = hkl.astype(np.int32)
    t["d"] = d
    t["id"] = np.full(n_obs, dataset_id, dtype=np.int32)
    t["intensity.sum.value"] = obs
    t["intensity.sum.variance"] = var
    t["flags"] = np.full(n_obs, 256, dtype=np.uint64)  # integrated_sum
    return t, g


def unique_indices(rng, n_unique, max_index=12):
    """n_unique distinct indices with h, k, l > 0 (all distinct ASU groups in P1)."""
    grid = np.stack(np.meshgrid(*[np.arange(1, max_index + 1)] * 3, indexing="ij"), -1)
    grid = grid.reshape(-1, 3)
    return grid[rng.choice(len(grid), n_unique, replace=False)].astype(np.int32)


def p1_space_group():
    from cctbx import sgtbx

    return sgtbx.space_group_info("P 1").group()


def default_params(**overrides):
    """A params namespace with DIALS names and defaults for the scaling core."""
    ns = types.SimpleNamespace
    params = ns(
        anomalous=False,
        reflection_selection=ns(method="use_all", Isigma_range=(2.0, 0.0), E2_range=(0.8, 5.0),
                                d_range=None, min_partiality=0.25, intensity_choice="sum",
                                random=ns(min_groups=2000, min_reflections=50000,
                                          multi_dataset=ns(Isigma_cutoff=1.0)),
                                combine=ns(Imid=None, joint_analysis=True)),
        weighting=ns(error_model=ns(error_model="basic", basic=ns(a=None, b=None,
                                    minimisation="individual", min_Ih=25.0, n_bins=10),
                                    reset_error_model=False, grouping="combined",
                                    error_model_group=None)),
        cut_data=ns(d_min=None, d_max=None, partiality_cutoff=0.25, min_isigi=-5.0,
                    small_scale_cutoff="auto"),
        scaling_options=ns(outlier_rejection="standard", outlier_zmax=6.0, emax=10.0,
                           full_matrix=True, nproc=1),
        scaling_refinery=ns(engine="SimpleLBFGS", max_iterations=None, rmsd_tolerance=1e-4,
                            full_matrix_engine="LevMar", full_matrix_max_iterations=None),
        compute=ns(nproc=1),
    )
    for key, value in overrides.items():
        obj = params
        parts = key.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part)
        setattr(obj, parts[-1], value)
    return params


def test_toy_model_derivatives_match_finite_differences():
    rng = np.random.default_rng(1)
    table, _ = make_dataset(rng, unique_indices(rng, 20), rng.exponential(100, 20), 1.0, 0.0, 50)
    model = ToyKB(k=1.3, b=-2.0)
    model.configure(table, None)
    g, values, index = model.evaluate()
    for j in range(2):
        step = 1e-6
        p = model.parameter_vector()
        p[j] += step
        model.set_parameter_vector(p)
        g_plus = model.evaluate()[0]
        p[j] -= 2 * step
        model.set_parameter_vector(p)
        g_minus = model.evaluate()[0]
        p[j] += step
        model.set_parameter_vector(p)
        numeric = (g_plus - g_minus) / (2 * step)
        assert np.allclose(values[:, j], numeric, rtol=1e-7)
        assert (index[:, j] == j).all()
