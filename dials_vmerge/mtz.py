"""MTZ output: merged (the dials.merge column set) and unmerged (as dials.export writes it).

Written with gemmi (as dials.export and dials.merge do) to a temporary file beside the target
and renamed on success. The header carries what CCP4 programs (POINTLESS, AIMLESS) read:
column ranges, VALM NAN, SORT (H K L, then M/ISYM BATCH for unmerged files), a history line
naming the program, version and method, DIALS/CCP4 project, crystal and dataset names, and
for unmerged files one batch header per image of the valid image ranges (cell, Mosflm U,
phi start/end, wavelength, scan axis, source, detector distance and size; the fields and
their positions are those of dials.util.export_mtz.add_batch_list). Missing values (I(-)
of centric reflections, amplitudes French-Wilson rejected) are MTZ missing numbers (NaN).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .io.atomic import atomic_output_path, interrupts_deferred

MERGED_COLUMNS = [
    ("FreeR_flag", "I"), ("IMEAN", "J"), ("SIGIMEAN", "Q"), ("N", "I"),
    ("F", "F"), ("SIGF", "Q"),
    ("I(+)", "K"), ("SIGI(+)", "M"), ("I(-)", "K"), ("SIGI(-)", "M"),
    ("N(+)", "I"), ("N(-)", "I"),
    ("F(+)", "G"), ("SIGF(+)", "L"), ("F(-)", "G"), ("SIGF(-)", "L"),
    ("DANO", "D"), ("SIGDANO", "Q"),
]
# The extra real columns of an unmerged file, in dials.export's order.
UNMERGED_EXTRA_COLUMNS = ("BG", "SIGBG", "FRACTIONCALC", "XDET", "YDET", "ROT", "LP", "QE")


def history_line(program: str, method: Optional[str] = None) -> str:
    """'From dials.vmerge 0.1.0 (dials-vmerge), method classical' (one MTZ history line)."""
    from . import __version__

    line = f"From {program} {__version__} (dials-vmerge)"
    return f"{line}, method {method}" if method else line


def _gemmi_space_group(space_group):
    import gemmi

    return gemmi.find_spacegroup_by_ops(gemmi.symops_from_hall(space_group.type().hall_symbol()))


def _new_mtz(space_group, unit_cell, title, crystal_name, project_name, dataset_name,
             wavelength, history):
    import gemmi

    mtz = gemmi.Mtz(with_base=True)
    mtz.title = title
    mtz.history = list(history or [])
    mtz.spacegroup = _gemmi_space_group(space_group)
    mtz.set_cell_for_all(gemmi.UnitCell(*unit_cell.parameters()))
    dataset = mtz.add_dataset(dataset_name)
    dataset.project_name = project_name
    dataset.crystal_name = crystal_name
    dataset.wavelength = float(wavelength)
    return mtz


def _finish(mtz, path, labelled_columns, n_sort):
    """Columns (label, type, values) in order after H K L, then data and write. Rows are
    sorted on the first n_sort columns by a stable sort (SORT header set accordingly): rows
    with equal keys keep their order, so a program that splits each reflection's
    observations in file order (iotbx.merging_statistics' CC1/2) sees our order."""
    n_rows = len(labelled_columns[0][2])
    data = np.empty((n_rows, len(labelled_columns)), dtype=np.float32)
    for i, (label, column_type, values) in enumerate(labelled_columns):
        if i >= 3:
            mtz.add_column(label, column_type)
        data[:, i] = np.asarray(values, dtype=np.float64)
    if n_sort and n_rows:
        data = data[np.lexsort(tuple(data[:, k] for k in reversed(range(n_sort))))]
    mtz.set_data(data)
    mtz.sort_order = [k + 1 if k < n_sort else 0 for k in range(5)]
    with atomic_output_path(path) as temp:
        mtz.write_to_file(temp)


def python_randint_draws(state, n_draws: int, upper: int) -> np.ndarray:
    """The n_draws values [random.randint(0, upper) for _ in range(n_draws)] would give from
    Python's random module in `state` (random.getstate()), computed with numpy: the same
    Mersenne Twister outputs (MT19937 with Python's key and position), the same recipe
    (CPython's _randbelow: getrandbits(k) = output >> (32 - k), k = (upper + 1).bit_length(),
    drawn again while >= upper + 1)."""
    n = int(upper) + 1
    k = n.bit_length()
    if not 0 < k <= 32:
        raise ValueError("randint range outside one 32-bit draw")
    version, internal, _ = state
    if version != 3 or len(internal) != 625:
        raise ValueError("not a Mersenne Twister state")
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937",
                  "state": {"key": np.array(internal[:624], dtype=np.uint32),
                            "pos": int(internal[624])}}
    parts, needed = [], int(n_draws)
    while needed > 0:
        raw = bits.random_raw(2 * needed + 64) >> np.uint64(32 - k)
        kept = raw[raw < n][:needed]
        parts.append(kept)
        needed -= kept.size
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


