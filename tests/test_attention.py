import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnkit
from conftest import poisoned
from reference import (
    FLOAT_DTYPES,
    assert_close,
    attention_ref,
    bfloat16,
    dtype_id,
    from_torch,
    nonfinite_cases,
    randn,
    to64,
    to_torch,
    torch_equivalent,
)

ISA_KERNELS = ("attention_fwd",)  # the kernel-table entries tested here (conftest.isas_for)


def make_qkv(rng, B, H, Hkv, Sq, Sk, D, Dv=None, dtype=np.float32, kv_dtype=None):
    Dv = D if Dv is None else Dv
    q = randn(rng, (B, H, Sq, D), dtype)
    k = randn(rng, (B, Hkv, Sk, D), kv_dtype or dtype)
    v = randn(rng, (B, Hkv, Sk, Dv), kv_dtype or dtype)
    return q, k, v


def torch_sdpa(q, k, v, mask=None, causal=False, scale=None):
    """torch SDPA in the inputs' dtype (for the 2x-torch-error rule)."""
    tq, tk, tv = to_torch(q), to_torch(k), to_torch(v)
    tm = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).to(tq.dtype if mask.dtype != np.bool_ else torch.bool)
    o = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm, is_causal=causal, scale=scale,
                                       enable_gqa=tq.shape[1] != tk.shape[1])
    return from_torch(o, q.dtype)


def check(q, k, v, got, *, use_torch=False, lse=None, **kw):
    """Against the float64 reference, bounded by the output's magnitude (reference.py); for
    float32/float64 also by 2x torch's own error on the same problem (torch_equivalent: its
    SDPA with the options as a bias mask), so score rounding torch shares is allowed for.
    use_torch=True: torch's SDPA called with the mask/causal as given (half dtypes too)."""
    ref, ref_lse = attention_ref(q, k, v, **kw)
    if use_torch:
        tres = torch_sdpa(q, k, v, mask=kw.get("mask"), causal=kw.get("causal", False),
                          scale=kw.get("scale"))
    else:
        tres = torch_equivalent(q, k, v, **kw)
    assert_close(got, ref, q.dtype, torch_result=tres, what="attention out")
    if lse is not None:
        assert lse.dtype == np.float32
        assert_close(lse, ref_lse, np.float32, what="lse")


@pytest.mark.parametrize("D", [1, 8, 40, 59, 64, 80, 96, 111, 128, 160, 256])
def test_head_dims(isa, rng, D):
    q, k, v = make_qkv(rng, 1, 2, 2, 17, 113, D)
    check(q, k, v, attnkit.attention(q, k, v), use_torch=True)
    o, lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
    check(q, k, v, o, lse=lse, use_torch=True, causal=True)


@pytest.mark.parametrize("D,Dv", [(64, 32), (40, 96), (7, 1), (128, 256)])
def test_dv_differs(isa, rng, D, Dv):
    q, k, v = make_qkv(rng, 2, 2, 1, 33, 70, D, Dv)
    check(q, k, v, attnkit.attention(q, k, v), use_torch=True)


SEQS = [(1, 1), (2, 17), (17, 2), (113, 128), (128, 113), (1, 1023), (1023, 17), (128, 1023)]


