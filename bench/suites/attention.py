"""attention prefill: attnkit.attention vs torch SDPA vs a naive matmul-softmax-matmul in torch.

GFLOP/s against the sgemm ceiling (FLOPs: 4*B*H*Sq*Sk*D, halved for causal). Rows cover the
issue's cases (MHA/GQA, causal or not, a bool key-padding mask), sequence-length sweeps (the
attention plot: B1 H12 D64 non-causal and causal, B1 H32/Hkv8 D128 causal GQA) and, in --full,
half types, a float mask and a sliding window.
"""
import math

import numpy as np

from harness import Case, Spec, attention_flops
from suites.common import SHORT, checker, randn, shape_label, to_torch, torch_or_none

NAME = "attention"

# (B, H, Hkv, S, D, variant); variant: "" | "causal" | "padmask" | "floatmask" | "window"
ISSUE = [
    (1, 12, 12, 1024, 64, ""),
    (1, 32, 32, 2048, 128, "causal"),
    (8, 12, 12, 128, 64, "padmask"),
    (1, 32, 8, 2048, 128, "causal"),
]
SEQ_SWEEP = {"tiny": [32, 80], "quick": [256, 512, 1024],
             "full": [128, 256, 512, 1024, 2048, 4096]}  # B1 H12 D64, non-causal and causal
CAUSAL_SWEEP = {"tiny": [], "quick": [512, 1024], "full": [256, 512, 1024, 2048, 4096]}
# B1 H32 Hkv8 D128 causal (the issue's GQA case, Llama-like heads); its S2048 point is that case
GQA_SWEEP = {"tiny": [48], "quick": [1024, 2048], "full": [256, 512, 1024, 2048]}
GQA_HEADS = (32, 8, 128)
TINY = [(2, 4, 2, 48, 32, "causal"), (2, 4, 4, 40, 16, "padmask")]
FULL_EXTRA = [(1, 12, 12, 1024, 64, "floatmask"), (1, 12, 12, 2048, 64, "window")]
HALF = ["bfloat16", "float16"]  # --full: the first issue case in these dtypes
# bf16 rows of issue 13 (B1 H32 S2048 D128, and its GQA 32/8 row; the avx512_bf16 and amx
# variants' targets), quick and full
BF16_ROWS = [(1, 32, 32, 2048, 128, ""), (1, 32, 32, 2048, 128, "causal"),
             (1, 32, 8, 2048, 128, "causal")]
WINDOW = (256, 0)


def missing():
    """attnkit.attention exists since the attention-forward commit; torch is the contender."""
    import attnkit

    if not hasattr(attnkit, "attention"):
        return "attnkit.attention is missing"
    if torch_or_none() is None:
        return "torch is not installed (contenders: torch SDPA and a torch naive attention)"
    return None


def _spec(b, h, hkv, s, d, variant, dtype="float32", sweep=None, heavy=False, naive=True):
    """A Spec for one attention row (label words: shape, variant, gqa)."""
    label = shape_label(b, h, s, s, d, hkv) + (f" {variant}" if variant else "")
    if h != hkv:
        label += " gqa"
    params = {"B": b, "H": h, "Hkv": hkv, "Sq": s, "Sk": s, "D": d, "variant": variant,
              "causal": variant == "causal", "dtype": dtype, "sweep": sweep, "naive": naive}
    return Spec(NAME, f"attn {SHORT[dtype]} {label}", label, dtype, params, heavy=heavy)


