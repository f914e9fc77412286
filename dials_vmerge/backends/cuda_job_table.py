"""compute.device=cuda: one device copy of a job's observation arrays, shared by its passes.

DeviceJobTable keeps each observation array of a job on the device under a role ("intensity",
"variance", "g", a layout's row order, ...). A pass asks for a role with the host arrays it
would have uploaded; the device copy is reused while those are the same host objects with the
same sampled content, so an array crosses the bus once per job and again only when the host
array is replaced (the run replaces, not edits, its per-row arrays: g after each expansion,
I and sigma^2 after Imid). An edit in place must be announced with invalidate(role); the
sampled content (SAMPLES values spread over the array) catches most that are not.

Tables in group order are gathered on the device (kernels.cuda.gather) from the job-order
columns through the table's row order, which is itself resident per layout. Weights with an
error model are computed there from I and sigma^2 (only a and b per dataset go up).

Counting: every host->device copy through the store is added to the current pass's bytes
("observations": arrays with a row per observation; "parameters": anything smaller), so the
log and the JSON show what crossed the bus in each pass (transfer_summary).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import numpy as np
from numba import cuda

from ..kernels.cuda.gather import error_model_weight_kernel, gather_kernel
from ..kernels.cuda.launch import THREADS_PER_BLOCK, blocks

SAMPLES = 64


def _sample(array):
    """SAMPLES values spread over the array (all of a smaller one), as bytes."""
    flat = np.asarray(array).reshape(-1)
    step = max(1, flat.size // SAMPLES)
    return flat[::step][:SAMPLES + 1].tobytes()


class _Entry:
    __slots__ = ("parts", "samples", "device", "key", "serial")

    def __init__(self, parts, device, key=None):
        self.key = key
        self.serial = 0
        self.parts = tuple(parts)  # held: an id is not reused while the entry lives
        self.samples = tuple(_sample(p) for p in parts)
        self.device = device

    def matches(self, parts):
        return (len(parts) == len(self.parts)
                and all(a is b for a, b in zip(parts, self.parts))
                and all(_sample(p) == s for p, s in zip(parts, self.samples)))


class DeviceJobTable:
    """The device-resident observation arrays of one job, with a transfer counter."""

    def __init__(self):
        self._entries = {}
        # rows per batch when the job's scaling layout is streamed from the host (set by
        # backends.cuda_streamed_scaling); None: the job fits on the device
        self.stream_rows = None
        self._uploads_made = 0
        self._pass = "other"
        # pass -> {"observations": bytes, "parameters": bytes, "uploads": [role, ...]}
        self.transfers = {}

    # -- counting ------------------------------------------------------------------------
    @contextmanager
    def counting(self, name):
        """Copies inside the block count towards pass `name`."""
        previous, self._pass = self._pass, name
        try:
            yield self
        finally:
            self._pass = previous

    def _calls(self):
        """The current pass's calls: [{"observations": bytes, "parameters": bytes,
        "uploads": [role, ...]}, ...] (a call opened by begin_call)."""
        calls = self.transfers.setdefault(self._pass, [])
        if not calls:
            calls.append({"observations": 0, "parameters": 0, "uploads": []})
        return calls

    def _count(self, kind, nbytes, role=None):
        call = self._calls()[-1]
        call[kind] += int(nbytes)
        if role is not None:
            call["uploads"].append(role)

    def begin_call(self):
        """A new call of the current pass: its copies are counted apart."""
        calls = self.transfers.setdefault(self._pass, [])
        calls.append({"observations": 0, "parameters": 0, "uploads": []})

    def put(self, array, kind="parameters", role=None):
        """cuda.to_device(array), counted."""
        array = np.ascontiguousarray(array)
        self._count(kind, array.nbytes, role)
        return cuda.to_device(array)

    # -- resident columns ----------------------------------------------------------------
    def column(self, role, parts, dtype=np.float64):
        """The device copy of the host arrays `parts` joined in order (one row per
        observation), uploaded only when they are not the arrays last given for role."""
        parts = [np.asarray(p) for p in parts]
        entry = self._entries.get(role)
        if entry is not None and entry.matches(parts):
            return entry.device
        self._entries.pop(role, None)  # free the old copy before the new one is made
        host = (np.ascontiguousarray(parts[0], dtype=dtype) if len(parts) == 1 else
                np.concatenate([np.asarray(p, dtype=dtype) for p in parts]))
        device = self.put(host, "observations", role)
        self._entries[role] = _Entry(parts, device)
        return device

    def keyed(self, role, key, build, hold=()):
        """The device copy of build() (an observation array), uploaded when role was last
        given another key or other held host arrays (hold: the host arrays it derives from,
        compared as in column)."""
        hold = [np.asarray(p) for p in hold]
        entry = self._entries.get(role)
        if entry is not None and entry.key == key and entry.matches(hold):
            return entry.device
        self._entries.pop(role, None)
        device = self.put(build(), "observations", role)
        self._entries[role] = _Entry(hold, device, key)
        return device

    def content(self, role, array, dtype=None, slots=1):
        """The device copy of array, uploaded only when its content differs from the array
        last given for role (for inputs the host rebuilds on every call, e.g. the model's
        per-row inputs of the expansion or a statistics subset: a host copy is kept to
        compare with; the same array object with the same samples is taken as unchanged
        without the comparison). slots: how many arrays of this role stay resident (the
        least recently uploaded is replaced)."""
        source = np.asarray(array)
        array = np.ascontiguousarray(source, dtype=dtype)
        names = [role] if slots == 1 else [f"{role} #{k}" for k in range(slots)]
        for name in names:
            entry = self._entries.get(name)
            if entry is None or entry.key != "content":
                continue
            kept, ref = entry.parts[0], entry.parts[1]
            if ref() is source and entry.samples[0] == _sample(source):
                return entry.device
            if kept.dtype == array.dtype and kept.shape == array.shape and \
                    np.array_equal(kept, array, equal_nan=array.dtype.kind == "f"):
                return entry.device
        self._uploads_made += 1
        free = [n for n in names if n not in self._entries]
        name = free[0] if free else min(names, key=lambda n: self._entries[n].serial)
        self._entries.pop(name, None)
        device = self.put(array, "observations", role)
        entry = _Entry([], device, "content")
        entry.parts = (array.copy() if array is source or array.base is source else array,
                       weakref.ref(source))
        entry.samples = (_sample(source),)
        entry.serial = self._uploads_made
        self._entries[name] = entry
        return device

    def adopt(self, role, parts, device):
        """Record that `device` already holds parts joined (computed on the device): a later
        column(role, the same parts) uploads nothing."""
        self._entries[role] = _Entry([np.asarray(p) for p in parts], device)

    def invalidate(self, *roles):
        """Forget these roles' device copies (all with no roles): their host arrays changed in
        place."""
        if not roles:
            self._entries.clear()
        for role in roles:
            self._entries.pop(role, None)

    def resident_roles(self):
        return sorted(self._entries)

    def resident_bytes(self):
        return sum(int(e.device.nbytes) for e in self._entries.values())

    # -- tables in group order -----------------------------------------------------------
    def gather(self, source, order):
        out = cuda.device_array(max(int(order.shape[0]), 1), dtype=source.dtype)
        n = int(order.shape[0])
        if n:
            gather_kernel[blocks(n), THREADS_PER_BLOCK](source, order, out[:n])
        return out[:n] if n else out[:0]

    def error_model_weights(self, intensity, variance, row_dataset, error_models):
        """1 / sigma'^2 per job row on the device, or None when some dataset's error model is
        not the basic a, b form (then the caller uploads its host weights)."""
        from ..scaling.error_model import BasicErrorModel

        n_sets = len(error_models)
        a, b, has = np.ones(n_sets), np.zeros(n_sets), np.zeros(n_sets, np.int32)
        for d, model in enumerate(error_models):
            if model is None:
                continue
            if getattr(type(model), "variance", None) is not BasicErrorModel.variance:
                return None
            a[d], b[d], has[d] = float(model.a), float(model.b), 1
        n = int(intensity.shape[0])
        out = cuda.device_array(max(n, 1))
        if n:
            error_model_weight_kernel[blocks(n), THREADS_PER_BLOCK](
                intensity, variance, row_dataset, self.put(a), self.put(b), self.put(has),
                out[:n])
        return out[:n] if n else out[:0]

    def summary(self):
        """Bytes host->device per pass and per call of it, for the log and the JSON."""
        return {name: {"observation_bytes": sum(c["observations"] for c in calls),
                       "parameter_bytes": sum(c["parameters"] for c in calls),
                       "calls": [{"observation_bytes": c["observations"],
                                  "parameter_bytes": c["parameters"],
                                  "uploaded": list(c["uploads"])} for c in calls]}
                for name, calls in self.transfers.items()}


# Inputs kept only for reuse (the expansion's per-row model inputs) stay resident only while
# this share of the device memory is left free after them; otherwise they are copied per call
KEEP_FREE_FRACTION = 0.5


def room_to_keep(nbytes):
    """Whether an array of nbytes may stay resident for reuse (unknown memory, e.g. the
    simulator: yes)."""
    try:
        free, total = cuda.current_context().get_memory_info()
        return float(free) - nbytes >= KEEP_FREE_FRACTION * float(total)
    except Exception:
        return True


def transfer_lines(table):
    """Log lines: MB host->device per pass (observation arrays; parameters and other small
    per-call inputs), and the observation MB of each call."""
    from . import mpi_world

    # under MPI each rank uploads its own rows to its own device: the log is rank 0's
    where = " of rank 0 (each rank its own rows)" if mpi_world.n_ranks() > 1 else ""
    lines = [f"Device transfers host->device per pass{where} (observation arrays | "
             "parameters and other per-call inputs):"]
    for name, v in table.summary().items():
        per_call = " ".join(f"{c['observation_bytes'] / 1e6:.3g}" for c in v["calls"])
        lines.append(f"  {name}: {v['observation_bytes'] / 1e6:.3f} MB | "
                     f"{v['parameter_bytes'] / 1e6:.3f} MB over {len(v['calls'])} call(s); "
                     f"observation MB per call: {per_call}")
    return lines


# The job table of the current job (the device of the passes after scaling is module state
# in run_device as well): replaced when a new scaling job resolves to cuda.
_CURRENT = [None]


def new_job_table():
    _CURRENT[0] = DeviceJobTable()
    return _CURRENT[0]


def current_job_table():
    """The current job's table (a new one if no job made one)."""
    if _CURRENT[0] is None:
        _CURRENT[0] = DeviceJobTable()
    return _CURRENT[0]


