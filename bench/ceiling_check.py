#!/usr/bin/env python3
"""Check the bandwidth ceilings against a decode row that reads DRAM, all timed in one loop.

    python bench/ceiling_check.py                 # 2 threads, Sk sized from the LLC (1 GB here)
    python bench/ceiling_check.py --threads 1

The read and copy methods of `harness.bandwidth_methods` (on the run's ceiling buffer, 4x the
last-level cache) and attnkit's fp32 decode B1 H32 D128 with K+V >= 2x the LLC are timed
interleaved (`harness.time_interleaved`), so a busy machine slows them alike. Printed: each
one's best-round and median GB/s, and the decode row's best round as a % of the best read
method. A read ceiling must be at or above that row; the exit status is 1 when it is not.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import env  # noqa: E402
import harness  # noqa: E402
from suites import decode  # noqa: E402


def main(argv=None) -> int:
    """Time the ceiling methods and the DRAM-sized decode row interleaved; 1 if decode wins."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--buffer-mb", type=int, help="ceiling buffer (default: 4x the LLC)")
    ap.add_argument("--sk", type=int, help="decode KV length (default: K+V >= 2x the LLC)")
    args = ap.parse_args(argv)
    llc = env.llc_info()
    buf_bytes = (args.buffer_mb << 20) if args.buffer_mb else harness.ceiling_buffer_bytes(
        "quick", llc["bytes"], env.mem_available_bytes())
    sk = args.sk or decode.dram_sk(llc["bytes"])
    if sk is None:
        print("ceiling_check: the LLC is too large for a DRAM-sized decode row", file=sys.stderr)
        return 2
    import attnkit

    with env.ThreadLimit(args.threads), harness._blas_limit(1):
        buf = np.ones(buf_bytes // 4, np.float32)
        copy_m, read_m = harness.bandwidth_methods(buf, args.threads)
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1, 1, 32, 128), dtype=np.float32)
        kc = decode.cache(rng, (1, sk, 32, 128), "float32", sk)
        vc = decode.cache(rng, (1, sk, 32, 128), "float32", sk)
        lens = np.array([sk], np.int32)
        methods = dict(copy_m, **read_m)
        name = f"decode Sk{sk}"
        methods[name] = (lambda: attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens),
                         kc.nbytes + vc.nbytes)
        t = harness.time_interleaved({k: f for k, (f, _) in methods.items()},
                                     harness.TimingConfig(rounds=args.rounds, burst_s=0.1))
    best = {k: methods[k][1] / t[k].min_s / 1e9 for k in methods}
    print(f"# {env.cpu_model()}, {args.threads} threads, LLC {llc['bytes'] >> 20} MB "
          f"({llc['source']}), buffer {buf_bytes >> 20} MB, decode K+V "
          f"{(kc.nbytes + vc.nbytes) >> 20} MB, load {env.loadavg()}")
    for k in methods:
        kind = "copy" if k in copy_m else ("read" if k in read_m else "row")
        print(f"  {kind:4s} {k:16s} best {best[k]:6.1f}  median "
              f"{methods[k][1] / t[k].median_s / 1e9:6.1f} GB/s")
    read = max(best[k] for k in read_m)
    print(f"# decode best round = {100 * best[name] / read:.0f}% of the best read method")
    return 0 if best[name] <= read else 1


if __name__ == "__main__":
    sys.exit(main())
