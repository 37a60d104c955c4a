"""attention decode: one new query token against a KV cache (memory-bound: GB/s vs read).

attnkit runs `attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=...)` when the
API exists (q (B, Sq, H, D), caches (B, Smax, Hkv, D)), and `attnkit.attention` with Sq=1 on
the filled part of the same caches (layout "bshd") in any case; torch SDPA runs on the same
memory. Achieved GB/s = K/V bytes read per call (2*B*Sk*Hkv*D*itemsize) / time. Rows whose
K/V is under twice the last-level cache (an fp32 Sk4096 H32 D128 cache is 128 MB: it fits in a
260-300 MB Xeon L3, not in a 32 MB Zen L3) are reported as cache-resident, not as a % of the
DRAM read ceiling, and the KV sweep gets one more point sized from the machine's LLC so that at
least one row reads from DRAM (fp32 B1 H32 D128, K+V >= 2x LLC; Sk32768 = 1 GB on a 260 MB L3).

The capacity row (issue 16 item 2) times the same 2048 tokens of B1 H32/8 D128 in a
32768-position cache (subject) and in a 2048-position cache, interleaved in one row;
`extra.slowdown_vs_exact_cache` = time(32768) / time(2048), target 1.00.

For fp16/bf16 caches attnkit takes an fp32 q (it computes in fp32); torch SDPA needs one
dtype, so its q is rounded to the cache dtype once, outside the timing.

8-bit cache rows (issue 15: `decode kv=i8 ...`, `decode kv=fp8 ...`): the subject reads an int8
or float8 e4m3fn cache (`attnkit.quantize_kv` of the same random data) with its float32 scales;
the same data in an fp16 and an fp32 cache are timed interleaved in the row ("attnkit fp16
cache", "attnkit fp32 cache", the reference). Work = bytes actually read: 8-bit codes plus one
float32 scale per token, kv head and K/V. `extra` holds each contender's GB/s of its own bytes
and the cache sizes. The check is the format's error against the fp32 cache, relative to the
output's magnitude (int8 2e-2, as the issue; e4m3 8e-2). One more int8 row is sized so its 8-bit
K+V is at least DRAM_FACTOR x the LLC (from DRAM; next to the fp16 cache only: fp32 would be
4x the bytes).
"""
import numpy as np

from harness import DRAM_FACTOR, Case, Spec, kv_bytes
from suites.common import SHORT, checker, close_enough, find_api, np_dtype, randn, shape_label, \
    to_numpy, to_torch, torch_or_none

NAME = "decode"
CACHE_SLACK = 256  # cache capacity = Sk + slack: a real cache is larger than what is filled

# (B, H, Hkv, Sk, D, kv dtype)
ISSUE = [
    (1, 32, 32, 4096, 128, "float32"),
    (4, 32, 8, 2048, 128, "float32"),
    (1, 32, 32, 4096, 128, "float16"),
    (1, 32, 32, 4096, 128, "bfloat16"),
]
KV_SWEEP = {"tiny": [64, 200], "quick": [512, 1024, 2048, 4096],
            "full": [256, 512, 1024, 2048, 4096, 8192, 16384]}  # fp32 B1 H32 D128
TINY = [(2, 4, 2, 96, 32, "float32"), (1, 4, 4, 128, 32, "bfloat16")]
# (B, H, Hkv, Sk tokens, D, cache capacity): Sk tokens in a big cache vs an exact-size one
CAPACITY = {"tiny": (1, 4, 2, 64, 32, 1024), "quick": (1, 32, 8, 2048, 128, 32768),
            "full": (1, 32, 8, 2048, 128, 32768)}
DRAM_SK_MAX = 1 << 17  # the LLC-sized row stops here (fp32 H32 D128: 4 GB of K+V)
# 8-bit caches: (B, H, Hkv, Sk, D) of the issue, each for int8 and fp8
Q8 = {"tiny": [(1, 4, 2, 256, 32)], "quick": [(1, 32, 8, 8192, 128), (4, 32, 32, 4096, 128)],
      "full": [(1, 32, 8, 8192, 128), (4, 32, 32, 4096, 128)]}
Q8_FORMATS = {"int8": "int8", "float8_e4m3fn": "fp8_e4m3"}  # spec dtype -> quantize_kv name
Q8_TOL = {"int8": 2e-2, "float8_e4m3fn": 8e-2}
FILL_BLOCK = 1 << 24  # caches above this many elements repeat one random block (fast set-up)


def missing():
    """Needs torch (the contender); attention_with_kvcache is used when present."""
    if torch_or_none() is None:
        return "torch is not installed (contender: torch SDPA)"
    return None


def kvcache_api():
    """attnkit.attention_with_kvcache, or None while the lead is still building it."""
    return find_api("attnkit", "attention_with_kvcache")


