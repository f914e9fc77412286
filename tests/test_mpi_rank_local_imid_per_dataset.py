"""The per-dataset Imid search (reflection_selection.combine.joint_analysis=False) of more
than 64 datasets (stills) under mpiexec (issue 11, session 12): combine.choose_imids_per_dataset
searches all datasets at once, each dataset's sums one sequential pass over its groups
continued from rank to rank, so the job runs rank-local and dials.vmerge's outputs are
byte-identical at N = 1, 2, 3.

- Unit: choose_imids_per_dataset on synthetic datasets (some profile-accurate, some
  summation-accurate, some in between) against an independent numpy/Python recomputation of
  each dataset's candidates (the mean a sequential sum over the rows in ASU order) and Rmeas
  (5 decimals, as logged), and the chosen Imid bit for bit; with a user list of candidates
  its log lines are those of the per-dataset choose_imid (one thread chunk) it replaces.
- Runs: dials.vmerge on 120 KB stills with joint_analysis=False at N = 1, 2, 3: scaled.refl,
  scaled.expt, merged.mtz, dials.vmerge.json byte-identical, logs identical apart from
  timings and MPI lines, the job rank-local, and the datasets' Imids not all the same.
"""

import json
import math
import re

import numpy as np
import pytest

import dials_vmerge  # noqa: F401  (before numba/scipy.special)

from dials_vmerge.scaling import combine as comb
from dials_vmerge.scaling.ih_table import pack_indices

N_DATASETS = 90


def synthetic_datasets(seed=3):
    """(pooled arrays in dataset order, rows per dataset): 90 datasets of a few hundred
    observations of 60 reflections; dataset d % 3 == 0 has accurate profile intensities,
    1 accurate summation ones, 2 profile accurate for weak reflections, summation for
    strong ones; dataset 7 has
    no rows."""
    rng = np.random.default_rng(seed)
    hkl = np.stack([rng.integers(0, 12, 60), rng.integers(0, 12, 60), rng.integers(1, 12, 60)],
                   axis=1)
    truth = rng.exponential(2000.0, 60) + 20.0
    parts, counts = [], []
    for d in range(N_DATASETS):
        n = 0 if d == 7 else int(rng.integers(150, 400))
        which = rng.integers(0, 60, n)
        g = rng.uniform(0.5, 2.0, n)
        p = np.where(rng.random(n) < 0.3, rng.uniform(0.3, 1.0, n), 1.0)
        true_i = g * truth[which]
        kind = d % 3
        sd_prf = (0.05 if kind == 0 else 0.3) * true_i + 5.0
        sd_sum = (0.3 if kind == 0 else 0.05) * true_i + 5.0
        if kind == 2:  # profile good for weak reflections, summation for strong ones
            weak = truth[which] < 1500.0
            sd_prf = np.where(weak, 0.03, 0.3) * true_i + 5.0
            sd_sum = np.where(weak, 0.3, 0.03) * true_i + 5.0
        parts.append({
            "asu_index": hkl[which].astype(np.int32),
            "i_prf": true_i + rng.normal(0.0, 1.0, n) * sd_prf,
            "v_prf": sd_prf ** 2,
            "i_sum": p * (true_i + rng.normal(0.0, 1.0, n) * sd_sum),
            "v_sum": (p * sd_sum) ** 2,
            "partiality": p,
            "correction": rng.uniform(0.9, 1.1, n),
            "g": g,
        })
        counts.append(n)
    pooled = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    return pooled, np.array(counts), parts


def expected_mean_and_max(part):
    """Independent: the mean of I_sum/p as a sequential sum over the rows sorted by ASU index
    (stable), and the maximum."""
    keys = pack_indices(part["asu_index"])
    order = np.argsort(keys, kind="stable")
    p = np.where(part["partiality"] > 0, part["partiality"], 1.0)
    ratio = (part["i_sum"] / p)[order]
    total = 0.0
    for x in ratio.tolist():
        total += x
    return total / ratio.size, float(ratio.max())


def expected_candidates(part):
    """The candidates: 0, 1, the mean (at least 10), the maximum / 10 and its divisions by 10
    while above the mean."""
    mean, maximum = expected_mean_and_max(part)
    avg = max(10.0, mean)
    values = [0.0, 1.0, avg, maximum / 10.0]
    while values[-1] > avg:
        values.append(values[-1] / 10.0)
    return values


def expected_rmeas(part, imid):
    """Independent numpy: Rmeas of the combined, scaled intensities (I/sigma > 1)."""
    p = np.where(part["partiality"] > 0, part["partiality"], 1.0)
    i_sum, v_sum = part["i_sum"] / p, part["v_sum"] / p ** 2
    if imid == 0:
        i, v = part["i_prf"], part["v_prf"]
    elif imid == 1:
        i, v = i_sum, v_sum
    else:
        w = np.where(part["i_sum"] <= 0, 1.0, 1.0 / (1.0 + (part["i_sum"] / imid) ** 3))
        i = w * part["i_prf"] + (1 - w) * i_sum
        v = w * part["v_prf"] + (1 - w) * v_sum
    scaled = i * part["correction"] / part["g"]
    sigma = np.sqrt(np.maximum(v, 0.0)) * part["correction"] / part["g"]
    keep = (sigma > 0) & (scaled / np.where(sigma > 0, sigma, 1.0) > 1)
    keys = pack_indices(part["asu_index"])[keep]
    scaled, sigma = scaled[keep], sigma[keep]
    num = den = 0.0
    for key in np.unique(keys):
        here = keys == key
        if here.sum() < 2:
            continue
        x, w = scaled[here], 1.0 / sigma[here] ** 2
        mean = np.sum(w * x) / np.sum(w)
        n = x.size
        num += math.sqrt(n / (n - 1.0)) * np.sum(np.abs(x - mean))
        den += np.sum(x)
    if keep.sum() < 2 or den <= 0:
        return -1.0
    return num / den


