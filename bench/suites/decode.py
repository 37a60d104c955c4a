"""attention decode: one new query token against a KV cache (memory-bound: GB/s vs read).

attnkit runs `attnkit.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=...)` when the
API exists (q (B, Sq, H, D), caches (B, Smax, Hkv, D)), and `attnkit.attention` with Sq=1 on
the filled part of the same caches (layout "bshd") in any case; torch SDPA runs on the same
memory. Achieved GB/s = K/V bytes read per call (2*B*Sk*Hkv*D*itemsize) / time; caches that
fit in the L3 (32 MB here: fp32 Sk <= 1024 at H32 D128) can beat the DRAM read ceiling.

For fp16/bf16 caches attnkit takes an fp32 q (it computes in fp32); torch SDPA needs one
dtype, so its q is rounded to the cache dtype once, outside the timing.
"""
import numpy as np

from harness import Case, Spec, kv_bytes
from suites.common import SHORT, checker, find_api, np_dtype, randn, shape_label, to_torch, \
    torch_or_none

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


def missing():
    """Needs torch (the contender); attention_with_kvcache is used when present."""
    if torch_or_none() is None:
        return "torch is not installed (contender: torch SDPA)"
    return None


def kvcache_api():
    """attnkit.attention_with_kvcache, or None while the lead is still building it."""
    return find_api("attnkit", "attention_with_kvcache")


def _spec(b, h, hkv, sk, d, dt, sweep=None):
    """A Spec for one decode row (one query token, cache of Sk + slack)."""
    label = shape_label(b, h, 1, sk, d, hkv) + (" gqa" if h != hkv else "")
    params = {"B": b, "H": h, "Hkv": hkv, "Sq": 1, "Sk": sk, "Smax": sk + CACHE_SLACK, "D": d,
              "dtype": dt, "q_dtype": "float32", "sweep": sweep}
    return Spec(NAME, f"decode kv={SHORT[dt]} {label}", label, dt, params)


def specs(cfg):
    """The issue's four cases and a KV-length sweep (the decode plot)."""
    if cfg.mode == "tiny":
        out = [_spec(1, 4, 4, s, 32, "float32", sweep="kv") for s in KV_SWEEP["tiny"]]
        return out + [_spec(*c) for c in TINY]
    out = [_spec(1, 32, 32, s, 128, "float32", sweep="kv") for s in KV_SWEEP[cfg.mode]]
    names = {s.name for s in out}
    return out + [s for s in (_spec(*c) for c in ISSUE) if s.name not in names]


def build(spec):
    """attnkit (kvcache API and/or attention Sq=1) and torch SDPA on the same caches."""
    import attnkit
    import torch
    import torch.nn.functional as F

    p = spec.params
    b, h, hkv, sk, smax, d = p["B"], p["H"], p["Hkv"], p["Sk"], p["Smax"], p["D"]
    rng = np.random.default_rng(0)
    q = randn(rng, (b, 1, h, d))
    k_cache = randn(rng, (b, smax, hkv, d), p["dtype"])
    v_cache = randn(rng, (b, smax, hkv, d), p["dtype"])
    k_cache[:, sk:] = np.nan  # beyond cache_seqlens: must never be read into the output
    v_cache[:, sk:] = np.nan
    seqlens = np.full((b,), sk, np.int32)
    k_view, v_view = k_cache[:, :sk], v_cache[:, :sk]

    contenders = {}
    kvc = kvcache_api()
    if kvc is not None:
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
                work=work, ceiling="read", check=checker(p["dtype"]), params=params)
