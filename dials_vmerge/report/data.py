"""Plot series and tables of the report, read from the dict that is written as the program's
JSON (dials.vmerge.json, dials.vmerge.merge.json, dials.vmerge.stats.json), so the report
shows exactly the numbers of the JSON and the log.

report_content(report) -> {"title", "method", "tables": [...], "sections": [...]}; each
section {"title", "plots": [plotly figure dicts {"id", "data", "layout"}]} and optionally
"tables" (shown below its plots). Values are copied from the JSON lists (at most scaled to
percent), never recomputed; per-observation data never enters (the JSON holds
per-shell, per-batch and per-dataset values only), so the report's size does not grow with
the number of observations.
"""

from __future__ import annotations

from typing import Optional

# Above this many batches the per-batch plots show the binned table (the log's rows)
MAX_PLOTTED_BATCHES = 2000
MAX_SHADED_DATASETS = 60


def _statistics_parts(report: dict):
    """(merge dict, scaling summary or None, half-dataset by method or None) of any of the
    three programs' JSON dicts."""
    merge = report.get("merging", report)
    half = report.get("half_dataset") or None
    if half and "repeats" in half:  # one method's (a merge's own half-dataset dict)
        half = {merge.get("method", "classical"): half}
    if half is None and merge.get("half_dataset"):
        half = {merge.get("method", "classical"): merge["half_dataset"]}
    return merge, report.get("scaling"), half


def _figure(plot_id, traces, title, x_title, y_title, reversed_x=False, shapes=None,
            y2_title=None):
    layout = {
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 15}},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}},
        "height": 380,
        "margin": {"l": 70, "r": 70 if y2_title else 20, "t": 50, "b": 55},
        "hovermode": "closest",
        "legend": {"orientation": "h", "y": -0.25},
    }
    if reversed_x:
        layout["xaxis"]["autorange"] = "reversed"
    if shapes:
        layout["shapes"] = shapes
    if y2_title:
        layout["yaxis2"] = {"title": {"text": y2_title}, "overlaying": "y", "side": "right"}
    return {"id": plot_id, "data": traces, "layout": layout}


def _line(x, y, name, yaxis=None, error=None, mode="lines+markers"):
    trace = {"type": "scatter", "mode": mode, "x": x, "y": y, "name": name}
    if yaxis:
        trace["yaxis"] = yaxis
    if error is not None:
        trace["error_y"] = {"type": "data", "array": error, "visible": True}
    return trace


def resolution_section(statistics: dict, method: str) -> dict:
    shells = statistics["shells"]
    d_min = [s["d_min"] for s in shells]

    def column(key, scale=1.0):
        return [None if s.get(key) is None else s[key] * scale for s in shells]

    x_title = "resolution: d_min of shell (Å)"
    plots = [
        _figure("cc_half_resolution", [
            _line(d_min, column("cc_half"), "CC1/2"),
            _line(d_min, column("cc_anom"), "CCanom"),
            _line(d_min, column("cc_half_critical_value"), "CC1/2 significance level",
                  mode="lines"),
        ], "CC1/2 and CCanom", x_title, "CC", reversed_x=True),
        _figure("i_over_sigma_resolution",
                [_line(d_min, column("i_over_sigma_mean"), "&lt;I/σ&gt;")],
                "&lt;I/σ(I)&gt;", x_title, "&lt;I/σ(I)&gt;", reversed_x=True),
        _figure("r_resolution", [
            _line(d_min, column("r_merge"), "Rmerge"), _line(d_min, column("r_meas"), "Rmeas"),
            _line(d_min, column("r_pim"), "Rpim"),
        ], "Rmerge, Rmeas, Rpim", x_title, "R", reversed_x=True),
        _figure("completeness_resolution", [
            _line(d_min, column("completeness", 100.0), "completeness (%)"),
            _line(d_min, column("multiplicity"), "multiplicity", yaxis="y2"),
        ], "Completeness and multiplicity", x_title, "completeness (%)",
            reversed_x=True, y2_title="multiplicity"),
        _figure("mean_intensity_resolution", [_line(d_min, column("i_mean"), "&lt;I&gt;")],
                "Wilson plot: &lt;I&gt; by shell", x_title, "&lt;I&gt;",
                reversed_x=True),
    ]
    return {"title": f"Statistics against resolution (merging.method={method})",
            "plots": plots}


