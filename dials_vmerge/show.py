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


def _flag_counts(table) -> str:
    return ", ".join(f"{name} {int(table.get_flags(mask, all=all_bits).sum())}"
                     for name, mask, all_bits in FLAG_SUMMARY)


def summarise(experiments, table=None) -> str:
    """Per experiment: scan, valid image ranges (after exclusions), symmetry, cell, model;
    with a table also reflections and flags; then totals. table=None: experiments alone."""
    from .selection import valid_ranges

    offsets = batch_offsets(experiments)
    ranges = batch_ranges(experiments, offsets)
    present = [c for c in INTENSITY_COLUMNS if c in table] if table is not None else []
    lines = []
    n_images = n_valid = 0
    for n, e in enumerate(experiments):
        lines.append(f"Experiment {n}: {e.identifier}")
        if e.is_still:
            lines.append("  still (no scan)")
        else:
            start, width = oscillation(e)
            first, last = image_range(e)
            lines.append(f"  image range: {first}-{last}   batch range: {ranges[n][0]}-{ranges[n][1]}")
            valid = valid_ranges(e)
            lines.append("  valid image ranges: "
                         + (", ".join(f"{a}-{b}" for a, b in valid) if valid else "none"))
            lines.append(f"  oscillation: start {start:.3f} deg, width {width:.4f} deg per image")
            n_images += last - first + 1
            n_valid += sum(b - a + 1 for a, b in valid)
        lines.append(f"  space group: {space_group_info(e)}")
        lines.append("  unit cell: " + ", ".join(f"{p:.4f}" for p in unit_cell(e).parameters()))
        if table is not None:
            ids = [k for k, v in table.identifiers.items() if v == e.identifier]
            sub = table.select(np.isin(table["id"], ids))
            lines.append(f"  reflections: {sub.nrows}")
            lines.append(f"  flags: {_flag_counts(sub)}")
            lines.append("  intensity columns: " + (", ".join(present) if present else "none"))
        lines.append(f"  scaling model: {model_summary(e.scaling_model)}")
    if len(experiments) > 1:
        lines.append("")
        lines.append(format_batch_table(experiments, offsets))
    lines.append("")
    lines.append(f"Total: {len(experiments)} experiment(s), {n_images} images "
                 f"({n_valid} in valid ranges)"
                 + (f", {table.nrows} reflections" if table is not None else ""))
    if table is not None:
        lines.append(f"  flags: {_flag_counts(table)}")
    return "\n".join(lines)


def summarise_mtz(path: str) -> str:
    """Merged or unmerged MTZ: symmetry, cell, datasets, columns (type, range), rows,
    batches (unmerged), as read by gemmi."""
    import gemmi

    from .errors import FileFormatError

    try:
        mtz = gemmi.read_mtz_file(path)
    except Exception as e:
        raise FileFormatError(f"{path}: not a readable MTZ file ({e})") from None
    labels = [c.label for c in mtz.columns]
    unmerged = "M/ISYM" in labels and "BATCH" in labels
    lines = [f"{path}: {'unmerged' if unmerged else 'merged'} MTZ"]
    lines.append(f"  title: {mtz.title.strip()}")
    for line in mtz.history:
        lines.append(f"  history: {line.strip()}")
    lines.append(f"  space group: {mtz.spacegroup.hm if mtz.spacegroup else 'none'}"
                 f" (number {mtz.spacegroup.number if mtz.spacegroup else '?'})")
    lines.append("  unit cell: " + ", ".join(f"{p:.4f}" for p in mtz.cell.parameters))
    for d in mtz.datasets:
        if d.id:
            lines.append(f"  dataset {d.id}: {d.project_name} > {d.crystal_name} > "
                         f"{d.dataset_name}, wavelength {d.wavelength:.5f} A")
    lines.append(f"  resolution: {mtz.resolution_low():.3f} - {mtz.resolution_high():.3f} A")
    lines.append("  columns:")
    width = max(len(l) for l in labels)
    for c in mtz.columns:
        lines.append(f"    {c.label:<{width}} {c.type}  {c.min_value:12.5g} {c.max_value:12.5g}")
    if unmerged:
        numbers = sorted(b.number for b in mtz.batches)
        runs = []
        for b in numbers:
            if runs and b == runs[-1][1] + 1:
                runs[-1][1] = b
            else:
                runs.append([b, b])
        lines.append(f"  batches: {len(numbers)} ("
                     + ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs) + ")")
    lines.append(f"Total: {mtz.nreflections} {'observations' if unmerged else 'reflections'}"
                 + (f" in {len(mtz.batches)} batches" if unmerged else ""))
    return "\n".join(lines)