@pytest.mark.parametrize("sq,sk", SEQS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_causal(isa, rng, sq, sk, causal):
    q, k, v = make_qkv(rng, 1, 2, 2, sq, sk, 64)
    check(q, k, v, attnkit.attention(q, k, v, causal=causal), use_torch=True, causal=causal)
    o, lse = attnkit.attention(q, k, v, causal=causal, causal_align="bottom_right", return_lse=True)
    check(q, k, v, o, lse=lse, causal=causal, bottom_right=True)


@pytest.mark.parametrize("H,Hkv", [(8, 2), (8, 1), (6, 6)])
def test_gqa_mqa(isa, rng, H, Hkv):
    q, k, v = make_qkv(rng, 2, H, Hkv, 50, 77, 32)
    check(q, k, v, attnkit.attention(q, k, v), use_torch=True)
    check(q, k, v, attnkit.attention(q, k, v, causal=True), use_torch=True, causal=True)


def masks(rng, B, H, Sq, Sk):
    lens = rng.integers(1, Sk + 1, size=B)
    keypad = (np.arange(Sk)[None, :] < lens[:, None])[:, None, None, :]
    full_bool = rng.random((B, H, Sq, Sk)) < 0.7
    full_bool[:, :, 0, :] = False  # a fully masked row
    addf = (rng.standard_normal((B, 1, Sq, Sk)) * 2).astype(np.float32)
    addf_inf = addf.copy()
    addf_inf[..., ::3] = -np.inf
    return {
        "keypad": keypad,
        "bool": full_bool,
        "float": addf,
        "float_inf": addf_inf,
        "2d": rng.random((Sq, Sk)) < 0.5,
        "broadcast_rows": np.broadcast_to(rng.random((1, 1, 1, Sk)) < 0.8, (B, H, 1, Sk)),
    }


@pytest.mark.parametrize("kind", ["keypad", "bool", "float", "float_inf", "2d", "broadcast_rows"])
def test_masks(isa, rng, kind):
    B, H, Sq, Sk = 3, 4, 37, 300
    q, k, v = make_qkv(rng, B, H, 2, Sq, Sk, 48)
    mask = masks(rng, B, H, Sq, Sk)[kind]
    o, lse = attnkit.attention(q, k, v, mask=mask, return_lse=True)
    use_torch = kind in ("keypad", "float", "2d")  # torch gives NaN for fully masked bool rows
    check(q, k, v, o, lse=lse, mask=mask, use_torch=use_torch)


def test_fully_masked_rows_give_zero(isa, rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 10, 20, 16)
    mask = np.ones((1, 2, 10, 20), bool)
    mask[0, 1, 3] = False
    o, lse = attnkit.attention(q, k, v, mask=mask, return_lse=True)
    assert (o[0, 1, 3] == 0).all() and lse[0, 1, 3] == -np.inf
    # Sq > Sk with bottom-right causal: the first rows see no key at all
    q, k, v = make_qkv(rng, 1, 1, 1, 9, 4, 8)
    o, lse = attnkit.attention(q, k, v, causal=True, causal_align="bottom_right", return_lse=True)
    assert (o[0, 0, :5] == 0).all() and np.isneginf(lse[0, 0, :5]).all()
    check(q, k, v, o, lse=lse, causal=True, bottom_right=True)


@pytest.mark.parametrize("window", [(0, 0), (16, 0), (5, 7), (-1, 3), (40, -1)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_windows(isa, rng, window, align):
    q, k, v = make_qkv(rng, 1, 2, 1, 70, 300, 32)
    for causal in (False, True):
        o, lse = attnkit.attention(q, k, v, window=window, causal=causal, causal_align=align, return_lse=True)
        check(q, k, v, o, lse=lse, window=window, causal=causal, bottom_right=align == "bottom_right")


def test_alibi_and_softcap(isa, rng):
    B, H = 2, 4
    q, k, v = make_qkv(rng, B, H, 2, 60, 90, 40)
    slopes = (2.0 ** -np.arange(1, H + 1)).astype(np.float32)
    for causal in (False, True):
        o = attnkit.attention(q, k, v, alibi_slopes=slopes, causal=causal)
        check(q, k, v, o, alibi=slopes, causal=causal)
    slopes_bh = rng.random((B, H)).astype(np.float32)
    check(q, k, v, attnkit.attention(q, k, v, alibi_slopes=slopes_bh), alibi=slopes_bh)
    qs = q * 6  # large scores so the cap matters
    for cap in (5.0, 30.0):
        check(qs, k, v, attnkit.attention(qs, k, v, softcap=cap), softcap=cap)


def test_feature_combinations(isa, rng):
    B, H, Sq, Sk = 2, 4, 45, 200
    q, k, v = make_qkv(rng, B, H, 2, Sq, Sk, 64, 32)
    m = masks(rng, B, H, Sq, Sk)
    slopes = rng.random(H).astype(np.float32)
    for mask in (m["keypad"], m["float_inf"]):
        kw = dict(mask=mask, causal=True, window=(30, -1), softcap=8.0, scale=0.2)
        o, lse = attnkit.attention(q * 3, k, v, alibi_slopes=slopes, causal_align="bottom_right", return_lse=True, **kw)
        check(q * 3, k, v, o, lse=lse, alibi=slopes, bottom_right=True, **kw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dtypes(isa, rng, dtype):
    q, k, v = make_qkv(rng, 2, 4, 2, 70, 130, 64, dtype=dtype)
    o = attnkit.attention(q, k, v, causal=True)
    assert o.dtype == dtype
    check(q, k, v, o, use_torch=True, causal=True)


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_half_kv_under_f32_q(isa, rng, kv):
    if kv == "bfloat16" and bfloat16 is None:
        pytest.skip("ml_dtypes not installed")
    kvd = np.float16 if kv == "float16" else bfloat16
    q, k, v = make_qkv(rng, 1, 4, 2, 30, 99, 64, dtype=np.float32, kv_dtype=kvd)
    o = attnkit.attention(q, k, v)
    assert o.dtype == np.float32
    ref, _ = attention_ref(q, k, v)
    assert_close(o, ref, np.float32)


def test_layouts_and_views(isa, rng):
    B, H, S, D = 2, 4, 40, 32
    q, k, v = make_qkv(rng, B, H, H, S, S, D)
    # bshd: the same data in (B, S, H, D)
    qs, ks, vs = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v))
    o = attnkit.attention(qs, ks, vs, layout="bshd", causal=True)
    assert o.shape == (B, S, H, D)
    check(q, k, v, o.transpose(0, 2, 1, 3), causal=True)
    # bshd views of a fused qkv projection (B, S, 3, H, D): strided, no copy needed
    qkv = randn(rng, (B, S, 3, H, D), np.float32)
    o = attnkit.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], layout="bshd")
    check(*(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)), o.transpose(0, 2, 1, 3))
    # strided batch/head/seq views and a non-contiguous head dim (copied)
    big = randn(rng, (B * 2, H, S * 2, D * 2), np.float32)
    qv, kv_, vv = big[::2, :, ::2, :D], big[1::2, :, 1::2, D:], big[::2, :, 1::2, ::2]
    check(qv, kv_, vv, attnkit.attention(qv, kv_, vv))
    # reversed sequence order (negative strides)
    check(q[:, :, ::-1], k[:, :, ::-1], v, attnkit.attention(q[:, :, ::-1], k[:, :, ::-1], v))


