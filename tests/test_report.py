"""The HTML report and the per-batch analysis (issue 13):
1. the report's plot data are the JSON's numbers, and the log's per-batch and summary tables
   print the same numbers;
2. a real browser (headless Chromium) draws the reports of the quartz example, a 4-sweep
   simulation and a 200-still simulation without console errors, every plot drawn, and a
   screenshot that is not blank;
3. the per-batch analysis finds the damage the simulator put over the last 10% of a sweep.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from browser_helpers import chromium_or_skip, load_in_browser, screenshot
from conftest import DATA
from dials_vmerge.simulate import simulate_rotation, simulate_stills, write_outputs

QUARTZ = os.path.join(DATA, "quartz_processed")
MAX_REPORT_BYTES = 6 * 1024 * 1024
PLOTLY_BLUE = (31, 119, 180)  # plotly's first trace colour, #1f77b4
# The simulated damage: sweep 2 of 4, 40 images each, last 10% (images 36-40). Sweep k's
# batches start at 100 (k - 1) + 1 (DIALS batch offsets), so the damaged batches are 137-140.
DAMAGED_BATCHES = (137, 140)
EXCLUDED = (301, 304)


def run_program(module, args, cwd):
    code = f"import sys; from dials_vmerge.command_line.{module} import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """dials.vmerge on the quartz sweep, on 4 simulated sweeps (sweep 2 damaged at its end,
    batches 301-304 excluded) and on 200 simulated stills: {name: working directory}."""
    out = {}
    work = tmp_path_factory.mktemp("quartz")
    for name in ("integrated.expt", "integrated.refl"):
        shutil.copy(os.path.join(QUARTZ, name), work)
    run_program("vmerge", ["integrated.expt", "integrated.refl", "partiality_cutoff=0.4"], work)
    out["quartz"] = work

    work = tmp_path_factory.mktemp("sweeps")
    experiments, table, truth = simulate_rotation(n_obs_target=12000, n_sweeps=4, seed=3,
                                                  damage_sweep=2, damage_last_fraction=0.1)
    write_outputs(experiments, table, truth, str(work / "sim.expt"), str(work / "sim.refl"),
                  str(work / "truth.h5"))
    run_program("vmerge", ["sim.expt", "sim.refl", f"exclude_batches={EXCLUDED[0]},{EXCLUDED[1]}"],
                work)
    out["sweeps"] = work

    work = tmp_path_factory.mktemp("stills")
    experiments, table, truth = simulate_stills(n_stills=200, seed=3, d_min=2.5)
    write_outputs(experiments, table, truth, str(work / "sim.expt"), str(work / "sim.refl"),
                  str(work / "truth.h5"))
    # with ΔCC½ filtering (as users of many stills run it), so that the report's filtering
    # section is drawn from a real run's dials.vmerge.json
    run_program("vmerge", ["sim.expt", "sim.refl", "filtering.method=deltacchalf"], work)
    out["stills"] = work
    return out


def embedded_content(html_path) -> dict:
    with open(html_path, encoding="utf-8") as f:
        text = f.read()
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text,
                      re.S)
    assert found, "no embedded report data"
    return json.loads(found.group(1).replace("<\\/", "</"))


def plots_by_id(content) -> dict:
    return {p["id"]: p for s in content["sections"] for p in s["plots"]}


def trace(plot, name):
    (found,) = [t for t in plot["data"] if t.get("name") == name]
    return found


def log_batch_rows(log_text):
    """The binned per-batch table of the log: (first, last, n, scale, i/s, rmerge, cc, %)."""
    lines = log_text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("Statistics against batch"))
    rows = []
    for line in lines[start + 2:]:
        fields = line.split()
        if not fields or not re.match(r"^\d+(-\d+)?$", fields[0]):
            break
        first, _, last = fields[0].partition("-")
        values = [None if v == "-" else float(v) for v in fields[2:]]
        rows.append((int(first), int(last or first), int(fields[1]), *values))
    return rows


@pytest.mark.parametrize("name", ["quartz", "sweeps", "stills"])
def test_report_plot_data_are_the_json_and_log_numbers(runs, name):
    work = runs[name]
    report = json.load(open(work / "dials.vmerge.json"))
    merging = report["merging"]
    html_path = work / "dials.vmerge.html"
    assert os.path.getsize(html_path) < MAX_REPORT_BYTES
    content = embedded_content(html_path)
    plots = plots_by_id(content)
    # no plot without data
    for plot_id, plot in plots.items():
        assert plot["data"], plot_id
        assert any(any(v is not None for v in (t.get("y") or t.get("x") or [])) for t in
                   plot["data"]), plot_id

    shells = merging["merging_statistics"]["shells"]
    cc = plots["cc_half_resolution"]
    assert trace(cc, "CC1/2")["x"] == [s["d_min"] for s in shells]
    assert trace(cc, "CC1/2")["y"] == [s["cc_half"] for s in shells]
    assert trace(cc, "CCanom")["y"] == [s["cc_anom"] for s in shells]
    assert trace(plots["r_resolution"], "Rpim")["y"] == [s["r_pim"] for s in shells]
    assert trace(plots["i_over_sigma_resolution"], "&lt;I/σ&gt;")["y"] == [
        s["i_over_sigma_mean"] for s in shells]
    completeness = trace(plots["completeness_resolution"], "completeness (%)")["y"]
    np.testing.assert_allclose(completeness, [100 * s["completeness"] for s in shells],
                               rtol=1e-15)

    per_batch = merging["per_batch"]["per_batch"]
    scale_plot = plots["scale_rmerge_batch"]
    x = trace(scale_plot, "mean scale g")["x"]
    points = [k for k, v in enumerate(x) if v is not None]  # nulls break lines between sweeps
    n_sweeps = sum(1 for lo, hi in merging["per_batch"]["batch_ranges"] if hi > lo)
    assert len(x) - len(points) == (n_sweeps - 1 if n_sweeps > 1 else 0)

    def plotted(plot, name):
        y = trace(plot, name)["y"]
        assert all(y[k] is None for k, v in enumerate(x) if v is None)
        return [y[k] for k in points]

    assert [x[k] for k in points] == per_batch["batch"]
    assert plotted(scale_plot, "mean scale g") == per_batch["mean_scale"]
    assert plotted(scale_plot, "Rmerge") == per_batch["r_merge"]
    assert plotted(plots["cc_rest_batch"], "CC(I, mean of the rest)") == per_batch["cc_rest"]
    assert plotted(plots["completeness_batch"], "completeness") == per_batch["completeness"]
    assert plotted(plots["i_over_sigma_batch"], "&lt;I/σ&gt;") == per_batch["i_over_sigma"]

    # error-model and scaling diagnostics: the JSON's numbers
    diagnostics = merging["diagnostics"]
    probability = diagnostics["normalised_deviations"]["probability_plot"]
    normal = trace(plots["normal_probability_plot"], "normalised deviations")
    assert normal["x"] == probability["expected"] and normal["y"] == probability["observed"]
    assert trace(plots["normalised_deviation_histogram"], "observations")["y"] == \
        diagnostics["normalised_deviations"]["histogram"]["counts"]
    assert trace(plots["scale_histogram"], "observations")["y"] == \
        diagnostics["scale_histogram"]["counts"]
    assert sum(diagnostics["scale_histogram"]["counts"]) == merging["n_observations"]
    assert trace(plots["second_moments"], "&lt;I²&gt;/&lt;I&gt;² (acentric)")["y"] == \
        diagnostics["second_moments"]["second_moment"]
    anomalous = diagnostics.get("anomalous")
    if anomalous and anomalous["n_pairs"]:
        assert trace(plots["anomalous_correlation_ratio"], "rms correlation ratio")["y"] == \
            anomalous["correlation_ratio"]["ratio"]
        assert trace(plots["anomalous_scatter"], "half-set differences")["x"] == \
            anomalous["scatter"]["delta_i_1"]
        assert trace(plots["anomalous_normal_plot"], "ΔI/σ(ΔI)")["y"] == \
            anomalous["normal_plot"]["observed"]
    models = report["scaling_models"]
    for n, curves in enumerate(models["physical"]):
        assert trace(plots["model_scale"], f"dataset {n}")["y"] == curves["scale"]
        assert trace(plots["model_b"], f"dataset {n}")["y"] == curves["B"]
        if "absorption" in curves:
            assert plots[f"model_absorption_{n}"]["data"][0]["z"] == curves["absorption"]["values"]
    if name == "stills":
        # the stills ΔCC½ filtering removed (reached: 2 in cycle 1, none in cycle 2) are not
        # scaled or plotted
        removed = [i for c in report["scaling"]["filtering"]["cycle_results"].values()
                   for i in c["removed_ids"]]
        assert len(models["kb"]["scale"]) == 200 - len(removed) < 200
        assert plots["kb_scale_distribution"]["data"][0]["x"] == models["kb"]["scale"]
    if diagnostics["outliers"]["n"]:
        assert trace(plots["outliers_per_batch"], "outliers")["y"] == \
            diagnostics["outliers"]["count"]
        assert sum(diagnostics["outliers"]["count"]) == diagnostics["outliers"]["n"]

    # sigma calibration: the JSON's points and bins
    calibration = merging["sigma_calibration"]
    points = calibration["normal_probability_plot"]
    normal = trace(plots["calibration_normal_probability"], "normalised deviations")
    assert normal["x"] == [p[0] for p in points] and normal["y"] == [p[1] for p in points]
    for key in ("by_intensity", "by_resolution"):
        bins = calibration[key]
        assert trace(plots[f"calibration_{key}"], "SD")["y"] == [b["sd"] for b in bins]
        assert trace(plots[f"calibration_{key}"], "robust SD (1.4826 median |δ|)")["y"] == [
            b["robust_sd"] for b in bins]
        assert sum(b["n"] for b in bins) == calibration["n"]
    log_text = open(work / "dials.vmerge.log").read()
    assert f"overall: SD {calibration['sd']:.3f}, robust SD {calibration['robust_sd']:.3f}" \
        in log_text
    # ΔCC½ filtering (the stills run): the scaling summary's "filtering" dict
    filtering = report["scaling"].get("filtering")
    assert (filtering is not None) == (name == "stills")
    if filtering is not None:
        check_filtering_section(content, filtering)
        assert filtering == json.load(open(work / "scale_and_filter_results.json"))

    # summary table: the JSON's, and the log's printed values
    (summary,) = [t for t in content["tables"] if t["id"] == "summary"]
    assert summary["rows"] == merging["summary_table"]["rows"]
    for row in summary["rows"]:
        label = row[0]
        line = next(l for l in log_text.split("\n") if l.startswith(label + " ")
                    and l[len(label):len(label) + 2] != "(I")
        printed = [float(v) for v in line[44:].split()]
        expected = [v for v in row[1:] if v is not None]
        np.testing.assert_allclose(printed, expected, atol=0.051 if label != "Total unique"
                                   else 0, err_msg=label)

    # the log's binned per-batch table holds the JSON's binned numbers (as printed)
    binned = merging["per_batch"]["binned"]
    rows = log_batch_rows(log_text)
    assert len(rows) == len(binned["batch_first"]) <= 60
    for k, row in enumerate(rows):
        assert row[:3] == (binned["batch_first"][k], binned["batch_last"][k], binned["n_obs"][k])
        for value, key, places in ((row[3], "mean_scale", 3), (row[4], "i_over_sigma", 2),
                                   (row[5], "r_merge", 3), (row[6], "cc_rest", 3)):
            expected = binned[key][k]
            assert (value is None) == (expected is None), (k, key)
            if value is not None:
                assert value == pytest.approx(expected, abs=0.51 * 10 ** -places), (k, key)
    # every binned row pools the per-batch rows it spans: the observation counts add up
    batches = np.array(per_batch["batch"])
    for first, last, n in zip(binned["batch_first"], binned["batch_last"], binned["n_obs"]):
        inside = (batches >= first) & (batches <= last)
        assert n == np.array(per_batch["n_obs"])[inside].sum()


def test_excluded_batches_are_shaded_and_absent(runs):
    work = runs["sweeps"]
    merging = json.load(open(work / "dials.vmerge.json"))["merging"]
    assert merging["per_batch"]["excluded_batch_ranges"] == [list(EXCLUDED)]
    batches = np.array(merging["per_batch"]["per_batch"]["batch"])
    assert not ((batches >= EXCLUDED[0]) & (batches <= EXCLUDED[1])).any()
    shapes = plots_by_id(embedded_content(work / "dials.vmerge.html"))["scale_rmerge_batch"][
        "layout"]["shapes"]
    red = [s for s in shapes if s["fillcolor"].startswith("rgba(220,40,40")]
    assert [(s["x0"], s["x1"]) for s in red] == [(EXCLUDED[0] - 0.5, EXCLUDED[1] + 0.5)]
    # the four sweeps' batch ranges are shaded too
    assert len(shapes) - len(red) == 4



def test_model_curves_give_the_scales_of_scaled_refl(runs):
    """The smooth scale and B curves of the quartz run, at each observation's z, times
    exp(B / 2d^2), are the g that scaling wrote (but for the absorption factor, whose
    parameters are ~3e-5 here)."""
    from dials_vmerge import flags
    from dials_vmerge.io import read_reflections

    work = runs["quartz"]
    (curves,) = json.load(open(work / "dials.vmerge.json"))["scaling_models"]["physical"]
    table = read_reflections(str(work / "scaled.refl"))
    scaled = table.get_flags(flags.scaled)
    z = table["xyzobs.px.value"][scaled, 2]
    d = table["d"][scaled]
    expected = np.interp(z, curves["image"], curves["scale"]) * np.exp(
        np.interp(z, curves["image"], curves["B"]) / (2 * d * d))
    ratio = table["inverse_scale_factor"][scaled] / expected
    deviation = np.abs(ratio - 1)
    assert np.median(deviation) < 1e-4
    # DIALS's smoother weights the 3 nearest knots, so its value steps where the nearest
    # three change (midway between knots); the test interpolates linearly between the curve's
    # 200 points, which spreads each step over 1/2 image: the few observations there (14 of
    # 1404, z = 20.5, 60.5, 80.6-80.9) are off by up to 1.9% (the B step times 1/2d^2 at
    # 0.59 A), 99% of all by < 0.2%
    assert np.percentile(deviation, 99) < 0.003
    assert deviation.max() < 0.025
    surface = np.array(curves["absorption"]["values"])
    assert np.abs(surface - 1).max() < 0.01


def test_outlier_count_is_that_of_the_scaled_table(runs):
    from dials_vmerge import flags
    from dials_vmerge.io import read_reflections

    work = runs["sweeps"]
    outliers = json.load(open(work / "dials.vmerge.json"))["merging"]["diagnostics"]["outliers"]
    table = read_reflections(str(work / "scaled.refl"))
    flagged = table.get_flags(flags.outlier_in_scaling)
    assert outliers["n"] == int(flagged.sum()) > 0
    assert sorted(outliers["x_px"]) == sorted(np.round(table["xyzobs.px.value"][flagged, 0],
                                                       1).tolist())


def test_per_batch_analysis_finds_the_simulated_damage(runs):
    per_batch = json.load(open(runs["sweeps"] / "dials.vmerge.json"))["merging"]["per_batch"]
    table = per_batch["per_batch"]
    batch = np.array(table["batch"])
    r_merge = np.array(table["r_merge"], dtype=float)
    cc = np.array(table["cc_rest"], dtype=float)
    damaged = (batch >= DAMAGED_BATCHES[0]) & (batch <= DAMAGED_BATCHES[1])
    assert damaged.sum() == 4
    # the damaged batches are the four with the highest Rmerge and the lowest CC
    assert set(batch[np.argsort(-r_merge)[:4]]) == set(batch[damaged])
    assert set(batch[np.argsort(cc)[:4]]) == set(batch[damaged])
    assert np.median(r_merge[damaged]) > 2.5 * np.median(r_merge[~damaged])
    # and the binned log row holding them stands out in the same way
    binned = per_batch["binned"]
    k = binned["batch_last"].index(DAMAGED_BATCHES[1])
    others = [v for i, v in enumerate(binned["r_merge"]) if i != k]
    assert binned["r_merge"][k] > 1.5 * max(others)


@pytest.mark.parametrize("name", ["quartz", "sweeps", "stills"])
def test_report_renders_in_a_real_browser(runs, name, tmp_path):
    chromium = chromium_or_skip()
    html_path = runs[name] / "dials.vmerge.html"
    found = load_in_browser(chromium, html_path, str(tmp_path))
    assert found["errors"] == []
    n_plots = len(plots_by_id(embedded_content(html_path)))
    assert found["containers"] == n_plots >= 8
    assert found["drawn"] == found["containers"]
    pixels = screenshot(chromium, html_path, str(tmp_path / "shot.png"), str(tmp_path))
    assert pixels.shape[:2] == (3000, 1400)
    rgb = pixels[..., :3].astype(int)
    assert tuple(rgb[0, 0]) == (255, 255, 255)  # the page background
    ink = (rgb < 235).any(axis=2).mean()
    assert 0.01 < ink < 0.6, ink
    # plotted lines in plotly's first trace colour
    blue = (np.abs(rgb - np.array(PLOTLY_BLUE)) <= 2).all(axis=2).sum()
    assert blue > 2000, blue


def test_merge_and_stats_write_their_reports_and_none_turns_it_off(tmp_path):
    expt, refl = os.path.join(QUARTZ, "scaled.expt"), os.path.join(QUARTZ, "scaled.refl")
    run_program("merge", [expt, refl], tmp_path)
    assert (tmp_path / "dials.vmerge.merge.html").exists()
    content = embedded_content(tmp_path / "dials.vmerge.merge.html")
    assert content["method"] == "classical"
    run_program("stats", [expt, refl, "merging.method=classical+robust",
                          "half_dataset_repeats=2", "output.html=stats.html"], tmp_path)
    plots = plots_by_id(embedded_content(tmp_path / "stats.html"))
    stats_json = json.load(open(tmp_path / "dials.vmerge.stats.json"))
    for method in ("classical", "robust"):
        shells = stats_json["half_dataset"][method]["cc_half"]["shells"]
        assert trace(plots["half_dataset_cc_half"], f"{method} pearson")["y"] == [
            s["pearson_mean"] for s in shells]
    # the methods' merged-intensity differences: recomputed from the two methods' merged.mtz
    import gemmi

    differences = stats_json["method_differences"]["robust"]
    columns = {}
    for method in ("classical", "robust"):
        run_program("merge", [expt, refl, f"merging.method={method}", "output.html=None",
                              f"merged_mtz={method}.mtz", f"output.json={method}.json"],
                    tmp_path)
        mtz = gemmi.read_mtz_file(str(tmp_path / f"{method}.mtz"))
        hkl = [tuple(int(v) for v in row) for row in mtz.make_miller_array()]
        columns[method] = dict(zip(hkl, zip(mtz.column_with_label("IMEAN").array,
                                            mtz.column_with_label("SIGIMEAN").array)))
    z = np.array([(columns["robust"][h][0] - i) / s for h, (i, s) in columns["classical"].items()
                  if h in columns["robust"] and s > 0])
    assert len(z) == differences["n"]
    assert np.sqrt((z ** 2).mean()) == pytest.approx(differences["overall_rms"], rel=1e-4)
    assert z.mean() == pytest.approx(differences["overall_mean"], rel=1e-3, abs=1e-5)
    assert trace(plots["method_difference_shells"], "robust rms")["y"] == \
        differences["shells"]["rms"]
    off = tmp_path / "off"
    off.mkdir()
    run_program("merge", [expt, refl, "output.html=None"], off)
    assert sorted(os.listdir(off)) == ["dials.vmerge.merge.json", "dials.vmerge.merge.log",
                                       "merged.mtz"]


def test_array_model_maps_are_its_parameter_grids(tmp_path):
    experiments, table, truth = simulate_rotation(n_obs_target=6000, n_sweeps=1, seed=4,
                                                  model="array")
    write_outputs(experiments, table, truth, str(tmp_path / "sim.expt"),
                  str(tmp_path / "sim.refl"), str(tmp_path / "truth.h5"))
    run_program("vmerge", ["sim.expt", "sim.refl", "model=array"], tmp_path)
    (maps,) = json.load(open(tmp_path / "dials.vmerge.json"))["scaling_models"]["array"]
    model = json.load(open(tmp_path / "scaled.expt"))["scaling_model"][0]
    config = model["configuration_parameters"]
    decay = model["decay"]["parameters"]
    n_res, n_time = config["n_res_param"], config["n_time_param"]
    assert len(maps["decay"]) == n_time and len(maps["decay"][0]) == n_res
    for j in range(n_time):  # the smoother's index is i + j n_res (resolution fastest)
        for i in range(n_res):
            assert maps["decay"][j][i] == pytest.approx(decay[i + j * n_res], abs=5e-7)
    plots = plots_by_id(embedded_content(tmp_path / "dials.vmerge.html"))
    assert plots["array_decay_0"]["data"][0]["z"] == maps["decay"]
    if "absorption" in config["corrections"]:
        absorption = np.array(model["absorption"]["parameters"])
        n_x, n_y = config["n_x_param"], config["n_y_param"]
        mean = [[np.mean([absorption[i + j * n_x + k * n_x * n_y] for k in range(n_time)])
                 for i in range(n_x)] for j in range(n_y)]
        np.testing.assert_allclose(maps["absorption_mean_over_time"], mean, atol=5e-7)


def check_filtering_section(content, filtering):
    """The filtering section shows every cycle's ΔCC½ values of the JSON dict (in %), the
    cutoff line, the points below the cutoff apart, and a table row for everything removed."""
    (section,) = [s for s in content["sections"] if s["title"].startswith("ΔCC½ filtering")]
    plots = {p["id"]: p for p in section["plots"]}
    cycles = filtering["cycle_results"]
    mode = filtering["mode"]
    below_name = "below cutoff (removed)" if mode == "dataset" else "below cutoff"
    for number, cycle in cycles.items():
        plot = plots[f"filtering_delta_cc_half_cycle_{number}"]
        cutoff = cycle["cutoff_value"]
        above, below = trace(plot, "above cutoff"), trace(plot, below_name)
        shown = sorted(zip(above["x"] + below["x"], above["y"] + below["y"]))
        expected = sorted(zip(cycle["delta_cc_half_groups"], cycle["delta_cc_half_values"]))
        assert [x for x, _ in shown] == [x for x, _ in expected]
        np.testing.assert_allclose([y for _, y in shown], [100 * v for _, v in expected],
                                   rtol=1e-15)
        assert all(y < 100 * cutoff for y in below["y"])
        assert all(y >= 100 * cutoff for y in above["y"])
        line = trace(plot, f"cutoff {100 * cutoff:.3g}%")
        assert line["y"] == pytest.approx([100 * cutoff] * 2, rel=1e-15)
        if mode == "dataset":  # every dataset below the cutoff is removed
            assert sorted(below["x"]) == sorted(cycle["removed_ids"])
    (table,) = section["tables"]
    removed = [(int(n), f"images {first}-{last} of dataset {key}")
               for n, c in cycles.items() for (first, last), key in
               c.get("image_ranges_removed") or []]
    removed += [(int(n), f"dataset {key} ({ident})") for n, c in cycles.items()
                for key, ident in zip(c["removed_ids"], c["removed_datasets"])]
    assert sorted((row[0], row[1]) for row in table["rows"]) == sorted(removed)
    for row in table["rows"]:
        cycle = cycles[str(row[0])]
        assert row[4] == pytest.approx(100 * cycle["cutoff_value"], rel=1e-15)
        if row[2] == "ΔCC½ below cutoff":
            key = int(row[1].split()[1])
            value = cycle["delta_cc_half_values"][cycle["delta_cc_half_groups"].index(key)]
            assert row[3] == pytest.approx(100 * value, rel=1e-15) and value < \
                cycle["cutoff_value"]


def filtering_results(mode):
    """A scale_and_filter_results dict of two cycles with removals, in DIALS's layout (as
    scaling/filtering.py writes it): mode=dataset on 12 datasets, or mode=image_group on two
    sweeps of 5 groups (dataset 1 loses its last group, then dataset 0 all its images)."""
    rng = np.random.default_rng(5)
    cycles = {}
    if mode == "dataset":
        removed = {1: [7, 3], 2: [10]}
        left = list(range(12))
        for number in (1, 2, 3):
            values = {k: float(rng.normal(0.002, 0.001)) for k in left}
            for k in removed.get(number, []):
                values[k] = -0.02 - 0.001 * k
            cutoff = float(np.mean(list(values.values())) - 2 * np.std(list(values.values())))
            order = sorted(values, key=values.get)
            gone = sorted(removed.get(number, []))
            cycles[str(number)] = {
                "merging_stats": None, "delta_cc_half_values": [values[k] for k in order],
                "delta_cc_half_groups": order, "mean_cc_half": 0.98 + 0.005 * number,
                "cutoff_value": cutoff, "removed_datasets": [f"id-{k}" for k in gone],
                "removed_ids": gone, "n_removed": 150 * len(gone),
                "cumul_percent_removed": 100.0 * sum(len(removed.get(c, []))
                                                     for c in range(1, number + 1)) / 12}
            left = [k for k in left if k not in gone]
        reason = "no_more_removed"
    else:
        values = [0.004, 0.003, 0.002, 0.001, 0.002, 0.003, 0.004, 0.003, 0.002, -0.03]
        cycles["1"] = {"merging_stats": None, "delta_cc_half_values": sorted(values),
                       "delta_cc_half_groups": sorted(range(10), key=lambda g: values[g]),
                       "mean_cc_half": 0.97, "cutoff_value": -0.01, "removed_datasets": [],
                       "removed_ids": [], "n_removed": 40, "cumul_percent_removed": 4.0,
                       "image_ranges_removed": [[[41, 50], 1]]}
        values = [-0.05, -0.04, -0.04, -0.03, -0.05, 0.01, 0.02, 0.01, 0.02]
        cycles["2"] = {"merging_stats": None, "delta_cc_half_values": sorted(values),
                       "delta_cc_half_groups": sorted(range(9), key=lambda g: values[g]),
                       "mean_cc_half": 0.975, "cutoff_value": -0.005,
                       "removed_datasets": ["first-sweep"], "removed_ids": [0],
                       "n_removed": 200, "cumul_percent_removed": 24.0,
                       "image_ranges_removed": [[[1, 10], 0], [[41, 50], 0], [[11, 20], 0],
                                                [[31, 40], 0], [[21, 30], 0]]}
        reason = "max_cycles"
    return {"termination_reason": reason, "initial_n_reflections": 1000,
            "initial_expids_and_image_ranges": None, "expids_and_image_ranges": None,
            "cycle_results": cycles, "final_stats": None, "mode": mode}


@pytest.mark.parametrize("mode", ["dataset", "image_group"])
def test_filtering_section_of_removals_renders(mode, tmp_path):
    """Removals in both modes (the stills run removes nothing): the plots and the table show
    the dict's numbers, and a real browser draws every plot without errors."""
    from dials_vmerge.report import write_report

    filtering = filtering_results(mode)
    report = json.loads(json.dumps({"scaling": {"filtering": filtering}, "merging": {}}))
    write_report(report, str(tmp_path / "report.html"))
    content = embedded_content(tmp_path / "report.html")
    check_filtering_section(content, report["scaling"]["filtering"])
    (section,) = content["sections"]
    assert len(section["plots"]) == len(filtering["cycle_results"]) + 1  # + the cycles plot
    (table,) = section["tables"]
    if mode == "dataset":
        assert [row[1] for row in table["rows"]] == ["dataset 3 (id-3)", "dataset 7 (id-7)",
                                                     "dataset 10 (id-10)"]
    else:
        assert len(table["rows"]) == 7
        assert table["rows"][-1][1:3] == ["dataset 0 (first-sweep)", "no valid images left"]
    text = open(tmp_path / "report.html", encoding="utf-8").read()
    assert 'id="table-filtering_removed"' in text
    assert all(f"<td>{row[1]}</td>" in text for row in table["rows"])
    chromium = chromium_or_skip()
    found = load_in_browser(chromium, tmp_path / "report.html", str(tmp_path))
    assert found["errors"] == []
    assert found["containers"] == found["drawn"] == len(section["plots"])
