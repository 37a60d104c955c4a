#!/usr/bin/env python3
"""attnkit microbenchmarks: one runner for every suite.

    python bench/run.py                     # quick sweep (about 2 minutes at 2 threads)
    python bench/run.py --full              # the whole sweep
    python bench/run.py --suite softmax --threads 1,2 --json out.json

Every case first checks attnkit's result against the contender it is compared to, then
times them interleaved; the table shows the median, the spread, the ratio to attnkit and the
fraction of the machine ceiling (sgemm GFLOP/s or copy/read GB/s) measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402

SUITES = ["softmax", "matmul"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run the whole sweep (default: quick)")
    ap.add_argument("--suite", action="append", choices=SUITES, help="only this suite (repeatable)")
    ap.add_argument("--shape", action="append", help="only cases whose shape label matches")
    ap.add_argument("--threads", default="2", help="comma-separated thread counts (default 2)")
    ap.add_argument("--json", metavar="PATH", help="write machine-readable results")
    ap.add_argument("--rounds", type=int, default=7, help="timing rounds per case")
    return ap.parse_args(argv)


def set_threads(n):
    import attnkit

    attnkit.set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(n)
    except ImportError:
        return None


def fmt_row(row, subject="attnkit"):
    t = row["timings"]
    s = t[subject]
    parts = [f"{row['name']:<34}", f"{s['median_s'] * 1e3:9.3f} ms",
             f"[{s['min_s'] * 1e3:.3f}-{s['max_s'] * 1e3:.3f}]"]
    if s["rate"] is not None:
        parts.append(f"{s['rate']:7.1f} {row['unit']} ({100 * s['fraction_of_ceiling']:3.0f}% of {row['ceiling']})")
    for n, sp in row["speedup"].items():
        parts.append(f"{sp:5.2f}x vs {n}")
    line = "  ".join(parts)
    if row["mismatch"]:
        line += "  !!! MISMATCH: " + "; ".join(f"{k}: {v}" for k, v in row["mismatch"].items())
    return line


def main(argv=None):
    args = parse_args(argv)
    import attnkit

    thread_counts = [int(t) for t in args.threads.split(",")]
    suites = args.suite or SUITES
    results = {"machine": harness.machine_info(thread_counts[0]), "runs": []}
    for nt in thread_counts:
        limiter = set_threads(nt)
        print(f"# attnkit {attnkit.__version__}  isa={attnkit.info()['isa']}  threads={nt}  "
              f"cpu={results['machine']['cpu']}")
        ceilings = harness.measure_ceilings(nt, quick=not args.full)
        print(f"# ceilings: sgemm {ceilings['sgemm_gflops']:.1f} GFLOP/s (N={ceilings['sgemm_n']}), "
              f"copy {ceilings['copy_gbs']:.1f} GB/s, read {ceilings['read_gbs']:.1f} GB/s")
        run = {"threads": nt, "ceilings": ceilings, "rows": []}
        for suite in suites:
            mod = importlib.import_module(f"suites.{suite}")
            print(f"\n## {suite}")
            for case in mod.cases(args):
                row = harness.run_case(case, ceilings, rounds=args.rounds)
                row["threads"] = nt
                run["rows"].append(row)
                print(fmt_row(row), flush=True)
        results["runs"].append(run)
        if limiter is not None:
            limiter.restore_original_limits()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    bad = [r["name"] for run in results["runs"] for r in run["rows"] if r["mismatch"]]
    if bad:
        print(f"\n!!! {len(bad)} case(s) disagree with their reference: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