def release_job_table():
    _CURRENT[0] = None


# -- the passes of a scaling run ----------------------------------------------------------
def _row_offsets(run):
    sizes = [int(s.intensity.shape[0]) for s in run.states]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def scaling_table_columns(run, table, states, use_error_model):
    """(intensity, weight, g, group_start) of a table that run.global_table(states, ...)
    built, on the device from the job table: the job's I, sigma^2 and g (in job row order)
    go up once and the table's row order once per layout; the table is gathered there.
    None when the table's rows cannot be mapped to job rows."""
    store = current_job_table()
    index = {id(s): k for k, s in enumerate(run.states)}
    if any(id(s) not in index for s in states):
        return None
    offsets = _row_offsets(run)
    state_offset = offsets[[index[id(s)] for s in states]]
    intensity = store.column("intensity", [s.intensity for s in run.states])
    variance = store.column("variance", [s.variance for s in run.states])
    g = store.column("g", [s.g for s in run.states])
    row_dataset = store.keyed(
        "row_dataset", offsets.tobytes(),
        lambda: np.repeat(np.arange(len(run.states), dtype=np.int32), np.diff(offsets)))
    # the table's rows in job order: resident per layout (the run's layout hands each of its
    # tables the same dataset_id and loc_index arrays)
    order = store.keyed(
        "rows", state_offset.tobytes(),
        lambda: (state_offset[np.asarray(table.dataset_id)]
                 + np.asarray(table.loc_index)).astype(np.int64),
        hold=[table.dataset_id, table.loc_index])
    group_start = store.column("group_start", [table.group_start], np.int64)
    error_models = [s.error_model if use_error_model else None for s in run.states]
    weight_rows = store.error_model_weights(intensity, variance, row_dataset, error_models)
    if weight_rows is None:  # an error model without a device formula: the host weights
        weight = store.put(table.weight, "observations", "weight")
    else:
        weight = store.gather(weight_rows, order)
    return store.gather(intensity, order), weight, store.gather(g, order), group_start


