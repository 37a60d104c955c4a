"""Interleaved A/B of two CPU variants (and torch) on bf16 matmul and attention.

Each round runs every contender once, each in its own process (ATTNKIT_CPU picks the variant
at import), alternating, so drift from other load on a shared machine hits all of them alike;
the per-round ratios and their spread are printed. Used for bench/notes/matmul.md "avx512_bf16
variant".

    python bench/bf16_interleave.py --rounds 5 --threads 2
    python bench/bf16_interleave.py --cases matmul:64:4096:4096,attention:8:256:64:causal
    ATTNKIT_CPU_ASSUME=avx512_bf16 is set for the children (a VM that hides AVX512-BF16)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, math, sys, time
import numpy as np, ml_dtypes
case, who, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
bf = ml_dtypes.bfloat16
def timeit(fn, reps):  # best of reps, each a burst of calls lasting >= 20 ms
    t = time.perf_counter(); fn(); once = time.perf_counter() - t
    calls = max(1, int(0.02 / max(once, 1e-7)))
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best
kind, *dims = case.split(":")
if who == "torch":
    import torch
    torch.set_num_threads(threads)
    tb = lambda a: torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
else:
    import attnkit
    attnkit.set_num_threads(threads)
    assert attnkit.info()["isa"] == who, attnkit.info()["isa"]
if kind == "matmul":  # matmul:N (square) or matmul:M:K:N
    m, kk, n = (int(dims[0]),) * 3 if len(dims) == 1 else map(int, dims)
    a = rng.standard_normal((m, kk), np.float32).astype(bf)
    b = rng.standard_normal((kk, n), np.float32).astype(bf)
    flops = 2.0 * m * kk * n
    if who == "torch":
        ta, tb_, out = tb(a), tb(b), torch.empty((m, n), dtype=torch.bfloat16)
        fn = lambda: torch.matmul(ta, tb_, out=out)
    else:
        out = np.empty((m, n), bf)
        fn = lambda: attnkit.matmul(a, b, out=out)
    sec = timeit(fn, 5 if flops <= 2.2e9 else 3)
else:  # attention:H:S:D:causal
    h, s, d, causal = int(dims[0]), int(dims[1]), int(dims[2]), dims[3] == "causal"
    q, k, v = (rng.standard_normal((1, h, s, d), np.float32).astype(bf) for _ in range(3))
    flops = 4.0 * h * s * s * d / (2 if causal else 1)
    if who == "torch":
        import torch.nn.functional as F
        tq, tk, tv = tb(q), tb(k), tb(v)
        fn = lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    else:
        fn = lambda: attnkit.attention(q, k, v, causal=causal)
    sec = timeit(fn, 3)
print(json.dumps({"gflops": flops / sec / 1e9}))
"""


def run_one(case, who, threads):
    env = dict(os.environ, ATTNKIT_CPU_ASSUME="avx512_bf16", OMP_NUM_THREADS=str(threads))
    if who != "torch":
        env["ATTNKIT_CPU"] = who
    r = subprocess.run([sys.executable, "-c", CHILD, case, who, str(threads)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{case} {who}: {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout)["gflops"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="matmul:1024,matmul:2048,attention:32:2048:128:full,"
                                       "attention:32:2048:128:causal")
    ap.add_argument("--variants", default="avx512_bf16,avx512_vnni,torch")
    args = ap.parse_args()
    who = args.variants.split(",")
    for case in args.cases.split(","):
        rows = {w: [] for w in who}
        for _ in range(args.rounds):
            for w in who:
                rows[w].append(run_one(case, w, args.threads))
        base = who[0]
        line = [f"{case}:"]
        for w in who:
            line.append(f"{w} {statistics.median(rows[w]):.0f} GFLOP/s "
                        f"[{min(rows[w]):.0f}-{max(rows[w]):.0f}]")
        for w in who[1:]:
            ratios = [x / y for x, y in zip(rows[base], rows[w])]
            line.append(f"{base}/{w} median {statistics.median(ratios):.2f} "
                        f"[{min(ratios):.2f}-{max(ratios):.2f}]")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
