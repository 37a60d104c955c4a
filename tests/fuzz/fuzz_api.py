"""Property-based fuzzing of every public function (run by tests/test_fuzz.py in a subprocess,
so a crash is reported as a failure instead of killing pytest).

Each drawn case either matches the float64 reference within the dtype tolerance or raises
TypeError/ValueError with a message (and a refused attention_with_kvcache call leaves the
caches untouched; an accepted one writes exactly the new rows). ATTNKIT_FUZZ_EXAMPLES sets the
examples per property (100 in CI, derandomized); ATTNKIT_FUZZ_SEED=N draws other cases.
"""
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import attnkit  # noqa: E402
from reference import (  # noqa: E402
    TOLERANCE,
    attention_ref,
    bfloat16,
    grad_rounding_floors,
    max_error,
    merge_ref,
    output_scale,
    softmax_ref,
    to64,
)

EXAMPLES = int(os.environ.get("ATTNKIT_FUZZ_EXAMPLES", "100"))
# CI: derandomized (the same cases every run). ATTNKIT_FUZZ_SEED=N explores other cases,
# reproducibly: a long run with a new seed finds what the fixed one cannot.
_SEED = os.environ.get("ATTNKIT_FUZZ_SEED")
_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=_SEED is None,
                     suppress_health_check=list(HealthCheck), database=None)


def SETTINGS(test):
    """The suite's settings, plus the explicit seed when ATTNKIT_FUZZ_SEED is set."""
    test = _SETTINGS(test)
    return hypothesis_seed(int(_SEED))(test) if _SEED is not None else test
FLOATS = [np.float32, np.float64, np.float16] + ([bfloat16] if bfloat16 is not None else [])
ANY_DTYPES = FLOATS + [np.int32, np.int64, np.bool_, np.complex64]


def expected_error(fn, *args, **kwargs):
    """Call; a TypeError/ValueError with a message is an acceptable outcome."""
    try:
        return fn(*args, **kwargs), None
    except (TypeError, ValueError) as e:
        assert str(e), "an error without a message"
        return None, e


def close(got, ref, dtype, scale=None, factor=4.0, floor=0.0):
    """factor x the tolerance table, relative to the output's magnitude by default."""
    err = max_error(got, ref)
    bound = max(factor * TOLERANCE[np.dtype(dtype)] * (output_scale(ref) if scale is None else scale), floor)
    assert err <= bound, f"error {err} > {bound} (dtype {np.dtype(dtype).name})"


