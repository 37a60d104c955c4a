"""Shared benchmark machinery: interleaved timing, machine ceilings, cases and results.

Timing rule (DESIGN.md, "Measuring"): contenders are timed in alternation (A B A B ...), each
in a burst of calls lasting about `burst_s`, after a short idle gap. OpenMP/OpenBLAS workers
keep spinning for tens of ms after a call; the gap lets them park so the next contender gets
both cores. The reported time is the median over rounds of (burst time / calls), with the
spread (min, max) across rounds.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import threading
import time
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    calls: int

    def as_dict(self):
        return dataclasses.asdict(self)


def _calibrate(fn, burst_s):
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    return max(1, int(burst_s / max(one, 1e-7)))


# OpenBLAS (NumPy's BLAS) worker threads spin for ~100-200 ms after a call (measured: attnkit
# matmul ran at 108 GFLOP/s right after a NumPy burst, 169 after 0.1 s, 181 after 0.2 s, 193
# alone). A contender whose name mentions one of these gets that long a pause after its burst.
SETTLE_AFTER = {"numpy": 0.25}


def settle_time(name, gap_s):
    for key, t in SETTLE_AFTER.items():
        if key in name:
            return max(t, gap_s)
    return gap_s


def time_interleaved(fns: dict, *, rounds=7, burst_s=0.03, gap_s=0.01, warmup=2) -> dict:
    """Time each callable in `fns` (name -> fn) in alternating bursts; returns name -> Timing.

    Before each burst the runner sleeps `gap_s`, or longer after a burst of a contender listed
    in SETTLE_AFTER, so the previous contender's worker threads have gone idle.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    calls = {n: _calibrate(fns[n], burst_s) for n in names}
    per_call = {n: [] for n in names}
    previous = names[-1]
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate who goes first
        for n in order:
            time.sleep(settle_time(previous, gap_s))
            previous = n
            f, c = fns[n], calls[n]
            t0 = time.perf_counter()
            for _ in range(c):
                f()
            per_call[n].append((time.perf_counter() - t0) / c)
    return {
        n: Timing(statistics.median(v), min(v), max(v), calls[n]) for n, v in per_call.items()
    }


# ---- machine ceilings, measured in the same run ----


def _parallel(fn_for_slice, parts):
    ths = [threading.Thread(target=fn_for_slice, args=(i,)) for i in range(parts)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()


def measure_ceilings(threads: int, quick=True) -> dict:
    """Large-sgemm GFLOP/s (NumPy/BLAS) and copy / read GB/s with `threads` threads."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    n = 2048 if quick else 4096
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    ctx = threadpool_limits(threads, user_api="blas") if threadpool_limits else _Null()
    with ctx:
        t = time_interleaved({"sgemm": lambda: a @ b}, rounds=5, burst_s=0.2)["sgemm"]
    sgemm = 2 * n**3 / t.median_s / 1e9

    size = (256 << 20) // 4  # 256 MB of fp32: far past any cache
    src = np.ones(size, np.float32)
    dst = np.empty_like(src)
    parts = max(1, threads)
    bounds = np.linspace(0, size, parts + 1).astype(np.int64)

    def copy_slice(i):
        np.copyto(dst[bounds[i] : bounds[i + 1]], src[bounds[i] : bounds[i + 1]])

    def read_slice(i):
        src[bounds[i] : bounds[i + 1]].sum()

    timing = time_interleaved(
        {"copy": lambda: _parallel(copy_slice, parts), "read": lambda: _parallel(read_slice, parts)},
        rounds=5, burst_s=0.2, warmup=1,
    )
    return {
        "sgemm_gflops": sgemm,
        "sgemm_n": n,
        "copy_gbs": 2 * src.nbytes / timing["copy"].median_s / 1e9,  # read + write
        "read_gbs": src.nbytes / timing["read"].median_s / 1e9,
    }


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---- cases and results ----


@dataclasses.dataclass
class Case:
    """One benchmark row: contenders computing the same thing, timed interleaved.

    `contenders` maps a name to a zero-argument callable returning its result; `subject` is
    attnkit's entry, `baselines` the others. `check(subject_result, baseline_result)` returns
    an error message or None; it runs before timing. `work` is flops (ceiling "sgemm") or
    bytes (ceiling "copy" / "read") per call.
    """

    suite: str
    name: str
    contenders: dict
    subject: str = "attnkit"
    work: float = 0.0
    ceiling: str = "sgemm"
    check: Optional[Callable] = None
    params: dict = dataclasses.field(default_factory=dict)


def rate(case: Case, seconds: float) -> float:
    """GFLOP/s or GB/s."""
    return case.work / seconds / 1e9


def ceiling_value(case: Case, ceilings: dict) -> float:
    return {
        "sgemm": ceilings["sgemm_gflops"],
        "copy": ceilings["copy_gbs"],
        "read": ceilings["read_gbs"],
    }[case.ceiling]


def run_case(case: Case, ceilings: dict, rounds=7, burst_s=0.03) -> dict:
    """Check, then time; returns a JSON-ready row."""
    row = {
        "suite": case.suite,
        "name": case.name,
        "params": case.params,
        "unit": "GFLOP/s" if case.ceiling == "sgemm" else "GB/s",
        "ceiling": case.ceiling,
        "mismatch": {},
        "timings": {},
    }
    results = {n: f() for n, f in case.contenders.items()}
    if case.check is not None:
        for n, res in results.items():
            if n == case.subject:
                continue
            msg = case.check(results[case.subject], res)
            if msg:
                row["mismatch"][n] = msg
    del results
    timings = time_interleaved(case.contenders, rounds=rounds, burst_s=burst_s)
    ceil = ceiling_value(case, ceilings)
    for n, t in timings.items():
        r = rate(case, t.median_s) if case.work else None
        row["timings"][n] = dict(
            t.as_dict(), rate=r, fraction_of_ceiling=(r / ceil if r else None)
        )
    subj = timings[case.subject].median_s
    row["speedup"] = {n: t.median_s / subj for n, t in timings.items() if n != case.subject}
    return row


# ---- environment ----


def git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import attnkit

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "attnkit": attnkit.__version__,
        "attnkit_isa": attnkit.info()["isa"],
        "git_commit": git_commit(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info