def test_out_and_poison(isa, rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 20, 30, 16)
    out = poisoned((1, 2, 20, 16), np.float32)
    assert attnkit.attention(q, k, v, out=out) is out
    check(q, k, v, out)
    out = poisoned((1, 20, 2, 16), np.float32)
    assert attnkit.attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), layout="bshd", out=out) is out
    check(q, k, v, out.transpose(0, 2, 1, 3))


def test_empty_keys_and_queries(isa, rng):
    q, k, v = make_qkv(rng, 2, 2, 2, 5, 0, 8)
    o, lse = attnkit.attention(q, k, v, return_lse=True)
    assert (o == 0).all() and np.isneginf(lse).all()
    q, k, v = make_qkv(rng, 2, 2, 2, 0, 5, 8)
    assert attnkit.attention(q, k, v).shape == (2, 2, 0, 8)


def test_nan_in_masked_kv_does_not_leak(isa, rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 12, 300, 16)
    k[0, :, 250:] = np.nan
    v[0, :, 250:] = np.nan
    v[0, :, 100] = np.inf
    mask = np.ones((1, 1, 12, 300), bool)
    mask[..., 250:] = False
    mask[..., 100] = False
    o = attnkit.attention(q, k, v, mask=mask)
    assert np.isfinite(o).all()
    check(q, k, v, o, mask=mask)
    # an unmasked inf in V propagates as in torch
    assert not np.isfinite(attnkit.attention(q, k[:, :, :150], v[:, :, :150])).all()


def ak_options(opts):
    """attention_ref's option names -> attnkit.attention's."""
    opts = dict(opts)
    if opts.pop("bottom_right", False):
        opts["causal_align"] = "bottom_right"
    return opts


# Prefill (one and two key blocks, Sq > Sk) and decode shapes (split and not), GQA.
NONFINITE_SHAPES = [(40, 300), (37, 19), (4, 300), (1, 700), (5, 7)]


@pytest.mark.parametrize("sq,sk", NONFINITE_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nonfinite_propagates_from_attended_entries(isa, rng, sq, sk, dtype):
    """NaN/inf in anything a row attends makes that row NaN (as torch); masked-out entries
    never reach the output, and a fully masked row gives 0 / lse -inf."""
    for name, q, k, v, opts in nonfinite_cases(rng, 1, 4, 2, sq, sk, 16, dtype):
        o, lse = attnkit.attention(q, k, v, return_lse=True, **ak_options(opts))
        ref, ref_lse = attention_ref(q, k, v, **opts)
        nan_rows = np.isnan(ref).any(-1)
        assert np.array_equal(np.isnan(to64(o)).any(-1), nan_rows), name
        assert np.array_equal(np.isnan(lse), np.isnan(ref_lse)), name
        assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), name
        fin = np.isfinite(ref)
        scale = float(np.abs(ref[fin]).max()) if fin.any() else 1.0
        assert_close(o, ref, dtype, scale=scale, what=name)  # finite rows: the right values
        if name.startswith("nan_query") or name.startswith("inf_float"):
            assert nan_rows.any() or name.endswith("fully_masked_row"), name


