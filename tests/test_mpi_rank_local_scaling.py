"""The rank-local scaling job (issue 11): under mpiexec each rank selects, prepares and
scales only the rows of its own unique reflections (pipeline.rank_local_supported), and the
ranks' scaled rows, gathered in output_order_key order, are the one-process scaled table.

Runs tests/rank_local_driver.py (the scaling job alone, rank-local switched on) as one
process and under mpiexec -n 2 and -n 3 on a 3-sweep physical rotation simulation (with
outliers, datasets above the E^2 normalisation threshold) and a 200-still KB simulation, with
use_all selection, profile intensities and no error model (those stages have their own
rank-local tests: test_mpi_rank_local_selection.py, test_mpi_rank_local_em_imid.py; the
defaults run end to end in test_mpi_runs.py). Compared per row: g, var(g), intensity.scale.value and
variance (1e-10 relative), flags, original_index, dataset (identical); the models; every
rank's log lines (identical to each other and to one process's); each rank's share of the
rows; a dataset without rows on a rank; a bad input's one-line error.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba/scipy.special)

import mpi_helpers
from mpi_helpers import STAGE_TIME, launcher

pytest.importorskip("mpi4py")

DRIVER = os.path.join(os.path.dirname(__file__), "rank_local_driver.py")
TIMEOUT_S = 300
PARAMS = ["reflection_selection.method=use_all", "reflection_selection.intensity_choice=profile",
          "weighting.error_model.error_model=None", "nproc=1"]
FLOATS = ("inverse_scale_factor", "inverse_scale_factor_variance", "intensity_scale_value",
          "intensity_scale_variance")
EXACT = ("flags", "original_index", "id", "key")


def run_driver(expt, refl, cwd, n_ranks=None, extra=(), in_memory=False, env_extra=None):
    command = [sys.executable, DRIVER, expt, refl] + PARAMS + list(extra)
    if n_ranks is not None:
        command = [launcher(), "-n", str(n_ranks)] + command
    env = dict(os.environ, RANK_LOCAL_OUT=str(cwd / "out.npz"), **(env_extra or {}))
    if in_memory:
        env["RANK_LOCAL_IN_MEMORY"] = "1"
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def datasets(rank_local_simulations):
    return rank_local_simulations


@pytest.fixture(scope="module")
def results(datasets, tmp_path_factory):
    """{(name, n_ranks or None): the driver's .npz}."""
    out = {}
    for name, (expt, refl) in datasets.items():
        for n_ranks in (None, 2, 3):
            d = tmp_path_factory.mktemp(f"{name}_{n_ranks}")
            done = run_driver(expt, refl, d, n_ranks)
            assert done.returncode == 0, done.stderr
            out[name, n_ranks] = dict(np.load(d / "out.npz"))
    return out


def comparable(lines):
    """A rank's log lines without the stage timings and the MPI lines (rows per rank)."""
    keep = []
    for message in lines:
        for line in message.splitlines():
            if STAGE_TIME.fullmatch(line) or line.startswith("MPI:"):
                continue
            keep.append(line)
    return keep


def model_numbers(models_json):
    """Every float of the scaled models, in order."""
    numbers = []

    def walk(value):
        if isinstance(value, dict):
            for k in sorted(value):
                walk(value[k])
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers.append(float(value))

    walk(json.loads(str(models_json)))
    return np.array(numbers)


@pytest.mark.parametrize("name", ["sweeps3", "stills200"])
@pytest.mark.parametrize("n_ranks", [2, 3])
def test_rank_local_job_equals_one_process(results, name, n_ranks):
    one, many = results[name, None], results[name, n_ranks]
    assert not one["rank_local"].any()  # one process: no rank-local job
    assert many["rank_local"].all() and many["rank_local"].size == n_ranks
    assert one["key"].size == many["key"].size
    for column in FLOATS:
        a, b = one[column], many[column]
        assert np.all(np.isfinite(a))
        scale = np.maximum(np.abs(a), np.finfo(float).tiny)
        assert np.max(np.abs(a - b) / scale) <= 1e-10, column
    for column in EXACT:
        np.testing.assert_array_equal(one[column], many[column], err_msg=column)
    # the merged order is the one-process order: keys strictly ascending, and within each
    # dataset the original_index runs ascending
    assert np.all(np.diff(many["key"]) > 0)
    a, b = model_numbers(one["models"]), model_numbers(many["models"])
    assert a.size == b.size and a.size > 0
    assert np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-300)) <= 1e-10
    assert str(one["identifiers"]) == str(many["identifiers"])
    one_log = [comparable(lines) for lines in json.loads(str(one["log_lines"]))]
    ranks_log = [comparable(lines) for lines in json.loads(str(many["log_lines"]))]
    assert len(one_log[0]) > 10
    for lines in ranks_log:
        assert lines == one_log[0]


