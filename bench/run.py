#!/usr/bin/env python3
"""attnkit microbenchmarks: one runner for every suite.

    python bench/run.py                          # quick sweep (under 2 minutes at 2 threads)
    python bench/run.py --full                   # the whole sweep
    python bench/run.py --suite attention --shape S1024 --dtype f32 --threads 1,2
    python bench/run.py --full --json out.json --plot docs/   # README table and plots
    python bench/run.py --compare old.json       # speedup per case against an earlier run
    python bench/run.py --load out.json --plot docs/          # re-report a saved run

Suites: softmax, matmul, attention (prefill), decode, backward, hf; and cp (ring attention on
W = 1, 2, 4 local processes), only when named with --suite cp. Every case first checks
attnkit's result against the contender it is compared to (a mismatch is printed loudly and
makes the exit status 1), then times the contenders interleaved in bursts; the table shows
attnkit's median and spread, its rate, the fraction of the machine ceiling measured in the
same run (sgemm GFLOP/s, copy or read GB/s; bandwidth ceilings on a buffer 4x the last-level
cache) and each contender's time / attnkit's time. Memory-bound rows whose data is under 2x
the last-level cache say "fits in L3" instead of a % of the DRAM ceiling; a row above 100% of
its ceiling is printed as a CEILING ERROR. A suite whose attnkit API is missing is skipped
with a one-line notice.
The JSON schema is documented in bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import env  # noqa: E402
import harness  # noqa: E402
import report  # noqa: E402
from suites import OPTIONAL  # noqa: E402
from suites import ORDER as SUITES  # noqa: E402
from suites.common import canonical_dtype  # noqa: E402

SCHEMA = "attnkit-bench/3"  # 3: ceilings past the LLC, best of methods; cache-resident rows
ROUNDS = {"tiny": 2, "quick": 5, "full": 9}
BURST_S = {"tiny": 0.002, "quick": 0.03, "full": 0.05}


def _llc_bytes():
    """The machine's last-level cache in bytes (env.llc_info)."""
    return env.llc_info()["bytes"]


@dataclasses.dataclass
class Config:
    """What the suites see: the mode (tiny | quick | full) and the last-level cache size (bytes),
    from which memory-bound suites size a row that must come from DRAM."""

    mode: str
    llc_bytes: int = dataclasses.field(default_factory=_llc_bytes)


