"""Float64 references and the pass rule shared by every kernel test (docs/ARCHITECTURE.md, "Testing").

A result passes when its max error against the float64 reference is at most twice PyTorch's
own error on the same inputs, or within the per-dtype tolerance below, whichever is larger.
Errors are measured in units of `scale`: by default the reference output's own magnitude
(max |ref| over its finite entries: an attention output of randn data is ~0.1, so a bound
taken from max |V| ~ 4.5 would let a dropped key pass), and for a matmul max(|A| @ |B|), the
magnitude its rounding errors are made of. One table serves every kernel. NaN never passes
unless the reference is NaN at the same place.
"""
import numpy as np

try:
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is in the test extra
    ml_dtypes = None
    bfloat16 = None

# Max error / scale allowed regardless of torch, per storage dtype. fp32: a few ulps of
# accumulated rounding; fp16/bf16: the final rounding to the storage type dominates
# (half an ulp relative: 4.9e-4 and 3.9e-3), plus fp32 work before it.
TOLERANCE = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float16): 1.5e-3,
}
if bfloat16 is not None:
    TOLERANCE[bfloat16] = 1.2e-2

FLOAT_DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)] + (
    [bfloat16] if bfloat16 is not None else []
)


def dtype_id(dt):
    return np.dtype(dt).name


def to64(a):
    return np.asarray(a).astype(np.float64)


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def max_error(got, ref):
    """Max |got - ref| over the finite reference entries; inf if NaN/inf patterns differ."""
    got, ref = to64(got), to64(ref)
    if got.shape != ref.shape:
        raise AssertionError(f"shape {got.shape} != reference shape {ref.shape}")
    ref_nan, got_nan = np.isnan(ref), np.isnan(got)
    if not np.array_equal(ref_nan, got_nan):
        return np.inf
    ref_inf, got_inf = np.isinf(ref), np.isinf(got)
    if not np.array_equal(ref_inf, got_inf) or not np.array_equal(ref[ref_inf], got[got_inf]):
        return np.inf
    fin = ~(ref_nan | ref_inf)
    if not fin.any():
        return 0.0
    return float(np.max(np.abs(got[fin] - ref[fin])))


def output_scale(ref):
    """max |ref| over the finite entries; the smallest normal float64 when that is 0 (a result
    that must be exactly zero, e.g. fully masked attention rows)."""
    ref = to64(ref)
    fin = np.abs(ref[np.isfinite(ref)])
    m = float(fin.max()) if fin.size else 0.0
    return m if m > 0 else float(np.finfo(np.float64).tiny)


def assert_close(got, ref, dtype, *, torch_result=None, scale=None, floor=0.0, what="result"):
    """The pass rule: error <= max(2 * torch error, TOLERANCE[dtype] * scale, floor), scale
    defaulting to the reference output's magnitude (output_scale). `floor` is an absolute
    rounding bound a caller derives from the algorithm (see test_backward.py), for results
    that cancel to ~0 in exact arithmetic."""
    dtype = np.dtype(dtype)
    if scale is None:
        scale = output_scale(ref)
    err = max_error(got, ref)
    bound = max(TOLERANCE[dtype] * scale, floor)
    torch_err = None
    if torch_result is not None:
        torch_err = max_error(torch_result, ref)
        if np.isfinite(torch_err):
            bound = max(bound, 2 * torch_err)
    assert err <= bound, (
        f"{what}: max error {err:.3e} vs float64 exceeds bound {bound:.3e} "
        f"(dtype {dtype.name}, scale {scale:.3g}, torch error {torch_err})"
    )


def grad_rounding_floors(q, k, o, dout, scale=None, key_mass=None):
    """Absolute rounding floors of (dq, dk, dv) from a FlashAttention-2 backward.

    D_i = rowsum(dO_i * O_i) is computed from the stored O, rounded to its dtype (unit roundoff
    eps), so dS_ij = P_ij (dP_ij - D_i) carries up to ~eps * sum_d |dO_id O_id| * P_ij of error
    even where it cancels to exactly 0 (one key per row: the float64 gradient is 0, torch's
    fused one is not either); dq_i then gets it times scale * max|K| (sum_j P_ij = 1), and dk_j
    times scale * max|Q| * sum_i P_ij over the rows of every head of the group: key_mass, the
    largest such sum (torch_reference_grads(with_key_mass=True)); without it, the number of
    query rows times the group size, the most it can be."""
    eps = {np.dtype(np.float64): 2.0 ** -53, np.dtype(np.float32): 2.0 ** -24,
           np.dtype(np.float16): 2.0 ** -11}.get(np.dtype(o.dtype), 2.0 ** -8)  # else bfloat16
    d_err = 4 * eps * float((np.abs(to64(dout)) * np.abs(to64(o))).sum(-1).max(initial=0.0))
    sc = 1 / np.sqrt(q.shape[-1]) if scale is None else abs(scale)
    if key_mass is None:
        key_mass = q.shape[2] * (q.shape[1] // max(k.shape[1], 1))
    return (d_err * sc * float(np.abs(to64(k)).max(initial=0.0)),
            d_err * sc * float(np.abs(to64(q)).max(initial=0.0)) * key_mass, 0.0)


# ---- references ----


def softmax_ref(x, axis):
    """float64 softmax on the (already rounded) inputs, torch's NaN/inf rules."""
    x = to64(x)
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - m)
        return e / np.sum(e, axis=axis, keepdims=True)