def test_each_rank_holds_its_share_of_the_rows(results):
    """Each rank's scaled table holds its own rows only: the ranks' counts add up to the
    one-process rows, none is repeated, and each is within one key block (4096
    observations) of the even share."""
    from dials_vmerge.backends.block_sums import MIN_BLOCK_OBSERVATIONS

    total = results["sweeps3", None]["key"].size
    assert total > 8 * MIN_BLOCK_OBSERVATIONS
    for n_ranks in (2, 3):
        many = results["sweeps3", n_ranks]
        rows = many["rows_per_rank"]
        assert rows.sum() == total and np.unique(many["key"]).size == total
        assert np.all(np.abs(rows - total / n_ranks) <= MIN_BLOCK_OBSERVATIONS), rows
        assert rows.max() < 0.7 * total
        # the rank of each row (in key order) agrees with the counts
        np.testing.assert_array_equal(np.bincount(many["rank"], minlength=n_ranks), rows)


def test_a_dataset_without_rows_on_a_rank(results):
    """Stills: some datasets have no row at all on some rank (the state's arrays are empty
    there) and still give the one-process result (test above); check that it happens."""
    many = results["stills200", 3]
    n_datasets = len(json.loads(str(many["identifiers"])))
    per_rank = np.zeros((3, n_datasets), dtype=np.int64)
    dataset = np.unique(many["id"], return_inverse=True)[1]
    np.add.at(per_rank, (many["rank"], dataset.ravel()), 1)
    assert np.any(per_rank == 0)
    assert np.all(per_rank.sum(axis=0) > 0)


@pytest.mark.parametrize("n_ranks", [None, 3])
def test_all_rows_excluded_one_line_error(datasets, tmp_path, n_ranks):
    expt, refl = datasets["sweeps3"]
    done = run_driver(expt, refl, tmp_path, n_ranks, extra=["cut_data.d_min=1000"])
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["rank_local_driver: error: no reflections left to scale after filtering"], \
        done.stderr
    assert not (tmp_path / "out.npz").exists()


def test_predicate_names_the_supported_configurations():
    from types import SimpleNamespace as NS

    from dials_vmerge import pipeline

    def params(**changes):
        p = NS(scaling_options=NS(target="least_squares", reference=None, use_free_set=False),
               filtering=NS(method=None), cross_validation=NS(cross_validation_mode=None),
               anomalous=False, merging=NS(method=["classical"]), compute=NS(device="cpu"),
               reflection_selection=NS(method="auto", intensity_choice="combine",
                                       combine=NS(joint_analysis=True)),
               weighting=NS(error_model=NS(error_model="basic")))
        for path, value in changes.items():
            *scopes, last = path.split("__")
            target = p
            for scope in scopes:
                target = getattr(target, scope)
            setattr(target, last, value)
        return p

    assert pipeline.rank_local_supported(params())
    for change in ({"merging__method": ["all"]},
                   {"merging__method": ["robust", "classical"]}):
        assert not pipeline.rank_local_supported(params(**change)), change
    # compute.device=cuda (device sums per key block: test_mpi_rank_local_cuda.py)
    assert pipeline.rank_local_supported(params(compute__device="cuda"))
    # the defaults (selection auto, Imid search, basic error model) run rank-local
    assert pipeline.rank_local_supported(params(merging__method=["robust"]))
    # variational: Sigma(d) fitted over the ranks (tests/test_mpi_rank_merge_variational.py)
    assert pipeline.rank_local_supported(params(merging__method=["variational"]))
    # a free set (membership by ASU index; test_more_configurations runs it)
    assert pipeline.rank_local_supported(params(scaling_options__use_free_set=True))
    # a reference (targeted sums over the key blocks; test_more_configurations runs it)
    assert pipeline.rank_local_supported(params(scaling_options__reference="ref.mtz"))
    # ΔCC½ filtering's cycles (test_mpi_rank_local_filtering.py runs them)
    assert pipeline.rank_local_supported(params(filtering__method="deltacchalf"))
    # the likelihood target (sums by key blocks; test_more_configurations runs it)
    assert pipeline.rank_local_supported(params(scaling_options__target="likelihood"))
    # cross-validation's free-set jobs (test_mpi_rank_local_cross_validation.py)
    assert pipeline.rank_local_supported(params(cross_validation__cross_validation_mode="single"))
    # anomalous=True (groups in (unique reflection, hand) order; test_more_configurations
    # and test_mpi_rank_local_anomalous.py run it)
    assert pipeline.rank_local_supported(params(anomalous=True))
    # per-dataset Imid searches, by key blocks up to 64 datasets, all datasets at once above
    # (session 12; test_mpi_rank_local_imid_per_dataset.py runs 120 stills)
    per_dataset = params(reflection_selection__combine__joint_analysis=False)
    assert pipeline.rank_local_supported(per_dataset, 64)
    assert pipeline.rank_local_supported(per_dataset, 65)
    assert pipeline.rank_local_supported(per_dataset, 20000)
    assert pipeline.rank_local_supported(params(), 65)
    assert pipeline.RANK_LOCAL_OUTPUT_READY is True


