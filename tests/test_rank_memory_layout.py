"""What a rank-local job (issue 11) holds per row besides the data: the row index its lazy
columns share (int32 where the file allows), its rows' partition keys sharing that index,
and no reference to the input table once the job has taken it.

References: the eager decoder (decode_reflections) for column values, cctbx's map_to_asu
for the keys' ASU indices, a weak reference for the input table's lifetime.
"""

import gc
import os
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import DATA
from dials_vmerge import lazy_column, pipeline
from dials_vmerge.io import read_experiments, read_reflections
from dials_vmerge.io.refl import decode_reflections

QUARTZ_REFL = os.path.join(DATA, "quartz_processed", "integrated.refl")
QUARTZ_EXPT = os.path.join(DATA, "quartz_processed", "integrated.expt")


def eager(path):
    with open(path, "rb") as f:
        return decode_reflections(f.read(), path)


def test_a_selection_holds_its_file_rows_as_int32_shared_by_its_columns():
    reference = eager(QUARTZ_REFL)
    rng = np.random.default_rng(3)
    rows = rng.permutation(reference.nrows)[: reference.nrows // 2]
    inner = np.arange(0, rows.size, 3)[::-1]
    for table, expected in ((read_reflections(QUARTZ_REFL).select(rows), reference.select(rows)),
                            (read_reflections(QUARTZ_REFL).select(rows).select(inner),
                             reference.select(rows).select(inner))):
        indices = {id(table.lazy_column(n).rows): table.lazy_column(n).rows
                   for n in table.keys() if table.is_lazy(n)}
        assert len(indices) == 1  # one index for all columns, not one per column
        (index,) = indices.values()
        assert index.dtype == np.int32
        for name in ("miller_index", "intensity.sum.value", "id", "flags", "d"):
            np.testing.assert_array_equal(table[name], expected[name], err_msg=name)


def test_compact_rows_keeps_int64_where_int32_cannot_hold_the_rows():
    rows = np.array([0, 7, 2**31 - 2], dtype=np.int64)
    assert lazy_column._compact_rows(rows, 2**31 - 1).dtype == np.int32
    wide = lazy_column._compact_rows(rows, 2**31)
    assert wide.dtype == np.int64 and wide is rows
    already = np.array([1, 2], dtype=np.int32)
    assert lazy_column._compact_rows(already, 10) is already
    assert lazy_column._compact_rows(None, 10) is None


def _cctbx_non_anomalous_asu(experiment, hkl):
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    from dials_vmerge.geometry import space_group

    symmetry = crystal.symmetry(space_group_info=None, space_group=space_group(experiment))
    mapped = miller.set(symmetry, flex.miller_index([tuple(map(int, h)) for h in hkl]),
                        anomalous_flag=False).map_to_asu().indices()
    return np.array(list(mapped), dtype=np.int32).reshape(-1, 3)


def test_rank_row_keys_share_the_lazy_row_index_and_give_the_asu_indices():
    experiments = read_experiments(QUARTZ_EXPT)
    table = read_reflections(QUARTZ_REFL)
    keep = table["id"] >= 0
    table = table.select(np.flatnonzero(keep))
    # one process: rank 0 of 1 holds every row; the layout is the one each rank builds
    partition, row_keys, own = pipeline.rank_local_rows(experiments, table)
    del table
    assert own.is_lazy("miller_index")
    index = own.lazy_column("miller_index").rows
    assert row_keys is not None and np.shares_memory(row_keys.file_rows, index)
    rows = np.arange(own.nrows)[::-1]
    asu = row_keys.asu_of(own, rows)
    hkl = eager(QUARTZ_REFL)["miller_index"][np.flatnonzero(keep)][rows]
    np.testing.assert_array_equal(asu, _cctbx_non_anomalous_asu(experiments[0], hkl))


def test_rank_row_keys_sort_file_rows_given_out_of_order():
    column = SimpleNamespace()
    file_rows = np.array([5, 1, 9, 3], dtype=np.int32)
    keys = np.array([50, 10, 90, 30], dtype=np.int64)
    held = pipeline._RankRowKeys(column, file_rows, keys)
    np.testing.assert_array_equal(held.file_rows, [1, 3, 5, 9])
    np.testing.assert_array_equal(held.keys, [10, 30, 50, 90])
    ordered = np.array([1, 3, 5], dtype=np.int32)
    assert pipeline._RankRowKeys(column, ordered, keys[:3]).file_rows is ordered


class _Stop(Exception):
    pass


def _input_table_alive_during_job(run, monkeypatch):
    """Whether anything but the job's own argument refers to the input table while
    `run` (command_line.vmerge._run or a stand-in) runs the scaling job."""
    from dials_vmerge.command_line import vmerge

    seen = {}

    def job(params, experiments, table, log):
        alive = weakref.ref(table)
        del table
        gc.collect()
        seen["alive"] = alive() is not None
        raise _Stop

    monkeypatch.setattr(vmerge, "run_scaling_job", job)
    inputs = SimpleNamespace(experiments=read_experiments(QUARTZ_EXPT),
                             reflections=read_reflections(QUARTZ_REFL))
    params = SimpleNamespace(filtering=SimpleNamespace(method=None))
    with pytest.raises(_Stop):
        run(params, inputs, None)
    assert inputs.reflections is None or run is not vmerge._run
    return seen["alive"]


def test_vmerge_keeps_no_reference_to_the_input_table_while_the_job_runs(monkeypatch):
    from dials_vmerge.command_line import vmerge

    assert not _input_table_alive_during_job(vmerge._run, monkeypatch)


def test_the_check_sees_a_caller_that_keeps_the_table(monkeypatch):
    """Negative control: the pattern _run had before (a local bound to the input while the
    job runs) is seen as keeping the table alive."""
    from dials_vmerge.command_line import vmerge

    def keeping(params, inputs, log):
        table, inputs.reflections = inputs.reflections, None
        return vmerge.run_scaling_job(params, inputs.experiments, table, log)

    assert _input_table_alive_during_job(keeping, monkeypatch)