def second_moment_plot(moments: dict) -> dict:
    d_min = moments["d_min"]
    return _figure("second_moments", [
        _line(d_min, moments["second_moment"], "&lt;I²&gt;/&lt;I&gt;² (acentric)"),
        _line(d_min, [2.0] * len(d_min), "untwinned (2)", mode="lines"),
        _line(d_min, [1.5] * len(d_min), "perfect twin (1.5)", mode="lines"),
    ], "Second moments of the merged intensities", "resolution: d_min of shell (Å)",
        "&lt;I²&gt;/&lt;I&gt;²", reversed_x=True)


def _histogram_bars(histogram: dict, name: str) -> dict:
    edges = histogram["edges"]
    centres = [0.5 * (a + b) for a, b in zip(edges[:-1], edges[1:])]
    return {"type": "bar", "x": centres, "y": histogram["counts"], "name": name,
            "width": edges[1] - edges[0] if len(edges) > 1 else 1}


def error_model_section(diagnostics: dict, scaling: Optional[dict]) -> Optional[dict]:
    deviations = diagnostics.get("normalised_deviations", {})
    if not deviations.get("n"):
        return None
    probability = deviations["probability_plot"]
    ends = [probability["expected"][0], probability["expected"][-1]]
    plots = [
        _figure("normal_probability_plot", [
            _line(probability["expected"], probability["observed"], "normalised deviations",
                  mode="markers"),
            _line(ends, ends, "expected (y = x)", mode="lines"),
        ], f"Normal probability plot ({deviations['n']} deviations)", "expected normal quantile",
            "sorted normalised deviation"),
        _figure("normalised_deviation_histogram",
                [_histogram_bars(deviations["histogram"], "observations")],
                f"Normalised deviations: mean {deviations['mean']:.3f}, sd {deviations['sd']:.3f}",
                "δ = √((n-1)/n) (I - &lt;I&gt;)/σ", "observations"),
    ]
    curve = diagnostics.get("i_over_sigma_vs_log_i", {})
    if curve.get("log10_i"):
        traces = [_line(curve["log10_i"], curve["mean_i_over_sigma"], "merged reflections")]
        for n, dataset in enumerate((scaling or {}).get("datasets") or []):
            model = dataset.get("error_model")
            if model and model[0] * model[1] > 0 and n < 5:
                limit = 1.0 / (model[0] * model[1])
                traces.append(_line([curve["log10_i"][0], curve["log10_i"][-1]], [limit, limit],
                                    f"dataset {n}: 1/(ab) = {limit:.1f}", mode="lines"))
        plots.append(_figure("i_over_sigma_log_i", traces, "I/σ against log₁₀ I (merged)",
                             "log₁₀ I", "mean I/σ(I)"))
    return {"title": "Error model", "plots": plots}