def test_per_dataset_search_against_independent_recomputation(monkeypatch):
    pooled, counts, parts = synthetic_datasets()
    lines, means = [], []
    candidates_of = comb._candidates

    def recording(mean_ratio, max_ratio):
        means.append((mean_ratio, max_ratio))
        return candidates_of(mean_ratio, max_ratio)

    monkeypatch.setattr(comb, "_candidates", recording)
    chosen = comb.choose_imids_per_dataset(dict(pooled), counts, None, lines.append)
    assert len(chosen) == N_DATASETS
    # the candidates' mean and maximum, bit for bit (datasets with rows, in order)
    assert means == [expected_mean_and_max(part) for part in parts if part["i_sum"].size]
    logged = iter(lines)
    for d, part in enumerate(parts):
        if counts[d] == 0:
            assert chosen[d] == 0.0
            continue
        candidates = expected_candidates(part)
        scores = [expected_rmeas(part, imid) for imid in candidates]
        for imid, score in zip(candidates, scores):
            assert next(logged) == f"  Imid {imid:.6g}: Rmeas {score:.5f}", d
        valid = [(s, k) for k, s in enumerate(scores) if s >= 0]
        best = candidates[min(valid)[1]]
        # bit for bit: the avg candidate's value is the sequential mean above
        assert chosen[d] == best, (d, chosen[d], best, scores)
    assert next(logged, None) is None
    # not vacuous: profile, summation and intermediate Imids are all chosen
    assert 0.0 in chosen and 1.0 in chosen
    assert any(c not in (0.0, 1.0) for c in chosen)
    assert all(c == 0.0 for d, c in enumerate(chosen) if d % 3 == 0 and counts[d])


def test_user_candidates_log_the_per_dataset_searchs_lines():
    """With given candidates (no mean), each dataset's Rmeas has the bits of the per-dataset
    choose_imid with one thread chunk (the one-process path before session 12, nproc=1)."""
    pooled, counts, parts = synthetic_datasets(seed=8)
    user = [0.0, 1.0, 300.0, 3000.0]
    lines = []
    chosen = comb.choose_imids_per_dataset(dict(pooled), counts, user, lines.append)
    before, expected = [], []
    for part in parts:
        expected.append(comb.choose_imid([dict(part)], user, 1, before.append))
    assert lines == before
    assert chosen == expected
    assert len(set(chosen)) >= 3


# -- dials.vmerge under mpiexec ------------------------------------------------------------

pytest.importorskip("mpi4py")
import mpi_helpers  # noqa: E402

TIMEOUT_S = 300
OUTPUTS = ("scaled.refl", "scaled.expt", "merged.mtz", "dials.vmerge.json")
SCALING_ON_RANKS = re.compile(r"MPI: scaling each rank's own unique reflections \(rows per "
                              r"rank ([\d / ]+) of (\d+)\)")


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    d = tmp_path_factory.mktemp("stills120")
    done = mpi_helpers.run(["dials.vmerge.simulate", "mode=stills", "stills.n_images=120",
                            "model=KB", "crystal.d_min=6", "seed=11"], cwd=d,
                           timeout_s=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return str(d / "simulated.expt"), str(d / "simulated.refl")


def test_per_dataset_imid_outputs_identical_at_one_two_three_ranks(stills, tmp_path):
    expt, refl = stills
    args = ["dials.vmerge", expt, refl, "reflection_selection.combine.joint_analysis=False",
            "nproc=1"]
    runs = mpi_helpers.runs_at_one_two_three(args, tmp_path, TIMEOUT_S)
    one = runs[None]
    for n_ranks in (2, 3):
        mpi_helpers.assert_same_files_and_log(one, runs[n_ranks], OUTPUTS, n_ranks)
        # the job ran on the ranks' own rows (not the repeated path)
        shares = SCALING_ON_RANKS.findall((runs[n_ranks] / "dials.vmerge.log").read_text())
        assert len(shares) == 1
        rows = [int(n) for n in shares[0][0].split(" / ")]
        assert len(rows) == n_ranks and sum(rows) == int(shares[0][1])
    text = (one / "dials.vmerge.log").read_text()
    assert "Intensity combination: Imid 120 datasets" in text
    # every dataset logged its candidates, and the datasets chose different Imids
    assert len(re.findall(r"^  Imid \S+: Rmeas", text, re.M)) >= 4 * 120
    imids = [model["configuration_parameters"]["Imid"]
             for model in json.loads((one / "scaled.expt").read_text())["scaling_model"]]
    assert len(imids) == 120
    assert 0.0 in imids and len(set(imids)) >= 3