def test_float64_mask_keeps_float64_precision(isa, rng):
    """A float64 additive mask is added in float64 (not rounded to float32 first): float64
    results stay exact to float64, prefill and the decode-sized shape alike."""
    for sq in (37, 3):
        q, k, v = make_qkv(rng, 2, 2, 2, sq, 70, 16, dtype=np.float64)
        mask = rng.standard_normal((1, 2, sq, 70)) * 3.0  # not representable in float32
        mask[..., ::5] = -np.inf
        o, lse = attnkit.attention(q, k, v, mask=mask, return_lse=True)
        ref, _ = attention_ref(q, k, v, mask=mask)
        err = np.abs(o - ref).max() / np.abs(ref).max()
        assert err < 1e-13, err  # float32 rounding of the mask gives ~1e-7


def test_bit_identical_across_threads(threads, rng):
    q, k, v = make_qkv(rng, 2, 8, 2, 300, 300, 64)
    mask = masks(rng, 2, 8, 300, 300)["keypad"]
    for kw in (dict(), dict(causal=True), dict(mask=mask, window=(50, 10))):
        outs = []
        for nt in (1, 2, 3):
            attnkit.set_num_threads(nt)
            outs.append(attnkit.attention(q, k, v, return_lse=True, **kw))
        for o in outs[1:]:
            assert np.array_equal(o[0], outs[0][0]) and np.array_equal(o[1], outs[0][1])


def test_shared_kv_packing_when_groups_are_fewer_than_threads(rng):
    """Fewer (batch, kv head) groups than threads: K/V are packed once for all threads
    (the plan says so) and the results are bit-identical to one thread's, which packs per
    thread: causal, key padding with NaN in the padded V rows, a window, fp16 K/V, and a KV
    cache appended in the same call (packing must follow the append)."""
    from attnkit import _C

    def run(nt, fn):
        attnkit.set_num_threads(nt)
        out = fn()
        return out, _C._last_attention_plan()["shared_pack"]

    q, k, v = make_qkv(rng, 1, 4, 1, 300, 700, 40)
    keypad = (np.arange(700) < 450)[None, None, None, :]
    v_nan = v.copy()
    v_nan[..., 450:, :] = np.nan  # masked out: must never reach the output
    q16, k16, v16 = make_qkv(rng, 1, 2, 1, 100, 600, 64, kv_dtype=np.float16)
    cases = {
        "causal": (lambda: attnkit.attention(q, k, v, causal=True, return_lse=True),
                   lambda o: check(q, k, v, o[0], lse=o[1], causal=True)),
        "keypad_nan_v": (lambda: attnkit.attention(q, k, v_nan, mask=keypad, return_lse=True),
                         lambda o: check(q, k, v, o[0], lse=o[1], mask=keypad)),
        "window": (lambda: attnkit.attention(q, k, v, window=(100, 20), return_lse=True),
                   lambda o: check(q, k, v, o[0], lse=o[1], window=(100, 20))),
        "fp16_kv": (lambda: attnkit.attention(q16, k16, v16, return_lse=True),
                    lambda o: check(q16, k16.astype(np.float32), v16.astype(np.float32), o[0], lse=o[1])),
    }
    for name, (fn, verify) in cases.items():
        one, shared1 = run(1, fn)
        verify(one)
        for nt in (2, 3):
            many, shared = run(nt, fn)
            assert shared and not shared1, name
            assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(one, many)), name

    # attention_with_kvcache with a prefill-sized Sq: the new rows are appended, then packed.
    B, Smax, Hkv, H, D, n0, sn = 1, 512, 1, 4, 32, 200, 96
    cache = [randn(rng, (B, Smax, Hkv, D), np.float32) for _ in range(2)]
    qn = randn(rng, (B, sn, H, D), np.float32)
    kn, vn = (randn(rng, (B, sn, Hkv, D), np.float32) for _ in range(2))
    results = []
    for nt in (1, 2):
        kc, vc = (c.copy() for c in cache)
        out, shared = run(nt, lambda: attnkit.attention_with_kvcache(
            qn, kc, vc, k=kn, v=vn, cache_seqlens=n0, causal=True))
        assert shared == (nt > 1)
        results.append(out)
    assert np.array_equal(results[0], results[1])
    keys = np.concatenate([cache[0][:, :n0], kn], 1).transpose(0, 2, 1, 3)
    vals = np.concatenate([cache[1][:, :n0], vn], 1).transpose(0, 2, 1, 3)
    ref, _ = attention_ref(qn.transpose(0, 2, 1, 3), keys, vals, causal=True, bottom_right=True)
    assert_close(results[1].transpose(0, 2, 1, 3), ref, np.float32)