def anomalous_section(anomalous: dict) -> Optional[dict]:
    if not anomalous or not anomalous.get("n_pairs"):
        return None
    ratio = anomalous["correlation_ratio"]
    scatter = anomalous["scatter"]
    every = scatter["every"]
    values = scatter["delta_i_1"] + scatter["delta_i_2"]
    ends = [min(values), max(values)] if values else [0, 1]
    plots = [
        _figure("anomalous_correlation_ratio", [
            _line(ratio["d_min"], ratio["ratio"], "rms correlation ratio"),
            _line(ratio["d_min"], [1.0] * len(ratio["d_min"]), "no signal (1)", mode="lines"),
        ], "Anomalous rms correlation ratio (acentric)", "resolution: d_min of shell (Å)",
            "rms(ΔI₁+ΔI₂) / rms(ΔI₁-ΔI₂)", reversed_x=True),
        _figure("anomalous_scatter", [
            {"type": "scattergl" if len(scatter["delta_i_1"]) > 2000 else "scatter",
             "mode": "markers", "x": scatter["delta_i_1"], "y": scatter["delta_i_2"],
             "marker": {"size": 3}, "name": "half-set differences"},
            _line(ends, ends, "ΔI₁ = ΔI₂", mode="lines"),
        ], "Half-set anomalous differences" + (f" (every {every}th pair)" if every > 1 else ""),
            "ΔI₁", "ΔI₂"),
    ]
    normal = anomalous.get("normal_plot")
    if normal:
        ends = [normal["expected"][0], normal["expected"][-1]]
        plots.append(_figure("anomalous_normal_plot", [
            _line(normal["expected"], normal["observed"], "ΔI/σ(ΔI)", mode="markers"),
            _line(ends, ends, "expected (y = x)", mode="lines"),
        ], f"Normal probability plot of ΔI/σ(ΔI) ({normal['n']} pairs)",
            "expected normal quantile", "sorted ΔI/σ(ΔI)"))
    return {"title": "Anomalous differences", "plots": plots}


def outlier_section(outliers: dict) -> Optional[dict]:
    if not outliers.get("n"):
        return None
    every = outliers.get("every", 1)
    shown = f" (every {every}th)" if every > 1 else ""
    return {"title": f"Outliers rejected in scaling ({outliers['n']})", "plots": [
        _figure("outlier_positions", [{"type": "scattergl" if len(outliers["x_px"]) > 2000
                                       else "scatter", "mode": "markers",
                                       "x": outliers["x_px"], "y": outliers["y_px"],
                                       "marker": {"size": 4}, "name": "outliers"}],
                "Detector positions of the outliers" + shown, "x (px)", "y (px)"),
        _figure("outliers_per_batch", [{"type": "bar", "x": outliers["batch"],
                                        "y": outliers["count"], "name": "outliers"}],
                "Outliers against batch", "batch", "outliers"),
    ]}


def _batch_shapes(per_batch: dict) -> list:
    """Shaded batch ranges of the datasets (alternating), and the excluded ranges in red."""
    shapes = []
    ranges = per_batch.get("batch_ranges", [])
    multi = [r for r in ranges if r[1] > r[0]]
    if 1 < len(multi) <= MAX_SHADED_DATASETS:
        for k, (lo, hi) in enumerate(multi):
            shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": lo - 0.5,
                           "x1": hi + 0.5, "y0": 0, "y1": 1, "line": {"width": 0},
                           "fillcolor": "rgba(120,120,200,0.10)" if k % 2 == 0
                           else "rgba(120,200,120,0.10)", "layer": "below"})
    for lo, hi in per_batch.get("excluded_batch_ranges", []):
        shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": lo - 0.5,
                       "x1": hi + 0.5, "y0": 0, "y1": 1, "line": {"width": 0},
                       "fillcolor": "rgba(220,40,40,0.18)", "layer": "below"})
    return shapes


def batch_plot_table(per_batch: dict) -> tuple:
    """(x, table, description) the per-batch plots show: every batch, or the binned rows
    (x = first batch of the bin) when there are more than MAX_PLOTTED_BATCHES."""
    table = per_batch["per_batch"]
    if len(table["batch"]) <= MAX_PLOTTED_BATCHES:
        return table["batch"], table, "per batch"
    binned = per_batch["binned"]
    return binned["batch_first"], binned, "binned as in the log"