def torch_dtype(dt):
    import torch

    dt = np.dtype(dt)
    if bfloat16 is not None and dt == bfloat16:
        return torch.bfloat16
    return {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float64): torch.float64,
        np.dtype(np.float16): torch.float16,
    }[dt]


def to_torch(a):
    """numpy -> torch without going through float64 (bfloat16 via its bits)."""
    import torch

    a = np.ascontiguousarray(a)
    if bfloat16 is not None and a.dtype == bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def from_torch(t, dtype):
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(bfloat16)
    return t.detach().contiguous().numpy().astype(dtype)


def attention_ref(q, k, v, *, mask=None, causal=False, bottom_right=False, scale=None,
                  window=None, alibi=None, softcap=None):
    """Float64 attention over (B, H, Sq, D) / (B, Hkv, Sk, D) with attnkit's full semantics.

    Returns (out, lse); a row with no allowed key gives out 0 and lse -inf.
    """
    q, k, v = to64(q), to64(k), to64(v)
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Sk == 0:
        return np.zeros((B, H, Sq, v.shape[3])), np.full((B, H, Sq), -np.inf)
    G = H // Hkv
    k = np.repeat(k, G, axis=1)
    v = np.repeat(v, G, axis=1)
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = np.einsum("bhid,bhjd->bhij", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    off = Sk - Sq if bottom_right else 0
    i = np.arange(Sq)[:, None] + off
    j = np.arange(Sk)[None, :]
    if alibi is not None:
        slopes = np.broadcast_to(to64(alibi).reshape((-1, H) if np.ndim(alibi) == 2 else (1, H)), (B, H))
        s = s - slopes[:, :, None, None] * np.abs(i - j)[None, None]
    allowed = np.ones((Sq, Sk), bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
    allowed = np.broadcast_to(allowed, s.shape).copy()
    add = None
    if mask is not None:
        m = np.broadcast_to(mask, s.shape)
        if m.dtype == np.bool_:
            allowed &= m
        else:
            m = to64(m)
            allowed &= m != -np.inf
            add = m
    with np.errstate(invalid="ignore"):
        s = np.where(allowed, s, -np.inf)
        if add is not None:
            s = np.where(allowed, s + add, -np.inf)
        mx = np.max(s, axis=-1, keepdims=True)
        empty = ~np.isfinite(mx) & (mx < 0)  # all -inf
        mx = np.where(empty, 0.0, mx)
        p = np.exp(s - mx)
        l = p.sum(-1, keepdims=True)
        pv = np.where(allowed, p, 0.0)
        out = np.einsum("bhij,bhjd->bhid", pv, v) if np.isfinite(v).all() else _masked_pv(pv, v)
        out = np.where(empty, 0.0, out / np.where(empty, 1.0, l))
        lse = np.where(empty[..., 0], -np.inf, (mx + np.log(np.where(empty, 1.0, l)))[..., 0])
    return out, lse


def _masked_pv(p, v):
    """P @ V where P == 0 entries skip their V row (so NaN there does not propagate)."""
    out = np.zeros(p.shape[:-1] + (v.shape[-1],))
    B, H, Sq, Sk = p.shape
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                nz = p[b, h, i] != 0
                out[b, h, i] = p[b, h, i, nz] @ v[b, h, nz]
    return out


def torch_equivalent(q, k, v, *, mask=None, causal=False, bottom_right=False, scale=None,
                     window=None, alibi=None, softcap=None):
    """torch's own result for the 2x-torch rule: ``F.scaled_dot_product_attention`` on the same
    (rounded) inputs in their dtype, with attnkit's options written as the float bias mask a
    torch user would pass (causal/window/bool mask -> -inf, ALiBi -> -slope * distance).

    None where torch has no equivalent (softcap) or for half dtypes, where a bias rounded to
    fp16/bf16 would measure the mask's own rounding rather than the kernel (their bound is the
    tolerance table: the output's rounding dominates there)."""
    import torch
    import torch.nn.functional as F

    if softcap or np.dtype(q.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        return None
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    off = Sk - Sq if bottom_right else 0
    i = np.arange(Sq)[:, None] + off
    j = np.arange(Sk)[None, :]
    bias = np.zeros((B, H, Sq, Sk))
    if alibi is not None:
        slopes = np.broadcast_to(to64(alibi).reshape((-1, H) if np.ndim(alibi) == 2 else (1, H)), (B, H))
        bias = bias - slopes[:, :, None, None] * np.abs(i - j)[None, None]
    allowed = np.ones((Sq, Sk), bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        if window[1] >= 0:
            allowed &= j <= i + window[1]
    allowed = np.broadcast_to(allowed, bias.shape).copy()
    if mask is not None:
        m = np.broadcast_to(mask, bias.shape)
        if m.dtype == np.bool_:
            allowed &= m
        else:
            allowed &= to64(m) != -np.inf
            bias = bias + np.where(allowed, to64(m), 0.0)
    bias = np.where(allowed, bias, -np.inf)
    t = [to_torch(a) for a in (q, k, v)]
    o = F.scaled_dot_product_attention(*t, attn_mask=torch.from_numpy(bias.astype(q.dtype)),
                                       scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return from_torch(o, q.dtype)

def nonfinite_cases(rng, B, H, Hkv, Sq, Sk, D, dtype):
    """Inputs holding NaN/inf, each as (name, q, k, v, opts) with attention_ref's option names.

    attention_ref gives the expected result: NaN exactly in the rows that attend a non-finite
    entry (a query row, a key, a value or a float-mask value that is not masked out), as torch
    propagates them, while rows to which the entry is masked out stay finite, and a fully
    masked row stays 0 (lse -inf) whatever its query holds. Positions are chosen so that every
    case has both kinds of row where the shape allows it.
    """
    def fresh():
        return (randn(rng, (B, H, Sq, D), dtype), randn(rng, (B, Hkv, Sk, D), dtype),
                randn(rng, (B, Hkv, Sk, D), dtype))

    r = Sq // 2                    # the poisoned query row
    j = max(0, Sk - Sq // 2 - 1)   # a key that bottom-right causal rows >= about Sq/2 attend
    cases = []
    q, k, v = fresh()
    q[0, 0, r] = np.nan
    cases.append(("nan_query_row", q, k, v, {}))
    q, k, v = fresh()
    q[0, H - 1, r, 1 % D] = np.inf
    k[0, :, 0, 1 % D] = 1.0  # some score of that row is +inf
    cases.append(("inf_query_element", q, k, v, {}))
    q, k, v = fresh()
    q[0, 0, r, 0] = -np.inf
    k[0, :, 0, 0] = -1.0  # -inf * -1: a +inf score
    cases.append(("neg_inf_query_element", q, k, v, {}))
    q, k, v = fresh()
    k[0, 0, j] = np.nan
    cases.append(("nan_key_causal", q, k, v, dict(causal=True, bottom_right=True)))
    q, k, v = fresh()
    k[0, 0, j, 0] = np.nan
    cases.append(("nan_key_element", q, k, v, {}))
    q, k, v = fresh()
    v[0, 0, j] = np.nan
    cases.append(("nan_value_causal", q, k, v, dict(causal=True, bottom_right=True)))
    q, k, v = fresh()
    k[0, :, j] = np.nan
    v[0, :, j] = np.nan
    mask = np.ones((1, 1, Sq, Sk), bool)
    mask[..., j] = False
    cases.append(("nan_kv_masked_bool", q, k, v, dict(mask=mask)))
    q, k, v = fresh()
    k[0, :, j] = np.nan
    v[0, :, j] = np.inf
    fmask = np.zeros((Sq, Sk), np.float32)
    fmask[:, j] = -np.inf
    cases.append(("nonfinite_kv_masked_float", q, k, v, dict(mask=fmask)))
    q, k, v = fresh()
    fmask = (rng.standard_normal((Sq, Sk))).astype(np.float32)
    fmask[r, j] = np.nan
    cases.append(("nan_float_mask", q, k, v, dict(mask=fmask)))
    q, k, v = fresh()
    fmask = np.zeros((Sq, Sk), np.float32)
    fmask[r, j] = np.inf
    cases.append(("inf_float_mask", q, k, v, dict(mask=fmask)))
    q, k, v = fresh()
    q[0, :, r] = np.nan
    mask = np.ones((1, 1, Sq, Sk), bool)
    mask[..., r, :] = False
    cases.append(("nan_query_fully_masked_row", q, k, v, dict(mask=mask)))
    # A NaN value whose weight underflows to 0 in float32 (exp(-200)) is still attended: torch
    # gives NaN there too (0 * NaN in P @ V); only masked-out keys are skipped.
    q, k, v = fresh()
    q[0, 0, r] = 0.0
    q[0, 0, r, 0] = 1.0
    k[0, 0, :, 0] = 0.0
    k[0, 0, j, 0] = -200.0 * np.sqrt(D)
    v[0, 0, j] = np.nan
    cases.append(("nan_value_underflowed_weight", q, k, v, {}))
    return cases


def merge_ref(outs, lses):
    """float64 reference: empty parts (lse -inf) skipped; all-empty rows give 0, -inf."""
    o, l = outs.astype(np.float64), lses.astype(np.float64)
    m = l.max(0)
    ms = np.where(np.isneginf(m), 0.0, m)
    empty = np.isneginf(l)
    w = np.where(empty, 0.0, np.exp(np.where(empty, 0.0, l - ms)))
    s = w.sum(0)
    vals = np.where(empty[..., None], 0.0, o)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(s[..., None] > 0, (w[..., None] * vals).sum(0) / np.where(s > 0, s, 1)[..., None], 0.0)
        lse = np.where(s > 0, ms + np.log(np.where(s > 0, s, 1)), -np.inf)
    bad = (np.isnan(l) | np.isposinf(l)).any(0)
    out[bad] = np.nan
    lse[bad] = np.nan
    return out, lse