def minimisation_columns(run, table):
    """(intensity, weight) of run.minimisation_table() on the device, gathered from the
    job's resident I and sigma^2 (weights with each dataset's error model, as
    state.weights()) through the table's row order (its own resident index): a round's
    table costs the upload of its row order, not of its I and weights. None when the rows
    cannot be mapped to job rows or an error model has no device formula (then uploaded)."""
    store = current_job_table()
    if getattr(table, "dataset_id", None) is None or getattr(table, "loc_index", None) is None:
        return None
    offsets = _row_offsets(run)
    intensity = store.column("intensity", [s.intensity for s in run.states])
    variance = store.column("variance", [s.variance for s in run.states])
    row_dataset = store.keyed(
        "row_dataset", offsets.tobytes(),
        lambda: np.repeat(np.arange(len(run.states), dtype=np.int32), np.diff(offsets)))
    order = store.keyed(
        "minimisation rows", offsets.tobytes(),
        lambda: (offsets[:-1][np.asarray(table.dataset_id)]
                 + np.asarray(table.loc_index)).astype(np.int64),
        hold=[table.dataset_id, table.loc_index])
    weight_rows = store.error_model_weights(intensity, variance, row_dataset,
                                            [s.error_model for s in run.states])
    if weight_rows is None:
        return None
    return store.gather(intensity, order), store.gather(weight_rows, order)


