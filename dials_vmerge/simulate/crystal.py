"""The simulated crystal: symmetry, cell, orientation and true intensities.

True intensities follow the Wilson distribution of a random structure: for an acentric
reflection J = eps * Sigma(d) * X with X ~ Exp(1); for a centric one X ~ chi-square with one
degree of freedom. Sigma(d) = exp(-B_wilson / (2 d^2)) (B fall-off; the absolute scale is
chosen later to reach the requested I/sigma). The anomalous signal splits each acentric J
into I(+) = J (1 + delta), I(-) = J (1 - delta) with delta ~ Normal(0, bijvoet_ratio).

Alternatively the true intensities are |F_model|^2 of a structure (a model file, or a random
cctbx structure), computed exactly as a reference model is read for reference scaling
(io/reference.model_intensities: bulk solvent k_sol, b_sol; Friedel mates averaged), so
that data simulated from a model can be scaled against that model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cctbx import crystal as cctbx_crystal
from cctbx import miller, sgtbx, uctbx
from numba import njit

# A Bijvoet difference cannot flip the sign of an intensity.
MAX_RELATIVE_BIJVOET = 0.95


@dataclass
class TrueStructure:
    """Unique (non-anomalous ASU) reflections with their true intensities."""

    space_group: sgtbx.space_group
    unit_cell: uctbx.unit_cell
    d_min: float
    miller_index: np.ndarray  # (n, 3) int32, ASU indices
    d: np.ndarray
    centric: np.ndarray  # bool
    epsilon: np.ndarray  # int32
    intensity_plus: np.ndarray  # true I(+) (equal to I(-) without anomalous signal)
    intensity_minus: np.ndarray
    anomalous: bool

    @property
    def n_unique(self) -> int:
        return len(self.d)

    @property
    def mean_intensity(self) -> np.ndarray:
        """Friedel mean J = (I(+) + I(-)) / 2: the true non-anomalous intensity."""
        return 0.5 * (self.intensity_plus + self.intensity_minus)

    def scaled(self, factor: float) -> "TrueStructure":
        return TrueStructure(
            self.space_group, self.unit_cell, self.d_min, self.miller_index, self.d,
            self.centric, self.epsilon, self.intensity_plus * factor,
            self.intensity_minus * factor, self.anomalous,
        )

    def anomalous_arrays(self):
        """ASU indices and intensities of both hands: I(+) for every reflection, then I(-)
        (as -h) for the acentric ones; centric I(-) is I(+) and is not listed twice."""
        acentric = ~self.centric
        index = np.concatenate([self.miller_index, -self.miller_index[acentric]])
        intensity = np.concatenate([self.intensity_plus, self.intensity_minus[acentric]])
        return index.astype(np.int32), intensity


def make_symmetry(space_group_symbol: str, unit_cell_parameters):
    info = sgtbx.space_group_info(symbol=str(space_group_symbol))
    cell = uctbx.unit_cell(tuple(float(v) for v in unit_cell_parameters))
    if not info.group().is_compatible_unit_cell(cell):
        raise ValueError(
            f"unit cell {tuple(unit_cell_parameters)} does not fit space group {info}"
        )
    return info.group(), cell


def point_group_operators(space_group) -> np.ndarray:
    """Distinct rotation parts of the space group (n, 3, 3) int64; h' = h . R is equivalent."""
    seen = []
    for op in space_group.smx():
        r = op.r()
        assert r.den() == 1
        rot = tuple(int(v) for v in r.num())
        if rot not in seen:
            seen.append(rot)
    if space_group.is_centric():
        for op in space_group.all_ops():
            rot = tuple(int(v) for v in op.r().num())
            if rot not in seen:
                seen.append(rot)
    return np.array(seen, dtype=np.int64).reshape(-1, 3, 3)


def equivalents_per_unique(space_group) -> int:
    """P1 reciprocal-lattice points per general non-anomalous ASU reflection (Friedel mates included)."""
    n_rot = len(point_group_operators(space_group))
    return n_rot if space_group.is_centric() else 2 * n_rot


def draw_true_structure(space_group, unit_cell, d_min: float, wilson_b: float,
                        anomalous: bool, bijvoet_ratio: float, rng) -> TrueStructure:
    symmetry = cctbx_crystal.symmetry(unit_cell=unit_cell, space_group=space_group)
    mset = miller.build_set(symmetry, anomalous_flag=False, d_min=d_min)
    mset = mset.remove_systematic_absences()
    index = np.array(mset.indices(), dtype=np.int32).reshape(-1, 3)
    d = np.array(mset.d_spacings().data())
    centric = np.array(mset.centric_flags().data(), dtype=bool)
    epsilon = np.array(mset.epsilons().data(), dtype=np.int32)
    n = len(d)
    # One uniform stream, transformed per class, keeps the draws independent of the
    # centric/acentric split order.
    exponential = rng.standard_exponential(n)
    gaussian = rng.standard_normal(n)
    normalised = np.where(centric, gaussian * gaussian, exponential)
    sigma_d = np.exp(-wilson_b / (2.0 * d * d))
    j = epsilon * sigma_d * normalised
    bijvoet = rng.standard_normal(n) * bijvoet_ratio
    if anomalous:
        delta = np.clip(bijvoet, -MAX_RELATIVE_BIJVOET, MAX_RELATIVE_BIJVOET)
        delta[centric] = 0.0
    else:
        delta = np.zeros(n)
    return TrueStructure(space_group, unit_cell, float(d_min), index, d, centric, epsilon,
                         j * (1 + delta), j * (1 - delta), bool(anomalous))