def one_process_and_ranks(expt, refl, tmp_path, n_ranks, extra):
    """The driver's .npz of one process and of n_ranks ranks with the same parameters."""
    out = []
    for ranks in (None, n_ranks):
        d = tmp_path / f"ranks{ranks}"
        d.mkdir()
        done = run_driver(expt, refl, d, ranks, extra=extra)
        assert done.returncode == 0, done.stderr
        out.append(dict(np.load(d / "out.npz")))
    return out


def assert_same_job(one, many):
    """A rank-local job's rows, models and every rank's log equal to one process's, bit
    for bit; returns one process's comparable log lines."""
    assert many["rank_local"].all()
    for column in FLOATS + EXACT:
        np.testing.assert_array_equal(one[column], many[column], err_msg=column)
    np.testing.assert_array_equal(model_numbers(one["models"]), model_numbers(many["models"]))
    one_log = comparable(json.loads(str(one["log_lines"]))[0])
    for lines in json.loads(str(many["log_lines"])):
        assert comparable(lines) == one_log
    return one_log


@pytest.mark.parametrize("extra", [
    [],
    # the likelihood's error-model groups (group, hand) of a rank without rows (an IndexError
    # before the fix in set_plug_intensity)
    ["scaling_options.target=likelihood", "weighting.error_model.error_model=basic"],
], ids=["default", "likelihood"])
def test_a_rank_without_rows(tmp_path, extra):
    """One sweep of ~12 600 rows is 3 key blocks: under 4 ranks one rank holds no row at all
    (empty states, no group for the E^2 shells: the sweep is above the normalisation
    threshold) and the result is still the one-process one, bit for bit."""
    done = mpi_helpers.run(["dials.vmerge.simulate", "rotation.n_sweeps=1",
                            "n_obs_target=11500", "noise.outlier_fraction=0.01", "seed=7"],
                           cwd=tmp_path, timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    expt, refl = str(tmp_path / "simulated.expt"), str(tmp_path / "simulated.refl")
    out = {}
    for n_ranks in (None, 4):
        d = tmp_path / f"ranks{n_ranks}"
        d.mkdir()
        done = run_driver(expt, refl, d, n_ranks, extra=extra)
        assert done.returncode == 0, done.stderr
        out[n_ranks] = dict(np.load(d / "out.npz"))
    rows = out[4]["rows_per_rank"]
    # 11 500 observations make 2-3 key blocks (n_obs // 4096, counted over the rows
    # preparation keeps): at least one of the 4 ranks holds no row
    assert rows.size == 4 and np.count_nonzero(rows == 0) >= 1
    assert out[None]["key"].size > 10000
    # the outlier rejection flagged rows (the sweep, above 10 000 rows, takes the E^2 test too)
    from dials_vmerge import flags

    assert np.count_nonzero(out[None]["flags"] & flags.outlier_in_scaling) > 20
    for column in FLOATS + EXACT:
        np.testing.assert_array_equal(out[None][column], out[4][column], err_msg=column)
    one_log = comparable(json.loads(str(out[None]["log_lines"]))[0])
    for lines in json.loads(str(out[4]["log_lines"])):
        assert comparable(lines) == one_log
    if extra:
        assert any(line.startswith("Error model (marginal likelihood): a = ")
                   for line in one_log)


def test_input_held_in_memory(datasets, results, tmp_path):
    """An input whose columns are in memory (no file rows: the rank's rows are selected in
    memory and the grouping maps its ASU indices itself) gives the same rows."""
    expt, refl = datasets["sweeps3"]
    done = run_driver(expt, refl, tmp_path, 2, in_memory=True)
    assert done.returncode == 0, done.stderr
    many = dict(np.load(tmp_path / "out.npz"))
    one = results["sweeps3", None]
    assert many["rank_local"].all()
    for column in FLOATS + EXACT:
        np.testing.assert_array_equal(one[column], many[column], err_msg=column)


def one_process_merged_mtz(datasets, tmp_path_factory, name):
    """merged.mtz of a one-process dials.vmerge run (defaults) of dataset `name`: a
    reference with every reflection of the data, on the data's scale."""
    expt, refl = datasets[name]
    d = tmp_path_factory.mktemp(f"reference_run_{name}")
    done = mpi_helpers.run(["dials.vmerge", expt, refl, "nproc=1"], cwd=d, timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return str(d / "merged.mtz")


@pytest.fixture(scope="module")
def reference_mtz(datasets, tmp_path_factory):
    return one_process_merged_mtz(datasets, tmp_path_factory, "sweeps3")


REFERENCE = "scaling_options.reference=REFERENCE"


@pytest.mark.parametrize("extra", [
    # image and dataset exclusions, a resolution cut, the absorption surface (its
    # coefficients from the geometry of each rank's rows)
    ["physical.absorption_correction=True", "exclude_images=0:1:10",
     "dataset_selection.exclude_datasets=2", "cut_data.d_min=1.8"],
    # the array model: its grid ranges (x, y, d) over every rank's rows
    ["model=array"],
    # summation intensities (the PHIL's last assignment wins over PARAMS' profile)
    ["reflection_selection.intensity_choice=sum"],
    # a free set left out of minimisation (each rank decides its own rows' membership)
    ["scaling_options.use_free_set=True", "scaling_options.free_set_percentage=20",
     "scaling_options.free_set_offset=1"],
    # scaling against a reference (scaling/targeted.py: its sums over the key blocks);
    # the second with the basic error model (refined against the reference's g)
    [REFERENCE, "scaling_options.outlier_rejection=standard"],
    [REFERENCE, "weighting.error_model.error_model=basic"],
    # the marginal-likelihood target: its sums over groups by the key blocks, its resolution
    # bins over the gathered groups, its error model (a, b) fitted inside the likelihood
    # from sums over ranks (PARAMS' error_model=None overridden)
    ["scaling_options.target=likelihood", "weighting.error_model.error_model=basic"],
    # anomalous groups (I(+) and I(-) apart) in (unique reflection, hand) order: a rank's
    # groups are a contiguous run of the one-process groups; with the quasi-random draws
    # (in the (h, k, l) order of the anomalous indices) and the basic error model
    ["anomalous=True", "reflection_selection.method=quasi_random",
     "weighting.error_model.error_model=basic"],
], ids=["exclusions_absorption", "array", "sum", "free_set", "reference",
        "reference_error_model", "likelihood", "anomalous"])
def test_more_configurations(datasets, results, tmp_path, extra, request):
    expt, refl = datasets["sweeps3"]
    if REFERENCE in extra:
        path = request.getfixturevalue("reference_mtz")
        extra = [f"scaling_options.reference={path}" if e == REFERENCE else e for e in extra]
    out = {}
    out[None], out[2] = one_process_and_ranks(expt, refl, tmp_path, 2, extra)
    one_log = assert_same_job(out[None], out[2])
    models = json.loads(str(out[2]["models"]))
    corrections = models[0]["configuration_parameters"]["corrections"]
    assert ("absorption" in corrections) == ("physical.absorption_correction=True" in extra
                                             or "model=array" in extra)
    if "reflection_selection.intensity_choice=sum" in extra:  # not the profile result
        assert not np.array_equal(out[2]["intensity_scale_value"],
                                  results["sweeps3", None]["intensity_scale_value"])
    if "scaling_options.use_free_set=True" in extra:
        # the free set changed the minimisation: not the default run's scales
        assert any(line.startswith("Free set (20%, offset 1): ") for line in one_log)
        assert not np.array_equal(out[2]["inverse_scale_factor"],
                                  results["sweeps3", None]["inverse_scale_factor"])
    if any(e.startswith("scaling_options.reference=") for e in extra):
        matched = [line for line in one_log if line.startswith("Reference ")]
        assert len(matched) == 1 and " measured intensities; " in matched[0], matched
        assert int(matched[0].split("; ")[1].split()[0]) > 40000  # every rank's rows
        assert any(line.startswith("LBFGS against the reference: ") for line in one_log)
        assert any(line.startswith("Outlier rejection against the reference: ")
                   for line in one_log)
        assert not np.array_equal(out[2]["inverse_scale_factor"],
                                  results["sweeps3", None]["inverse_scale_factor"])
    if "scaling_options.target=likelihood" in extra:
        # the likelihood's own error model: not the default run's scales
        assert any(line.startswith("Error model (marginal likelihood): a = ")
                   for line in one_log)
        assert not np.array_equal(out[2]["inverse_scale_factor"],
                                  results["sweeps3", None]["inverse_scale_factor"])
    if "anomalous=True" in extra:
        # the anomalous grouping changed the minimisation: not the default run's scales
        assert any(line.startswith("Reflection selection (quasi_random): ") for line in one_log)
        assert any(line.startswith("Error model: a = ") for line in one_log)
        assert not np.array_equal(out[2]["inverse_scale_factor"],
                                  results["sweeps3", None]["inverse_scale_factor"])
    if "exclude_images=0:1:10" in extra:
        assert len(models) == 2  # dataset 2 excluded
        assert any("valid image ranges now 11-" in line for line in one_log)


def test_reference_scaling_of_stills_on_three_ranks(datasets, tmp_path, tmp_path_factory):
    """200 KB stills against their own one-process merged.mtz at N = 3 (some stills have
    no row on some rank: their prescale and target sums are empty there): rows, models and
    log bit for bit against one process."""
    expt, refl = datasets["stills200"]
    extra = ["scaling_options.reference="
             + one_process_merged_mtz(datasets, tmp_path_factory, "stills200")]
    one, many = one_process_and_ranks(expt, refl, tmp_path, 3, extra)
    one_log = assert_same_job(one, many)
    assert any(line.startswith("LBFGS against the reference: ") for line in one_log)


def test_unsupported_configuration_keeps_the_repeated_path(datasets, results, tmp_path):
    """A configuration kept off the rank-local path (anomalous=True, by the driver's
    RANK_LOCAL_REPEATED_WHEN_TRUE: every real configuration is rank-local since session 12,
    the per-dataset Imid search of 200 stills, the example before, included): every rank
    holds and scales every row, and the rows gathered from rank 0 are those of one process
    run the same way."""
    expt, refl = datasets["stills200"]
    out = {}
    for n_ranks in (None, 2):
        d = tmp_path / f"ranks{n_ranks}"
        d.mkdir()
        done = run_driver(expt, refl, d, n_ranks, extra=["anomalous=True"],
                          env_extra={"RANK_LOCAL_REPEATED_WHEN_TRUE": "anomalous"})
        assert done.returncode == 0, done.stderr
        out[n_ranks] = dict(np.load(d / "out.npz"))
    assert not out[2]["rank_local"].any()
    n = out[None]["key"].size
    np.testing.assert_array_equal(out[2]["rows_per_rank"], [n, n])
    # rank 0's rows (each rank holds all of them: the gathered table holds each row twice)
    first = out[2]["rank"] == 0
    for column in FLOATS + EXACT:
        np.testing.assert_array_equal(out[None][column], out[2][column][first], err_msg=column)
    # and anomalous=True changed the scales (not the rank-local run's rows)
    assert not np.array_equal(out[None]["inverse_scale_factor"],
                              results["stills200", None]["inverse_scale_factor"])
