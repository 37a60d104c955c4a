"""Shared benchmark machinery: interleaved timing, machine ceilings, work counts, cases.

Timing rule (docs/ARCHITECTURE.md, "Measuring"): contenders are timed in alternation (A B A B ...), each
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
# libgomp's workers (attnkit's and torch's, one pool when torch is loaded first) spin ~300k
# `pause`s after a region, ~10 ms on an Emerald Rapids core, and an OpenBLAS worker waiting for
# that core stalls NumPy's call for all of it (a NumPy and an attnkit or torch 128^3 product
# alternating: 8 ms per pair; bench/notes/matmul.md, "fixed cost of a small product"). A
# contender whose name mentions one of these waits that long before its burst.
SETTLE_BEFORE = {"numpy": 0.03}


def settle_time(name, gap_s, settle=True, next_name=""):
    """Idle time before the next burst (of contender `next_name`), given that contender `name`
    ran the last one."""
    t = gap_s
    if settle:
        for key, s in SETTLE_AFTER.items():
            if key in name:
                t = max(t, s)
        for key, s in SETTLE_BEFORE.items():
            if key in next_name:
                t = max(t, s)
    return t


def _quartiles(v):
    """(q1, q3) of a list (the list itself when it is too short to split)."""
    if len(v) < 2:
        return v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[2]


def _calibrate(fn, burst_s):
    """Calls per burst so that a burst lasts about burst_s (at least one call).

    A single timed call is not enough for short calls: the first one after another contender
    can wait milliseconds on that contender's spinning worker threads, and a 128^3 matmul
    timed so got bursts of 6 calls instead of ~1000. Calls are therefore timed until there
    are five and a tenth of a burst has passed, or half a burst has passed (one call of a heavy
    row), and the median of all but the first is taken."""
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= 6 and elapsed >= burst_s / 10) or elapsed >= burst_s / 2:
            break
    one = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return max(1, int(burst_s / max(one, 1e-7)))


def time_interleaved(fns: dict, cfg: TimingConfig = TimingConfig()) -> dict:
    """Time each callable in `fns` (name -> fn) in alternating bursts; returns name -> Timing.

    Before each burst the runner sleeps `gap_s`, or longer after a burst of a contender listed
    in SETTLE_AFTER or before one listed in SETTLE_BEFORE, so the previous contender's worker
    threads have gone idle; the warm-up calls and the calibration (calls per burst) pause the
    same way. The order of contenders flips every round so none always runs first. The garbage
    collector is paused while timing (collected once before) so a collection never lands inside
    one burst.
    """
    names = list(fns)
    previous = ""
    for _ in range(cfg.warmup):
        for n in names:
            time.sleep(settle_time(previous, 0.0, cfg.settle, n))
            fns[n]()
            previous = n
    calls = {}
    for n in names:  # with the same pauses as the bursts: calibration is a short burst
        time.sleep(settle_time(previous, cfg.gap_s, cfg.settle, n))
        calls[n], previous = _calibrate(fns[n], cfg.burst_s), n
    per_call = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(cfg.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                time.sleep(settle_time(previous, cfg.gap_s, cfg.settle, n))
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


# ---- work per call (docs/ARCHITECTURE.md, "Measuring": FLOP and byte conventions) ----


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
    """Forward: 2*B*H*Sq*Sk*(D + Dv) (= 4*B*H*Sq*Sk*D), halved for causal (docs/ARCHITECTURE.md, "Measuring").

    A sliding `window` (left, right) counts only the pairs it allows (kernels skip the rest).
    Bool/float masks are counted dense: the kernel cannot know they are sparse.
    """
    dv = d if dv is None else dv
    pairs = window_pairs(sq, sk, *window) if window is not None else sq * sk
    f = 2.0 * b * h * pairs * (d + dv)
    return f / 2 if causal else f


def attention_bwd_flops(b, h, sq, sk, d, causal=False):
    """Backward alone: 2.5x the forward (docs/ARCHITECTURE.md, "Measuring"). fwd+bwd is 3.5x."""
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


SGEMM_N = {"tiny": 256, "quick": 2048, "full": 4096}
# attnkit's GEMMs are also timed at this N (operands in L2): a ceiling is the best rate the
# machine shows, and a product whose blocks stay in cache runs faster than N = 4096 (Zen 5:
# attnkit's 512^3 at 101% of its own 4096^3 rate, a CEILING ERROR).
CACHED_GEMM_N = 512
# bf16 GEMMs are also timed (attnkit's and torch's) at these N below the sgemm's: on a Zen 5 both
# ran 1024^3 and 2048^3 at 107-112% of their 4096^3 rate (the --full run's CEILING ERRORs).
BF16_MID_GEMM_N = (1024, 2048)
# torch's bf16 GEMM is first timed once at CACHED_GEMM_N; below this share of the sgemm ceiling
# (no bf16 hardware path: 1 GFLOP/s on a CPU showing only AVX2, where one 2048^3 call took 17 s
# and the ceilings 7 minutes) it is not timed at the larger N.
BF16_SLOW_SHARE = 0.125
# Bandwidth ceilings read a buffer of at least CEILING_LLC_FACTOR x the last-level cache (and at
# least MIN_BUFFER): a 256 MB buffer sat inside a 300 MB L3 and an in-cache rate was taken for
# the machine's. Rows whose data is below DRAM_FACTOR x the LLC are reported as cache-resident.
CEILING_LLC_FACTOR = 4
DRAM_FACTOR = 2
MIN_BUFFER = {"tiny": 8 << 20, "quick": 256 << 20, "full": 512 << 20}
MAX_BUFFER_SHARE = 3  # the ceiling buffer stays under 1/3 of the available memory
BANDWIDTH_CEILINGS = ("copy", "read")


def ceiling_buffer_bytes(mode: str, llc_bytes: int, mem_available=None) -> int:
    """Bytes of the read-ceiling buffer: max(MIN_BUFFER, CEILING_LLC_FACTOR x LLC) in 64 MB
    steps, capped at 1/MAX_BUFFER_SHARE of the available memory; tiny mode: MIN_BUFFER."""
    if mode == "tiny":
        return MIN_BUFFER["tiny"]
    step = 64 << 20
    want = max(MIN_BUFFER[mode], CEILING_LLC_FACTOR * int(llc_bytes))
    want = -(-want // step) * step
    if mem_available:
        want = min(want, max(MIN_BUFFER[mode], (mem_available // MAX_BUFFER_SHARE) // step * step))
    return want


class _Null:
    """A do-nothing context manager (threadpoolctl absent)."""

    def __enter__(self):
        """Nothing to set up."""
        return self

    def __exit__(self, *a):
        """Do not swallow exceptions."""
        return False


def _blas_limit(n):
    """threadpoolctl's BLAS limit of n threads (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return _Null()
    return threadpool_limits(n, user_api="blas")