def random_rotation(rng) -> np.ndarray:
    """A rotation matrix uniformly distributed over SO(3) (normalised Gaussian quaternion)."""
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def ub_matrix(unit_cell, orientation: np.ndarray) -> np.ndarray:
    """A = U B: columns a*, b*, c* in the lab frame at the goniometer datum.

    B is the transpose of the fractionalisation matrix (reciprocal basis in the Cartesian
    frame of cctbx's orthogonalisation), so that d* = A h and 1/|A h| = d.
    """
    frac = np.array(unit_cell.fractionalization_matrix(), dtype=float).reshape(3, 3)
    return orientation @ frac.T


def real_space_vectors(a_matrix: np.ndarray) -> np.ndarray:
    """Rows a, b, c: the inverse of A (dials-formats 4.2)."""
    return np.linalg.inv(a_matrix)


def index_box(unit_cell, d_min: float):
    """Largest |h|, |k|, |l| inside the resolution sphere: |h| <= |a| / d_min."""
    a, b, c = unit_cell.parameters()[:3]
    return int(np.floor(a / d_min)), int(np.floor(b / d_min)), int(np.floor(c / d_min))


def build_lookup_grid(structure: TrueStructure):
    """A dense grid over the index box: code = 2 * unique_id + hand (0 = +, 1 = -), -1 absent."""
    hmax, kmax, lmax = index_box(structure.unit_cell, structure.d_min)
    grid = np.full((2 * hmax + 1, 2 * kmax + 1, 2 * lmax + 1), -1, dtype=np.int32)
    ops = point_group_operators(structure.space_group)
    _fill_lookup(structure.miller_index.astype(np.int64), ops, hmax, kmax, lmax, grid)
    return grid, (hmax, kmax, lmax)


@njit(cache=True)
def _fill_lookup(asu_index, ops, hmax, kmax, lmax, grid):
    n = asu_index.shape[0]
    # All (+) hands first so that a centric -h, which is also a (+) equivalent, keeps hand 0.
    for hand in range(2):
        sign = 1 - 2 * hand
        for u in range(n):
            h0 = asu_index[u, 0] * sign
            k0 = asu_index[u, 1] * sign
            l0 = asu_index[u, 2] * sign
            for o in range(ops.shape[0]):
                h = h0 * ops[o, 0, 0] + k0 * ops[o, 1, 0] + l0 * ops[o, 2, 0]
                k = h0 * ops[o, 0, 1] + k0 * ops[o, 1, 1] + l0 * ops[o, 2, 1]
                l = h0 * ops[o, 0, 2] + k0 * ops[o, 1, 2] + l0 * ops[o, 2, 2]
                if abs(h) > hmax or abs(k) > kmax or abs(l) > lmax:
                    continue
                cell = grid[h + hmax, k + kmax, l + lmax]
                if cell < 0:
                    grid[h + hmax, k + kmax, l + lmax] = 2 * u + hand


def random_xray_structure(space_group, unit_cell, n_atoms: int, seed: int):
    """A random cctbx structure (C/N/O/S in protein-like proportions, B about 24 A^2)."""
    import random

    from cctbx.array_family import flex
    from cctbx.development import random_structure

    # cctbx draws from Python's and flex's global generators: seed both, restore Python's
    state = random.getstate()
    random.seed(seed)
    flex.set_random_seed(seed)
    try:
        n_s = max(1, n_atoms // 60)
        n_n = n_o = n_atoms // 6
        elements = ["S"] * n_s + ["N"] * n_n + ["O"] * n_o
        elements += ["C"] * max(n_atoms - len(elements), 0)
        return random_structure.xray_structure(
            sgtbx.space_group_info(group=space_group), unit_cell=unit_cell,
            elements=elements, min_distance=1.2, u_iso=0.3)
    finally:
        random.setstate(state)


def read_model_structure(path):
    """(xray_structure, space_group, unit_cell) of a .pdb/.cif model file."""
    import iotbx.pdb

    xs = iotbx.pdb.input(file_name=path).xray_structure_simple()
    symmetry = xs.crystal_symmetry()
    return xs, symmetry.space_group(), symmetry.unit_cell()


def structure_true_intensities(space_group, unit_cell, d_min: float, xray_structure,
                               wavelength: float, k_sol: float, b_sol: float) -> TrueStructure:
    """True intensities |F_model|^2 of a structure on the simulator's unique set."""
    from ..io.reference import model_intensities

    symmetry = cctbx_crystal.symmetry(unit_cell=unit_cell, space_group=space_group)
    mset = miller.build_set(symmetry, anomalous_flag=False, d_min=d_min)
    mset = mset.remove_systematic_absences()
    # The bulk-solvent mask grid follows d_min: the same d_min as a reference read with
    # cut_data.d_min=d_min gives identical intensities.
    computed = model_intensities(xray_structure, d_min, wavelength, k_sol, b_sol)
    computed = computed.as_non_anomalous_array().merge_equivalents().array().map_to_asu()
    matches = miller.match_indices(mset.indices(), computed.indices())
    if matches.singles(0).size():
        raise ValueError("the structure's intensities do not cover the simulated reflections")
    pairs = matches.pairs()
    values = np.empty(mset.size())
    values[np.array(pairs.column(0))] = np.array(computed.data())[np.array(pairs.column(1))]
    index = np.array(mset.indices(), dtype=np.int32).reshape(-1, 3)
    d = np.array(mset.d_spacings().data())
    centric = np.array(mset.centric_flags().data(), dtype=bool)
    epsilon = np.array(mset.epsilons().data(), dtype=np.int32)
    return TrueStructure(space_group, unit_cell, float(d_min), index, d, centric, epsilon,
                         values.copy(), values.copy(), False)
