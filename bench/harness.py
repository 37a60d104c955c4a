"""Shared benchmark machinery: interleaved timing, machine ceilings, work counts, cases.

Timing rule (DESIGN.md, "Measuring"): contenders are timed in alternation (A B A B ...), each
in a burst of calls lasting about `burst_s`, after a short idle gap. OpenMP/OpenBLAS workers
keep spinning for tens of ms after a call; the gap lets them park so the next contender gets
both cores. The reported time is the median over rounds of (burst time / calls), with the
spread across rounds (min, max and the interquartile range).

A suite describes its rows as cheap `Spec`s (so the runner can filter and count them before
any array is allocated) and turns one spec into a `Case` (arrays + contenders) on demand.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import threading
import time
from typing import Callable, Optional

import numpy as np


# ---- timing ----


@dataclasses.dataclass
class Timing:
    """Per-call seconds of one contender: median and spread over rounds."""

    median_s: float
    min_s: float
    max_s: float
    q1_s: float
    q3_s: float
    calls: int  # calls per burst
    rounds: int

    def as_dict(self):
        """Plain dict for JSON."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TimingConfig:
    """How hard to time: rounds of bursts, burst length, idle gap, settling after NumPy."""

    rounds: int = 5
    burst_s: float = 0.03
    gap_s: float = 0.01
    warmup: int = 1
    settle: bool = True  # honour SETTLE_AFTER (off only for the tiny test mode)


# OpenBLAS (NumPy's BLAS) worker threads spin for ~100-200 ms after a call (measured: attnkit
# matmul ran at 108 GFLOP/s right after a NumPy burst, 169 after 0.1 s, 181 after 0.2 s, 193
# alone). A contender whose name mentions one of these gets that long a pause after its burst.
SETTLE_AFTER = {"numpy": 0.25}


def settle_time(name, gap_s, settle=True):
    """Idle time before the next burst, given that contender `name` ran the last one."""
    if settle:
        for key, t in SETTLE_AFTER.items():
            if key in name:
                return max(t, gap_s)
    return gap_s


def _quartiles(v):
    """(q1, q3) of a list (the list itself when it is too short to split)."""
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[2]