# ---- varlen ----


def varlen_case(rng, lens_q, lens_k, H=4, Hkv=2, D=32, dtype=np.float32):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = randn(rng, (cu_q[-1], H, D), dtype)
    k = randn(rng, (cu_k[-1], Hkv, D), dtype)
    v = randn(rng, (cu_k[-1], Hkv, D), dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence(isa, rng, causal):
    lens_q = [5, 0, 70, 1, 33]
    lens_k = [9, 4, 70, 0, 100]
    q, k, v, cu_q, cu_k = varlen_case(rng, lens_q, lens_k)
    slopes = rng.random(4).astype(np.float32)
    o, lse = attnkit.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True,
                                      window=(20, 5), alibi_slopes=slopes, softcap=10.0)
    assert o.shape == (q.shape[0], 4, 32) and lse.shape == (4, q.shape[0])
    for b in range(len(lens_q)):
        qs = q[cu_q[b]:cu_q[b + 1]].transpose(1, 0, 2)[None]
        ks = k[cu_k[b]:cu_k[b + 1]].transpose(1, 0, 2)[None]
        vs = v[cu_k[b]:cu_k[b + 1]].transpose(1, 0, 2)[None]
        ob = o[cu_q[b]:cu_q[b + 1]].transpose(1, 0, 2)[None]
        lb = lse[:, cu_q[b]:cu_q[b + 1]][None]
        if qs.shape[2] == 0:
            continue
        check(qs, ks, vs, ob, lse=lb, causal=causal, bottom_right=True, window=(20, 5),
              alibi=slopes, softcap=10.0)


def test_varlen_errors(rng):
    q, k, v, cu_q, cu_k = varlen_case(rng, [3, 4], [3, 4])
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        attnkit.attention_varlen(q, k, v, cu_q[::-1].copy(), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing from 0 to the token count"):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k + 1)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32 or int64"):
        attnkit.attention_varlen(q, k, v, cu_q.astype(np.float32), cu_k)
    with pytest.raises(ValueError, match="same length"):
        attnkit.attention_varlen(q, k, v, cu_q, cu_k[:2])


# ---- errors ----


