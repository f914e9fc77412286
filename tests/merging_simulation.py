"""A small simulator for merging tests: true J from the Wilson distribution (acentric
exponential, centric Gamma(1/2)), known sigmas, optional gross outliers. Not a test module."""

from dataclasses import dataclass

import numpy as np
from cctbx import crystal, miller

import dials_vmerge  # noqa: F401


@dataclass
class SimulatedMerging:
    space_group: object
    unit_cell: object
    unique_index: np.ndarray  # (n_unique, 3) ASU indices
    true_intensity: np.ndarray  # J per unique reflection
    centric: np.ndarray
    epsilon: np.ndarray
    dstar_sq: np.ndarray
    miller_index: np.ndarray  # per observation (symmetry-equivalent, not ASU)
    intensity: np.ndarray
    sigma: np.ndarray
    batch: np.ndarray
    is_outlier: np.ndarray
    obs_unique: np.ndarray  # unique reflection number of each observation


def simulate(seed=0, d_min=2.0, wilson_b=20.0, scale=1000.0, mean_multiplicity=6.0,
             background=50.0, outlier_fraction=0.0, outlier_size_sigma=(15.0, 40.0),
             symbol="P 41 21 2", cell=(60.0, 60.0, 80.0, 90, 90, 90), n_batches=100):
    rng = np.random.default_rng(seed)
    symmetry = crystal.symmetry(unit_cell=cell, space_group_symbol=symbol)
    complete = miller.build_set(symmetry, anomalous_flag=False, d_min=d_min)
    unique = np.array(complete.indices(), dtype=np.int32)
    centric = np.array(complete.centric_flags().data(), dtype=bool)
    epsilon = np.array(complete.epsilons().data(), dtype=np.float64)
    dstar_sq = complete.d_star_sq().data().as_numpy_array()
    wilson_sigma = scale * np.exp(-wilson_b * dstar_sq / 2.0)
    prior_mean = epsilon * wilson_sigma
    true_j = np.where(centric, rng.gamma(0.5, 2.0 * prior_mean), rng.exponential(prior_mean))
    counts = np.maximum(rng.poisson(mean_multiplicity, size=len(unique)), 1)
    obs_unique = np.repeat(np.arange(len(unique)), counts)
    j_obs = true_j[obs_unique]
    sigma = np.sqrt(j_obs + background) * rng.uniform(0.8, 1.25, size=len(j_obs))
    intensity = rng.normal(j_obs, sigma)
    is_outlier = rng.random(len(j_obs)) < outlier_fraction
    size = rng.uniform(*outlier_size_sigma, size=is_outlier.sum())
    intensity[is_outlier] += size * sigma[is_outlier]
    # symmetry-equivalent indices: apply a random operator of the group
    ops = symmetry.space_group().all_ops()
    rotations = np.array([np.array(op.r().num()).reshape(3, 3) for op in ops])
    choice = rng.integers(0, len(ops), size=len(j_obs))
    hkl = np.einsum("ni,nij->nj", unique[obs_unique].astype(np.int64), rotations[choice])
    flip = rng.random(len(j_obs)) < 0.5
    hkl[flip] *= -1
    batch = rng.integers(1, n_batches + 1, size=len(j_obs))
    return SimulatedMerging(symmetry.space_group(), symmetry.unit_cell(), unique, true_j, centric,
                            epsilon, dstar_sq, hkl.astype(np.int32), intensity, sigma, batch,
                            is_outlier, obs_unique)


def truth_for_groups(sim: SimulatedMerging, asu_index: np.ndarray) -> np.ndarray:
    """True J aligned to merged ASU indices."""
    lookup = {tuple(h): j for h, j in zip(sim.unique_index.tolist(), sim.true_intensity)}
    return np.array([lookup[tuple(h)] for h in asu_index.tolist()])