@contextlib.contextmanager
def _vectorised_ccp4_draws():
    """cctbx's CCP4-format flags are one random.randint per reflection in a Python loop
    (r_free_utils.assign_random_r_free_flags, ~0.2 s for 1.6e5 reflections). Within this
    block that function draws the same values with python_randint_draws (without advancing
    Python's random state: free_r_flags restores it anyway, and cctbx draws nothing after
    the flags); other formats, or a Python whose randint differs from the recipe (checked
    on the first 64 draws), use cctbx's loop."""
    import random

    from cctbx import r_free_utils
    from libtbx.math_utils import iround
    from scitbx.array_family import flex

    original = r_free_utils.assign_random_r_free_flags

    def assign(n_refl, fraction_free, format="cns"):
        if format != "ccp4" or not 0 < fraction_free < 0.5:
            return original(n_refl, fraction_free, format=format)
        flag_max = iround(1 / fraction_free) - 1
        start = random.getstate()
        probe = [random.randint(0, flag_max) for _ in range(64)]
        random.setstate(start)
        if probe != python_randint_draws(start, 64, flag_max).tolist():
            return original(n_refl, fraction_free, format=format)
        return flex.int(python_randint_draws(start, n_refl, flag_max))

    r_free_utils.assign_random_r_free_flags = assign
    try:
        yield
    finally:
        r_free_utils.assign_random_r_free_flags = original


def _packed_keys(indices: np.ndarray) -> np.ndarray:
    """One int64 per (h, k, l) row, ordered as the rows are lexicographically."""
    from .merging.lookup import column_bounds

    indices = indices.astype(np.int64)
    low, high = column_bounds(indices)
    shifted = indices - low
    span = high - low + 1
    return (shifted[:, 0] * span[1] + shifted[:, 1]) * span[2] + shifted[:, 2]


def _is_unique_under_symmetry(unique) -> bool:
    """miller.set.is_unique_set_under_symmetry of a non-anomalous set, from one mapping."""
    from cctbx import miller

    from .merging.groups import _numpy_indices

    mapped = unique.indices().deep_copy()
    miller.map_to_asu(unique.space_group_info().type(), False, mapped)
    keys = _packed_keys(_numpy_indices(mapped))
    keys.sort()  # (np.unique's hash table took 0.2 s for 1.6e5 keys)
    return not np.any(keys[1:] == keys[:-1])


# cctbx's generate_r_free_flags(use_lattice_symmetry=True) default
LATTICE_SYMMETRY_MAX_DELTA = 5.0


