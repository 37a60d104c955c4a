"""attention backward: attnkit.torch autograd vs torch SDPA's backward (GFLOP/s vs sgemm).

Two kinds of rows: "bwd" times the backward alone (`torch.autograd.grad` on a graph kept with
retain_graph=True, so the forward is not timed); "fwd+bwd" times a forward and a backward.
FLOPs: backward 2.5x the forward (docs/ARCHITECTURE.md, "Measuring"), fwd+bwd 3.5x. Needs
`attnkit.torch.scaled_dot_product_attention` with autograd (F.scaled_dot_product_attention's
signature); the suite is skipped while it is missing.
"""
import numpy as np

from harness import Case, Spec, attention_bwd_flops, attention_flops
from suites.common import SHORT, close_enough, find_api, randn, shape_label, torch_or_none

NAME = "backward"
GRAD_TOL = 1e-4  # fp32 gradients: longer reductions than the forward (dV, dK sum over Sq)
# bf16 gradients (rounded to bf16, 2^-8 relative, and computed from bf16 P and dS on tiles)
GRAD_TOL_BF16 = 3e-2
# bf16 rows of issue 13 (B1 H12 S1024 D64, the amx variant's target), quick and full
BF16_ROWS = [(1, 12, 12, 1024, 64, False, "bwd"), (1, 12, 12, 1024, 64, True, "bwd")]

# (B, H, Hkv, S, D, causal, kind)
QUICK = [
    (1, 12, 12, 1024, 64, False, "bwd"),
    (1, 12, 12, 1024, 64, True, "bwd"),
    (8, 12, 12, 128, 64, False, "fwd+bwd"),
]
FULL_EXTRA = [
    (8, 12, 12, 128, 64, True, "fwd+bwd"),
    (1, 12, 12, 2048, 64, True, "bwd"),
    (1, 32, 8, 1024, 128, True, "bwd"),
]
TINY = [(1, 2, 2, 48, 16, True, "bwd"), (2, 4, 2, 32, 16, False, "fwd+bwd")]


def sdpa_api():
    """attnkit.torch.scaled_dot_product_attention, or None if attnkit.torch lacks it."""
    return find_api("attnkit.torch", "scaled_dot_product_attention")


def missing():
    """Why the suite cannot run (no torch, or no attnkit autograd SDPA yet), else None."""
    if torch_or_none() is None:
        return "torch is not installed"
    if sdpa_api() is None:
        return "attnkit.torch.scaled_dot_product_attention is missing"
    return None


def specs(cfg):
    """Issue cases (and GQA / longer rows in --full)."""
    rows = {"tiny": TINY, "quick": QUICK, "full": QUICK + FULL_EXTRA}[cfg.mode]
    rows = [r + ("float32",) for r in rows]
    if cfg.mode != "tiny":
        rows += [r + ("bfloat16",) for r in BF16_ROWS]
    out = []
    for b, h, hkv, s, d, causal, kind, dtype in rows:
        label = shape_label(b, h, s, s, d, hkv) + (" causal" if causal else "") + \
            (" gqa" if h != hkv else "")
        params = {"B": b, "H": h, "Hkv": hkv, "Sq": s, "Sk": s, "D": d, "causal": causal,
                  "kind": kind, "dtype": dtype}
        out.append(Spec(NAME, f"{kind} {SHORT[dtype]} {label}", label, dtype, params,
                        heavy=b * h * s * s * d >= 32 * 1024 * 1024 * 128))
    return out


def build(spec):
    """attnkit.torch and torch SDPA, each on its own leaf tensors with the same values."""
    import torch
    import torch.nn.functional as F

    p = spec.params
    rng = np.random.default_rng(0)
    b, h, hkv, s, d, causal = p["B"], p["H"], p["Hkv"], p["Sq"], p["D"], p["causal"]
    tdt = getattr(torch, p["dtype"])
    data = [randn(rng, (b, n, s, d)) for n in (h, hkv, hkv)]
    grad_out = torch.from_numpy(randn(rng, (b, h, s, d))).to(tdt)
    kw = {"is_causal": causal}
    if h != hkv:
        kw["enable_gqa"] = True

    def contender(fn):
        """A closure timing backward (kind bwd) or forward+backward (kind fwd+bwd)."""
        leaves = [torch.from_numpy(x.copy()).to(tdt).requires_grad_(True) for x in data]
        if p["kind"] == "bwd":
            out = fn(*leaves, **kw)
            return lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

        def fwd_bwd():
            """Forward, then gradients of q, k, v; returns (out, dq, dk, dv)."""
            o = fn(*leaves, **kw)
            return (o.detach(),) + torch.autograd.grad(o, leaves, grad_out)

        return fwd_bwd

    contenders = {"attnkit": contender(sdpa_api()),
                  "torch sdpa": contender(F.scaled_dot_product_attention)}
    fwd = attention_flops(b, h, s, s, d, causal=causal)
    bwd = attention_bwd_flops(b, h, s, s, d, causal=causal)
    work = bwd if p["kind"] == "bwd" else fwd + bwd
    return Case(suite=NAME, name=spec.name, contenders=contenders, reference="torch sdpa",
                work=work, ceiling="bf16" if p["dtype"] == "bfloat16" else "sgemm",
                check=lambda x, ref: close_enough(x, ref, GRAD_TOL if p["dtype"] == "float32" else GRAD_TOL_BF16),
                params=p)