def outlier_columns(run, table, states, error_model_weights=None):
    """The device columns of an outlier-rejection table (ScalingRun._outliers_to_states),
    counted as the pass "outlier rejection"."""
    use_em = (run.global_uses_error_model_weights if error_model_weights is None
              else error_model_weights)
    store = current_job_table()
    with store.counting("outlier rejection"):
        store.begin_call()
        return scaling_table_columns(run, table, states, use_em)


# -- merging and its statistics -----------------------------------------------------------
def _grouping_on_device(store, groups, intensity, sigma):
    """(permutation, group_start, I, sigma or None) of a grouping, resident under the roles
    merging and the statistics share: compared by content (each statistics call rebuilds its
    sigma > 0 subset arrays), two of each resident (the statistics' resolution-cut subset and
    the full set); I and sigma in the caller's row order."""
    tag = "anomalous" if getattr(groups, "anomalous", False) else "non-anomalous"
    order = store.content(f"merging order ({tag})", groups.permutation, np.int64, slots=2)
    group_start = store.content(f"merging group_start ({tag})", groups.group_start, np.int64,
                                slots=2)
    i_rows = store.content("merging intensity", intensity, np.float64, slots=2)
    s_rows = None if sigma is None else store.content("merging sigma", sigma, np.float64,
                                                      slots=2)
    return order, group_start, i_rows, s_rows


def merging_columns(groups, intensity, sigma=None, pass_name="merging"):
    """(I, sigma, group_start) of a grouping (merging.groups.GroupedObservations) in its
    sorted order, on the device: I and sigma (the caller's row order) go up once for all the
    merges and statistics of a job, each grouping's permutation once; sigma None: not
    wanted."""
    store = current_job_table()
    with store.counting(pass_name):
        store.begin_call()
        order, group_start, i_rows, s_rows = _grouping_on_device(store, groups, intensity,
                                                                 sigma)
        i_sorted = store.gather(i_rows, order)
        s_sorted = None if s_rows is None else store.gather(s_rows, order)
    return i_sorted, s_sorted, group_start


# -- the error model's sums -------------------------------------------------------------
def error_model_upload():
    """The upload of one error-model refinement's arrays (kernels.cuda.error_model
    .DeviceErrorModelSums), counted as the pass "error model": an array whose content is
    already resident under its name is not copied again."""
    store = current_job_table()
    with store.counting("error model"):
        store.begin_call()

    def upload(name, array):
        with store.counting("error model"):
            return store.content(f"error model {name}", array)

    return upload


def statistics_columns(groups, intensity, sigma, pass_name="merging statistics"):
    """(I, sigma, permutation, group_start) of a grouping on the device, I and sigma in the
    caller's row order (read through the permutation): the resident copies merging_columns
    made (the same roles), uploaded only if absent."""
    store = current_job_table()
    with store.counting(pass_name):
        store.begin_call()
        order, group_start, i_rows, s_rows = _grouping_on_device(store, groups, intensity,
                                                                 sigma)
    return i_rows, s_rows, order, group_start


def split_stream(n_draws, pass_name="merging statistics"):
    """The first n_draws (at least) of cctbx's split stream on the device: one copy per job,
    replaced only by a longer one (every statistics call takes a prefix of the same stream)."""
    from ..merging.statistics import cctbx_uniform_stream

    store = current_job_table()
    length = max(int(n_draws), getattr(store, "split_stream_length", 0), 1)
    store.split_stream_length = length
    with store.counting(pass_name):
        return store.keyed("cctbx split stream", length,
                           lambda: cctbx_uniform_stream(length))