def _lattice_orbit_free_flags(unique, fraction: float):
    """The flags cctbx's generate_r_free_flags(fraction, max_free=None, format="ccp4") gives
    the unique non-anomalous set `unique`, computed on the lattice-symmetry orbits with numpy
    (issue 10: ~0.45 s of cctbx on a 1e6 sweep's 1.6e5 reflections), or None where this
    shortcut does not apply (then the caller runs cctbx's generator).

    cctbx's recipe (miller.set.generate_r_free_flags_on_lattice_symmetry): in the Niggli
    setting, map the indices to the ASU of the cell's lattice symmetry group and merge them
    (one entry per lattice orbit, in packed-index, i.e. lexicographic (h, k, l), order); draw
    one flag per orbit, the draws given to the orbits in decreasing 1/d^2 (cctbx's sort
    permutation); expand the orbits to P1, merge them in the space group, change back to the
    original basis and read each reflection's flag. When the space group's rotations all lie
    in the lattice group, every reflection's orbit under the space group lies in one lattice
    orbit, so that last round trip gives each reflection its lattice orbit's flag, which is
    what is computed here. Otherwise (a cell far from its space group's metric, or a set that
    is not unique) None. Python's random state must be seeded by the caller, and the draws
    are cctbx's own r_free_utils.assign_random_r_free_flags."""
    from cctbx import crystal, miller
    from cctbx import r_free_utils
    from cctbx.array_family import flex
    from cctbx.sgtbx import lattice_symmetry

    from .merging.groups import _numpy_indices, flex_indices

    if not 0 < fraction < 0.5:
        return None  # cctbx raises its own error
    if not _is_unique_under_symmetry(unique):
        return None  # cctbx asserts a unique set
    niggli = unique.change_basis(unique.change_of_basis_op_to_niggli_cell())
    cell = niggli.unit_cell()
    lattice_group = lattice_symmetry.group(cell, max_delta=LATTICE_SYMMETRY_MAX_DELTA)

    def rotations(group):
        return {(op.r().den(), tuple(op.r().num())) for op in group.all_ops()}

    if not rotations(niggli.space_group()) <= rotations(lattice_group):
        return None
    lattice = crystal.symmetry(unit_cell=cell, space_group=lattice_group,
                               assert_is_compatible_unit_cell=False)
    # The 1/d^2 that order the draws use the unit cell of cctbx's merged orbits: the Niggli
    # cell averaged under the lattice group by each crystal.symmetry made on the way (the
    # last bits change from one to the next), so it is taken from the same chain of calls
    # on one reflection.
    probe = niggli.select(flex.size_t([0]))
    orbit_cell = (probe.array(data=flex.double(1, 0)).customized_copy(crystal_symmetry=lattice)
                  .map_to_asu().merge_equivalents().array().average_bijvoet_mates().unit_cell())
    mapped = niggli.indices().deep_copy()
    miller.map_to_asu(lattice.space_group_info().type(), False, mapped)
    lattice_asu = _numpy_indices(mapped)
    del mapped
    orbit_keys, first, orbit_of_row = np.unique(_packed_keys(lattice_asu), return_index=True,
                                                return_inverse=True)
    orbit_index = lattice_asu[first]
    draws = r_free_utils.assign_random_r_free_flags(len(orbit_keys), fraction, format="ccp4")
    by_resolution = flex.sort_permutation(
        data=orbit_cell.d_star_sq(flex_indices(orbit_index)), reverse=True)
    orbit_flags = draws.select(indices=by_resolution, reverse=True).as_numpy_array()
    return orbit_flags[orbit_of_row.reshape(-1)].astype(np.int32)


