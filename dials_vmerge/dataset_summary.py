"""The end-of-scaling summary when there are many datasets.

Above SUMMARY_ABOVE_DATASETS datasets the log gives counts and min / median / max of the
per-dataset quantities instead of one model block per dataset; every dataset's model stays
in scaled.expt and its numbers in the JSON (per_dataset_table).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

SUMMARY_ABOVE_DATASETS = 20


def _component_mean(model_dict: dict, name: str) -> Optional[float]:
    component = model_dict.get(name)
    if not isinstance(component, dict) or not component.get("parameters"):
        return None
    return float(np.mean(component["parameters"]))


def per_dataset_table(experiments, models, summary) -> List[Dict]:
    """One dict per scaled dataset: identifier, model type, mean scale parameter, mean B
    (A^2; physical and KB models), error model (a, b), suitable / selected / outlier counts."""
    per_dataset = summary.get("datasets", [])
    rows = []
    for n, (e, model) in enumerate(zip(experiments, models)):
        d = model.to_dict()
        info = per_dataset[n] if n < len(per_dataset) else {}
        kind = d.get("__id__")
        rows.append({
            "identifier": e.identifier,
            "model": kind,
            "scale": _component_mean(d, "scale"),
            "b_factor": _component_mean(d, "decay") if kind in ("physical", "KB") else None,
            "error_model": info.get("error_model"),
            "n_suitable": info.get("n_suitable"),
            "n_selected": info.get("n_selected"),
            "n_outliers": info.get("n_outliers"),
        })
    return rows


def _spread(values) -> Optional[str]:
    values = np.array([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return None
    return (f"min {values.min():.4g}, median {np.median(values):.4g}, "
            f"max {values.max():.4g}")


def _spread_with_names(rows, key, identifier_of) -> Optional[str]:
    pairs = [(r[key], r["identifier"]) for r in rows if r[key] is not None]
    if not pairs:
        return None
    values = np.array([p[0] for p in pairs], dtype=float)
    low, high = int(np.argmin(values)), int(np.argmax(values))
    return (f"min {values[low]:.4g} ({identifier_of(pairs[low][1])}), "
            f"median {np.median(values):.4g}, "
            f"max {values[high]:.4g} ({identifier_of(pairs[high][1])})")


def format_many_datasets_summary(experiments, models, summary, id_of=None) -> str:
    """Counts and spreads over the datasets; id_of(identifier) -> the name used in the log
    (default: the identifier)."""
    identifier_of = id_of or (lambda identifier: identifier)
    kept = summary.get("experiments", experiments)
    rows = per_dataset_table(kept, models, summary)
    kinds = sorted({r["model"] for r in rows if r["model"]})
    lines = [f"\nScaling summary for {len(rows)} datasets (model {', '.join(kinds)}; every "
             "dataset's model is in the scaled .expt and its numbers in the JSON):"]
    for label, key in (("mean scale parameter", "scale"), ("mean B (A^2)", "b_factor")):
        text = _spread_with_names(rows, key, identifier_of)
        if text:
            lines.append(f"  {label}: {text}")
    for label, key in (("suitable reflections", "n_suitable"),
                       ("selected for minimisation", "n_selected"),
                       ("outliers", "n_outliers")):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            lines.append(f"  {label}: total {int(np.sum(values))}, per dataset "
                         + _spread(values))
    error_models = [tuple(r["error_model"]) for r in rows if r["error_model"]]
    if error_models:
        distinct = sorted(set(error_models))
        if len(distinct) == 1:
            a, b = distinct[0]
            lines.append(f"  error model: a = {a:.5f}, b = {b:.5f} (all datasets)")
        else:
            lines.append("  error model a: " + _spread([m[0] for m in error_models]))
            lines.append("  error model b: " + _spread([m[1] for m in error_models]))
    dropped = list(summary.get("dropped_datasets", []))
    if dropped:
        shown = ", ".join(str(identifier_of(d)) for d in dropped[:10])
        more = len(dropped) - 10
        lines.append(f"  {len(dropped)} dataset(s) removed during scaling (no usable "
                     f"reflections): {shown}" + (f" and {more} more" if more > 0 else ""))
    else:
        lines.append("  no dataset was removed during scaling")
    return "\n".join(lines)


def format_per_dataset_values(label: str, values, decimals: Optional[int] = None) -> str:
    """One log line for a per-dataset list ("Outlier rejection: 3, 0, 5"): the list itself
    up to SUMMARY_ABOVE_DATASETS datasets, above that its total (for counts) and spread.
    For scaling's per-round lines, e.g.
        self.log(format_per_dataset_values("Outlier rejection", counts))"""
    values = list(values)
    if len(values) <= SUMMARY_ABOVE_DATASETS:
        shown = [f"{v:.{decimals}f}" if decimals is not None else str(v) for v in values]
        return f"{label}: " + ", ".join(shown)
    array = np.asarray(values, dtype=float)
    total = f"total {array.sum():.6g}, " if np.all(array == np.round(array)) else ""
    return (f"{label}: {len(values)} datasets, {total}per dataset min {array.min():.6g}, "
            f"median {np.median(array):.6g}, max {array.max():.6g}")
