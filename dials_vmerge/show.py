"""Text summary of experiments and reflections, as printed by dials.vmerge.show."""

from __future__ import annotations

import numpy as np

from . import flags
from .batches import batch_offsets, batch_ranges, format_batch_table
from .geometry import image_range, oscillation, space_group_info, unit_cell

INTENSITY_COLUMNS = (
    "intensity.prf.value",
    "intensity.sum.value",
    "intensity.scale.value",
    "inverse_scale_factor",
)

FLAG_SUMMARY = (
    ("integrated", flags.integrated, False),
    ("integrated_prf", flags.integrated_prf, True),
    ("integrated_sum", flags.integrated_sum, True),
    ("user_excluded_in_scaling", flags.user_excluded_in_scaling, True),
    ("excluded_for_scaling", flags.excluded_for_scaling, True),
    ("outlier_in_scaling", flags.outlier_in_scaling, True),
    ("scaled", flags.scaled, True),
)


def model_summary(model) -> str:
    if not model:
        return "none"
    parts = []
    for name in model.get("configuration_parameters", {}).get("corrections", []):
        block = model.get(name, {})
        parts.append(f"{name} ({block.get('n_parameters', 0)} parameters)")
    config = model.get("configuration_parameters", {})
    text = f"{model.get('__id__', '?')}: " + ", ".join(parts)
    if "error_model_parameters" in config:
        a, b = config["error_model_parameters"]
        text += f"; error model a={a:.5f} b={b:.5f}"
    return text


def summarise(experiments, table) -> str:
    offsets = batch_offsets(experiments)
    ranges = batch_ranges(experiments, offsets)
    present = [c for c in INTENSITY_COLUMNS if c in table]
    lines = []
    for n, e in enumerate(experiments):
        ids = [k for k, v in table.identifiers.items() if v == e.identifier]
        rows = np.isin(table["id"], ids)
        sub = table.select(rows)
        lines.append(f"Experiment {n}: {e.identifier}")
        if e.is_still:
            lines.append("  still (no scan)")
        else:
            start, width = oscillation(e)
            first, last = image_range(e)
            lines.append(f"  image range: {first}-{last}   batch range: {ranges[n][0]}-{ranges[n][1]}")
            lines.append(f"  oscillation: start {start:.3f} deg, width {width:.4f} deg per image")
        lines.append(f"  space group: {space_group_info(e)}")
        lines.append("  unit cell: " + ", ".join(f"{p:.4f}" for p in unit_cell(e).parameters()))
        lines.append(f"  reflections: {sub.nrows}")
        counts = ", ".join(
            f"{name} {int(sub.get_flags(mask, all=all_bits).sum())}" for name, mask, all_bits in FLAG_SUMMARY
        )
        lines.append(f"  flags: {counts}")
        lines.append("  intensity columns: " + (", ".join(present) if present else "none"))
        lines.append(f"  scaling model: {model_summary(e.scaling_model)}")
    if len(experiments) > 1:
        lines.append("")
        lines.append(format_batch_table(experiments, offsets))
    return "\n".join(lines)