def free_r_flags(miller_index, space_group, unit_cell, fraction: float = 0.05,
                 seed: int = 0) -> np.ndarray:
    """CCP4-convention FreeR_flag for unique (ASU, non-anomalous) indices: integers
    0..round(1/fraction) - 1, the free set being 0 (about `fraction` of the reflections).

    Generated by cctbx's r-free flag generator (miller.set.generate_r_free_flags, format
    "ccp4", lattice symmetry used so that twin-related reflections share a flag, no cap on
    the size of the free set), whose draws come from Python's `random` module: we seed it
    with `seed` for the call and restore its state afterwards, so the same unique indices
    always get the same flags."""
    import random

    from cctbx import crystal, miller

    from .merging.groups import _numpy_indices, flex_indices

    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    if len(miller_index) == 0:
        return np.zeros(0, dtype=np.int32)
    symmetry = crystal.symmetry(unit_cell=unit_cell, space_group=space_group,
                                assert_is_compatible_unit_cell=False)
    unique = miller.set(symmetry, flex_indices(miller_index), anomalous_flag=False)
    state = random.getstate()
    try:
        random.seed(seed)
        with _vectorised_ccp4_draws():
            fast = _lattice_orbit_free_flags(unique, fraction)
            if fast is not None:
                return fast
            flags = unique.generate_r_free_flags(fraction=fraction, max_free=None,
                                                 format="ccp4")
    finally:
        random.setstate(state)
    # _numpy_indices, not np.asarray: that walks the flex indices as Python tuples (0.3 s
    # for 1.6e5 indices)
    assert np.array_equal(_numpy_indices(flags.indices()), miller_index)
    return flags.data().as_numpy_array().astype(np.int32)


@interrupts_deferred()  # gemmi aborts the process on a Ctrl-C inside its calls
def write_merged_mtz(path, space_group, unit_cell, miller_index, columns: Dict[str, np.ndarray],
                     wavelength=1.0, title="dials.vmerge merged", crystal_name="XTAL",
                     project_name="DIALS", dataset_name="NATIVE", history=None):
    """Merged MTZ with H K L and the dials.merge columns present in `columns` (label ->
    values per row; NaN = missing), in the dials.merge order and types, sorted by H K L."""
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    known = dict(MERGED_COLUMNS)
    for label in columns:
        if label not in known:
            raise ValueError(f"unknown merged MTZ column {label}")
    mtz = _new_mtz(space_group, unit_cell, title, crystal_name, project_name, dataset_name,
                   wavelength, history)
    labelled = [(label, "H", miller_index[:, i]) for i, label in enumerate("HKL")]
    labelled += [(label, column_type, columns[label]) for label, column_type in MERGED_COLUMNS
                 if label in columns]
    _finish(mtz, path, labelled, 3)


@dataclass
class BatchHeader:
    """What one MTZ batch header holds (dials.export's fields)."""
    number: int
    cell: tuple  # a, b, c (A), alpha, beta, gamma (deg)
    umat: np.ndarray  # Mosflm U, 3x3
    phi_start: float  # deg
    phi_end: float  # deg
    wavelength: float  # A
    scan_axis: np.ndarray  # lab frame
    source: np.ndarray  # sample-to-source unit vector
    detector_distance: float  # mm
    detector_size: tuple  # (NX, NY) pixels
    mosaicity: float = 0.0  # deg


def mosflm_u(ub_lab: np.ndarray, unit_cell) -> np.ndarray:
    """U of Mosflm's convention: UB . B_mosflm^-1, B_mosflm built from the reciprocal cell
    (dials.util.ext.ub_to_mosflm_u)."""
    a, b, c, alpha, beta, gamma = unit_cell.parameters()
    ra, rb, rc, ralpha, rbeta, rgamma = unit_cell.reciprocal_parameters()
    d2r = np.pi / 180.0
    b_mosflm = np.array([
        [ra, rb * np.cos(rgamma * d2r), rc * np.cos(rbeta * d2r)],
        [0.0, rb * np.sin(rgamma * d2r), -rc * np.sin(rbeta * d2r) * np.cos(alpha * d2r)],
        [0.0, 0.0, 1.0 / c]])
    return np.asarray(ub_lab, dtype=float) @ np.linalg.inv(b_mosflm)