class _TorchThreads:
    """torch.set_num_threads(n) for a block, restored after (no-op without torch)."""

    def __init__(self, n):
        """Remember n."""
        self.n, self.prev, self.torch = n, None, None

    def __enter__(self):
        """Set torch's intra-op thread count."""
        try:
            import torch
        except ImportError:
            return self
        self.torch, self.prev = torch, torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *a):
        """Restore the previous count."""
        if self.torch is not None:
            self.torch.set_num_threads(self.prev)
        return False


def _torch_or_none():
    """torch if it imports, else None."""
    try:
        import torch

        return torch
    except ImportError:
        return None


def _attnkit_or_none():
    """attnkit if it imports, else None."""
    try:
        import attnkit

        return attnkit
    except ImportError:
        return None


def _best_rates(fns: dict, work: dict, cfg: TimingConfig) -> dict:
    """name -> work / best round's per-call time, the callables timed interleaved."""
    t = time_interleaved(fns, cfg)
    return {n: work[n] / t[n].min_s for n in fns}


def bandwidth_methods(buf, threads: int):
    """(copy, read) dicts of name -> (callable, bytes moved per call) on `threads` threads.

    Read (all of `buf`): each of `threads` Python threads reduces its own contiguous slice with
    an op that does far less arithmetic per byte than DRAM delivers (NumPy's SIMD max; a BLAS
    sdot of the slice with itself, BLAS held to one thread per caller; a BLAS sdot of the
    slice's first half with its second half: two streams per thread, as the decode kernel reads
    K and V, ran 23 GB/s where one stream ran 20-21 on a 2-core Xeon, and the decode row
    exceeded the one-stream ceiling), and torch's parallel sum on `threads` intra-op threads. NumPy's float sum is not used: its pairwise summation
    ran at ~8 GB/s per core even from L2, below DRAM speed: it measured the adder, not memory.
    Copy (read + write bytes): the first half of `buf` into the second half (each half is
    still 2x the LLC), by np.copyto per thread slice and by torch's parallel copy_.
    """
    parts = max(1, threads)
    half = buf.size // 2
    src, dst = buf[:half], buf[half : 2 * half]
    rb = np.linspace(0, buf.size, parts + 1).astype(np.int64)
    cb = np.linspace(0, half, parts + 1).astype(np.int64)

    def read_max(i):
        """SIMD max over slice i."""
        buf[rb[i] : rb[i + 1]].max()

    def read_dot(i):
        """BLAS sdot of slice i with itself (one load per element)."""
        seg = buf[rb[i] : rb[i + 1]]
        np.dot(seg, seg)

    def read_dot2(i):
        """BLAS sdot of slice i's two halves (two streams, one load per element)."""
        seg = buf[rb[i] : rb[i + 1]]
        m = seg.size // 2
        np.dot(seg[:m], seg[m : 2 * m])

    def copy_slice(i):
        """Copy slice i of the first half into the second half."""
        np.copyto(dst[cb[i] : cb[i + 1]], src[cb[i] : cb[i + 1]])

    read = {"numpy max": (lambda: _parallel(read_max, parts), buf.nbytes),
            "blas dot": (lambda: _parallel(read_dot, parts), buf.nbytes),
            "blas dot 2 streams": (lambda: _parallel(read_dot2, parts), buf.nbytes)}
    copy = {"numpy copyto": (lambda: _parallel(copy_slice, parts), 2 * dst.nbytes)}
    torch = _torch_or_none()
    if torch is not None:
        tb, ts, td = torch.from_numpy(buf), torch.from_numpy(src), torch.from_numpy(dst)
        read["torch sum"] = (lambda: tb.sum(), buf.nbytes)
        copy["torch copy_"] = (lambda: td.copy_(ts), 2 * dst.nbytes)
    return copy, read


