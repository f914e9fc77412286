#!/usr/bin/env python
"""Two checkouts of dials-vmerge run end to end on the same files, alternately.

On a shared machine the load drifts between runs; alternating before/after runs on the same
simulated files, and recording the CPU seconds of each dials.vmerge process next to its wall
time, is what makes a before/after comparison readable there. Each run uses run.py's
run_end_to_end (peak RSS from the child's VmHWM) with PYTHONPATH set to one checkout.

    python benchmarks/ab_end_to_end.py --before /tmp/main --after . \
        --data /tmp/wedges200x5000 --repeats 3 --out ab.json model=physical

--data holds simulated.expt and simulated.refl (e.g. written by dials.vmerge.simulate or
run.py --workdir); trailing arguments are PHIL for dials.vmerge.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as harness  # noqa: E402


def one_run(code_root, data, workdir, phil):
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    for name in ("simulated.expt", "simulated.refl"):
        os.symlink(os.path.join(os.path.abspath(data), name), os.path.join(workdir, name))
    os.environ["PYTHONPATH"] = os.path.abspath(code_root)
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, peak, _, code, tail = harness.run_end_to_end(workdir, "simulated.expt",
                                                          "simulated.refl", phil)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": peak, "returncode": code,
            "load_before": load, "load_after": os.getloadavg()[0], "stderr_tail": tail}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="checkout run first in each pair")
    parser.add_argument("--after", required=True, help="checkout run second in each pair")
    parser.add_argument("--data", required=True, help="folder with simulated.expt/.refl")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="ab_results.json")
    parser.add_argument("phil", nargs="*", help="PHIL arguments for dials.vmerge")
    args = parser.parse_args(argv)
    records = []
    workdir = tempfile.mkdtemp(prefix="vmerge_ab_")
    try:
        for repeat in range(args.repeats):
            for label, root in (("before", args.before), ("after", args.after)):
                record = one_run(root, args.data, os.path.join(workdir, label), args.phil)
                record.update(label=label, repeat=repeat, code_root=os.path.abspath(root))
                records.append(record)
                print(json.dumps(record), flush=True)
                with open(args.out, "w") as f:
                    json.dump({"data": os.path.abspath(args.data), "phil": args.phil,
                               "records": records}, f, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