def batch_headers(experiments, offsets=None, present=()) -> List[BatchHeader]:
    """One header per image of each experiment's valid image ranges (stills: one per
    experiment), numbered image + batch offset as the BATCH column, plus one for each batch
    number in `present` that falls in an experiment's scan outside them. Static crystal
    model (dials.export's force_static_model)."""
    from . import geometry
    from .batches import batch_offsets
    from .selection import valid_ranges

    offsets = batch_offsets(experiments) if offsets is None else offsets
    headers = []
    for experiment, offset in zip(experiments, offsets):
        cell = geometry.unit_cell(experiment)
        ub_lab = geometry.A_matrix(experiment)
        axis = np.zeros(3)
        if experiment.goniometer is not None:
            ub_lab = geometry.setting_rotation(experiment) @ geometry.fixed_rotation(
                experiment) @ ub_lab
            axis = geometry.lab_rotation_axis(experiment)
        umat = mosflm_u(ub_lab, cell)
        distance, size = _detector_geometry(experiment)
        beam = experiment.beam or {}
        common = dict(cell=tuple(cell.parameters()), umat=umat,
                      wavelength=float(beam.get("wavelength", 1.0)), scan_axis=axis,
                      source=(geometry.sample_to_source(experiment) if beam else
                              np.array([0.0, 0.0, 1.0])),
                      detector_distance=distance, detector_size=size,
                      mosaicity=float((experiment.crystal or {}).get("mosaicity", 0.0) or 0.0))
        if experiment.is_still:
            headers.append(BatchHeader(number=offset + 1, phi_start=0.0, phi_end=0.0,
                                       **common))
            continue
        phi0, width = geometry.oscillation(experiment)
        first, last = geometry.image_range(experiment)
        images = set()
        for lo, hi in valid_ranges(experiment):
            images.update(range(int(lo), int(hi) + 1))
        images.update(int(b) - offset for b in present if first <= int(b) - offset <= last)
        for image in sorted(images):
            start = phi0 + (image - first) * width
            headers.append(BatchHeader(number=image + offset, phi_start=start,
                                       phi_end=start + width, **common))
    return headers


def _detector_geometry(experiment):
    """(directed distance of the first panel in mm, its size in pixels); DIALS ignores the
    other panels too."""
    detector = experiment.detector
    panels = detector.get("panels") if isinstance(detector, dict) else None
    if not panels:
        return 0.0, (0, 0)
    panel = panels[0]
    fast = np.asarray(panel["fast_axis"], dtype=float)
    slow = np.asarray(panel["slow_axis"], dtype=float)
    normal = np.cross(fast, slow)
    normal /= np.linalg.norm(normal)
    distance = float(np.dot(np.asarray(panel["origin"], dtype=float), normal))
    return distance, tuple(int(v) for v in panel["image_size"])


def _add_batches(mtz, headers: List[BatchHeader], dataset_id: int) -> None:
    import gemmi

    for header in sorted(headers, key=lambda h: h.number):
        batch = gemmi.Mtz.Batch()
        batch.number = int(header.number)
        batch.title = f"Batch {header.number}"
        batch.dataset_id = dataset_id
        batch.wavelength = header.wavelength
        ints, floats = batch.ints, batch.floats
        ints[12] = 1  # ncryst
        ints[14] = 2  # ldtype: 3D
        ints[15] = 1  # jsaxs: goniostat scan axis number
        ints[17] = 1  # ngonax
        ints[19] = 1  # ndet
        for j in range(6):
            floats[j] = header.cell[j]
        for j, value in enumerate(np.asarray(header.umat).T.ravel()):  # column-major
            floats[6 + j] = value
        floats[21] = header.mosaicity
        floats[36] = header.phi_start
        floats[37] = header.phi_end
        for j in range(3):
            floats[38 + j] = header.scan_axis[j]  # scanax
            floats[59 + j] = header.scan_axis[j]  # e1
            floats[83 + j] = header.source[j]
        floats[43] = 1.0  # bscale
        floats[47] = header.phi_end - header.phi_start  # phirange
        floats[80 + int(np.argmin(header.source))] = -1.0  # idealised source vector
        floats[111] = header.detector_distance
        floats[114] = header.detector_size[0]
        floats[116] = header.detector_size[1]
        batch.ints = ints
        batch.floats = floats
        batch.axes = ["AXIS"]
        mtz.batches.append(batch)


