"""The Imid-search kernel gives exactly the numpy recipe (combine_values, times c over g)."""

import numpy as np

from dials_vmerge.scaling import combine


def test_scaled_combined_kernel_equals_numpy_recipe():
    rng = np.random.default_rng(2)
    n = 20000
    i_sum = rng.normal(300, 600, n)
    i_prf = i_sum + rng.normal(0, 30, n)
    v_sum = np.abs(rng.normal(400, 100, n))
    v_prf = np.abs(v_sum + rng.normal(0, 50, n))
    v_prf[:50] = -1.0  # negative variances are clipped to 0 in sigma
    partiality = rng.uniform(-0.1, 1.0, n)  # p <= 0 counts as 1
    correction = rng.uniform(0.5, 2.0, n)
    g = rng.uniform(0.5, 2.0, n)
    for imid in (0.0, 1.0, 412.5, 17.0):
        i, v = combine.combine_values(i_prf, v_prf, i_sum, v_sum, partiality, imid)
        expected_i = i * correction / g
        expected_sigma = np.sqrt(np.clip(v, 0, None)) * correction / g
        scaled_i = np.empty(n)
        scaled_sigma = np.empty(n)
        weight = combine.profile_weight(i_sum, imid)
        combine.scaled_combined_kernel(i_prf, v_prf, i_sum, v_sum, partiality, correction, g,
                                       imid, weight, scaled_i, scaled_sigma)
        assert np.array_equal(scaled_i, expected_i)
        assert np.array_equal(scaled_sigma, expected_sigma)


def test_apply_imid_in_chunks_equals_the_formula_row_by_row(monkeypatch):
    # apply_imid combines large row sets chunk by chunk (memory): every row must get the
    # dials-scaling.md 9 formula, written here independently, whatever the chunk it is in
    from dials_vmerge import flags
    from dials_vmerge.table import ReflectionTable

    rng = np.random.default_rng(7)
    n = 1000
    table = ReflectionTable(n)
    i_sum = rng.normal(300, 600, n)
    table["intensity.sum.value"] = i_sum
    table["intensity.prf.value"] = i_sum + rng.normal(0, 30, n)
    table["intensity.sum.variance"] = np.abs(rng.normal(400, 100, n))
    table["intensity.prf.variance"] = np.abs(rng.normal(400, 100, n))
    table["partiality"] = rng.uniform(-0.1, 1.0, n)
    table["prescaling_correction"] = rng.uniform(0.5, 2.0, n)
    kind = rng.integers(0, 3, n)  # 0: both integrations, 1: profile only, 2: summation only
    row_flags = np.where(kind != 2, flags.integrated_prf, 0) | np.where(kind != 1,
                                                                        flags.integrated_sum, 0)
    table["flags"] = row_flags.astype(np.uint64)
    rows = np.sort(rng.choice(n, 700, replace=False))
    monkeypatch.setattr(combine, "APPLY_CHUNK_ROWS", 64)  # 11 chunks, the last partial
    for imid in (0.0, 1.0, 412.5):
        i, v = combine.apply_imid(table, imid, rows)
        for out_row, r in enumerate(rows):
            p = table["partiality"][r] if table["partiality"][r] > 0 else 1.0
            c = table["prescaling_correction"][r]
            prf = (table["intensity.prf.value"][r], table["intensity.prf.variance"][r])
            summ = (table["intensity.sum.value"][r] / p, table["intensity.sum.variance"][r] / p**2)
            if imid == 0:
                value = prf if kind[r] != 2 else summ
            elif imid == 1:
                value = summ if kind[r] != 1 else prf
            elif kind[r] == 0:
                s = table["intensity.sum.value"][r]
                w = 1.0 if s <= 0 else 1.0 / (1.0 + (s / imid) ** 3)
                value = (w * prf[0] + (1 - w) * summ[0], w * prf[1] + (1 - w) * summ[1])
            else:
                value = prf if kind[r] == 1 else summ
            assert np.isclose(i[out_row], value[0] * c, rtol=1e-12, atol=0)
            assert np.isclose(v[out_row], value[1] * c * c, rtol=1e-12, atol=0)
        # and chunking changes no bit: one pass over all rows gives the same arrays
        whole = combine._apply_imid_rows(table, imid, rows)
        assert np.array_equal(whole[0], i) and np.array_equal(whole[1], v)