def _calibrate(fn, burst_s):
    """Calls per burst so that a burst lasts about burst_s (at least one call)."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    return max(1, int(burst_s / max(one, 1e-7)))


def time_interleaved(fns: dict, cfg: TimingConfig = TimingConfig()) -> dict:
    """Time each callable in `fns` (name -> fn) in alternating bursts; returns name -> Timing.

    Before each burst the runner sleeps `gap_s`, or longer after a burst of a contender listed
    in SETTLE_AFTER, so the previous contender's worker threads have gone idle. The order of
    contenders flips every round so none always runs first. The garbage collector is paused
    while timing (collected once before) so a collection never lands inside one burst.
    """
    names = list(fns)
    for _ in range(cfg.warmup):
        for n in names:
            fns[n]()
    calls = {n: _calibrate(fns[n], cfg.burst_s) for n in names}
    per_call = {n: [] for n in names}
    previous = names[-1]
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(cfg.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                time.sleep(settle_time(previous, cfg.gap_s, cfg.settle))
                previous = n
                f, c = fns[n], calls[n]
                t0 = time.perf_counter()
                for _ in range(c):
                    f()
                per_call[n].append((time.perf_counter() - t0) / c)
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {}
    for n, v in per_call.items():
        q1, q3 = _quartiles(v)
        out[n] = Timing(statistics.median(v), min(v), max(v), q1, q3, calls[n], len(v))
    return out


# ---- work per call (DESIGN.md: FLOP and byte conventions) ----


def matmul_flops(m, n, k, batch=1):
    """2*M*N*K per matrix product."""
    return 2.0 * batch * m * n * k


def window_pairs(sq, sk, left, right):
    """(query, key) pairs a top-left aligned sliding window (left, right) allows; -1 = unbounded."""
    i = np.arange(sq)
    lo = np.maximum(0, i - left) if left >= 0 else np.zeros_like(i)
    hi = np.minimum(sk - 1, i + right) if right >= 0 else np.full_like(i, sk - 1)
    return int(np.maximum(hi - lo + 1, 0).sum())


def attention_flops(b, h, sq, sk, d, dv=None, causal=False, window=None):
    """Forward: 2*B*H*Sq*Sk*(D + Dv) (= 4*B*H*Sq*Sk*D), halved for causal (DESIGN.md).

    A sliding `window` (left, right) counts only the pairs it allows (kernels skip the rest).
    Bool/float masks are counted dense: the kernel cannot know they are sparse.
    """
    dv = d if dv is None else dv
    pairs = window_pairs(sq, sk, *window) if window is not None else sq * sk
    f = 2.0 * b * h * pairs * (d + dv)
    return f / 2 if causal else f


def attention_bwd_flops(b, h, sq, sk, d, causal=False):
    """Backward alone: 2.5x the forward (DESIGN.md). fwd+bwd is 3.5x."""
    return 2.5 * attention_flops(b, h, sq, sk, d, causal=causal)


def kv_bytes(b, sk, hkv, d, itemsize):
    """Bytes of K and V one decode step must read: 2 * B * Sk * Hkv * D * itemsize."""
    return 2.0 * b * sk * hkv * d * itemsize


def softmax_bytes(nbytes):
    """Softmax reads x and writes out once each."""
    return 2.0 * nbytes


# ---- machine ceilings, measured in the same run ----


def _parallel(fn_for_slice, parts):
    """Run fn_for_slice(0..parts-1) on that many Python threads and wait."""
    ths = [threading.Thread(target=fn_for_slice, args=(i,)) for i in range(parts)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()


CEILING_SIZES = {  # mode -> (sgemm N, bytes of the copy/read buffer)
    "tiny": (256, 8 << 20),
    "quick": (2048, 256 << 20),  # 256 MB: far past any cache
    "full": (4096, 512 << 20),
}


class _Null:
    """A do-nothing context manager (threadpoolctl absent)."""

    def __enter__(self):
        """Nothing to set up."""
        return self

    def __exit__(self, *a):
        """Do not swallow exceptions."""
        return False


def measure_ceilings(threads: int, mode="quick") -> dict:
    """Large-sgemm GFLOP/s (NumPy/BLAS) and copy / read GB/s with `threads` threads.

    copy_gbs counts read + write bytes; read_gbs is a reduction over the buffer. Threads for
    copy/read are Python threads on NumPy calls that release the GIL. A ceiling is what the
    machine can do, so each is taken from the best of its rounds (bursts of 0.2 s): on a shared
    machine the median round can land in someone else's build and halve the ceiling.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        threadpool_limits = None
    n, buf = CEILING_SIZES[mode]
    cfg = TimingConfig(rounds=3 if mode == "tiny" else 5,
                       burst_s=0.01 if mode == "tiny" else 0.2, settle=mode != "tiny")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ctx = threadpool_limits(threads, user_api="blas") if threadpool_limits else _Null()
    with ctx:
        t = time_interleaved({"sgemm": lambda: a @ b}, cfg)["sgemm"]
    sgemm = matmul_flops(n, n, n) / t.min_s / 1e9
    del a, b

    size = buf // 4
    src = np.ones(size, np.float32)
    dst = np.empty_like(src)
    parts = max(1, threads)
    bounds = np.linspace(0, size, parts + 1).astype(np.int64)

    def copy_slice(i):
        """Copy slice i of the buffer."""
        np.copyto(dst[bounds[i] : bounds[i + 1]], src[bounds[i] : bounds[i + 1]])

    def read_slice(i):
        """Read (sum) slice i of the buffer."""
        src[bounds[i] : bounds[i + 1]].sum()

    timing = time_interleaved(
        {"copy": lambda: _parallel(copy_slice, parts), "read": lambda: _parallel(read_slice, parts)},
        cfg,
    )
    return {
        "sgemm_gflops": sgemm,
        "sgemm_n": n,
        "copy_gbs": 2 * src.nbytes / timing["copy"].min_s / 1e9,  # read + write
        "read_gbs": src.nbytes / timing["read"].min_s / 1e9,
        "buffer_mb": src.nbytes >> 20,
        "stat": "best round",
    }


CEILING_KEYS = {"sgemm": "sgemm_gflops", "copy": "copy_gbs", "read": "read_gbs"}
UNIT_OF_CEILING = {"sgemm": "GFLOP/s", "copy": "GB/s", "read": "GB/s"}
UNIT_SCALE = {"GFLOP/s": 1e9, "GB/s": 1e9, "tok/s": 1.0}


# ---- specs, cases and results ----


class SuiteUnavailable(Exception):
    """Raised by a suite's `missing()` check path: the API it measures is not there yet."""