# The bandwidth beside a row: memory-bound rows from DRAM also time a plain read (read rows) or
# copy (copy rows) of their own footprint, interleaved with the contenders. On a shared VM the
# memory rate moved by 20-50% between runs of a few minutes (Zen 5, 2026-12-01: read 51 to 89
# GB/s), so a % of the ceiling taken at the start of the run can land anywhere from 34% to 100%
# for the same kernel; the rate beside the row sees the same moments as the row
# (bench/notes/harness.md, "a read timed beside each DRAM row").
PROBE_NAME = "bandwidth beside"


def bandwidth_probe(kind: str, nbytes: int, threads: int, by_method=None):
    """(method, callable, bytes per call) for a row of ceiling `kind` ("read" or "copy"): one of
    `bandwidth_methods` on a fresh buffer of about `nbytes` (float32, every page written first;
    a copy moves its first half into its second and counts both), on `threads` threads. The
    BLAS methods are left out (each call would need a thread limit around it); of the rest the
    one the ceilings rated fastest (`by_method`: the ceilings' `read_by_method` or
    `copy_by_method`), torch's when nothing is rated."""
    buf = np.ones(max(2, int(nbytes) // 4), np.float32)
    copy, read = bandwidth_methods(buf, threads)
    methods = {k: v for k, v in (copy if kind == "copy" else read).items() if not k.startswith("blas")}
    rated = by_method or {}
    method = max(methods, key=lambda m: (rated.get(m, 0.0), m.startswith("torch")))
    fn, nb = methods[method]
    return method, fn, nb


def measure_ceilings(threads: int, mode="quick", llc_bytes=None, mem_available=None) -> dict:
    """Machine ceilings with `threads` threads, each the best of several independent methods.

    sgemm: NumPy (OpenBLAS), torch and attnkit fp32 GEMMs of N x N, and attnkit's of
    CACHED_GEMM_N (the fastest one: torch's MKL GEMM ran at 133% of NumPy's on an Emerald
    Rapids; on a Zen 5 both libraries reached 250 GFLOP/s at 2 threads, half of the AVX-512 FMA
    rate, and attnkit's own GEMM 450, so a ceiling of theirs alone put attnkit's fp32 rows at
    110-180%). bf16_gemm: the same for bf16 (`_bf16_gemm_rates`); bf16 rows are compared with it
    (ceiling "bf16"). read / copy: see `bandwidth_methods`, on one
    buffer of `ceiling_buffer_bytes` (4x the LLC; the copy moves its first half into its second
    half); copy_gbs counts read + write.
    A ceiling is what the machine can do, so each method's best round (bursts of ~0.2 s) is
    taken and the best method wins; every method's rate is kept in `*_by_method`. Warnings
    name a buffer that could not exceed the cache and a read ceiling below half the copy rate
    (a copy reads at half its counted rate, so a slower read op is arithmetic-bound).
    """
    import env

    if llc_bytes is None:
        llc_bytes = env.llc_info()["bytes"]
    if mem_available is None:
        mem_available = env.mem_available_bytes()
    n = SGEMM_N[mode]
    buf = ceiling_buffer_bytes(mode, llc_bytes, mem_available)
    tiny = mode == "tiny"
    cfg = TimingConfig(rounds=3 if tiny else 5, burst_s=0.01 if tiny else 0.2, settle=not tiny)
    torch = _torch_or_none()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    fns = {"numpy sgemm": lambda: a @ b}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns["torch mm"] = lambda: torch.mm(ta, tb)
    work = {k: matmul_flops(n, n, n) / 1e9 for k in fns}
    attnkit = _attnkit_or_none()
    if attnkit is not None:
        attnkit.set_num_threads(threads)
        _add_attnkit_gemms(attnkit, a, b, fns, work)
    with _blas_limit(threads), _TorchThreads(threads):
        sgemm = _best_rates(fns, work, cfg)
        bf16 = _bf16_gemm_rates(a, b, threads, torch, cfg, max(sgemm.values()))
    del a, b, fns

    data = np.ones(buf // 4, np.float32)  # written: every page is mapped before timing
    copy_m, read_m = bandwidth_methods(data, threads)
    both = dict(copy_m, **read_m)
    cfg = dataclasses.replace(cfg, burst_s=cfg.burst_s / 2)  # calls of 40-100 ms each
    with _blas_limit(1), _TorchThreads(threads):
        rates = _best_rates({k: f for k, (f, _) in both.items()},
                            {k: nb / 1e9 for k, (_, nb) in both.items()}, cfg)
    copy_by = {k: rates[k] for k in copy_m}
    read_by = {k: rates[k] for k in read_m}
    out = {
        "sgemm_gflops": max(sgemm.values()),
        "sgemm_n": n,
        "sgemm_by_method": sgemm,
        "bf16_gemm_gflops": max(bf16.values()) if bf16 else None,
        "bf16_gemm_by_method": bf16,
        "copy_gbs": max(copy_by.values()),  # read + write
        "copy_by_method": copy_by,
        "read_gbs": max(read_by.values()),
        "read_by_method": read_by,
        "buffer_mb": data.nbytes >> 20,
        "copy_buffer_mb": data.nbytes >> 21,  # source and destination: a half of it each
        "llc_bytes": int(llc_bytes),
        "buffer_vs_llc": data.nbytes / llc_bytes,
        "stat": "best round, best method",
        "threads": threads,
        "warnings": [],
    }
    if data.nbytes < DRAM_FACTOR * llc_bytes:
        out["warnings"].append(
            f"the {out['buffer_mb']} MB ceiling buffer is under {DRAM_FACTOR}x the "
            f"{llc_bytes >> 20} MB last-level cache: read/copy ceilings are cache rates")
    if out["read_gbs"] < 0.5 * out["copy_gbs"]:
        out["warnings"].append(
            f"read ceiling {out['read_gbs']:.1f} GB/s is under half the copy rate "
            f"{out['copy_gbs']:.1f} GB/s: the read ops are arithmetic-bound here")
    return out


def _bf16_gemm_rates(a, b, threads, torch, cfg, sgemm_gflops: float) -> dict:
    """bf16 x bf16 -> bf16 GEMMs of the sgemm's N x N (and CACHED_GEMM_N for attnkit, and the
    BF16_MID_GEMM_N below N for both) through attnkit's matmul (its best variant here:
    AVX512-BF16 or AMX when the CPU has them) and torch (oneDNN): the machine's bf16 matrix
    rate, shown beside the sgemm ceiling (method -> GFLOP/s; {} without either). Where one
    torch call at CACHED_GEMM_N runs below BF16_SLOW_SHARE x `sgemm_gflops`, torch is timed at
    that N only ("torch mm N=..."): its larger products would take minutes."""
    n = a.shape[0]
    mids = [m for m in BF16_MID_GEMM_N if CACHED_GEMM_N < m < n]
    fns, work = {}, {}
    try:
        import ml_dtypes

        import attnkit

        attnkit.set_num_threads(threads)
        _add_attnkit_gemms(attnkit, a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16),
                           fns, work, (CACHED_GEMM_N, *mids))
    except ImportError:
        pass
    if torch is not None:
        ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
        m = min(n, CACHED_GEMM_N)
        tam, tbm = ta[:m, :m].contiguous(), tb[:m, :m].contiguous()
        torch.mm(tam, tbm)  # (first call: oneDNN's set-up)
        t0 = time.perf_counter()
        torch.mm(tam, tbm)
        if matmul_flops(m, m, m) / 1e9 / (time.perf_counter() - t0) < BF16_SLOW_SHARE * sgemm_gflops:
            fns[f"torch mm N={m}"] = lambda: torch.mm(tam, tbm)
            work[f"torch mm N={m}"] = matmul_flops(m, m, m) / 1e9
            mids = []
        else:
            fns["torch mm"] = lambda: torch.mm(ta, tb)
            work["torch mm"] = matmul_flops(n, n, n) / 1e9
        for m in mids:
            tam, tbm = ta[:m, :m].contiguous(), tb[:m, :m].contiguous()
            fns[f"torch mm N={m}"] = lambda tam=tam, tbm=tbm: torch.mm(tam, tbm)
            work[f"torch mm N={m}"] = matmul_flops(m, m, m) / 1e9
    if not fns:
        return {}
    return _best_rates(fns, work, cfg)


def _add_attnkit_gemms(attnkit, a, b, fns: dict, work: dict, squares=(CACHED_GEMM_N,)):
    """attnkit's matmul of the N x N a @ b and of their leading squares of each size in `squares`
    (at most N; CACHED_GEMM_N: blocks in cache) into fns (name -> callable) and work (name ->
    GFLOP per call)."""
    n = a.shape[0]
    fns["attnkit matmul"] = lambda: attnkit.matmul(a, b)
    work["attnkit matmul"] = matmul_flops(n, n, n) / 1e9
    for m in (min(n, s) for s in squares):
        am, bm = a[:m, :m].copy(), b[:m, :m].copy()
        fns[f"attnkit matmul N={m}"] = lambda am=am, bm=bm: attnkit.matmul(am, bm)
        work[f"attnkit matmul N={m}"] = matmul_flops(m, m, m) / 1e9


CEILING_KEYS = {"sgemm": "sgemm_gflops", "bf16": "bf16_gemm_gflops", "copy": "copy_gbs",
                "read": "read_gbs"}
UNIT_OF_CEILING = {"sgemm": "GFLOP/s", "bf16": "GFLOP/s", "copy": "GB/s", "read": "GB/s"}
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
    "sgemm", or "bf16" for bf16 GEMM-bound rows), bytes (ceiling "copy" / "read") or tokens (unit "tok/s", no ceiling) per call.
    `derive(timings) -> dict` adds derived numbers (e.g. adapter overhead) to the row.
    `footprint` is the bytes one call streams through memory (default: `work` for the copy and
    read ceilings); against the LLC it decides whether the row is cache-resident.
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
    footprint: Optional[float] = None

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


def cache_fit(footprint, llc_bytes):
    """Where a memory-bound row's data lives: "fits" (<= LLC), "partial" (< DRAM_FACTOR x LLC:
    part of it can stay cached between calls), "exceeds" (from DRAM); None if unknown."""
    if not footprint or not llc_bytes:
        return None
    if footprint <= llc_bytes:
        return "fits"
    return "partial" if footprint < DRAM_FACTOR * llc_bytes else "exceeds"


def ceiling_error(row: dict, ceilings: dict) -> Optional[str]:
    """A message when a timed contender runs above 100% of the row's ceiling, else None.

    Such a row means the ceiling was measured wrong (too small a buffer, an arithmetic-bound
    op, a slower library than the one timed). Cache-resident rows carry no fraction. A
    contender that stayed within the bandwidth timed beside it (`fraction_of_beside` <= 1) is
    not an error: the machine's memory rate rose after the ceilings were taken
    (report.moved_above).
    """
    over = [(n, t["fraction_of_ceiling"]) for n, t in row["timings"].items()
            if t.get("fraction_of_ceiling") is not None and t["fraction_of_ceiling"] > 1.0
            and not (t.get("fraction_of_beside") is not None and t["fraction_of_beside"] <= 1.0)]
    if not over:
        return None
    c = row["ceiling"]
    what = ", ".join(f"{n} {100 * f:.0f}%" for n, f in over)
    return (f"{what} of the {c} ceiling {ceiling_value(c, ceilings):.1f} "
            f"{UNIT_OF_CEILING.get(c, '')}: the ceiling is wrong")


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
        "footprint_bytes": None,
        "cache_fit": None,
        "ceiling_error": None,
        "beside": None,
    }
    llc = ceilings.get("llc_bytes")
    if case.ceiling in BANDWIDTH_CEILINGS:
        row["footprint_bytes"] = case.footprint if case.footprint is not None else case.work
        row["cache_fit"] = cache_fit(row["footprint_bytes"], llc)
    row["mismatch"] = check_case(case)
    runnable = {n: f for n, f in case.contenders.items()
                if not (n in row["mismatch"] and row["mismatch"][n].startswith("raised"))}
    if case.subject not in runnable:
        return row
    probe = None
    if case.ceiling in BANDWIDTH_CEILINGS and row["cache_fit"] == "exceeds":
        # the row's own footprint, at most the ceilings' buffer (>= 4x the LLC: still DRAM)
        size = row["footprint_bytes"]
        if ceilings.get("buffer_mb"):
            size = min(size, int(ceilings["buffer_mb"] * 2**20))
        method, fn, nbytes = bandwidth_probe(case.ceiling, size, ceilings.get("threads", 1),
                                             ceilings.get(f"{case.ceiling}_by_method"))
        probe = {"kind": case.ceiling, "method": method, "bytes": nbytes}
        runnable[PROBE_NAME] = fn
    timings = time_interleaved(runnable, cfg)
    if probe is not None:
        t = timings.pop(PROBE_NAME)
        probe.update(gbs=probe["bytes"] / t.median_s / 1e9, **t.as_dict())
        row["beside"] = probe
    ceil = ceiling_value(case.ceiling, ceilings)
    if row["cache_fit"] in ("fits", "partial"):
        ceil = None  # a % of a DRAM ceiling means nothing for data served from the cache
    for n, t in timings.items():
        r = case.work / t.median_s / UNIT_SCALE[unit] if (case.work and unit) else None
        row["timings"][n] = dict(t.as_dict(), rate=r,
                                 fraction_of_ceiling=(r / ceil if (r and ceil) else None))
        # the rate over the bandwidth beside it (medians of the same rounds), rows from DRAM only
        row["timings"][n]["fraction_of_beside"] = r / probe["gbs"] if (probe and r) else None
    subj = timings[case.subject].median_s
    row["speedup"] = {n: t.median_s / subj for n, t in timings.items() if n != case.subject}
    if case.derive is not None:
        row["extra"] = case.derive(timings)
    row["ceiling_error"] = ceiling_error(row, ceilings)
    return row
