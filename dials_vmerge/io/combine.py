"""Several `.expt`/`.refl` pairs on one command line become one experiment list and one table.

As DIALS does (dials-scaling.md 10.3): experiments are matched to reflections by identifier;
`id` values are kept unless they clash between files or identifiers are missing, in which
case datasets are renumbered 0..n-1 in command-line order.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from ..errors import VmergeError
from ..table import ReflectionTable
from .expt import ExperimentList, read_experiments
from .refl import read_reflections


def load_experiments_and_reflections(
    expt_paths: Sequence[str], refl_paths: Sequence[str]
) -> Tuple[ExperimentList, ReflectionTable]:
    if len(expt_paths) != len(refl_paths):
        raise VmergeError(
            f"{len(expt_paths)} experiment file(s) but {len(refl_paths)} reflection file(s): "
            "give them in pairs"
        )
    seen = {}
    for path in list(expt_paths) + list(refl_paths):
        key = _file_key(path)
        if key in seen:
            raise VmergeError(f"{path}: the same file is given twice")
        seen[key] = path
    pairs = [(read_experiments(e), read_reflections(r), e, r) for e, r in zip(expt_paths, refl_paths)]
    return combine_pairs(pairs)


def _file_key(path: str):
    import os

    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return os.path.abspath(path)


def match_experiments(experiments: ExperimentList, table: ReflectionTable, expt_path: str, refl_path: str):
    """Check that ids in the table and experiments correspond; fill in missing identifiers."""
    ids_present = np.unique(table["id"][table["id"] >= 0]) if table.nrows else np.zeros(0, int)
    if not table.identifiers:
        if any(e.identifier for e in experiments):
            raise VmergeError(
                f"{refl_path}: has no experiment identifiers but {expt_path} does; "
                "they do not belong together"
            )
        if len(ids_present) and ids_present.max() >= len(experiments):
            raise VmergeError(
                f"{refl_path}: has reflections with id {int(ids_present.max())} but {expt_path} "
                f"has only {len(experiments)} experiment(s)"
            )
        return None  # identifiers assigned by the caller
    for key in ids_present:
        if int(key) not in table.identifiers:
            raise VmergeError(f"{refl_path}: reflections with id {int(key)} have no experiment identifier")
    known = set(experiments.identifiers())
    for key, ident in table.identifiers.items():
        if ident not in known:
            raise VmergeError(
                f"{refl_path}: experiment identifier {ident} (id {key}) is not in {expt_path}"
            )
    mapped = set(table.identifiers.values())
    for e in experiments:
        if e.identifier not in mapped:
            raise VmergeError(
                f"{expt_path}: experiment {e.identifier or '(no identifier)'} has no reflections in {refl_path}"
            )
    return table.identifiers


def combine_pairs(pairs) -> Tuple[ExperimentList, ReflectionTable]:
    all_identifiers: List[str] = []
    seen_identifiers = set()
    prepared = []
    for experiments, table, expt_path, refl_path in pairs:
        if len(experiments) == 0:
            raise VmergeError(f"{expt_path}: contains no experiments")
        for n, e in enumerate(experiments):
            if e.crystal is None:
                raise VmergeError(f"{expt_path}: experiment {n} has no crystal model")
        mapping = match_experiments(experiments, table, expt_path, refl_path)
        if mapping is None:
            # Old files without identifiers: id i belongs to experiment i of this file.
            for i, e in enumerate(experiments):
                e.identifier = _new_identifier(len(all_identifiers) + i)
            table.identifiers = {i: e.identifier for i, e in enumerate(experiments)}
        for e in experiments:
            if e.identifier in seen_identifiers:  # a set: 20 000 stills in a list took ~8 s
                raise VmergeError(
                    f"{expt_path}: experiment {e.identifier} is also in an earlier file "
                    "(the same data given twice?)"
                )
            all_identifiers.append(e.identifier)
            seen_identifiers.add(e.identifier)
        prepared.append((experiments, table, refl_path))

    if len(prepared) == 1:
        experiments, table, _ = prepared[0]
        return experiments, table

    used_ids = [set(t.identifiers) for _, t, _ in prepared]
    clash = sum(len(s) for s in used_ids) != len(set().union(*used_ids))
    tables = []
    combined = ExperimentList(extra_keys=prepared[0][0].extra_keys)
    for experiments, table, _ in prepared:
        if clash:
            new_id = {}
            index_of_identifier = experiments.index_by_identifier()
            for key, ident in table.identifiers.items():
                new_id[key] = len(combined) + index_of_identifier.get(ident, -1)
            ids = table["id"].copy()
            remap = np.full(max(new_id) + 1, -1, dtype=np.int64)
            for old, new in new_id.items():
                remap[old] = new
            valid = (ids >= 0) & (ids < len(remap))
            ids[valid] = remap[ids[valid]]
            ids[~valid] = -1
            table = table.copy()
            table["id"] = ids.astype(np.int32)
            table.identifiers = {new_id[k]: v for k, v in table.identifiers.items()}
        # Unassigned rows cannot be attributed to a dataset once tables are combined.
        table = table.select(table["id"] >= 0)
        tables.append(table)
        combined.extend(experiments)
    common = set(tables[0].keys())
    for t in tables[1:]:
        common &= set(t.keys())
    for t in tables:
        for name in list(t.keys()):
            if name not in common:
                t.del_column(name)
    table = ReflectionTable.concatenate(tables)
    return combined, table


def _new_identifier(index: int) -> str:
    # Deterministic, so that reruns on the same old-format input give identical output.
    return f"dials-vmerge-{index:06d}"