@dataclasses.dataclass
class Spec:
    """A row before any array exists: what the runner filters, counts and shows.

    `name` is unique and stable across runs (--compare matches rows by it and the thread
    count); `shape` is matched by --shape, `dtype` by --dtype; `heavy` rows get at most
    `HEAVY_ROUNDS` rounds in quick mode.
    """

    suite: str
    name: str
    shape: str
    dtype: str = "float32"
    params: dict = dataclasses.field(default_factory=dict)
    heavy: bool = False


HEAVY_ROUNDS = 3


@dataclasses.dataclass
class Case:
    """One benchmark row: contenders computing the same thing, timed interleaved.

    `contenders` maps a name to a zero-argument callable returning its result; `subject` is
    attnkit's entry. Every contender's result is compared with `reference`'s (default: the
    first contender that is not the subject) by `check(result, reference_result)`, which
    returns an error message or None; this runs before timing. `work` is FLOPs (ceiling
    "sgemm"), bytes (ceiling "copy" / "read") or tokens (unit "tok/s", no ceiling) per call.
    `derive(timings) -> dict` adds derived numbers (e.g. adapter overhead) to the row.
    """

    suite: str
    name: str
    contenders: dict
    subject: str = "attnkit"
    reference: Optional[str] = None
    work: float = 0.0
    ceiling: Optional[str] = "sgemm"
    unit: Optional[str] = None
    check: Optional[Callable] = None
    derive: Optional[Callable] = None
    params: dict = dataclasses.field(default_factory=dict)

    def unit_name(self):
        """The unit of `work / time`: explicit, else implied by the ceiling."""
        if self.unit:
            return self.unit
        return UNIT_OF_CEILING.get(self.ceiling) if self.work else None

    def reference_name(self):
        """Whose result the others are checked against."""
        if self.reference:
            return self.reference
        others = [n for n in self.contenders if n != self.subject]
        return others[0] if others else self.subject


def ceiling_value(ceiling, ceilings: dict):
    """The measured ceiling a row is compared against, or None."""
    key = CEILING_KEYS.get(ceiling)
    return ceilings.get(key) if key else None


def _short(e: BaseException) -> str:
    """One line naming an exception, for mismatch messages."""
    msg = str(e).strip().splitlines()
    return f"raised {type(e).__name__}: {msg[0][:160] if msg else ''}"


def check_case(case: Case) -> dict:
    """Run every contender once and compare with the reference; returns name -> error text.

    A contender that raises is reported (and is then left out of the timing).
    """
    ref = case.reference_name()
    errors, results = {}, {}
    for n, f in case.contenders.items():
        try:
            results[n] = f()
        except Exception as e:  # a broken contender is a finding, not a crash
            errors[n] = _short(e)
    if case.check is not None and ref in results:
        for n, res in results.items():
            if n == ref:
                continue
            try:
                msg = case.check(res, results[ref])
            except Exception as e:
                msg = "check " + _short(e)
            if msg:
                errors[n] = msg
    elif ref not in results and case.check is not None:
        for n in results:
            errors.setdefault(n, f"reference {ref!r} failed, nothing to check against")
    return errors


def run_case(case: Case, ceilings: dict, cfg: TimingConfig) -> dict:
    """Check, then time; returns a JSON-ready row (schema in bench/README.md)."""
    unit = case.unit_name()
    row = {
        "suite": case.suite,
        "name": case.name,
        "params": case.params,
        "unit": unit,
        "ceiling": case.ceiling,
        "work": case.work,
        "subject": case.subject,
        "reference": case.reference_name(),
        "mismatch": {},
        "timings": {},
        "speedup": {},
        "extra": {},
    }
    row["mismatch"] = check_case(case)
    runnable = {n: f for n, f in case.contenders.items()
                if not (n in row["mismatch"] and row["mismatch"][n].startswith("raised"))}
    if case.subject not in runnable:
        return row
    timings = time_interleaved(runnable, cfg)
    ceil = ceiling_value(case.ceiling, ceilings)
    for n, t in timings.items():
        r = case.work / t.median_s / UNIT_SCALE[unit] if (case.work and unit) else None
        row["timings"][n] = dict(t.as_dict(), rate=r,
                                 fraction_of_ceiling=(r / ceil if (r and ceil) else None))
    subj = timings[case.subject].median_s
    row["speedup"] = {n: t.median_s / subj for n, t in timings.items() if n != case.subject}
    if case.derive is not None:
        row["extra"] = case.derive(timings)
    return row