def _dtype_arg(name: str) -> str:
    """--dtype through canonical_dtype, its message kept (argparse drops a ValueError's)."""
    try:
        return canonical_dtype(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fail(msg: str):
    """A usage error found after parsing: message on stderr, exit status 2 (as argparse's)."""
    print(f"run.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _read_results(path: str, option: str) -> dict:
    """A saved run (--load, --compare), read and checked before anything runs; SystemExit 2
    with a message naming the option for a missing, unreadable or foreign file (exit 1 means
    a case disagreed with its reference)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        _fail(f"{option} {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        _fail(f"{option} {path}: not JSON ({e})")
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list) or not \
            isinstance(results.get("machine"), dict):
        _fail(f"{option} {path}: not a bench run (no 'runs' / 'machine'; write one with --json)")
    return results


def parse_args(argv=None):
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run the whole sweep (default: quick)")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds
    ap.add_argument("--suite", action="append", choices=SUITES + OPTIONAL,
                    help="only this suite (repeatable); cp (context parallelism, W = 1, 2, 4 "
                         "local processes) runs only when named")
    ap.add_argument("--shape", action="append",
                    help="only cases whose shape label has all these words, e.g. 'S1024' or "
                         "'H32 causal' or '4096x4096' (repeatable: any of them)")
    ap.add_argument("--dtype", action="append", type=_dtype_arg,
                    help="only cases of this dtype (KV dtype for decode): f32, f16, bf16, f64, "
                         "i8, fp8 (repeatable)")
    ap.add_argument("--threads", default=str(min(2, os.cpu_count() or 1)),
                    help="comma-separated thread counts, each a full pass (default 2)")
    ap.add_argument("--json", metavar="PATH", help="write machine-readable results")
    ap.add_argument("--plot", metavar="DIR", help="write PNG plots (matplotlib) into DIR")
    ap.add_argument("--compare", metavar="OLD_JSON", help="print the speedup per case vs an earlier run")
    ap.add_argument("--load", metavar="JSON", help="do not run: report (table, --plot, --compare) a saved run")
    ap.add_argument("--list", action="store_true", help="list the selected cases and exit")
    ap.add_argument("--rounds", type=int, help="timing rounds per case (default: 5 quick, 9 full)")
    ap.add_argument("--burst", type=float, help="seconds per burst of calls (default 0.03 / 0.05)")
    args = ap.parse_args(argv)
    if args.full and args.tiny:
        ap.error("--full and --tiny exclude each other")
    args.mode = "tiny" if args.tiny else ("full" if args.full else "quick")
    try:
        args.thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads must be comma-separated ints, got {args.threads!r}")
    if not args.thread_counts or min(args.thread_counts) < 1:
        ap.error("--threads needs counts >= 1")
    return args


def shape_matches(label: str, patterns) -> bool:
    """True when some pattern's words all occur among the label's words (or it equals it)."""
    if not patterns:
        return True
    words = set(label.split())
    return any(p == label or set(p.split()) <= words for p in patterns)


def selected_specs(mod, cfg, args) -> list:
    """A suite's specs after --shape and --dtype."""
    out = []
    for s in mod.specs(cfg):
        if not shape_matches(s.shape, args.shape):
            continue
        if args.dtype and s.dtype not in args.dtype:
            continue
        out.append(s)
    return out


def timing_config(args, spec) -> harness.TimingConfig:
    """Rounds and burst for one row: mode defaults, CLI overrides, fewer rounds if heavy."""
    rounds = args.rounds or ROUNDS[args.mode]
    if spec.heavy and args.mode == "quick" and not args.rounds:
        rounds = min(rounds, harness.HEAVY_ROUNDS)
    return harness.TimingConfig(rounds=rounds, burst_s=args.burst or BURST_S[args.mode],
                                gap_s=0.001 if args.mode == "tiny" else 0.01,
                                settle=args.mode != "tiny")


def _progress(total):
    """A tqdm bar on stderr when stdout is a terminal (and tqdm is installed), else None."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, leave=False, unit="case", dynamic_ncols=True)


def _emit(text, bar):
    """Print around the progress bar."""
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


def _error_row(spec, err):
    """A row for a case whose inputs or contenders could not even be built."""
    return {"suite": spec.suite, "name": spec.name, "params": spec.params, "unit": None,
            "ceiling": None, "work": 0.0, "subject": "attnkit", "reference": None,
            "mismatch": {"build": harness._short(err)}, "timings": {}, "speedup": {}, "extra": {},
            "footprint_bytes": None, "cache_fit": None, "ceiling_error": None,
            "beside": None}


def run_suites(args, cfg, machine) -> list:
    """Every selected suite at every thread count; returns the JSON `runs` list."""
    mods = {name: importlib.import_module(f"suites.{name}") for name in (args.suite or SUITES)}
    skipped = {name: mod.missing() for name, mod in mods.items()}
    plan = {n: selected_specs(m, cfg, args) for n, m in mods.items() if not skipped[n]}
    runs = []
    for nt in args.thread_counts:
        with env.ThreadLimit(nt):
            t_run = time.perf_counter()
            ceilings = harness.measure_ceilings(nt, args.mode, llc_bytes=cfg.llc_bytes)
            ceilings["wall_s"] = time.perf_counter() - t_run
            print(report.header(machine, nt, env.ThreadLimit.describe(), ceilings, args.mode),
                  flush=True)
            run = {"threads": nt, "threads_by_library": env.ThreadLimit.describe(),
                   "ceilings": ceilings, "skipped": {}, "rows": []}
            bar = _progress(sum(len(v) for v in plan.values()))
            for name, mod in mods.items():
                if skipped[name]:
                    run["skipped"][name] = skipped[name]
                    _emit(f"\n## {name}: skipped ({skipped[name]})", bar)
                    continue
                if not plan[name]:
                    continue
                _emit(report.suite_title(name), bar)
                for spec in plan[name]:
                    if bar is not None:
                        bar.set_description(spec.name[:40])
                    t_row = time.perf_counter()
                    try:
                        case = mod.build(spec)
                    except Exception as e:
                        row = _error_row(spec, e)
                    else:
                        row = harness.run_case(case, ceilings, timing_config(args, spec))
                        del case
                    row["threads"] = nt
                    row["wall_s"] = time.perf_counter() - t_row
                    run["rows"].append(row)
                    _emit(report.format_row(row, report.llc_label(machine)), bar)
                    if bar is not None:
                        bar.update()
            if bar is not None:
                bar.close()
            run["wall_s"] = time.perf_counter() - t_run
            run["loadavg_end"] = env.loadavg()
        runs.append(run)
    return runs


def list_cases(args, cfg):
    """--list: the selected rows, one per line."""
    for name in args.suite or SUITES:
        mod = importlib.import_module(f"suites.{name}")
        why = mod.missing()
        specs = selected_specs(mod, cfg, args)
        print(f"## {name}" + (f" (skipped: {why})" if why else f" ({len(specs)} cases)"))
        for s in specs:
            print(f"  {s.name}" + ("  [heavy]" if s.heavy else ""))


def print_saved(results):
    """--load: the tables of a saved run."""
    for run in results["runs"]:
        print(f"# saved run: {run['threads']} threads, commit {results['machine'].get('git_commit')}")
        suite = None
        for row in run["rows"]:
            if row["suite"] != suite:
                suite = row["suite"]
                print(report.suite_title(suite))
            print(report.format_row(row, report.llc_label(results["machine"])))


def main(argv=None) -> int:
    """Run (or load), print, write JSON/plots, compare; 1 if any case mismatched, else 0."""
    args = parse_args(argv)
    cfg = Config(mode=args.mode)
    if args.list:
        list_cases(args, cfg)
        return 0
    old = _read_results(args.compare, "--compare") if args.compare else None
    if args.load:
        results = _read_results(args.load, "--load")
        print_saved(results)
    else:
        if not any(selected_specs(importlib.import_module(f"suites.{n}"), cfg, args)
                   for n in args.suite or SUITES):
            _fail("no case matches --suite / --shape / --dtype (--list shows what each selects)")
        t0 = time.perf_counter()
        machine = env.machine_info(args.thread_counts[0])
        cfg.llc_bytes = machine["llc"]["bytes"]
        results = {"schema": SCHEMA, "machine": machine,
                   "config": {"mode": args.mode, "threads": args.thread_counts,
                              "suites": args.suite or SUITES, "shape": args.shape,
                              "dtype": args.dtype, "rounds": args.rounds, "burst_s": args.burst,
                              "argv": sys.argv[1:] if argv is None else list(argv)},
                   "runs": []}
        results["runs"] = run_suites(args, cfg, machine)
        results["wall_s"] = time.perf_counter() - t0
    text, n_bad = report.summary(results)
    print("\n" + text)
    if old is not None:
        print(report.compare(old, results))
        results["compare"] = {"old_commit": old["machine"].get("git_commit"),
                              "rows": report.compare_rows(old, results)}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        import plots

        for path in plots.write_plots(results, args.plot):
            print(f"wrote {path}")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