@st.composite
def views(draw, shape, dtype):
    """An array of `shape` as a contiguous array or a strided / reversed / broadcast view."""
    kind = draw(st.sampled_from(["plain", "step", "reverse", "fortran", "broadcast"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    if kind == "step":
        base = (rng.standard_normal(tuple(s * 2 for s in shape)) * scale).astype(dtype)
        return base[tuple(slice(None, None, 2) for _ in shape)]
    if kind == "broadcast" and len(shape) > 0 and all(s > 0 for s in shape):
        small = (rng.standard_normal((1,) + tuple(shape[1:])) * scale).astype(dtype)
        return np.broadcast_to(small, shape)
    a = (rng.standard_normal(shape) * scale).astype(dtype)
    if kind == "reverse":
        return a[tuple(slice(None, None, -1) for _ in shape)]
    if kind == "fortran":
        return np.asfortranarray(a)
    return a


# ---- softmax -------------------------------------------------------------------------------


@SETTINGS
@given(st.data())
def test_softmax(data):
    ndim = data.draw(st.integers(0, 4))
    shape = tuple(data.draw(st.lists(st.integers(0, 7), min_size=ndim, max_size=ndim)))
    dtype = data.draw(st.sampled_from(ANY_DTYPES))
    x = data.draw(views(shape, dtype)) if dtype in FLOATS else np.zeros(shape, dtype)
    axis = data.draw(st.integers(-5, 5))
    out_kind = data.draw(st.sampled_from(["none", "good", "wrong_shape", "wrong_dtype", "inplace"]))
    out = None
    if out_kind == "good":
        out = np.full(shape, np.nan, dtype=dtype)
    elif out_kind == "wrong_shape":
        out = np.zeros(shape + (2,), dtype=dtype)
    elif out_kind == "wrong_dtype":
        out = np.zeros(shape, np.float64 if dtype != np.float64 else np.float32)
    elif out_kind == "inplace" and x.flags.writeable:
        x = x.copy()
        out = x
    ref_in = x.copy() if x.size else x
    res, err = expected_error(attnkit.softmax, x, axis=axis, out=out)
    if err is None:
        nd = max(ndim, 1)
        assert -nd <= axis < nd and dtype in FLOATS
        if x.size:
            close(res, softmax_ref(ref_in, axis), dtype)


# ---- matmul --------------------------------------------------------------------------------


@SETTINGS
@given(st.data())
def test_matmul(data):
    dtype = data.draw(st.sampled_from(FLOATS + [np.int32]))
    m, k, n = (data.draw(st.integers(0, 20)) for _ in range(3))
    batch_a = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    batch_b = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    sa = batch_a + ((m, k) if data.draw(st.booleans()) else (k,))
    kb = k if data.draw(st.integers(0, 9)) else k + 1  # sometimes misaligned
    sb = batch_b + ((kb, n) if data.draw(st.booleans()) else (kb,))
    if dtype in FLOATS:
        a, b = data.draw(views(sa, dtype)), data.draw(views(sb, dtype))
    else:
        a, b = np.ones(sa, dtype), np.ones(sb, dtype)
    if data.draw(st.integers(0, 9)) == 0:
        b = b.astype(np.float64 if dtype != np.float64 else np.float32)
    res, err = expected_error(attnkit.matmul, a, b)
    if err is None:
        ref = np.matmul(to64(a), to64(b))
        scale = float(np.max(np.matmul(np.abs(to64(a)), np.abs(to64(b))), initial=1.0))
        assert res.shape == ref.shape and res.dtype == a.dtype
        close(res, ref, dtype, scale=max(1.0, scale))


# ---- attention -----------------------------------------------------------------------------


@st.composite
def attention_case(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    G = draw(st.integers(1, 3))
    H = Hkv * G if draw(st.integers(0, 9)) else Hkv * G + 1  # sometimes not a multiple
    Sq, Sk = draw(st.integers(0, 20)), draw(st.integers(0, 40))
    D, Dv = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    qd = draw(st.sampled_from(FLOATS))
    kvd = qd if draw(st.integers(0, 3)) else draw(st.sampled_from(FLOATS))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    q = rng.standard_normal((B, H, Sq, D)).astype(qd)
    k = rng.standard_normal((B, Hkv, Sk, D)).astype(kvd)
    v = rng.standard_normal((B, Hkv, Sk, Dv)).astype(kvd)
    opts = {}
    mk = draw(st.sampled_from(["none", "bool", "keypad", "float", "bad"]))
    if mk == "bool":
        opts["mask"] = rng.random((B, 1, Sq, Sk)) < 0.6
    elif mk == "keypad":
        opts["mask"] = rng.random((B, 1, 1, Sk)) < 0.8
    elif mk == "float":
        f = rng.standard_normal((Sq, Sk)).astype(np.float32)
        f[rng.random((Sq, Sk)) < 0.2] = -np.inf
        opts["mask"] = f
    elif mk == "bad":
        opts["mask"] = np.ones((Sq + 1, Sk + 2), bool)
    opts["causal"] = draw(st.booleans())
    opts["causal_align"] = draw(st.sampled_from(["top_left", "bottom_right"]))
    if draw(st.booleans()):
        opts["window"] = (draw(st.integers(-2, 8)), draw(st.integers(-1, 8)))
    if draw(st.booleans()):
        opts["alibi_slopes"] = rng.random(H).astype(np.float32)
    if draw(st.booleans()):
        opts["softcap"] = draw(st.sampled_from([0.5, 3.0, -1.0]))
    if draw(st.booleans()):
        opts["scale"] = draw(st.sampled_from([0.0, 0.3, 2.0, float("inf")]))
    return q, k, v, opts


def ref_for(q, k, v, opts):
    return attention_ref(q, k, v, mask=opts.get("mask"), causal=opts.get("causal", False),
                         bottom_right=opts.get("causal_align") == "bottom_right",
                         scale=opts.get("scale"), window=opts.get("window"),
                         alibi=opts.get("alibi_slopes"), softcap=opts.get("softcap"))


@SETTINGS
@given(attention_case(), st.sampled_from(["bhsd", "bshd"]))
def test_attention(case, layout):
    q, k, v, opts = case
    args = (q, k, v) if layout == "bhsd" else tuple(a.transpose(0, 2, 1, 3) for a in (q, k, v))
    res, err = expected_error(attnkit.attention, *args, layout=layout, return_lse=True, **opts)
    if err is None:
        o, lse = res
        if layout == "bshd":
            o = o.transpose(0, 2, 1, 3)
        ref, ref_lse = ref_for(q, k, v, opts)
        close(o, ref, q.dtype)
        close(lse, ref_lse, np.float32)


@SETTINGS
@given(attention_case())
def test_attention_backward(case):
    q, k, v, opts = case
    opts.pop("alibi_slopes", None)
    res, err = expected_error(attnkit.attention, q, k, v, return_lse=True, **opts)
    if err is not None:
        return
    o, lse = res
    dout = np.ones_like(o)
    res, err = expected_error(attnkit.attention_backward, dout, q, k, v, o, lse, **opts)
    if err is not None:
        assert k.dtype != q.dtype, err  # the one combination the forward takes and backward refuses
        return
    import torch

    from test_backward import torch_reference_grads

    kw = dict(mask=opts.get("mask"), causal=opts.get("causal", False),
              bottom_right=opts.get("causal_align") == "bottom_right", scale=opts.get("scale"),
              window=opts.get("window"), softcap=opts.get("softcap"))
    _, rq, rk, rv = torch_reference_grads(q, k, v, dout, **kw)
    floors = grad_rounding_floors(q, k, o, dout, opts.get("scale"))
    for got, ref, fl in zip(res, (rq, rk, rv), floors):
        close(got, ref, q.dtype, factor=8.0, floor=fl)


@SETTINGS
@given(st.data())
def test_attention_varlen(data):
    n = data.draw(st.integers(1, 4))
    lens_q = data.draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    lens_k = data.draw(st.lists(st.integers(0, 12), min_size=n, max_size=n))
    H, Hkv, D = data.draw(st.sampled_from([(2, 1), (2, 2), (3, 2)])) + (data.draw(st.integers(1, 9)),)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    if data.draw(st.integers(0, 9)) == 0:
        cu_k = cu_k[::-1].copy()
    q = rng.standard_normal((int(cu_q[-1]), H, D)).astype(np.float32)
    k = rng.standard_normal((int(max(cu_k.max(), 0)), Hkv, D)).astype(np.float32)
    v = rng.standard_normal((int(max(cu_k.max(), 0)), Hkv, D)).astype(np.float32)
    causal = data.draw(st.booleans())
    res, err = expected_error(attnkit.attention_varlen, q, k, v, cu_q, cu_k, causal=causal)
    if err is None:
        for b in range(n):
            qs = q[cu_q[b]:cu_q[b + 1]].transpose(1, 0, 2)[None]
            if qs.shape[2] == 0:
                continue
            ks = k[cu_k[b]:cu_k[b + 1]].transpose(1, 0, 2)[None]
            vs = v[cu_k[b]:cu_k[b + 1]].transpose(1, 0, 2)[None]
            ref, _ = attention_ref(qs, ks, vs, causal=causal, bottom_right=True)
            close(res[cu_q[b]:cu_q[b + 1]].transpose(1, 0, 2)[None], ref, np.float32)


@SETTINGS
@given(st.data())
def test_attention_with_kvcache(data):
    B, Hkv, G, D = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 16))
    H = Hkv * G
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    paged = data.draw(st.booleans())
    page, nblk = 4, 5
    smax = page * nblk
    lens = np.array(data.draw(st.lists(st.integers(-1, smax + 1), min_size=B, max_size=B)), np.int32)
    s_new = data.draw(st.integers(0, 3))
    kvd = data.draw(st.sampled_from([np.float32, np.float16]))
    q = rng.standard_normal((B, max(s_new, 1), H, D)).astype(np.float32)
    kn = rng.standard_normal((B, s_new, Hkv, D)).astype(kvd) if s_new else None
    vn = rng.standard_normal((B, s_new, Hkv, D)).astype(kvd) if s_new else None
    if paged:
        pages = B * nblk
        kc = rng.standard_normal((pages, page, Hkv, D)).astype(kvd)
        vc = rng.standard_normal((pages, page, Hkv, D)).astype(kvd)
        bt = rng.permutation(pages).reshape(B, nblk).astype(np.int32)
        if data.draw(st.integers(0, 5)) == 0:
            bt[0, 0] = pages + 3
    else:
        kc = rng.standard_normal((B, smax, Hkv, D)).astype(kvd)
        vc = rng.standard_normal((B, smax, Hkv, D)).astype(kvd)
        bt = None
    k0, v0 = kc.copy(), vc.copy()
    res, err = expected_error(attnkit.attention_with_kvcache, q, kc, vc, k=kn, v=vn,
                              cache_seqlens=lens, block_table=bt)
    if err is not None:
        assert np.array_equal(kc, k0) and np.array_equal(vc, v0), "cache changed on error"
        return
    # The expected caches, built from the copies taken before the call: the new rows at
    # positions lens[b] .. lens[b] + s_new - 1 of each sequence, nothing else changed.
    total = lens + s_new
    ke, ve = k0.copy(), v0.copy()
    for b in range(B):
        for t in range(s_new):
            pos = int(lens[b]) + t
            if paged:
                ke[bt[b, pos // page], pos % page] = kn[b, t]
                ve[bt[b, pos // page], pos % page] = vn[b, t]
            else:
                ke[b, pos], ve[b, pos] = kn[b, t], vn[b, t]
    assert np.array_equal(kc, ke) and np.array_equal(vc, ve), "the append wrote the wrong cache rows"
    for b in range(B):
        if paged:
            used = bt[b, : -(-int(total[b]) // page)]  # only the pages the sequence touches
            rows = np.concatenate([ke[p] for p in used] + [ke[:0, 0]])[: total[b]]
            vrows = np.concatenate([ve[p] for p in used] + [ve[:0, 0]])[: total[b]]
        else:
            rows, vrows = ke[b, : total[b]], ve[b, : total[b]]
        ref, _ = attention_ref(q[b:b + 1].transpose(0, 2, 1, 3), rows[None].transpose(0, 2, 1, 3),
                               vrows[None].transpose(0, 2, 1, 3), causal=True, bottom_right=True)
        close(res[b:b + 1].transpose(0, 2, 1, 3), ref, np.float32)


@SETTINGS
@given(attention_case())
def test_torch_sdpa_twin(case):
    """The twin against torch on the same inputs, every dtype (half precision and mixed dtypes
    included): where torch raises, the twin raises alike; else it matches a float64 torch
    reference within max(2 x torch's own error, the dtype tolerance x the output's magnitude)."""
    torch = pytest.importorskip("torch")
    import attnkit.torch as at
    import torch.nn.functional as F

    from reference import TOLERANCE, max_error, to_torch

    q, k, v, opts = case
    tq, tk, tv = to_torch(q), to_torch(k), to_torch(v)
    mask = opts.get("mask")
    # A float mask is float32 (torch takes float32 with any query dtype), or the query's dtype.
    tm = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))
    if tm is not None and tm.dtype != torch.bool and q.shape[0] % 2 == 0:
        tm = tm.to(tq.dtype)
    kw = dict(attn_mask=tm, is_causal=opts.get("causal", False), enable_gqa=tq.shape[1] != tk.shape[1])
    try:  # torch in the inputs' own dtypes: its errors and its own rounding
        theirs = F.scaled_dot_product_attention(tq, tk, tv, **kw)
    except (RuntimeError, ValueError, IndexError) as e:  # torch refuses: so must we, alike
        with pytest.raises(type(e)):
            at.scaled_dot_product_attention(tq, tk, tv, **kw)
        return
    m64 = None if tm is None else (tm if tm.dtype == torch.bool else tm.double())
    # (float64 takes torch's same CPU kernel: is_causal with a mask applies both there too)
    want = F.scaled_dot_product_attention(tq.double(), tk.double(), tv.double(), **dict(kw, attn_mask=m64))
    got = at.scaled_dot_product_attention(tq, tk, tv, **kw)
    assert got.shape == want.shape and got.dtype == tq.dtype
    want, got, theirs = want.numpy(), got.double().numpy(), theirs.double().numpy()
    fin = np.isfinite(want)
    out_scale = float(np.abs(want[fin]).max()) if fin.any() else 1.0
    bound = max(2 * max_error(theirs, want), TOLERANCE[np.dtype(q.dtype)] * max(out_scale, 1e-3))
    err = max_error(got, want)
    assert err <= bound, f"error {err} > {bound} ({np.dtype(q.dtype).name}, output scale {out_scale})"


# ---- merge_attention_states ----------------------------------------------------------------


@SETTINGS
@given(st.data())
def test_merge_attention_states(data):
    n = data.draw(st.integers(0, 4))
    rows = tuple(data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    dv = data.draw(st.integers(0, 40))
    dtype = data.draw(st.sampled_from(ANY_DTYPES))
    lse_dtype = data.draw(st.sampled_from([np.float32, np.float64, np.float16, np.int32]))
    shape = (n,) + rows + (dv,)
    outs = data.draw(views(shape, dtype)) if dtype in FLOATS else np.zeros(shape, dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    lses = (rng.standard_normal(shape[:-1]) * 3).astype(lse_dtype)
    if lse_dtype != np.int32 and lses.size:
        lses[rng.random(lses.shape) < 0.3] = -np.inf  # empty parts, sometimes whole rows
    if data.draw(st.booleans()):
        lses = lses[..., :max(0, rows[-1] - 1)]       # a wrong shape
    out_kind = data.draw(st.sampled_from(["none", "good", "wrong_shape", "wrong_dtype", "part0",
                                          "part1"]))
    out = None
    if out_kind == "good":
        out = np.full(shape[1:], np.nan, dtype=dtype)
    elif out_kind == "wrong_shape":
        out = np.zeros(shape[1:-1] + (dv + 1,), dtype=dtype)
    elif out_kind == "wrong_dtype":
        out = np.zeros(shape[1:], np.float64 if dtype != np.float64 else np.float32)
    elif out_kind in ("part0", "part1") and n > int(out_kind[-1]):
        outs = np.ascontiguousarray(outs)
        out = outs[int(out_kind[-1])]
    ref_outs = outs.copy()
    valid = (n >= 1 and dtype in FLOATS and lse_dtype in (np.float32, np.float64)
             and lses.shape == shape[:-1] and out_kind in ("none", "good", "part0", "part1")
             and not (out_kind == "part1" and out is not None))
    res, err = expected_error(attnkit.merge_attention_states, outs, lses, out=out)
    assert err is None or not valid, f"a valid call was refused: {err}"
    if err is None:
        assert n >= 1 and dtype in FLOATS and lse_dtype in (np.float32, np.float64)
        assert out_kind != "part1" or out is None or outs[0].size == 0
        got, lse = res
        want, want_lse = merge_ref(ref_outs, lses)
        if got.size:
            close(got, want, dtype)
        assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