def _gaps_between_sweeps(x, table, ranges):
    """x and the table's columns with a null point where a sweep (a dataset of several
    batches) ends or starts, so that lines do not join one sweep to the next; stills (one
    batch each) stay one joined series."""
    dataset = table["dataset"]

    def sweep(d):
        return 0 <= d < len(ranges) and ranges[d][1] > ranges[d][0]

    out_x, out = [], {key: [] for key in table}
    for k in range(len(x)):
        if k and dataset[k] != dataset[k - 1] and (sweep(dataset[k]) or sweep(dataset[k - 1])):
            out_x.append(None)
            for key in table:
                out[key].append(None)
        out_x.append(x[k])
        for key, values in table.items():
            out[key].append(values[k])
    return out_x, out


def batch_section(per_batch: dict) -> dict:
    x, table, how = batch_plot_table(per_batch)
    x, table = _gaps_between_sweeps(x, table, per_batch.get("batch_ranges", []))
    shapes = _batch_shapes(per_batch)
    method = per_batch.get("method", "classical")
    mode = "lines+markers" if len(x) <= 400 else "lines"
    plots = [
        _figure("scale_rmerge_batch", [
            _line(x, table["mean_scale"], "mean scale g", mode=mode),
            _line(x, table["r_merge"], "Rmerge", yaxis="y2", mode=mode),
        ], "Scale and Rmerge", "batch", "mean inverse scale factor g",
            shapes=shapes, y2_title="Rmerge"),
        _figure("i_over_sigma_batch", [_line(x, table["i_over_sigma"], "&lt;I/σ&gt;", mode=mode)],
                "&lt;I/σ(I)&gt;", "batch", "&lt;I/σ(I)&gt;", shapes=shapes),
        _figure("cc_rest_batch", [_line(x, table["cc_rest"], "CC(I, mean of the rest)",
                                        mode=mode)],
                "CC of I with the mean of its other observations", "batch", "CC", shapes=shapes),
        _figure("completeness_batch", [_line(x, table["completeness"], "completeness",
                                             mode=mode)],
                "Cumulative completeness", "batch",
                "completeness (fraction)", shapes=shapes),
    ]
    ranges = per_batch.get("batch_ranges", [])
    if len(ranges) > 20:
        # many datasets (stills, wedges): distribution of the per-batch mean scale
        plots.append(_figure("scale_distribution", [
            {"type": "histogram", "x": table["mean_scale"], "name": "mean scale g"}],
            "Distribution of the mean scale g per batch", "mean inverse scale factor g",
            "batches"))
    return {"title": f"Statistics against batch, {how} (merging.method={method})",
            "plots": plots}


def method_difference_plots(differences: dict) -> list:
    if not differences:
        return []
    reference = next(iter(differences.values()))["reference"]
    rms, scatter = [], []
    for method, diff in differences.items():
        rms.append(_line(diff["shells"]["d_min"], diff["shells"]["rms"], f"{method} rms"))
        rms.append(_line(diff["shells"]["d_min"], diff["shells"]["mean"], f"{method} mean"))
        scatter.append({"type": "scatter", "mode": "markers", "name": method,
                        "x": diff["scatter"]["reference"], "y": diff["scatter"]["method"],
                        "marker": {"size": 3}})
    return [
        _figure("method_difference_shells", rms,
                f"Merged I of each method minus {reference}'s, in units of {reference}'s σ",
                "resolution: d_min of shell (Å)", "(I - I_ref)/σ_ref", reversed_x=True),
        _figure("method_difference_scatter", scatter, f"Merged I against {reference}'s",
                f"I ({reference})", "I (method)"),
    ]


