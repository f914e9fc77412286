"""DIALS experiment lists (`.expt` JSON, dials-formats.md section 4).

Every model is kept as the JSON dict it was read as, so unknown keys survive a round trip;
`dials_vmerge.geometry` derives numbers (s0, UB, rotation angles) from these dicts.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional

from ..errors import FileFormatError
from .atomic import atomic_write
from .files import read_input_bytes

MODEL_KINDS = ("beam", "detector", "goniometer", "scan", "crystal", "profile", "scaling_model", "imageset")


class Experiment:
    """One experiment: its identifier and its models (JSON dicts, or None when absent)."""

    def __init__(self, identifier: str = "", **models):
        self.identifier = identifier
        for kind in MODEL_KINDS:
            setattr(self, kind, models.pop(kind, None))
        self.extra: Dict = models.pop("extra", {})
        if models:
            raise TypeError(f"unknown experiment models: {sorted(models)}")

    @property
    def is_still(self) -> bool:
        scan = self.scan
        return scan is None or self.goniometer is None or float(scan["oscillation"][1]) == 0.0

    def __repr__(self) -> str:
        return f"<Experiment {self.identifier}>"


class ExperimentList(list):
    """A list of Experiment objects plus the other top-level keys of the file (e.g. history)."""

    def __init__(self, experiments=(), extra_keys: Optional[Dict] = None):
        super().__init__(experiments)
        self.extra_keys: Dict = dict(extra_keys or {})
        self._unreferenced: Dict[str, list] = {}

    def identifiers(self) -> List[str]:
        return [e.identifier for e in self]

    def find(self, identifier: str) -> int:
        for i, e in enumerate(self):
            if e.identifier == identifier:
                return i
        return -1

    def index_by_identifier(self) -> Dict[str, int]:
        """{identifier: its first position}, what find() gives: for look-ups of many
        identifiers (find() in a loop over thousands of datasets is quadratic)."""
        out: Dict[str, int] = {}
        for i, e in enumerate(self):
            out.setdefault(e.identifier, i)
        return out

    def select(self, indices) -> "ExperimentList":
        return ExperimentList([self[i] for i in indices], self.extra_keys)

    # -- JSON -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Dict, path: str = "<dict>") -> "ExperimentList":
        if not isinstance(d, dict) or d.get("__id__") != "ExperimentList":
            raise FileFormatError(f"{path}: JSON is not a DIALS ExperimentList")
        entries = d.get("experiment")
        if not isinstance(entries, list):
            raise FileFormatError(f"{path}: ExperimentList has no 'experiment' list")
        lists = {}
        for kind in MODEL_KINDS:
            models = d.get(kind, [])
            if not isinstance(models, list):
                raise FileFormatError(f"{path}: '{kind}' is not a list")
            lists[kind] = models
        experiments = []
        referenced = {kind: set() for kind in MODEL_KINDS}
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise FileFormatError(f"{path}: experiment {n} is not a JSON object")
            models = {}
            for kind in MODEL_KINDS:
                if kind in entry:
                    index = entry[kind]
                    if not isinstance(index, int) or not 0 <= index < len(lists[kind]):
                        raise FileFormatError(
                            f"{path}: experiment {n} refers to {kind} {index!r}, "
                            f"but the file has {len(lists[kind])}"
                        )
                    models[kind] = lists[kind][index]
                    referenced[kind].add(index)
            extra = {
                k: v
                for k, v in entry.items()
                if k not in MODEL_KINDS and k not in ("__id__", "identifier")
            }
            identifier = entry.get("identifier", "")
            if not isinstance(identifier, str):
                raise FileFormatError(f"{path}: experiment {n} has a non-string identifier")
            experiments.append(Experiment(identifier, extra=extra, **models))
        extra_keys = {k: v for k, v in d.items() if k not in MODEL_KINDS and k not in ("__id__", "experiment")}
        out = cls(experiments, extra_keys)
        out._key_order = list(d.keys())
        out._entry_has_identifier = [("identifier" in e) for e in entries]
        out._unreferenced = {
            kind: [(i, m) for i, m in enumerate(lists[kind]) if i not in referenced[kind]]
            for kind in MODEL_KINDS
        }
        out._present_kinds = [k for k in MODEL_KINDS if k in d]
        out._source_experiments = list(experiments)
        return out

    def to_dict(self) -> Dict:
        unchanged = getattr(self, "_source_experiments", None) == list(self)
        lists: Dict[str, list] = {kind: [] for kind in MODEL_KINDS}
        index_of: Dict[str, Dict[int, int]] = {kind: {} for kind in MODEL_KINDS}
        entries = []
        for n, e in enumerate(self):
            entry = {"__id__": "Experiment"}
            if e.identifier or not unchanged or self._entry_has_identifier[n]:
                entry["identifier"] = e.identifier
            for kind in ("beam", "detector", "goniometer", "scan", "crystal", "profile", "scaling_model", "imageset"):
                model = getattr(e, kind)
                if model is None:
                    continue
                key = id(model)
                if key not in index_of[kind]:
                    index_of[kind][key] = len(lists[kind])
                    lists[kind].append(model)
                entry[kind] = index_of[kind][key]
            entry.update(e.extra)
            entries.append(entry)
        if unchanged:
            # Keep unreferenced models in place so an untouched list writes back as read.
            for kind in MODEL_KINDS:
                for original_index, model in self._unreferenced.get(kind, []):
                    lists[kind].insert(min(original_index, len(lists[kind])), model)
        out = {"__id__": "ExperimentList", "experiment": entries}
        present = getattr(self, "_present_kinds", MODEL_KINDS)
        for kind in ("imageset", "beam", "detector", "goniometer", "scan", "crystal", "profile", "scaling_model"):
            if kind in present or lists[kind]:
                out[kind] = lists[kind]
        out.update(self.extra_keys)
        order = getattr(self, "_key_order", None)
        if order:
            ranked = {k: i for i, k in enumerate(order)}
            out = dict(sorted(out.items(), key=lambda kv: ranked.get(kv[0], len(ranked))))
        return out


def read_experiments(path: str) -> ExperimentList:
    raw = read_input_bytes(path, ".expt")
    if not raw.strip():
        raise FileFormatError(f"{path}: file is empty, expected a DIALS .expt file")
    if raw[:1] in (b"\x93", b"\x80", b"\x1f"):
        raise FileFormatError(f"{path}: is a binary file (a .refl?), expected a JSON .expt file")
    try:
        d = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: not valid JSON ({e.__class__.__name__}: {e})") from None
    return ExperimentList.from_dict(d, path)


def encode_experiments(experiments: ExperimentList) -> str:
    return json.dumps(experiments.to_dict(), indent=2) + "\n"


def write_experiments(experiments: ExperimentList, path: str) -> None:
    """Write a `.expt` atomically (temp file + rename)."""
    text = encode_experiments(experiments)
    with atomic_write(path, "w") as f:
        f.write(text)