def _spec(b, h, hkv, sk, d, dt, sweep=None, smax=None, heavy=False):
    """A Spec for one decode row (one query token, cache of Sk + slack, or of `smax` positions:
    then a capacity row that also times the same tokens in an Sk-position cache)."""
    label = shape_label(b, h, 1, sk, d, hkv) + (" gqa" if h != hkv else "")
    if smax is not None:
        label += f" Smax{smax}"
    params = {"B": b, "H": h, "Hkv": hkv, "Sq": 1, "Sk": sk,
              "Smax": smax if smax is not None else sk + CACHE_SLACK, "D": d,
              "dtype": dt, "q_dtype": "float32", "sweep": sweep, "capacity": smax is not None}
    return Spec(NAME, f"decode kv={SHORT[dt]} {label}", label, dt, params, heavy=heavy)


def _q8_spec(b, h, hkv, sk, d, dt, dram=False):
    """An 8-bit cache row: `dt` int8 / float8_e4m3fn next to fp16 and (unless `dram`) fp32."""
    label = shape_label(b, h, 1, sk, d, hkv) + (" gqa" if h != hkv else "")
    params = {"B": b, "H": h, "Hkv": hkv, "Sq": 1, "Sk": sk, "Smax": sk + CACHE_SLACK, "D": d,
              "dtype": dt, "q_dtype": "float32", "q8": True, "with_fp32": not dram, "sweep": None,
              "capacity": False}
    return Spec(NAME, f"decode kv={SHORT[dt]} {label}", label, dt, params, heavy=dram)


def dram_sk(llc_bytes, h=32, d=128, itemsize=4, start=4096):
    """Smallest power-of-two Sk >= start whose fp32 B1 K+V is at least DRAM_FACTOR x the LLC
    (None above DRAM_SK_MAX)."""
    sk = start
    while kv_bytes(1, sk, h, d, itemsize) < DRAM_FACTOR * llc_bytes:
        sk *= 2
    return sk if sk <= DRAM_SK_MAX else None


def specs(cfg):
    """The KV-length sweep (the decode plot) with a DRAM-sized point, the issue cases and the
    capacity row."""
    b, h, hkv, sk, d, smax = CAPACITY[cfg.mode]
    capacity = _spec(b, h, hkv, sk, d, "float32", smax=smax)
    q8 = [_q8_spec(*c, dt) for c in Q8[cfg.mode] for dt in Q8_FORMATS]
    if cfg.mode == "tiny":
        out = [_spec(1, 4, 4, s, 32, "float32", sweep="kv") for s in KV_SWEEP["tiny"]]
        return out + [_spec(*c) for c in TINY] + [capacity] + q8
    big8 = dram_sk(getattr(cfg, "llc_bytes", 0) or 0, itemsize=1)
    if big8 is not None:
        q8.append(_q8_spec(1, 32, 32, big8, 128, "int8", dram=True))
    sweep = list(KV_SWEEP[cfg.mode])
    big = dram_sk(getattr(cfg, "llc_bytes", 0) or 0)
    out = [_spec(1, 32, 32, s, 128, "float32", sweep="kv") for s in sweep]
    if big is not None and big not in sweep:
        out.append(_spec(1, 32, 32, big, 128, "float32", sweep="kv", heavy=True))
    names = {s.name for s in out}
    return out + [s for s in (_spec(*c) for c in ISSUE) if s.name not in names] + [capacity] + q8