def half_dataset_section(half: dict) -> Optional[dict]:
    traces_half, traces_anom = [], []
    for method, result in half.items():
        shells = result["cc_half"]["shells"]
        d_min = [s["d_min"] for s in shells]
        for kind, traces in (("cc_half", traces_half), ("cc_anom", traces_anom)):
            part = result[kind]["shells"]
            for stat in ("pearson", "spearman"):
                traces.append(_line(d_min, [s[f"{stat}_mean"] for s in part],
                                    f"{method} {stat}",
                                    error=[s[f"{stat}_sd"] for s in part]))
    x_title = "resolution: d_min of shell (Å)"
    repeats = next(iter(half.values()))["repeats"]
    return {"title": "Merging methods side by side (half-dataset cross-validation)", "plots": [
        _figure("half_dataset_cc_half", traces_half,
                f"Half-dataset CC1/2 (mean ± SD, {repeats} splits by batch)",
                x_title, "CC1/2", reversed_x=True),
        _figure("half_dataset_cc_anom", traces_anom,
                f"Half-dataset CCanom (mean ± SD, {repeats} splits)",
                x_title, "CCanom", reversed_x=True),
    ]}


def scaling_section(scaling: Optional[dict], diagnostics: dict) -> Optional[dict]:
    plots = []
    histogram = diagnostics.get("scale_histogram")
    if histogram:
        plots.append(_figure("scale_histogram", [_histogram_bars(histogram, "observations")],
                             "Applied inverse scale factors g (merged observations)",
                             "inverse scale factor g", "observations"))
    datasets = (scaling or {}).get("datasets") or []
    if not datasets:
        return {"title": "Scaling", "plots": plots} if plots else None
    models = [(n, d["error_model"]) for n, d in enumerate(datasets) if d.get("error_model")]
    if len({tuple(m) for _, m in models}) > 1:
        # one error model per dataset (shared models are a row of the error-model table)
        index = [n for n, _ in models]
        plots.append(_figure("error_model_parameters", [
            _line(index, [m[0] for _, m in models], "a"),
            _line(index, [m[1] for _, m in models], "b", yaxis="y2")],
            "Error model: σ'² = a² (σ² + (b I)²)", "dataset", "a", y2_title="b"))
    plots.append(_figure("outliers_per_dataset", [{
        "type": "bar", "x": list(range(len(datasets))),
        "y": [d.get("n_outliers") for d in datasets], "name": "outliers"}],
        "Outliers rejected per dataset", "dataset", "outliers"))
    return {"title": "Scaling", "plots": plots}


def error_model_table(scaling: Optional[dict]) -> Optional[dict]:
    """The distinct error models (a, b), with the datasets using each (at most 20 rows)."""
    datasets = (scaling or {}).get("datasets") or []
    users = {}
    for n, d in enumerate(datasets):
        if d.get("error_model"):
            users.setdefault(tuple(d["error_model"]), []).append(n)
    if not users or len(users) > 20:
        return None
    rows = []
    for (a, b), which in users.items():
        limit = 1.0 / (a * b) if a * b > 0 else None
        span = (f"{which[0]}" if len(which) == 1 else
                f"{len(which)} datasets ({which[0]}-{which[-1]})")
        rows.append([span, a, b, limit])
    return {"id": "error_model", "title": "Error model σ'² = a² (σ² + (b I)²)",
            "columns": ["datasets", "a", "b", "I/σ limit 1/(ab)"], "rows": rows}


def summary_tables(merge: dict) -> list:
    tables = []
    summary = merge.get("summary_table")
    if summary:
        tables.append({"id": "summary", "title": "Summary of merging statistics "
                       f"(merging.method={merge.get('method', 'classical')})",
                       "columns": summary["columns"], "rows": summary["rows"]})
    stats = merge.get("merging_statistics")
    if stats is not None:
        fit = stats.get("d_min_cc_half_fit")
        tables.append({"id": "resolution_estimate", "title": "Resolution estimate",
                       "columns": ["", "value"],
                       "rows": [["Resolution limit suggested from CC1/2 fit (limit CC1/2=0.3)",
                                 fit]]})
    return tables


