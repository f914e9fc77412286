"""Profile/summation intensity combination with the Imid search (dials-scaling.md 9).

    w = 1 / (1 + (I_sum/Imid)^3)   (w = 1 where I_sum <= 0)
    I = w I_prf + (1 - w) I_sum/p,  V = w V_prf + (1 - w) V_sum/p^2   (linear in w)
both times the prescaling correction c (c^2 for V). Imid = 0 means profile, 1 summation.
Candidates: 0, 1, avg = max(10, mean(I_sum/p)), I_max/10 and further divisions by 10 while
the last value exceeds avg. The candidate with the lowest Rmeas of I/g (I/sigma > 1,
internal-variance merging, non-anomalous groups) wins.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.size_dispatch import parallel_when_large

from .. import flags
from ..memory import release_free_memory
from .ih_table import chunk_bounds, group_sort, pack_indices


def combine_values(i_prf, v_prf, i_sum, v_sum, partiality, imid):
    """Combined (I, V) before the prescaling correction; partiality <= 0 counts as 1."""
    p = np.where(partiality > 0, partiality, 1.0)
    sum_i = i_sum / p
    sum_v = v_sum / (p * p)
    if imid == 0:
        return i_prf.copy(), v_prf.copy()
    if imid == 1:
        return sum_i, sum_v
    w = profile_weight(i_sum, imid)
    return w * i_prf + (1.0 - w) * sum_i, w * v_prf + (1.0 - w) * sum_v


def profile_weight(i_sum, imid, out=None):
    """w = 1 / (1 + (I_sum/Imid)^3), 1 where I_sum <= 0 (numpy's power, as combine_values);
    written into `out` if given."""
    # the same ufuncs as np.where(i_sum <= 0, 1.0, 1.0 / (1.0 + (i_sum / imid) ** 3)), in
    # one array instead of five (1e6 sweep: 28 MB less at the scaling stage's peak RSS)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        w = np.divide(i_sum, imid, out=out)
        np.power(w, 3, out=w)
        np.add(1.0, w, out=w)
        np.divide(1.0, w, out=w)
    w[i_sum <= 0] = 1.0
    return w


@njit(cache=True)
def _scaled_combined_row(i_prf, v_prf, i_sum, v_sum, partiality, correction, g, imid, weight,
                         r, scaled_i, scaled_sigma):
    """Row r of scaled_combined_kernel with Imid `imid` (both kernels' arithmetic)."""
    p = partiality[r] if partiality[r] > 0 else 1.0
    sum_i = i_sum[r] / p
    sum_v = v_sum[r] / (p * p)
    if imid == 0:
        i = i_prf[r]
        v = v_prf[r]
    elif imid == 1:
        i = sum_i
        v = sum_v
    else:
        w = weight[r]
        i = w * i_prf[r] + (1.0 - w) * sum_i
        v = w * v_prf[r] + (1.0 - w) * sum_v
    scaled_i[r] = i * correction[r] / g[r]
    scaled_sigma[r] = np.sqrt(max(v, 0.0)) * correction[r] / g[r]


@parallel_when_large
def scaled_combined_kernel(i_prf, v_prf, i_sum, v_sum, partiality, correction, g, imid,
                           weight, scaled_i, scaled_sigma):
    """I c / g and sqrt(max(V, 0)) c / g of combine_values(..., imid), element by element
    with the same operations (no temporaries for the Imid search). weight: profile_weight
    for Imid other than 0 and 1 (unused otherwise)."""
    for r in prange(i_prf.size):
        _scaled_combined_row(i_prf, v_prf, i_sum, v_sum, partiality, correction, g, imid,
                             weight, r, scaled_i, scaled_sigma)


def candidate_imids(i_sum, partiality):
    """The candidates from all test rows in one array (np.mean's pairwise sum; callers with
    the rows sorted by group use candidate_imids_sorted, whose mean is split-invariant)."""
    p = np.where(partiality > 0, partiality, 1.0)
    ratio = i_sum / p
    return _candidates(float(np.mean(ratio)), float(np.max(ratio)))


def _candidates(mean_ratio, max_ratio):
    avg = max(10.0, mean_ratio)
    values = [0.0, 1.0, avg, max_ratio / 10.0]
    while values[-1] > avg:
        values.append(values[-1] / 10.0)
    return values


@parallel_when_large
def ratio_sums_kernel(i_sum, partiality, group_start, chunk_start, sums, counts):
    """Per chunk of groups: the sum of I_sum/p (p <= 0 counts as 1) in row order, and the
    number of rows."""
    for c in prange(chunk_start.size - 1):
        total = 0.0
        lo = group_start[chunk_start[c]]
        hi = group_start[chunk_start[c + 1]]
        for r in range(lo, hi):
            p = partiality[r] if partiality[r] > 0 else 1.0
            total += i_sum[r] / p
        sums[c] = total
        counts[c] = hi - lo


def candidate_imids_sorted(i_sum, partiality, group_start, nproc=1, key_blocks=None):
    """candidate_imids of test rows sorted by group (offsets group_start), with a mean whose
    bits do not depend on how the rows are split (issue 11): the sum of I_sum/p is taken
    block by block and added as the block sums' tree (the job's key blocks when given, else
    blocks cut from these groups), the count and the maximum over all MPI ranks of a
    rank-local job (backends/rank_local.py). In a rank-local job each rank passes only its
    own groups' rows; in any other run the rows of all groups.

    (np.mean's pairwise sum over the rows in dataset order, used before session 10, depends
    on the rows' order and on every row being in one array: the avg candidate moved in its
    last bit, README issue 11.)"""
    from ..backends import rank_local
    from ..backends.block_sums import batch_blocks_for, blockwise_sum

    def evaluate(chunks):
        n = chunks.size - 1
        sums, counts = np.zeros(n), np.zeros(n, dtype=np.int64)
        ratio_sums_kernel(i_sum, partiality, group_start, chunks, sums, counts)
        return [sums, counts.astype(np.float64)]  # counts exact below 2^53

    if key_blocks is not None:
        block_bounds, rank_blocks = key_blocks
        total, count = blockwise_sum(group_start, evaluate, batch_blocks_for(2, nproc),
                                     block_bounds, rank_blocks=rank_blocks)
    else:
        if rank_local.active():
            raise RuntimeError("a rank-local job's Imid search needs the job's key blocks")
        total, count = blockwise_sum(group_start, evaluate, batch_blocks_for(2, nproc))
    if i_sum.size:
        p = np.where(partiality > 0, partiality, 1.0)
        local_max = float(np.max(i_sum / p))
    else:
        local_max = -np.inf
    return _candidates(float(total) / float(count), rank_local.maximum(local_max))


@njit(cache=True)
def _group_rmeas_sums(intensity, sigma, lo, hi, num, den):
    """(num, den, n) continued over one group (observations lo:hi) of the Rmeas sums: n the
    observations with sigma > 0 and I/sigma > 1; for n > 1, num += sqrt(n/(n-1)) sum |I -
    <I>| and den += each I in order, <I> the 1/sigma^2 weighted mean."""
    n = 0
    sw = 0.0
    swi = 0.0
    for i in range(lo, hi):
        if sigma[i] > 0.0 and intensity[i] / sigma[i] > 1.0:
            n += 1
            w = 1.0 / (sigma[i] * sigma[i])
            sw += w
            swi += w * intensity[i]
    if n < 2:
        return num, den, n
    mean = swi / sw
    dev = 0.0
    for i in range(lo, hi):
        if sigma[i] > 0.0 and intensity[i] / sigma[i] > 1.0:
            dev += abs(intensity[i] - mean)
            den += intensity[i]
    return num + np.sqrt(n / (n - 1.0)) * dev, den, n


@parallel_when_large
def rmeas_of_sorted_kernel(intensity, sigma, group_start, chunk_start, num_partial,
                           den_partial, n_partial):
    """Per chunk of groups, over the observations with sigma > 0 and I/sigma > 1 only (read
    in place: no compacted copies), counted in n_partial: the sum over groups with n > 1 of
    sqrt(n/(n-1)) sum |I - <I>| and the sum of I, <I> the 1/sigma^2 weighted mean."""
    n_chunks = chunk_start.size - 1
    for c in prange(n_chunks):
        num = 0.0
        den = 0.0
        n_kept = 0
        for grp in range(chunk_start[c], chunk_start[c + 1]):
            num, den, n = _group_rmeas_sums(intensity, sigma, group_start[grp],
                                            group_start[grp + 1], num, den)
            n_kept += n
        num_partial[c] = num
        den_partial[c] = den
        n_partial[c] = n_kept


def rmeas_sorted(intensity, sigma, group_start, nproc=1, key_blocks=None):
    """rmeas of observations already sorted by group (offsets group_start).

    key_blocks: (block bounds, rank block offsets) of the job's read-time key blocks
    (backends/rank_partition.py key_blocks_of_groups): the sums are then taken block by
    block and added as the block sums' tree, the same bits for any nproc and any number of
    MPI ranks, each rank summing only its own blocks' rows (issue 11). Without them: chunks
    of groups per thread, added in chunk order."""
    if key_blocks is not None:
        from ..backends.block_sums import batch_blocks_for, blockwise_sum

        block_bounds, rank_blocks = key_blocks

        def evaluate(chunks):
            n = chunks.size - 1
            num, den, kept = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
            rmeas_of_sorted_kernel(intensity, sigma, group_start, chunks, num, den, kept)
            # counts travel as float64 (exact below 2^53) with the other partials
            return [num, den, kept.astype(np.float64)]

        num, den, kept = blockwise_sum(group_start, evaluate, batch_blocks_for(3, nproc),
                                       block_bounds, rank_blocks=rank_blocks)
        if float(kept) < 2:
            return -1.0
        return float(num) / float(den) if float(den) > 0 else -1.0
    chunks = chunk_bounds(group_start, nproc)
    num = np.zeros(chunks.size - 1)
    den = np.zeros(chunks.size - 1)
    kept = np.zeros(chunks.size - 1, dtype=np.int64)
    rmeas_of_sorted_kernel(intensity, sigma, group_start, chunks, num, den, kept)
    if kept.sum() < 2:
        return -1.0
    total_den = float(sum(den))
    return float(sum(num)) / total_den if total_den > 0 else -1.0


def rmeas(asu_index, intensity, sigma, nproc=1):
    """Rmeas of I (1/sigma^2-weighted group means) over the observations with sigma > 0 and
    I/sigma > 1, grouped by ASU index; -1 when fewer than two are kept."""
    order, group_start = group_sort(asu_index)
    return rmeas_sorted(np.ascontiguousarray(intensity[order]),
                        np.ascontiguousarray(sigma[order]), group_start, nproc)


def combination_test_selection(table, g, suitable_and_not_outlier):
    """Rows usable for choosing Imid (both integrated, positive variances, g > 0, p > 0)."""
    both = table.get_flags(flags.integrated_prf | flags.integrated_sum, all=True)
    usable = both & suitable_and_not_outlier & (g > 0)
    usable &= table.peek("intensity.prf.variance") > 0
    usable &= table.peek("intensity.sum.variance") > 0
    if "partiality" in table:
        usable &= table.peek("partiality") > 0
    return usable


def _joined_popped(datasets, key):
    parts = [d.pop(key) for d in datasets]
    return parts.pop() if len(parts) == 1 else np.concatenate(parts)


# Per-dataset Imid searches (joint_analysis=False) of at most this many datasets sum over the
# job's key blocks, as the joint search does (hundreds of mostly empty blocks per dataset would
# cost more than one pass over many small datasets); more datasets (stills) are searched all
# at once by choose_imids_per_dataset. Both give one process's bits for any nproc and any
# number of MPI ranks (issue 11).
PER_DATASET_KEY_BLOCKS_MAX = 64


@parallel_when_large
def dataset_ratio_sums_kernel(i_sum, partiality, row_start, state):
    """Per dataset d (rows row_start[d]:row_start[d + 1], sorted by group): continue the
    sequential sum of I_sum/p (p <= 0 counts as 1) in state[0, d] and the row count in
    state[1, d]."""
    for d in prange(row_start.size - 1):
        total = state[0, d]
        for r in range(row_start[d], row_start[d + 1]):
            p = partiality[r] if partiality[r] > 0 else 1.0
            total += i_sum[r] / p
        state[0, d] = total
        state[1, d] += row_start[d + 1] - row_start[d]


@parallel_when_large
def dataset_rmeas_kernel(intensity, sigma, group_start, dataset_groups, active, state):
    """rmeas_of_sorted_kernel's sums per dataset d (its groups dataset_groups[d]:
    dataset_groups[d + 1]), for active datasets only, continued from state[:, d] = (num,
    den, kept): one sequential pass over the dataset's groups in order, so a pass continued
    from rank to rank has the bits of one pass over all of them."""
    for d in prange(dataset_groups.size - 1):
        if not active[d]:
            continue
        num = state[0, d]
        den = state[1, d]
        n_kept = state[2, d]  # exact below 2^53
        for grp in range(dataset_groups[d], dataset_groups[d + 1]):
            num, den, n = _group_rmeas_sums(intensity, sigma, group_start[grp],
                                            group_start[grp + 1], num, den)
            n_kept += n
        state[0, d] = num
        state[1, d] = den
        state[2, d] = n_kept


@parallel_when_large
def scaled_combined_rows_kernel(i_prf, v_prf, i_sum, v_sum, partiality, correction, g,
                                imid, weight, scaled_i, scaled_sigma):
    """scaled_combined_kernel with one Imid per row (imid[r])."""
    for r in prange(i_prf.size):
        _scaled_combined_row(i_prf, v_prf, i_sum, v_sum, partiality, correction, g, imid[r],
                             weight, r, scaled_i, scaled_sigma)


def _dataset_group_sort(asu_index, rows_per_dataset):
    """(order, group_start, dataset_groups, row_start) of rows in dataset order: a stable
    permutation sorting by (dataset, ASU index), the group offsets, each dataset's first
    group (n_datasets + 1) and first sorted row (n_datasets + 1)."""
    n_datasets = len(rows_per_dataset)
    counts = np.asarray(rows_per_dataset, dtype=np.int64)
    row_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    keys = pack_indices(asu_index) if counts.sum() else np.zeros(0, dtype=np.int64)
    dataset = np.repeat(np.arange(n_datasets, dtype=np.int64), counts)
    span = int(keys.max()) + 1 if keys.size else 1
    if span * max(n_datasets, 1) < (1 << 62):
        order = np.argsort(dataset * span + keys, kind="stable")
    else:
        order = np.lexsort((keys, dataset))
    sorted_keys, sorted_dataset = keys[order], dataset[order]
    new_group = np.ones(order.size, dtype=bool)
    if order.size:
        new_group[1:] = (sorted_keys[1:] != sorted_keys[:-1]) | \
            (sorted_dataset[1:] != sorted_dataset[:-1])
    first_rows = np.flatnonzero(new_group)
    group_start = np.concatenate([first_rows, [order.size]]).astype(np.int64)
    dataset_groups = np.searchsorted(first_rows, row_start).astype(np.int64)
    return order, group_start, dataset_groups, row_start


def choose_imids_per_dataset(pooled, rows_per_dataset, imids=None, log=None):
    """The Imid with the lowest Rmeas of each dataset (joint_analysis=False), all datasets at
    once; what choose_imid([dataset]) chose with one thread chunk, for any nproc and any
    number of MPI ranks.

    pooled: the arrays of choose_imid's datasets (test rows) of all datasets, in dataset
    order, rows_per_dataset rows each (the dict is emptied). The rows are sorted by (dataset,
    ASU index): in a rank-local job a rank's rows of a dataset are its own groups, in key
    order, so every per-dataset sum (the candidates' mean of I_sum/p, and per candidate the
    Rmeas sums) is one sequential pass over the dataset's groups continued from rank to rank
    (rank_local.sequential_over_ranks) with the state of all datasets in one array: one
    collective per pass, not per dataset. The maxima are an elementwise maximum over ranks.
    The mean is that sequential sum over the rows in key order (np.mean's pairwise sum over
    the rows in input order before session 12: README issue 11)."""
    from ..backends import rank_local

    n_datasets = len(rows_per_dataset)
    order, group_start, dataset_groups, row_start = _dataset_group_sort(
        pooled.pop("asu_index"), rows_per_dataset)
    for name in list(pooled):
        pooled[name] = pooled.pop(name)[order]
    del order
    cat = pooled
    if imids:
        counts = rank_local.totals(np.diff(row_start))
        candidates = [list(imids) if counts[d] else [] for d in range(n_datasets)]
    else:
        def add_ratios(state):
            dataset_ratio_sums_kernel(cat["i_sum"], cat["partiality"], row_start, state)

        sums = rank_local.sequential_over_ranks(np.zeros((2, n_datasets)), add_ratios)
        p = np.where(cat["partiality"] > 0, cat["partiality"], 1.0)
        ratio = cat["i_sum"] / p
        del p
        local_max = np.full(n_datasets, -np.inf)
        nonempty = np.flatnonzero(np.diff(row_start) > 0)
        if nonempty.size:
            local_max[nonempty] = np.maximum.reduceat(ratio, row_start[nonempty])
        del ratio
        maxima = rank_local.maximum(local_max)
        candidates = [_candidates(float(sums[0, d]) / float(sums[1, d]), float(maxima[d]))
                      if sums[1, d] > 0 else [] for d in range(n_datasets)]
    n_passes = max((len(c) for c in candidates), default=0)
    table = np.zeros((n_datasets, max(n_passes, 1)))
    for d, values in enumerate(candidates):
        table[d, :len(values)] = values
    length = np.array([len(c) for c in candidates], dtype=np.int64)
    dataset_of_row = np.repeat(np.arange(n_datasets, dtype=np.int64), np.diff(row_start))
    scaled_i = np.empty(cat["i_sum"].size)
    scaled_sigma = np.empty(cat["i_sum"].size)
    scores = np.full((n_datasets, max(n_passes, 1)), -1.0)
    for k in range(n_passes):
        active = length > k
        row_imid = table[dataset_of_row, k]
        # the weights go into scaled_i: the kernel reads weight[r] before it writes it
        weight = profile_weight(cat["i_sum"], row_imid, out=scaled_i)
        scaled_combined_rows_kernel(cat["i_prf"], cat["v_prf"], cat["i_sum"], cat["v_sum"],
                                    cat["partiality"], cat["correction"], cat["g"],
                                    row_imid, weight, scaled_i, scaled_sigma)
        del weight, row_imid

        def add_rmeas(state):
            dataset_rmeas_kernel(scaled_i, scaled_sigma, group_start, dataset_groups, active,
                                 state)

        num, den, kept = rank_local.sequential_over_ranks(np.zeros((3, n_datasets)),
                                                          add_rmeas)
        ok = active & (kept >= 2) & (den > 0)
        scores[ok, k] = num[ok] / den[ok]
    chosen = []
    for d, values in enumerate(candidates):
        best, best_score = 0.0, None
        for k, imid in enumerate(values):
            score = float(scores[d, k])
            if log is not None:
                log(f"  Imid {imid:.6g}: Rmeas {score:.5f}")
            if score < 0:
                continue
            if best_score is None or score < best_score:
                best, best_score = imid, score
        chosen.append(best)
    return chosen


def choose_imid(datasets, imids=None, nproc=1, log=None, by_key_blocks=False):
    """The Imid with the lowest Rmeas over the pooled datasets.

    datasets: list of dicts with arrays asu_index (non-anomalous), i_prf, v_prf, i_sum,
    v_sum, partiality, correction, g (already restricted to the test selection); the dicts
    are emptied. by_key_blocks: Rmeas summed over the job's read-time key blocks when a job
    partition is active (rmeas_sorted; issue 11): each MPI rank then combines and sums only
    the rows of its own blocks, and the avg candidate's mean is a block-tree sum too
    (candidate_imids_sorted). Always so in a rank-local job (each rank's datasets hold only
    its own groups' rows). Without: per-thread chunks and np.mean, whose bits depend on
    nproc (the program calls it with key blocks only since session 12; many datasets go to
    choose_imids_per_dataset: see PER_DATASET_KEY_BLOCKS_MAX).
    """
    # the datasets' arrays are released as they are joined (the caller is done with them);
    # one dataset's (the joint analysis) are taken as they are: a joined copy of each beside
    # its original was this step's peak RSS (issue 10, memory)
    from ..backends import rank_local

    cat = {k: _joined_popped(datasets, k) for k in list(datasets[0])}
    if rank_local.total(cat["i_sum"].size) == 0:  # a rank-local job: over all ranks
        return 0.0
    by_key_blocks = by_key_blocks or rank_local.active()
    if not imids and not by_key_blocks:
        # per-thread chunks: the candidates as before session 10 (np.mean of the rows)
        imids = candidate_imids(cat["i_sum"], cat["partiality"])
    best, best_score = 0.0, None
    # Sorted by group once, array by array: every candidate's Rmeas then reads them in place.
    # (A cycle-following permutation in place saved one array here but cost 12-15x the CPU
    # of this gather: 0.15 s per array at 1e6 rows.)
    asu = cat.pop("asu_index")
    order, group_start = group_sort(asu)
    key_blocks = None
    if by_key_blocks:
        from ..backends import mpi_world
        from ..backends.rank_partition import key_blocks_of_groups

        key_blocks = key_blocks_of_groups(asu[order[group_start[:-1]]])
        if key_blocks is None and rank_local.active():
            raise RuntimeError("a rank-local job's Imid search needs the job's key blocks")
    del asu
    for name in list(cat):
        cat[name] = cat.pop(name)[order]
    del order
    if not imids:
        # from the sorted rows (a rank-local job: this rank's groups), split-invariant
        imids = candidate_imids_sorted(cat["i_sum"], cat["partiality"], group_start, nproc,
                                       key_blocks)
    # the joined, mapped and sorted-away arrays of the set-up left holes in the heaps under
    # the arrays the loop reads: their pages go back before the loop allocates (memory.py)
    release_free_memory(collect_cycles=False)
    scaled_i = np.empty(cat["i_sum"].size)
    scaled_sigma = np.empty(cat["i_sum"].size)
    rows = slice(None)
    if key_blocks is not None:  # only this rank's blocks are read by its Rmeas sums
        bounds, rank_blocks = key_blocks
        rank = mpi_world.rank()
        rows = slice(int(group_start[bounds[rank_blocks[rank]]]),
                     int(group_start[bounds[rank_blocks[rank + 1]]]))
    own = {name: values[rows] for name, values in cat.items()}
    for imid in imids:
        # the weights go into scaled_i: the kernel reads weight[r] before it writes
        # scaled_i[r] (one array of all test rows fewer at this step's peak; issue 10, memory)
        weight = profile_weight(own["i_sum"], imid, out=scaled_i[rows]) \
            if imid not in (0, 1) else scaled_i[rows]
        scaled_combined_kernel(own["i_prf"], own["v_prf"], own["i_sum"], own["v_sum"],
                               own["partiality"], own["correction"], own["g"], float(imid),
                               weight, scaled_i[rows], scaled_sigma[rows])
        del weight
        score = rmeas_sorted(scaled_i, scaled_sigma, group_start, nproc, key_blocks)
        if log is not None:
            log(f"  Imid {imid:.6g}: Rmeas {score:.5f}")
        if score < 0:
            continue
        if best_score is None or score < best_score:
            best, best_score = imid, score
    return best


# Rows combined per pass of apply_imid: its ~15 temporaries per row (columns read, flags,
# the summation and combined values, np.where results) were the peak RSS of 1e7-observation
# runs (1.2 GB of transients over all rows at once); per chunk they are ~30 MB.
APPLY_CHUNK_ROWS = 1 << 18


def apply_imid(table, imid, rows):
    """(intensity, variance) for `rows` of a prepared table with the chosen Imid (9),
    combined chunk by chunk (element by element, so the same values as all rows at once)."""
    rows = np.asarray(rows)
    if rows.size <= APPLY_CHUNK_ROWS:
        return _apply_imid_rows(table, imid, rows)
    intensity, variance = np.empty(rows.size), np.empty(rows.size)
    for start in range(0, rows.size, APPLY_CHUNK_ROWS):
        stop = min(start + APPLY_CHUNK_ROWS, rows.size)
        intensity[start:stop], variance[start:stop] = _apply_imid_rows(table, imid,
                                                                       rows[start:stop])
    return intensity, variance


def _apply_imid_rows(table, imid, rows):
    c = table.peek("prescaling_correction", rows)
    row_flags = table.peek("flags", rows)
    prf_flag = (row_flags & np.uint64(flags.integrated_prf)) != 0
    sum_flag = (row_flags & np.uint64(flags.integrated_sum)) != 0
    del row_flags
    p = table.peek("partiality", rows) if "partiality" in table else np.ones(rows.size)
    i_prf = table.peek("intensity.prf.value", rows)
    v_prf = table.peek("intensity.prf.variance", rows)
    i_sum = table.peek("intensity.sum.value", rows)
    v_sum = table.peek("intensity.sum.variance", rows)
    prf = (i_prf, v_prf)
    summ = combine_values(i_prf, v_prf, i_sum, v_sum, p, 1)
    if imid == 0:
        i = np.where(prf_flag, prf[0], summ[0])
        v = np.where(prf_flag, prf[1], summ[1])
    elif imid == 1:
        i = np.where(sum_flag, summ[0], prf[0])
        v = np.where(sum_flag, summ[1], prf[1])
    else:
        comb = combine_values(i_prf, v_prf, i_sum, v_sum, p, imid)
        both = prf_flag & sum_flag
        i = np.where(both, comb[0], np.where(prf_flag, prf[0], summ[0]))
        v = np.where(both, comb[1], np.where(prf_flag, prf[1], summ[1]))
    return i * c, v * c * c