def specs(cfg):
    """Issue cases, length sweeps, and --full extras; naive torch left out of heavy quick rows."""
    if cfg.mode == "tiny":
        out = [_spec(2, 4, 4, s, 32, "", sweep="seq") for s in SEQ_SWEEP["tiny"]]
        return out + [_spec(*c, sweep="seq_gqa" if c[1] != c[2] else None) for c in TINY]
    full = cfg.mode == "full"
    seen, out = set(), []

    def add(sp):
        """Append a spec unless a sweep already has that row."""
        if sp.name not in seen:
            seen.add(sp.name)
            out.append(sp)

    for s in SEQ_SWEEP[cfg.mode]:
        add(_spec(1, 12, 12, s, 64, "", sweep="seq"))
    for s in CAUSAL_SWEEP[cfg.mode]:
        add(_spec(1, 12, 12, s, 64, "causal", sweep="seq_causal"))
    h, hkv, d = GQA_HEADS
    for s in GQA_SWEEP[cfg.mode]:
        heavy = s * d * h >= 1024 * 128 * 32
        add(_spec(1, h, hkv, s, d, "causal", sweep="seq_gqa", heavy=heavy,
                  naive=(full and s <= 2048) or not heavy))
    for c in ISSUE:
        heavy = c[3] * c[4] * c[1] >= 2048 * 128 * 32
        add(_spec(*c, heavy=heavy, naive=full or not heavy))
    for c in BF16_ROWS:
        add(_spec(*c, dtype="bfloat16", heavy=True, naive=False))
    if full:
        for c in FULL_EXTRA:
            add(_spec(*c))
        for dt in HALF:
            add(_spec(*ISSUE[0], dtype=dt))
    return out


def _inputs(p):
    """q, k, v in (B, H, S, D) and the NumPy mask (None, bool or float) for a spec's params."""
    rng = np.random.default_rng(0)
    b, h, hkv, s, d = p["B"], p["H"], p["Hkv"], p["Sq"], p["D"]
    q = randn(rng, (b, h, s, d), p["dtype"])
    k = randn(rng, (b, hkv, s, d), p["dtype"])
    v = randn(rng, (b, hkv, s, d), p["dtype"])
    mask = None
    if p["variant"] == "padmask":  # key padding: batch i keeps its first len_i keys (>= 1)
        lens = rng.integers(max(1, s // 4), s + 1, size=b)
        lens[0] = s
        mask = (np.arange(s)[None, :] < lens[:, None])[:, None, None, :]
    elif p["variant"] == "floatmask":  # a per-head additive bias, e.g. relative positions
        mask = (-0.05 * np.abs(np.arange(s)[:, None] - np.arange(s)[None, :])).astype(np.float32)
        mask = np.broadcast_to(mask, (1, 1, s, s))
    return q, k, v, mask


def _window_mask(s):
    """Bool (S, S) mask equal to attnkit's window=WINDOW (top-left aligned): torch's input."""
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    return (j >= i - WINDOW[0]) & (j <= i + WINDOW[1])


def naive_attention(torch, q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v with the full S x S score matrix (GQA: repeat K/V)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    return torch.matmul(torch.softmax(s, dim=-1), v)


def build(spec):
    """attnkit.attention, torch SDPA (enable_gqa) and the naive torch attention."""
    import attnkit
    import torch
    import torch.nn.functional as F

    p = spec.params
    q, k, v, mask = _inputs(p)
    causal, variant = p["causal"], p["variant"]
    window = WINDOW if variant == "window" else None
    tq, tk, tv = to_torch(q), to_torch(k), to_torch(v)
    gqa = p["H"] != p["Hkv"]
    tmask = None
    if mask is not None:
        tmask = torch.from_numpy(np.array(mask))  # a writable copy: torch warns on read-only views
    elif window is not None:
        tmask = torch.from_numpy(_window_mask(p["Sq"]))
    scale = 1.0 / math.sqrt(p["D"])

    contenders = {
        "attnkit": lambda: attnkit.attention(q, k, v, mask=mask, causal=causal, window=window),
        "torch sdpa": lambda: F.scaled_dot_product_attention(
            tq, tk, tv, attn_mask=tmask, is_causal=causal, enable_gqa=gqa),
    }
    if p["naive"]:
        bias = None
        if causal:
            bias = torch.full((p["Sq"], p["Sk"]), float("-inf"), dtype=tq.dtype).triu_(1)
        elif tmask is not None and tmask.dtype == torch.bool:
            bias = torch.zeros(tmask.shape, dtype=tq.dtype).masked_fill_(~tmask, float("-inf"))
        elif tmask is not None:
            bias = tmask
        contenders["torch naive"] = lambda: naive_attention(torch, tq, tk, tv, bias, scale)

    work = attention_flops(p["B"], p["H"], p["Sq"], p["Sk"], p["D"], causal=causal, window=window)
    return Case(suite=NAME, name=spec.name, contenders=contenders, reference="torch sdpa",
                work=work, ceiling="bf16" if p["dtype"] == "bfloat16" else "sgemm",
                check=checker(p["dtype"]), params=p)