def model_section(models: dict) -> Optional[dict]:
    plots = []
    physical = models.get("physical") or []
    scale = [_line(c["phi_deg"], c["scale"], f"dataset {n}", mode="lines")
             for n, c in enumerate(physical) if "scale" in c]
    if scale:
        plots.append(_figure("model_scale", scale, "Smooth scale against rotation",
                             "rotation angle (°)", "scale"))
    decay = [_line(c["phi_deg"], c["B"], f"dataset {n}", mode="lines")
             for n, c in enumerate(physical) if "B" in c]
    if decay:
        plots.append(_figure("model_b", decay, "Relative B against rotation",
                             "rotation angle (°)", "B (Å²)"))
    for n, c in enumerate(physical):
        if "absorption" not in c:
            continue
        surface = c["absorption"]
        figure = _figure(f"model_absorption_{n}", [{
            "type": "heatmap", "x": surface["phi_deg"], "y": surface["theta_deg"],
            "z": surface["values"], "colorscale": "Viridis", "name": "absorption",
            "colorbar": {"title": {"text": "correction"}}}],
            f"Absorption surface, dataset {n}", "azimuthal angle φ (°)", "polar angle θ (°)")
        figure["layout"]["yaxis"]["autorange"] = "reversed"
        plots.append(figure)
    maps = (("decay", "decay grid", "resolution grid point (low → high d*²)",
             "time grid point"),
            ("absorption_mean_over_time", "absorption grid, mean over time",
             "detector x grid point", "detector y grid point"),
            ("modulation", "modulation grid", "detector x grid point", "detector y grid point"))
    for n, grids in enumerate(models.get("array") or []):
        for key, title, x_title, y_title in maps:
            if key in grids:
                plots.append(_figure(f"array_{key}_{n}", [{
                    "type": "heatmap", "z": grids[key], "colorscale": "Viridis", "name": key,
                    "colorbar": {"title": {"text": "scale"}}}],
                    f"Array model {title}, dataset {n}", x_title, y_title))
    kb = models.get("kb")
    if kb and len(kb["identifier"]) > 1:
        plots.append(_figure("kb_scale_distribution", [
            {"type": "histogram", "x": kb["scale"], "name": "scale"}],
            f"Scale of the {len(kb['identifier'])} KB datasets", "scale", "datasets"))
        plots.append(_figure("kb_b_distribution", [
            {"type": "histogram", "x": kb["B"], "name": "B"}],
            f"B of the {len(kb['identifier'])} KB datasets", "B (Å²)", "datasets"))
    return {"title": "Scaling models", "plots": plots} if plots else None


# -- ΔCC½ filtering (scaling summary "filtering": scale_and_filter_results.json's layout) ----
MAX_FILTER_TABLE_ROWS = 200


def _filter_label(mode: str, label: int) -> str:
    return f"dataset {label}" if mode == "dataset" else f"image group {label}"


