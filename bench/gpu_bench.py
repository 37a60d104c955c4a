#!/usr/bin/env python3
"""GPU benchmark: attnkit's CUDA kernels against torch on the same device, same run.

    python bench/gpu_bench.py                 # about a minute on an H100/H200
    python bench/gpu_bench.py --json out.json --case attn

Each case first checks attnkit's result against torch's, then times both interleaved (A B A B
..., docs/ARCHITECTURE.md "Measuring"): every round times a burst of calls lasting >= 30 ms per
contender with CUDA events, the report is the median over rounds. torch attention runs the
FlashAttention-2 backend where it supports the case (fp16/bf16), else its own choice.
Rates: attention 4*B*H*Sq*Sk*D FLOPs (halved for causal), matmul 2*M*N*K, softmax and decode
in bytes moved, next to the device's copy bandwidth measured in the same run (the "of copy"
column). ratio = torch time / attnkit time (> 1: attnkit is faster). The decode-kernel rows
and the bwd rows turn on the CUDA decode kernel / backward (off by default until verified on
a GPU) for that row only.
"""
import argparse
import contextlib
import json
import statistics
import sys

import torch
import torch.nn.functional as F

import attnkit
import attnkit as ak  # device arrays go to the CUDA backend

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None


def burst_ms(fn, n):
    """Milliseconds per call of n back-to-back calls of fn, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def time_pair(fa, fb, rounds, min_burst_ms=30.0):
    """Median ms per call of fa and fb, timed in alternating bursts (the order flips each round)."""
    for f in (fa, fb):
        f()
        f()
    torch.cuda.synchronize()
    one = max(burst_ms(fa, 1), burst_ms(fb, 1), 1e-3)
    n = max(1, int(min_burst_ms / one))
    ta, tb = [], []
    for r in range(rounds):
        pair = [(fa, ta), (fb, tb)] if r % 2 == 0 else [(fb, tb), (fa, ta)]
        for f, acc in pair:
            acc.append(burst_ms(f, n))
    return statistics.median(ta), statistics.median(tb)


def flash(dtype):
    """[FLASH_ATTENTION] for torch SDPA in fp16/bf16 (None: let torch choose)."""
    if sdpa_kernel is None or dtype not in (torch.float16, torch.bfloat16):
        return None
    return [SDPBackend.FLASH_ATTENTION]


def torch_sdpa(q, k, v, causal, backends):
    """A zero-argument torch SDPA call on q, k, v, restricted to `backends` when given."""
    gqa = q.shape[1] != k.shape[1]
    if backends is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    def run():
        """SDPA under the chosen backends."""
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def check(a, b, tol, what):
    """Max |a - b|; AssertionError when above tol * max(1, max|b|)."""
    scale = max(1.0, b.abs().max().item())
    err = (a.double() - b.double()).abs().max().item()
    if not err <= tol * scale:
        raise AssertionError(f"{what}: attnkit differs from torch by {err:.3e} (scale {scale:.3g})")
    return err


def attn_case(name, B, H, Hkv, S, D, dtype, causal, rounds, kernel=None):
    """attnkit vs torch attention forward (B, H, S, D); result dict with TFLOP/s.

    kernel "hopper": the Hopper kernel (attention_hopper.cuh; off by default until verified on
    a GPU) is switched on for this row, and the row fails unless the planner chose it."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, generator=g)
    backends = flash(dtype) if Hkv == H else None
    from attnkit import _cuda_backend

    mod = _cuda_backend._module()
    was = mod.hopper_kernel_enabled() if hasattr(mod, "hopper_kernel_enabled") else None
    if kernel == "hopper":
        if was is None or not mod.hopper_kernel_built():
            raise RuntimeError("this build has no Hopper attention kernel")
        mod._set_hopper_kernel(True)
    try:
        ours = lambda: ak.attention(q, k, v, causal=causal)
        theirs = torch_sdpa(q, k, v, causal, backends)
        check(ours(), theirs(), 2e-2 if dtype == torch.bfloat16 else 5e-3, name)
        ran = mod._last_attention_plan()["kernel"]
        if kernel and ran != kernel:
            raise AssertionError(f"{name}: ran the {ran} kernel, not {kernel}")
        ta, tb = time_pair(ours, theirs, rounds)
    finally:
        if was is not None:
            mod._set_hopper_kernel(was)
    flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return dict(case=name, attnkit_ms=ta, torch_ms=tb, rate=flops / ta / 1e9, unit="TFLOP/s",
                torch_impl=("flash" if backends else "sdpa auto") + f" (attnkit: {ran})")