def cache(rng, shape, dtype, filled):
    """A (B, Smax, Hkv, D) cache: random in the first `filled` positions, NaN after them.

    Above FILL_BLOCK elements the filled part repeats one random block of positions (the
    kernels do not care, and 1 GB of randn would take longer than timing the row).
    """
    b, smax, hkv, d = shape
    c = np.empty(shape, np_dtype(dtype))
    c[:, filled:] = np.nan  # beyond cache_seqlens: must never be read into the output
    if b * filled * hkv * d <= FILL_BLOCK:
        c[:, :filled] = randn(rng, (b, filled, hkv, d), dtype)
        return c
    blk = max(1, FILL_BLOCK // (b * hkv * d))
    block = randn(rng, (b, blk, hkv, d), dtype)
    for s0 in range(0, filled, blk):
        n = min(blk, filled - s0)
        c[:, s0:s0 + n] = block[:, :n]
    return c


def build_q8(spec):
    """An 8-bit cache row: the codes + scales (subject), the same data in fp16 / fp32 caches."""
    import attnkit

    p = spec.params
    b, h, hkv, sk, smax, d = p["B"], p["H"], p["Hkv"], p["Sk"], p["Smax"], p["D"]
    rng = np.random.default_rng(0)
    q = randn(rng, (b, 1, h, d))
    k32 = cache(rng, (b, smax, hkv, d), "float32", sk)
    v32 = cache(rng, (b, smax, hkv, d), "float32", sk)
    fmt = Q8_FORMATS[p["dtype"]]
    kq, ks = attnkit.quantize_kv(k32, fmt)  # rows past sk: NaN scales, never read
    vq, vs = attnkit.quantize_kv(v32, fmt)
    k16, v16 = k32.astype(np.float16), v32.astype(np.float16)
    if not p["with_fp32"]:
        del k32, v32
    lens = np.full((b,), sk, np.int32)
    kvc = attnkit.attention_with_kvcache
    contenders = {"attnkit": lambda: kvc(q, kq, vq, cache_seqlens=lens, k_scale=ks, v_scale=vs),
                  "attnkit fp16 cache": lambda: kvc(q, k16, v16, cache_seqlens=lens)}
    bytes_read = {"attnkit": 2.0 * b * sk * hkv * (d * kq.itemsize + 4),
                  "attnkit fp16 cache": kv_bytes(b, sk, hkv, d, 2)}
    if p["with_fp32"]:
        contenders["attnkit fp32 cache"] = lambda: kvc(q, k32, v32, cache_seqlens=lens)
        bytes_read["attnkit fp32 cache"] = kv_bytes(b, sk, hkv, d, 4)
    reference = "attnkit fp32 cache" if p["with_fp32"] else "attnkit fp16 cache"
    tol = Q8_TOL[p["dtype"]]

    def check(x, ref):
        """The format's error, relative to the output's magnitude."""
        return close_enough(x, ref, tol, scale=float(np.abs(to_numpy(ref)).max()))

    def derive(t):
        """GB/s of each contender's own bytes; cache sizes (codes + scales vs fp16)."""
        out = {f"gbs {n}": bytes_read[n] / t[n].median_s / 1e9 for n in t if n in bytes_read}
        out["cache_bytes"] = {"8-bit codes + scales": kq.nbytes + ks.nbytes + vq.nbytes + vs.nbytes,
                              "fp16": k16.nbytes + v16.nbytes}
        return out

    params = dict(p, api="attention_with_kvcache", format=fmt)
    return Case(suite=NAME, name=spec.name, contenders=contenders, reference=reference,
                work=bytes_read["attnkit"], ceiling="read", check=check, params=params,
                derive=derive)


def build(spec):
    """attnkit (kvcache API and/or attention Sq=1) and torch SDPA on the same caches."""
    import attnkit
    import torch
    import torch.nn.functional as F

    p = spec.params
    if p.get("q8"):
        return build_q8(spec)
    b, h, hkv, sk, smax, d = p["B"], p["H"], p["Hkv"], p["Sk"], p["Smax"], p["D"]
    rng = np.random.default_rng(0)
    q = randn(rng, (b, 1, h, d))
    k_cache = cache(rng, (b, smax, hkv, d), p["dtype"], sk)
    v_cache = cache(rng, (b, smax, hkv, d), p["dtype"], sk)
    seqlens = np.full((b,), sk, np.int32)
    k_view, v_view = k_cache[:, :sk], v_cache[:, :sk]

    contenders = {}
    kvc = kvcache_api()
    derive = None
    if p.get("capacity"):
        if kvc is None:
            raise RuntimeError("the capacity row needs attnkit.attention_with_kvcache")
        k_exact, v_exact = np.ascontiguousarray(k_view), np.ascontiguousarray(v_view)
        contenders["attnkit"] = lambda: kvc(q, k_cache, v_cache, cache_seqlens=seqlens)
        contenders[f"attnkit Smax={sk}"] = lambda: kvc(q, k_exact, v_exact, cache_seqlens=seqlens)
        exact = f"attnkit Smax={sk}"

        def derive(t):
            """time in the big cache / time in the exact-size cache (target 1.00)."""
            return {"slowdown_vs_exact_cache": t["attnkit"].median_s / t[exact].median_s}
    elif kvc is not None:
        contenders["attnkit"] = lambda: kvc(q, k_cache, v_cache, cache_seqlens=seqlens)
        contenders["attnkit attention"] = lambda: attnkit.attention(q, k_view, v_view, layout="bshd")
    else:
        contenders["attnkit"] = lambda: attnkit.attention(q, k_view, v_view, layout="bshd")
    tq = to_torch(q).transpose(1, 2)  # (B, H, 1, D)
    if p["dtype"] != "float32":
        tq = tq.to(to_torch(np.zeros(1, np_dtype(p["dtype"]))).dtype)
    tk, tv = to_torch(k_view).transpose(1, 2), to_torch(v_view).transpose(1, 2)
    gqa = h != hkv
    contenders["torch sdpa"] = lambda: F.scaled_dot_product_attention(
        tq, tk, tv, enable_gqa=gqa).transpose(1, 2)

    params = dict(p, api="attention_with_kvcache" if kvc is not None else "attention")
    work = kv_bytes(b, sk, hkv, d, np_dtype(p["dtype"]).itemsize)
    return Case(suite=NAME, name=spec.name, contenders=contenders, reference="torch sdpa",
                work=work, ceiling="read", check=checker(p["dtype"]), params=params,
                derive=derive)