def filtering_section(filtering: Optional[dict]) -> Optional[dict]:
    """Per cycle, ΔCC½ of every dataset (mode=dataset, x = dataset id) or image group
    (mode=image_group, x = group index) with the cutoff line and those below it marked; the
    removed datasets and image ranges in a table, with the reason."""
    cycles = (filtering or {}).get("cycle_results") or {}
    if not cycles:
        return None
    mode = filtering.get("mode", "dataset")
    x_title = "dataset id" if mode == "dataset" else "image group (index)"
    plots = []
    for number in sorted(cycles, key=int):
        cycle = cycles[number]
        labels, values = cycle["delta_cc_half_groups"], cycle["delta_cc_half_values"]
        cutoff = cycle["cutoff_value"]
        below = [k for k, v in enumerate(values) if v < cutoff]
        above = [k for k, v in enumerate(values) if v >= cutoff]
        kind = "scattergl" if len(values) > 2000 else "scatter"
        # dataset mode removes every dataset below the cutoff; image_group mode only the
        # groups at an end of a sweep (the table lists what went)
        below_name = "below cutoff (removed)" if mode == "dataset" else "below cutoff"
        traces = []
        for name, which, colour in (("above cutoff", above, "#1f77b4"),
                                    (below_name, below, "#d62728")):
            traces.append({"type": kind, "mode": "markers", "name": name,
                           "x": [labels[k] for k in which],
                           "y": [100 * values[k] for k in which],
                           "text": [_filter_label(mode, labels[k]) for k in which],
                           "marker": {"size": 6, "color": colour}})
        ends = [min(labels), max(labels)] if labels else [0, 1]
        traces.append(_line(ends, [100 * cutoff] * 2, f"cutoff {100 * cutoff:.3g}%",
                            mode="lines"))
        plots.append(_figure(
            f"filtering_delta_cc_half_cycle_{number}", traces,
            f"Cycle {number}: ΔCC½ of {len(values)} "
            f"{'datasets' if mode == 'dataset' else 'image groups'} "
            f"(CC½ {100 * cycle['mean_cc_half']:.2f}%)", x_title, "ΔCC½ (%)"))
    order = sorted(cycles, key=int)
    if len(order) > 1:
        plots.append(_figure("filtering_cycles", [
            _line([int(c) for c in order], [cycles[c]["cumul_percent_removed"] for c in order],
                  "reflections removed, cumulative (%)"),
            _line([int(c) for c in order], [100 * cycles[c]["mean_cc_half"] for c in order],
                  "CC½ before the cycle's removal (%)", yaxis="y2"),
        ], "Filtering cycles", "cycle", "reflections removed (%)", y2_title="CC½ (%)"))
    return {"title": f"ΔCC½ filtering (mode={mode}, stopped: "
                     f"{(filtering.get('termination_reason') or 'unknown').replace('_', ' ')})",
            "plots": plots, "tables": [filtering_table(filtering)]}


def filtering_table(filtering: dict) -> dict:
    """What each cycle removed and why (at most MAX_FILTER_TABLE_ROWS rows; all in the
    JSON)."""
    mode = filtering.get("mode", "dataset")
    cycles = filtering["cycle_results"]
    rows = []
    for number in sorted(cycles, key=int):
        cycle = cycles[number]
        delta = dict(zip(cycle["delta_cc_half_groups"], cycle["delta_cc_half_values"]))
        cutoff = 100 * cycle["cutoff_value"]
        for (first, last), key in cycle.get("image_ranges_removed") or []:
            rows.append([int(number), f"images {first}-{last} of dataset {key}",
                         "ΔCC½ below cutoff, at a sweep end", None, cutoff])
        identifiers = cycle.get("removed_datasets") or []
        for k, key in enumerate(cycle.get("removed_ids") or []):
            name = f"dataset {key}" + (f" ({identifiers[k]})" if k < len(identifiers) else "")
            if mode == "dataset":
                value = delta.get(key)
                rows.append([int(number), name, "ΔCC½ below cutoff",
                             None if value is None else 100 * value, cutoff])
            else:
                rows.append([int(number), name, "no valid images left", None, cutoff])
    n_rows = len(rows)
    title = "Removed by ΔCC½ filtering"
    if not rows:
        title += ": nothing"
    elif n_rows > MAX_FILTER_TABLE_ROWS:
        rows = rows[:MAX_FILTER_TABLE_ROWS]
        title += f" (first {MAX_FILTER_TABLE_ROWS} of {n_rows}; all in the JSON)"
    return {"id": "filtering_removed", "title": title,
            "columns": ["cycle", "removed", "why", "ΔCC½ (%)", "cutoff (%)"], "rows": rows}


# -- sigma calibration (merging "sigma_calibration", merging/calibration.py) -----------------
def _calibration_bins(bins: list, name: str) -> list:
    """Category labels of the equal-count bins: intensity ranges, or d ranges in Å."""
    labels = []
    for b in bins:
        lo, hi = b[f"{name}_min"], b[f"{name}_max"]
        if name == "dstar_sq":
            lo, hi = (lo ** -0.5 if lo > 0 else float("inf")), (hi ** -0.5 if hi > 0
                                                               else float("inf"))
            labels.append(f"{lo:.2f}-{hi:.2f} Å")
        else:
            labels.append(f"{lo:.4g} to {hi:.4g}")
    return labels