def decode_kernel(on):
    """Turns the CUDA decode kernel (attention_decode.cuh; off by default until verified on a
    GPU) on or off for the cases after it; returns the previous setting."""
    from attnkit import _cuda_backend

    mod = _cuda_backend._module()
    was = mod.decode_kernel_enabled()
    mod._set_decode_kernel(on)
    return was


def decode_case(name, B, H, Hkv, S, D, dtype, rounds, kernel="mma", page=None):
    """attnkit attention_with_kvcache vs torch SDPA, one query token; GB/s of K+V.

    kernel: "mma" (the tensor-core forward) or "decode" (the decode kernel); page: paged cache
    with pages of that many tokens, scattered in a shuffled pool (torch reads the dense copy)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, 1, H, D, device="cuda", dtype=dtype, generator=g)
    kc = torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype, generator=g)
    vc = torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype, generator=g)
    lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
    kt, vt, qt = kc.transpose(1, 2), vc.transpose(1, 2), q.transpose(1, 2)
    kw = {}
    if page:
        nb = S // page
        perm = torch.randperm(B * nb, device="cuda", generator=g)
        table = perm.view(B, nb).to(torch.int32)
        kp = torch.empty(B * nb, page, Hkv, D, device="cuda", dtype=dtype)
        vp = torch.empty_like(kp)
        kp[perm] = kc.reshape(B * nb, page, Hkv, D)
        vp[perm] = vc.reshape(B * nb, page, Hkv, D)
        kcache, vcache, kw = kp, vp, dict(block_table=table)
    else:
        kcache, vcache = kc, vc
    was = decode_kernel(kernel == "decode")
    try:
        ours = lambda: ak.attention_with_kvcache(q, kcache, vcache, cache_seqlens=lens, **kw)
        theirs = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=H != Hkv)
        check(ours().transpose(1, 2), theirs(), 2e-2, name)
        plan = attnkit._cuda_backend._module()._last_attention_plan()
        if plan["kernel"] != kernel:
            raise AssertionError(f"{name}: ran the {plan['kernel']} kernel, not {kernel}")
        ta, tb = time_pair(ours, theirs, rounds)
    finally:
        decode_kernel(was)
    nbytes = 2.0 * B * S * Hkv * D * kc.element_size()
    return dict(case=name, attnkit_ms=ta, torch_ms=tb, rate=nbytes / ta / 1e6, unit="GB/s", torch_impl="sdpa auto",
                plan=plan)


def backward_case(name, B, H, S, D, dtype, causal, rounds):
    """attnkit attention_backward (CUDA backward, off by default until verified: turned on for
    this row) vs torch's SDPA backward (flash where it applies); TFLOP/s at 2.5x the forward's."""
    from attnkit import _cuda_backend

    mod = _cuda_backend._module()
    was = mod.backward_kernel_enabled()
    mod._set_backward_kernel(True)
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        out, lse = ak.attention(q, k, v, causal=causal, return_lse=True)
        dout = torch.randn_like(out)
        ours = lambda: ak.attention_backward(dout, q, k, v, out, lse, causal=causal)
        qt, kt, vt = (t.detach().requires_grad_() for t in (q, k, v))
        backends = flash(dtype)
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            ot = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        theirs = lambda: torch.autograd.grad(ot, (qt, kt, vt), dout, retain_graph=True)
        for a, b, what in zip(ours(), theirs(), ("dq", "dk", "dv")):
            check(a, b, 2e-2 if dtype == torch.bfloat16 else 5e-3, f"{name} {what}")
        ta, tb = time_pair(ours, theirs, rounds)
    finally:
        mod._set_backward_kernel(was)
    flops = 2.5 * 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return dict(case=name, attnkit_ms=ta, torch_ms=tb, rate=flops / ta / 1e9, unit="TFLOP/s",
                torch_impl="flash bwd" if backends else "sdpa auto bwd")


def copy_gbps(rounds):
    """The device's copy bandwidth (read + write of 2 GiB, device to device): the ceiling the
    GB/s rows are compared with."""
    src = torch.empty(1 << 30, device="cuda", dtype=torch.int16)
    dst = torch.empty_like(src)
    f = lambda: dst.copy_(src)
    ms, _ = time_pair(f, f, rounds)
    return 2.0 * src.numel() * src.element_size() / ms / 1e6


def softmax_case(name, M, N, dtype, rounds):
    """attnkit vs torch softmax over the last axis; GB/s (read + write)."""
    x = torch.randn(M, N, device="cuda", dtype=dtype)
    ours, theirs = lambda: ak.softmax(x), lambda: torch.softmax(x, -1)
    check(ours(), theirs(), 1e-5 if dtype == torch.float32 else 1e-2, name)
    ta, tb = time_pair(ours, theirs, rounds)
    return dict(case=name, attnkit_ms=ta, torch_ms=tb, rate=2.0 * x.numel() * x.element_size() / ta / 1e6,
                unit="GB/s", torch_impl="torch.softmax")


def matmul_case(name, M, N, K, dtype, rounds, cutlass=False, b_transposed=False):
    """attnkit vs cuBLAS (TF32 off); TFLOP/s. cutlass: with the CUTLASS sm90 kernel switched on
    (gemm_sm90.cu; off by default until verified on a GPU), and the row says which kernel ran;
    b_transposed: B as the transpose of an (N, K) matrix (x @ W.T)."""
    from attnkit import _cuda_backend

    mod = _cuda_backend._module()
    a = torch.randn(M, K, device="cuda", dtype=dtype)
    b = torch.randn(N, K, device="cuda", dtype=dtype).t() if b_transposed else \
        torch.randn(K, N, device="cuda", dtype=dtype)
    torch.backends.cuda.matmul.allow_tf32 = False  # full fp32, as attnkit
    ours, theirs = lambda: ak.matmul(a, b), lambda: a @ b
    was = mod.cutlass_gemm_enabled() if hasattr(mod, "cutlass_gemm_enabled") else False
    if cutlass:
        if not (hasattr(mod, "cutlass_gemm_built") and mod.cutlass_gemm_built()):
            raise RuntimeError("this build has no CUTLASS sm90 matmul")
        mod._set_cutlass_gemm(True)
    try:
        check(ours(), theirs(), 1e-2 if dtype != torch.float32 else 1e-4, name)
        kernel = mod._last_gemm_kernel() if hasattr(mod, "_last_gemm_kernel") else "?"
        ta, tb = time_pair(ours, theirs, rounds)
    finally:
        if hasattr(mod, "_set_cutlass_gemm"):
            mod._set_cutlass_gemm(was)
    return dict(case=name, attnkit_ms=ta, torch_ms=tb, rate=2.0 * M * N * K / ta / 1e9, unit="TFLOP/s",
                torch_impl=f"cuBLAS (attnkit: {kernel})")


CASES = [
    ("attn bf16 B4 H32 S4096 D128 causal", lambda r: attn_case("attn bf16 B4 H32 S4096 D128 causal", 4, 32, 32, 4096, 128, torch.bfloat16, True, r)),
    ("attn bf16 B4 H32 S4096 D128", lambda r: attn_case("attn bf16 B4 H32 S4096 D128", 4, 32, 32, 4096, 128, torch.bfloat16, False, r)),
    ("attn fp16 B8 H16 S2048 D64 causal", lambda r: attn_case("attn fp16 B8 H16 S2048 D64 causal", 8, 16, 16, 2048, 64, torch.float16, True, r)),
    ("attn bf16 B2 H16 S2048 D256 causal", lambda r: attn_case("attn bf16 B2 H16 S2048 D256 causal", 2, 16, 16, 2048, 256, torch.bfloat16, True, r)),
    ("attn bf16 GQA32/8 B4 S4096 D128 causal", lambda r: attn_case("attn bf16 GQA32/8 B4 S4096 D128 causal", 4, 32, 8, 4096, 128, torch.bfloat16, True, r)),
    ("attn-hopper bf16 B4 H32 S4096 D128 causal", lambda r: attn_case("attn-hopper bf16 B4 H32 S4096 D128 causal", 4, 32, 32, 4096, 128, torch.bfloat16, True, r, "hopper")),
    ("attn-hopper bf16 B4 H32 S4096 D128", lambda r: attn_case("attn-hopper bf16 B4 H32 S4096 D128", 4, 32, 32, 4096, 128, torch.bfloat16, False, r, "hopper")),
    ("attn-hopper fp16 B8 H16 S2048 D64 causal", lambda r: attn_case("attn-hopper fp16 B8 H16 S2048 D64 causal", 8, 16, 16, 2048, 64, torch.float16, True, r, "hopper")),
    ("attn-hopper bf16 B2 H16 S2048 D256 causal", lambda r: attn_case("attn-hopper bf16 B2 H16 S2048 D256 causal", 2, 16, 16, 2048, 256, torch.bfloat16, True, r, "hopper")),
    ("attn-hopper bf16 GQA32/8 B4 S4096 D128 causal", lambda r: attn_case("attn-hopper bf16 GQA32/8 B4 S4096 D128 causal", 4, 32, 8, 4096, 128, torch.bfloat16, True, r, "hopper")),
    ("attn fp32 B2 H16 S1024 D64 causal", lambda r: attn_case("attn fp32 B2 H16 S1024 D64 causal", 2, 16, 16, 1024, 64, torch.float32, True, r)),
    ("decode bf16 B8 H32/8 S8192 D128", lambda r: decode_case("decode bf16 B8 H32/8 S8192 D128", 8, 32, 8, 8192, 128, torch.bfloat16, r)),
    ("decode-kernel bf16 B8 H32/8 S8192 D128", lambda r: decode_case("decode-kernel bf16 B8 H32/8 S8192 D128", 8, 32, 8, 8192, 128, torch.bfloat16, r, "decode")),
    ("decode-kernel bf16 B16 H32/8 S8192 D128", lambda r: decode_case("decode-kernel bf16 B16 H32/8 S8192 D128", 16, 32, 8, 8192, 128, torch.bfloat16, r, "decode")),
    ("decode bf16 paged256 B16 H32/8 S8192 D128", lambda r: decode_case("decode bf16 paged256 B16 H32/8 S8192 D128", 16, 32, 8, 8192, 128, torch.bfloat16, r, "mma", 256)),
    ("decode-kernel bf16 paged256 B16 H32/8 S8192 D128", lambda r: decode_case("decode-kernel bf16 paged256 B16 H32/8 S8192 D128", 16, 32, 8, 8192, 128, torch.bfloat16, r, "decode", 256)),
    ("decode-kernel fp16 B1 H32/32 S16384 D128", lambda r: decode_case("decode-kernel fp16 B1 H32/32 S16384 D128", 1, 32, 32, 16384, 128, torch.float16, r, "decode")),
    ("bwd bf16 B4 H32 S4096 D128 causal", lambda r: backward_case("bwd bf16 B4 H32 S4096 D128 causal", 4, 32, 4096, 128, torch.bfloat16, True, r)),
    ("bwd fp16 B8 H16 S2048 D64", lambda r: backward_case("bwd fp16 B8 H16 S2048 D64", 8, 16, 2048, 64, torch.float16, False, r)),
    ("softmax fp32 8192x8192", lambda r: softmax_case("softmax fp32 8192x8192", 8192, 8192, torch.float32, r)),
    ("softmax bf16 4096x32000", lambda r: softmax_case("softmax bf16 4096x32000", 4096, 32000, torch.bfloat16, r)),
    ("matmul fp16 4096^3", lambda r: matmul_case("matmul fp16 4096^3", 4096, 4096, 4096, torch.float16, r)),
    ("matmul-cutlass fp16 4096^3", lambda r: matmul_case("matmul-cutlass fp16 4096^3", 4096, 4096, 4096, torch.float16, r, True)),
    ("matmul-cutlass bf16 8192x8192x4096 B^T", lambda r: matmul_case("matmul-cutlass bf16 8192x8192x4096 B^T", 8192, 8192, 4096, torch.bfloat16, r, True, True)),
    ("matmul fp32 2048^3", lambda r: matmul_case("matmul fp32 2048^3", 2048, 2048, 2048, torch.float32, r)),
]


def main(argv=None):
    """Run the selected cases, print the table (and --json); 1 if any case failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="only cases whose name contains this (repeatable)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not attnkit.info()["cuda_available"]:
        print("gpu_bench: needs a CUDA device and attnkit built with ATTNKIT_CUDA=ON", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, attnkit {attnkit.__version__}",
          flush=True)
    results, failures = [], []
    copy = copy_gbps(args.rounds)
    print(f"device copy (the bandwidth ceiling of the GB/s rows): {copy:.0f} GB/s", flush=True)
    for name, fn in CASES:
        if args.case and not any(c in name for c in args.case):
            continue
        try:
            res = fn(args.rounds)
            results.append(res)
            print(f"  {name}: attnkit {res['attnkit_ms']:.3f} ms, torch {res['torch_ms']:.3f} ms", flush=True)
        except Exception as e:  # report and go on: one broken case must not hide the others
            failures.append((name, f"{type(e).__name__}: {e}"))
            print(f"  {name}: FAILED {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": copy, "results": results,
                       "failures": failures}, f, indent=1)
    print()
    print(f"{'case':50s} {'attnkit ms':>10s} {'torch ms':>9s} {'ratio':>6s} {'attnkit rate':>16s} {'of copy':>7s}  torch")
    for r in results:
        frac = f"{r['rate'] / copy:7.2f}" if r["unit"] == "GB/s" else " " * 7
        print(f"{r['case']:50s} {r['attnkit_ms']:10.3f} {r['torch_ms']:9.3f} {r['torch_ms'] / r['attnkit_ms']:6.2f} "
              f"{r['rate']:9.1f} {r['unit']:6s} {frac}  {r['torch_impl']}")
    for name, err in failures:
        print(f"{name:50s} FAILED: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