def test_bad_inputs(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 8, 9, 16)
    A = attnkit.attention
    with pytest.raises(TypeError, match="q must be a numpy.ndarray"):
        A(q.tolist(), k, v)
    with pytest.raises(ValueError, match="k must be 4-D"):
        A(q, k[0], v)
    with pytest.raises(ValueError, match="k has head_dim 8 but q has 16"):
        A(q, k[..., :8], v)
    with pytest.raises(ValueError, match="not a multiple"):
        A(q[:, :3], k, v)
    with pytest.raises(ValueError, match="v has shape"):
        A(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="same batch size"):
        A(q, np.concatenate([k, k]), np.concatenate([v, v]))
    with pytest.raises(TypeError, match="k has dtype float32 but v has float64"):
        A(q, k, v.astype(np.float64))
    with pytest.raises(TypeError, match="k/v must have q's dtype"):
        A(q.astype(np.float16), k, v)
    with pytest.raises(TypeError, match="q has dtype int32"):
        A(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        A(q, k, v, mask=np.ones((3, 9), bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        A(q, k, v, mask=np.ones((8, 9), np.int32))
    with pytest.raises(ValueError, match="scale must be finite"):
        A(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a real number"):
        A(q, k, v, scale="1")
    with pytest.raises(TypeError, match="window must be a"):
        A(q, k, v, window=5)
    with pytest.raises(TypeError, match="window entries must be ints"):
        A(q, k, v, window=(1.5, 2))
    with pytest.raises(ValueError, match="window entries must be >= -1"):
        A(q, k, v, window=(-2, 2))
    with pytest.raises(ValueError, match=r"alibi_slopes has shape \(3,\)"):
        A(q, k, v, alibi_slopes=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="softcap must be a finite number"):
        A(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="causal_align must be"):
        A(q, k, v, causal=True, causal_align="center")
    with pytest.raises(ValueError, match="layout must be"):
        A(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="out has shape"):
        A(q, k, v, out=np.empty((1, 4, 8, 8), np.float32))
    with pytest.raises(TypeError, match="out has dtype"):
        A(q, k, v, out=np.empty((1, 4, 8, 16), np.float64))
    with pytest.raises(ValueError, match="out overlaps an input"):
        A(q, q[:, :2], q[:, :2], out=q)  # k and v are views of out
    with pytest.raises(TypeError, match="causal must be a bool"):
        A(q, k, v, causal=1)


@pytest.mark.parametrize("nt", [None, 16])
def test_peak_memory_does_not_materialize_scores(rng, threads, nt):
    """No S x S scores, and per-thread scratch that stays small at a server's 16 threads
    (oversubscribed here: the memory, not the speed, is what is measured). A 16-thread run on a
    16-core Xeon once grew 81 MB (issue 13); the K/V of a group are now packed once for all
    threads when threads outnumber groups."""
    psutil = pytest.importorskip("psutil")
    import gc

    if nt is not None:
        attnkit.set_num_threads(nt)

    S, D = 16384, 64
    q = randn(rng, (1, 1, S, D), np.float32)
    k = randn(rng, (1, 1, S, D), np.float32)
    v = randn(rng, (1, 1, S, D), np.float32)
    out = np.empty_like(q)
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    import threading

    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.002)

    t = threading.Thread(target=sample)
    t.start()
    attnkit.attention(q, k, v, out=out, causal=True)
    stop.set()
    t.join()
    if nt is not None:
        from attnkit import _C
        assert _C._last_attention_plan()["threads"] == nt
    grown = (peak[0] - before) / 2**20
    # An S x S fp32 score matrix would be 1024 MB.
    assert grown < 64, f"RSS grew by {grown:.1f} MB during attention"
    assert np.isfinite(out).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_the_bound_catches_a_dropped_key(rng, dtype):
    """The pass rule is relative to the output's magnitude (~0.1 for randn data, not max |V|
    ~4.5), so an output that lost one key's contribution fails it in every dtype."""
    q, k, v = make_qkv(rng, 1, 4, 4, 64, 512, 64, dtype=dtype)
    ref, _ = attention_ref(q, k, v)
    keep = np.ones((1, 4, 64, 512), bool)
    keep[..., 137] = False  # the kernel "forgot" key 137
    dropped, _ = attention_ref(q, k, v, mask=keep)
    with pytest.raises(AssertionError, match="exceeds bound"):
        assert_close(dropped.astype(dtype), ref, dtype, torch_result=torch_equivalent(q, k, v))
    attention_out = attnkit.attention(q, k, v)
    check(q, k, v, attention_out)  # while the kernel itself passes


def test_long_keys_repack_the_kv_cache(isa, rng):
    """Above 16 MB of packed K+V per (batch, kv head) -- about 16k keys at D = 128 in fp32 --
    the prefill kernel keeps one packed block per thread and repacks it on use."""
    from attnkit import _C

    q, k, v = make_qkv(rng, 1, 2, 1, 40, 17000, 128)
    o, lse = attnkit.attention(q, k, v, return_lse=True)
    assert _C._last_attention_plan()["pack_slots"] == 1
    check(q, k, v, o, lse=lse)
    q, k, v = make_qkv(rng, 1, 2, 1, 40, 3000, 128)
    attnkit.attention(q, k, v)
    assert _C._last_attention_plan()["pack_slots"] > 1  # the cached path, for contrast



# bf16 q, k, v through the prefill kernel (avx512_bf16: S = Q K^T on vdpbf16ps, K in pair
# words; amx: both GEMMs on tiles, P rounded to bf16): odd and even head dims, q rows not whole words (odd D, odd row strides), GQA,
# masks and windows, several key blocks, reversed sequences.
@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
@pytest.mark.parametrize("D", [1, 7, 64, 111, 128])
def test_bf16_prefill_paths(isa, rng, D):
    from attnkit import _C

    _C._take_tile_items()
    q, k, v = make_qkv(rng, 2, 4, 2, 70, 300, D, dtype=bfloat16)
    o = attnkit.attention(q, k, v, causal=True)
    check(q, k, v, o, use_torch=True, causal=True)
    # odd q row stride (a bshd view of a fused (B, S, 3 * H + 1, D) projection) and reversed keys
    big = randn(rng, (2, 70, 13, D), bfloat16)
    qv = big[:, :, :4].transpose(0, 2, 1, 3)
    kv_, vv = k[:, :, ::-1], v[:, :, ::-1]
    o = attnkit.attention(qv, kv_, vv, window=(40, 3))
    check(qv, kv_, vv, o, use_torch=False, window=(40, 3))
    mask = rng.random((1, 1, 70, 300)) < 0.7
    o = attnkit.attention(q, k, v, mask=mask, softcap=5.0)
    check(q, k, v, o, mask=mask, softcap=5.0)
    # a window whose left edge leaves whole key panels out of later query tiles (run_item's
    # `off`: the packed K and V are then read from a key past the block's start)
    q2, k2, v2 = make_qkv(rng, 1, 2, 1, 300, 300, D, dtype=bfloat16)
    o = attnkit.attention(q2, k2, v2, window=(40, 3))
    check(q2, k2, v2, o, use_torch=False, window=(40, 3))
    tiles = _C._take_tile_items()["forward"]  # query tiles run on AMX tiles (amx variants only)
    assert (tiles > 0) == isa.startswith("amx"), (isa, tiles)


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
def test_bf16_subnormal_scores(isa, rng):
    """vdpbf16ps and TDPBF16PS read subnormal bf16 as zero (Intel SDM: DAZ, MXCSR ignored). The
    fp32 paths attend with the subnormal q; avx512_bf16's and amx's Q K^T attend as if it were 0
    (documented in ARCHITECTURE.md, "ISA variants"). Here that moves one score from 1 to 0."""
    q = np.zeros((1, 1, 40, 8), bfloat16)
    k = np.zeros((1, 1, 40, 8), bfloat16)
    q[0, 0, 0, 0] = np.float32(2.0 ** -130)  # subnormal in bf16
    k[0, 0, 0, 0] = np.float32(2.0 ** 126)   # q k = 2^-4, times scale 16 = 1
    v = randn(rng, (1, 1, 40, 8), bfloat16)
    v[0, 0, 0] = 8.0  # key 0's weight moves from e/(e+39) to 1/40: the output by ~0.3 for any seed
    o = attnkit.attention(q, k, v, scale=16.0)
    flushed = q.copy()
    flushed[0, 0, 0, 0] = 0
    exact, _ = attention_ref(q, k, v, scale=16.0)
    daz, _ = attention_ref(flushed, k, v, scale=16.0)
    assert np.abs(exact - daz).max() > 0.05  # the two semantics differ visibly
    flushes = isa in ("avx512_bf16", "amx", "amx_emulated")
    assert_close(o, daz if flushes else exact, bfloat16, what="attention out")


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
def test_bf16_subnormal_values_are_attended(isa, rng):
    """Unlike a score, a V value is the output's own magnitude: V blocks holding a subnormal bf16
    (which vdpbf16ps and TDPBF16PS read as zero) take the exact fp32 P V. With every V value
    subnormal the output is subnormal too, and bf16's subnormal step is 2^-133: the error stays
    within one step (the pair kernels gave 0, a relative error of 1)."""
    q, k, _ = make_qkv(rng, 1, 2, 1, 70, 301, 64, dtype=bfloat16)
    v = (rng.standard_normal((1, 1, 301, 64)) * 2.0 ** -129).astype(bfloat16)
    assert np.abs(to64(v)).max() < 2.0 ** -126 and np.count_nonzero(to64(v)) > 0
    for causal in (False, True):
        o = attnkit.attention(q, k, v, causal=causal)
        ref, _ = attention_ref(q, k, v, causal=causal)
        assert np.abs(to64(o) - ref).max() <= 2.0 ** -133, (isa, causal)
    # one subnormal among normal values (one key block of two): the whole output as usual
    v2 = randn(rng, (1, 1, 301, 64), bfloat16)
    v2[0, 0, 280, 5] = np.float32(2.0 ** -130)
    o = attnkit.attention(q, k, v2)
    check(q, k, v2, o, use_torch=True)