def _isym_in_file_order(isym, space_group, gemmi_space_group) -> np.ndarray:
    """M/ISYM numbers symmetry operators in the order of the file's SYMM records (gemmi's
    order); `isym` numbers them in cctbx's order (merging.groups.mtz_isym)."""
    import gemmi

    def key(rotation):
        return tuple(int(v) for v in np.rint(np.asarray(rotation, dtype=float).ravel() * 24))

    file_order = {key(np.array(op.rot, dtype=float) / gemmi.Op.DEN): k
                  for k, op in enumerate(gemmi_space_group.operations())}
    to_file = np.array([file_order[key(op.r().as_double())] for op in space_group.all_ops()],
                       dtype=np.int64)
    isym = np.asarray(isym, dtype=np.int64)
    op, friedel = (isym - 1) // 2, (isym - 1) % 2
    return 2 * to_file[op] + 1 + friedel


@interrupts_deferred()  # gemmi aborts the process on a Ctrl-C inside its calls
def write_unmerged_mtz(path, space_group, unit_cell, miller_index, isym, batch, intensity,
                       sigma, scale=None, scale_sigma=None, extra: Optional[dict] = None,
                       headers: Optional[List[BatchHeader]] = None, wavelength=1.0,
                       title="dials.vmerge unmerged", crystal_name="XTAL",
                       project_name="DIALS", dataset_name="NATIVE", history=None):
    """Unmerged MTZ: H K L (ASU) M/ISYM BATCH I SIGI [SCALEUSED SIGSCALEUSED] and the extra
    real columns present in `extra` (BG SIGBG FRACTIONCALC XDET YDET ROT LP QE), sorted by
    H K L M/ISYM BATCH. intensity and sigma are the scaled values (I/g, sigma/g), as
    dials.export writes them. headers: batch headers (default: blank ones for the batch
    numbers present); every BATCH value must have one."""
    miller_index = np.asarray(miller_index, dtype=np.int32).reshape(-1, 3)
    mtz = _new_mtz(space_group, unit_cell, title, crystal_name, project_name, dataset_name,
                   wavelength, history)
    isym = _isym_in_file_order(isym, space_group, mtz.spacegroup)
    labelled = [(label, "H", miller_index[:, i]) for i, label in enumerate("HKL")]
    labelled += [("M/ISYM", "Y", isym), ("BATCH", "B", batch), ("I", "J", intensity),
                 ("SIGI", "Q", sigma)]
    if scale is not None:
        labelled.append(("SCALEUSED", "R", scale))
    if scale_sigma is not None:
        labelled.append(("SIGSCALEUSED", "R", scale_sigma))
    for label in UNMERGED_EXTRA_COLUMNS:
        if extra and label in extra:
            labelled.append((label, "R", extra[label]))
    numbers = np.unique(np.asarray(batch, dtype=np.int64))
    if headers is None:
        headers = [BatchHeader(int(b), tuple(unit_cell.parameters()), np.eye(3), 0.0, 0.0,
                               float(wavelength), np.zeros(3), np.array([0.0, 0.0, 1.0]),
                               0.0, (0, 0)) for b in numbers]
    missing = sorted(set(numbers.tolist()) - {h.number for h in headers})
    if missing:
        raise ValueError(f"unmerged MTZ: no batch header for batch(es) {missing[:5]}")
    _add_batches(mtz, headers, dataset_id=1)
    _finish(mtz, path, labelled, 3)


# -- reading ------------------------------------------------------------------------------
@dataclass
class UnmergedMtz:
    """The observations of an unmerged MTZ (ours, dials.export's, AIMLESS/POINTLESS or
    XDS/XSCALE via POINTLESS): original indices, I and SIGI as they stand in the file (scaled
    where the file is scaled), BATCH, and what else dials.export writes when present."""
    path: str
    space_group: object  # cctbx space group
    unit_cell: object  # cctbx unit cell
    wavelength: float
    miller_index: np.ndarray  # original (unmerged) indices, (n, 3) int
    intensity: np.ndarray
    sigma: np.ndarray
    batch: np.ndarray
    scale: Optional[np.ndarray]
    scale_sigma: Optional[np.ndarray]
    extra: Dict[str, np.ndarray]
    n_batches: int
    column_labels: List[str]