def calibration_section(calibration: Optional[dict]) -> Optional[dict]:
    if not calibration or not calibration.get("n") or \
            not calibration.get("normal_probability_plot"):
        return None
    points = calibration["normal_probability_plot"]
    expected = [p[0] for p in points]
    ends = [expected[0], expected[-1]]
    plots = [_figure("calibration_normal_probability", [
        _line(expected, [p[1] for p in points], "normalised deviations", mode="markers"),
        _line(ends, ends, "expected (y = x)", mode="lines"),
    ], f"Normal probability plot of δ ({calibration['n']} observations)",
        "expected normal quantile", "observed deviation δ")]
    for key, name, title, x_title in (
            ("by_intensity", "intensity", "by intensity",
             "mean I of the other observations (equal-count bins)"),
            ("by_resolution", "dstar_sq", "by resolution", "d range (equal-count bins)")):
        bins = calibration.get(key)
        if not bins:
            continue
        x = _calibration_bins(bins, name)
        figure = _figure(f"calibration_{key}", [
            _line(x, [b["sd"] for b in bins], "SD"),
            _line(x, [b["robust_sd"] for b in bins], "robust SD (1.4826 median |δ|)"),
            _line(x, [1.0] * len(x), "correct sigmas (1)", mode="lines"),
        ], f"SD of normalised deviations {title}", x_title, "SD of δ")
        # the bin ranges are slanted tick labels: room for them below the axis
        figure["layout"]["xaxis"].update({"type": "category", "tickangle": 30,
                                          "automargin": True})
        figure["layout"]["height"] = 430
        figure["layout"]["legend"]["y"] = -0.45
        plots.append(figure)
    return {"title": f"Sigma calibration: SD {calibration['sd']:.3f}, robust SD "
                     f"{calibration['robust_sd']:.3f} (1 = correct sigmas, > 1 = sigmas too "
                     "small)", "plots": plots}


def report_content(report: dict, program: str = "dials.vmerge") -> dict:
    merge, scaling, half = _statistics_parts(report)
    method = merge.get("method", "classical")
    sections = []
    statistics = merge.get("merging_statistics")
    if statistics is not None and statistics.get("shells"):
        sections.append(resolution_section(statistics, method))
    per_batch = merge.get("per_batch") or report.get("per_batch")
    if per_batch is not None and per_batch["per_batch"]["batch"]:
        sections.append(batch_section(per_batch))
    diagnostics = merge.get("diagnostics") or report.get("diagnostics") or {}
    if diagnostics.get("second_moments") and sections and \
            sections[0]["title"].startswith("Statistics against resolution"):
        sections[0]["plots"].append(second_moment_plot(diagnostics["second_moments"]))
    models = report.get("scaling_models")
    for section in (model_section(models) if models else None,
                    scaling_section(scaling, diagnostics),
                    filtering_section((scaling or {}).get("filtering")),
                    error_model_section(diagnostics, scaling),
                    calibration_section(merge.get("sigma_calibration")),
                    anomalous_section(diagnostics.get("anomalous")),
                    outlier_section(diagnostics.get("outliers", {}))):
        if section is not None:
            sections.append(section)
    if half:
        sections.append(half_dataset_section(half))
    differences = report.get("method_differences")
    if differences:
        plots = method_difference_plots(differences)
        if half:
            sections[-1]["plots"] += plots
        else:
            sections.append({"title": "Merging methods side by side", "plots": plots})
    tables = summary_tables(merge)
    table = error_model_table(scaling)
    if table is not None:
        tables.append(table)
    return {"title": f"{program} report", "method": method, "tables": tables,
            "sections": sections}
