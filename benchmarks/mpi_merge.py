"""Per-rank peak memory of `dials.vmerge.merge` (or `dials.vmerge.stats`) on each MPI rank's
own rows (benchmark only).

    python benchmarks/mpi_merge.py SCALED.EXPT SCALED.REFL [--ranks 1,2] [--repeats 2]
        [--program merge|stats] [--json OUT.json] [--results benchmarks/mpi_results.json]
        [-- PROGRAM ARGS...]

For each N and repeat, `mpiexec -n N` (N = 1: no launcher) runs dials.vmerge.merge (or
dials.vmerge.stats) through benchmarks/mpi_rank.py with VMERGE_PEAK_STACK=1, in a fresh
directory: each rank's peak RSS (VmHWM) and where its sampled RSS peaked (the Python stack),
the program's wall time, the 1-minute load average before and after, the rows each rank held
(the log's MPI line), and whether the program's main output (merged.mtz;
dials.vmerge.stats.json) is byte-identical to the first N = 1 run's. --results adds the runs
under "merge_rank_rows" ("stats_rank_rows" for stats) to the benchmarks' MPI JSON.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
HERE = os.path.dirname(os.path.abspath(__file__))
RANK_ROWS = re.compile(r"rows per rank ([\d / ]+) of (\d+)")
# program -> (its log, the output compared with the first one-rank run's)
PROGRAMS = {"merge": ("dials.vmerge.merge.log", "merged.mtz"),
            "stats": ("dials.vmerge.stats.log", "dials.vmerge.stats.json")}


def one_run(expt, refl, n, directory, program="merge", extra=()):
    launcher = shutil.which("mpiexec", path=BIN + os.pathsep + os.environ.get("PATH", ""))
    out = os.path.join(directory, "peak")
    command = [sys.executable, os.path.join(HERE, "mpi_rank.py"), out,
               f"dials.vmerge.{program}", os.path.abspath(expt), os.path.abspath(refl),
               *extra]
    if n > 1:
        if launcher is None:
            raise SystemExit("no mpiexec (pip install 'dials-vmerge[mpi]')")
        command = [launcher, "-n", str(n)] + command
    env = dict(os.environ, VMERGE_PEAK_STACK="1")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(command, cwd=directory, check=True, timeout=1800, env=env,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    per_rank = []
    for r in range(n):
        record = json.load(open(f"{out}.rank{r}.json"))
        timeline = record.get("rss_timeline_20ms") or []
        at_peak = max(timeline, key=lambda x: x[0])[1] if timeline else None
        per_rank.append({"rank": r, "peak_rss_mib": record["peak_rss_mib"],
                         "sampled_peak_at": at_peak,
                         "exchange_s": record.get("comm_seconds"),
                         "exchanges": record.get("comm_reductions"),
                         "exchanged_mb": (record.get("comm_bytes_per_rank") or 0) / 1e6})
    log = open(os.path.join(directory, PROGRAMS[program][0])).read()
    match = RANK_ROWS.search(log)
    rows = [int(x) for x in match.group(1).split(" / ")] if match else None
    return {"ranks": n, "wall_s": wall, "load_average_before": load_before,
            "load_average_after": load_after, "rows_per_rank": rows, "per_rank": per_rank}


def run(expt, refl, ranks, repeats, program="merge", extra=()):
    results = []
    with tempfile.TemporaryDirectory(prefix="mpi_merge_") as tmp:
        reference = None
        for repeat in range(repeats):
            for n in ranks:
                directory = os.path.join(tmp, f"n{n}_r{repeat}")
                os.makedirs(directory)
                record = one_run(expt, refl, n, directory, program, extra)
                output = os.path.join(directory, PROGRAMS[program][1])
                if reference is None and n == 1:
                    reference = output
                record["output_identical_to_one_rank"] = (
                    None if reference is None else filecmp.cmp(output, reference, shallow=False))
                record["repeat"] = repeat
                results.append(record)
                print(row(record, results), flush=True)
    return results


def row(record, results):
    ones = [p["peak_rss_mib"] for r in results if r["ranks"] == 1 for p in r["per_rank"]]
    one = min(ones) if ones else None
    peaks = [p["peak_rss_mib"] for p in record["per_rank"]]
    ratio = "" if one is None else " / ".join(f"{p / one:.2f}" for p in peaks)
    rows = "" if record["rows_per_rank"] is None else " / ".join(map(str, record["rows_per_rank"]))
    return (f"| {record['ranks']} | {rows} | {' / '.join(f'{p:.0f}' for p in peaks)} | {ratio} | "
            f"{record['wall_s']:.1f} | {record['load_average_before']:.1f}-"
            f"{record['load_average_after']:.1f} | {record['output_identical_to_one_rank']} |")


def main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("expt")
    parser.add_argument("refl")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--results")
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="merge")
    parser.add_argument("extra", nargs="*", help="the program's parameters (after --)")
    args = parser.parse_args(argv)
    output = PROGRAMS[args.program][1]
    print("| ranks | rows per rank | peak RSS per rank (MiB) | / lowest one-rank peak | wall (s) "
          f"| load average | {output} identical |")
    print("|---|---|---|---|---|---|---|")
    results = run(args.expt, args.refl, [int(n) for n in args.ranks.split(",")], args.repeats,
                  args.program, args.extra)
    document = {"input": [args.expt, args.refl], "program": f"dials.vmerge.{args.program}",
                "parameters": args.extra, "compared": output,
                "machine": f"{os.cpu_count()} cores",
                "runs": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
    if args.results:
        with open(args.results) as f:
            existing = json.load(f)
        existing[f"{args.program}_rank_rows"] = document
        with open(args.results, "w") as f:
            json.dump(existing, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