def _unmerged_cell_parameters(mtz) -> tuple:
    """The cell of an unmerged MTZ: the median of the batch headers' cells (float32, 7
    digits) where every one agrees with the file header's cell (text, 4 decimals) to the
    header's rounding, else the header's cell. The batch cells are the cell that the
    intensities were indexed with, as exact as the file holds it; d* from the 4-decimal cell
    differs by ~1e-5 relative from that of the .expt the file was written from."""
    cell = mtz.get_cell()
    header = np.array([cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma])
    if not len(mtz.batches):
        return tuple(header)
    batch_cells = np.array([b.cell.parameters for b in mtz.batches], dtype=np.float64)
    # 5e-5: half the last printed decimal of the header; 2e-6: float32 of the batch values
    agree = np.all(np.abs(batch_cells - header) <= 5e-5 + 2e-6 * np.abs(header))
    return tuple(np.median(batch_cells, axis=0)) if agree else tuple(header)


def read_unmerged_mtz(path: str) -> UnmergedMtz:
    """Read an unmerged MTZ with gemmi; FileFormatError naming the file if it is not one
    (merged, no intensities, unreadable). Rows with a missing I or SIGI <= 0 are dropped
    (POINTLESS/AIMLESS mark rejected observations so); I/SIGI are taken as they are, so
    a file of unscaled intensities is merged unscaled."""
    import gemmi
    from cctbx import sgtbx, uctbx

    from .errors import FileFormatError
    from .io.files import check_input_file

    check_input_file(path, ".mtz")
    try:
        with interrupts_deferred():
            mtz = gemmi.read_mtz_file(path)
    except Exception as e:  # gemmi raises RuntimeError/ValueError with its own text
        raise FileFormatError(f"{path}: not a readable MTZ file ({e})") from None
    labels = [c.label for c in mtz.columns]
    if "M/ISYM" not in labels or "BATCH" not in labels:
        raise FileFormatError(f"{path}: not an unmerged MTZ file (no M/ISYM and BATCH "
                              "columns); merged files cannot be merged again")
    i_label = next((l for l in ("I", "IPR") if l in labels), None)
    if i_label is None or ("SIG" + i_label) not in labels:
        raise FileFormatError(f"{path}: no I/SIGI (or IPR/SIGIPR) columns")
    if mtz.spacegroup is None:
        raise FileFormatError(f"{path}: no space group in the header")
    mtz.switch_to_original_hkl()
    data = np.array(mtz, copy=True)
    column = {label: data[:, k] for k, label in enumerate(labels)}
    intensity = column[i_label].astype(np.float64)
    sigma = column["SIG" + i_label].astype(np.float64)
    keep = np.isfinite(intensity) & np.isfinite(sigma) & (sigma > 0)
    if not keep.any():
        raise FileFormatError(f"{path}: no observation with a positive SIG{i_label}")
    hall = mtz.spacegroup.hall
    space_group = sgtbx.space_group(hall)
    unit_cell = uctbx.unit_cell(_unmerged_cell_parameters(mtz))
    wavelength = next((d.wavelength for d in reversed(mtz.datasets) if d.wavelength > 0), 1.0)

    def optional(label):
        return column[label][keep].astype(np.float64) if label in column else None

    extra = {label: optional(label) for label in UNMERGED_EXTRA_COLUMNS if label in column}
    return UnmergedMtz(
        path=path, space_group=space_group, unit_cell=unit_cell, wavelength=float(wavelength),
        miller_index=np.rint(data[keep, :3]).astype(np.int32),
        intensity=intensity[keep], sigma=sigma[keep],
        batch=np.rint(column["BATCH"][keep]).astype(np.int64),
        scale=optional("SCALEUSED"), scale_sigma=optional("SIGSCALEUSED"), extra=extra,
        n_batches=len(mtz.batches), column_labels=labels)
