"""One MPI rank of a benchmarked run: `mpiexec -n N python benchmarks/mpi_rank.py OUT PROGRAM ARGS`.

Runs the dials.vmerge program PROGRAM (e.g. dials.vmerge) in this process and, when it ends,
writes OUT.rank<r>.json with this rank's peak RSS (MiB) and its reduction statistics
(seconds in the Allgatherv of block-sum tree nodes, their number and bytes). Benchmark-only.
"""

import json
import os
import resource
import sys

import dials_vmerge  # noqa: F401  (before numba/scipy.special)


SHARDED = {"seconds": 0.0, "calls": 0}


def time_sharded_work():
    """Wrap the evaluations that MPI shards (target and gradient, normal matrix, fused
    physical pass: all block sums; the least-squares target's model evaluations) with
    timers; the exchanges inside are subtracted later."""
    import time

    from dials_vmerge.scaling import target

    def timed(function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                SHARDED["seconds"] += time.perf_counter() - start
                SHARDED["calls"] += 1
        return wrapper

    # every sharded sum of the target module goes through blockwise_sum (its exchange inside)
    target.blockwise_sum = timed(target.blockwise_sum)
    # the least-squares target's model evaluations (g and its derivatives), which under MPI
    # run on the rank's own rows (RankShare); never nested in a blockwise_sum
    target.ScalingTarget._ell = timed(target.ScalingTarget._ell)
    target.ScalingTarget._rank_ell = timed(target.ScalingTarget._rank_ell)


def heap_breakdown():
    """At a new RSS peak: anonymous vs file-backed RSS (smaps_rollup) and glibc's heap
    counters (mallinfo2: bytes in use, free inside the heaps, mmapped), in MiB, to tell the
    live data from the heaps' free holes."""
    import ctypes

    out = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("Rss", "Anonymous", "Pss_File", "Pss_Anon"):
                    out[name] = int(rest.split()[0]) / 1024.0
    except OSError:
        pass
    try:
        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
        out.update({"heap_mib": info.arena / 2 ** 20, "in_use_mib": info.uordblks / 2 ** 20,
                    "free_in_heap_mib": info.fordblks / 2 ** 20,
                    "mmapped_mib": info.hblkhd / 2 ** 20, "mmapped_blocks": info.hblks,
                    "top_free_mib": info.keepcost / 2 ** 20})
    except (OSError, AttributeError):
        pass
    return out


class PeakSampler:
    """With VMERGE_PEAK_STACK=1: a thread samples this rank's RSS every 20 ms and keeps the
    main thread's Python stack at the highest sample, to say what makes the peak."""

    def __init__(self):
        import threading

        self.peak_mib, self.stack, self.timeline = 0.0, [], []
        self.main = threading.main_thread().ident
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        import traceback

        page = os.sysconf("SC_PAGE_SIZE")
        while not self.stop.wait(0.02):
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page / 2 ** 20
            frame = sys._current_frames().get(self.main)
            if frame is not None and len(self.timeline) < 20000:
                where = [f"{s.filename.split('/')[-1]}:{s.lineno} {s.name}"
                         for s in traceback.extract_stack(frame)
                         if "dials_vmerge" in s.filename or "command_line" in s.filename]
                self.timeline.append((round(rss, 1), " < ".join(where[::-1][:3])))
            if rss > self.peak_mib:
                self.peak_mib = rss
                self.heap = heap_breakdown()
                self.stack = [f"{s.filename.split('dials_vmerge/')[-1]}:{s.lineno} {s.name}"
                              for s in traceback.extract_stack(frame)][-12:]

    def record(self):
        self.stop.set()
        self.thread.join()
        return {"sampled_peak_mib": self.peak_mib, "stack_at_peak": self.stack,
                "heap_at_peak": getattr(self, "heap", None),
                "rss_timeline_20ms": self.timeline}


def main() -> int:
    out, program, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    time_sharded_work()
    sampler = PeakSampler() if os.environ.get("VMERGE_PEAK_STACK") else None
    module = {"dials.vmerge": "vmerge", "dials.vmerge.merge": "merge",
              "dials.vmerge.stats": "stats"}[program]
    import importlib

    entry = importlib.import_module(f"dials_vmerge.command_line.{module}").main
    code = entry(args)
    from dials_vmerge.backends import mpi_world

    record = {"rank": mpi_world.rank(), "ranks": mpi_world.n_ranks(), "exit_code": code,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    # CPU seconds of this rank (user + system, all threads): on a shared machine the wall time
    # of N ranks also measures the other jobs; the strong-scaling model is fitted to CPU time
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record["cpu_s"] = usage.ru_utime + usage.ru_stime
    stats = mpi_world.communication_stats()
    record.update({f"comm_{k}": v for k, v in stats.items()})
    record["sharded_compute_s"] = max(0.0, SHARDED["seconds"] - stats["seconds"])
    record["sharded_calls"] = SHARDED["calls"]
    if sampler is not None:
        record.update(sampler.record())
    with open(f"{out}.rank{record['rank']}.json", "w") as f:
        json.dump(record, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
