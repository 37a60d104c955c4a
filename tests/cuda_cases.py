"""Test cases of the CUDA kernels, shared by test_cuda.py (a real GPU, torch tensors) and
test_cuda_emulated.py (the same kernel sources on the CPU emulator, numpy-backed arrays).

Every test takes the `dev` fixture of its module:
  dev.put(a) / dev.get(d)   numpy -> device array -> numpy (bfloat16 via ml_dtypes)
  dev.poisoned(shape, dt)   a NaN-filled device array (so unwritten elements show)
  dev.api                   attnkit (the public functions; device arrays go to the CUDA backend)
  dev.torch_device          where torch computes its own (2x-error-rule) result: "cuda" or "cpu"
  dev.small                 True on the emulator: the longest key ranges are cut (still split)
Sizes are small enough for the emulator; the GPU module adds large and timing-sensitive cases.
"""
import contextlib

import numpy as np
import pytest

from reference import (FLOAT_DTYPES, assert_close, attention_ref, bfloat16, dtype_id, nonfinite_cases, randn,
                       softmax_ref, to64)

HALF = [np.dtype(np.float16)] + ([bfloat16] if bfloat16 is not None else [])
TC_AND_FP32 = HALF + [np.dtype(np.float32)]


def make_qkv(rng, B, H, Hkv, Sq, Sk, D, Dv=None, dtype=np.float32, kv_dtype=None):
    Dv = D if Dv is None else Dv
    return (randn(rng, (B, H, Sq, D), dtype), randn(rng, (B, Hkv, Sk, D), kv_dtype or dtype),
            randn(rng, (B, Hkv, Sk, Dv), kv_dtype or dtype))


def torch_sdpa(dev, q, k, v, mask=None, causal=False, scale=None):
    """torch's own result in the inputs' dtype, on dev.torch_device (for the 2x-torch rule)."""
    import torch
    import torch.nn.functional as F
    from reference import from_torch, to_torch

    t = [to_torch(a).to(dev.torch_device) for a in (q, k, v)]
    tm = None
    if mask is not None:
        m = torch.from_numpy(np.ascontiguousarray(mask)).to(dev.torch_device)
        tm = m if mask.dtype == np.bool_ else m.to(t[0].dtype)
    o = F.scaled_dot_product_attention(*t, attn_mask=tm, is_causal=causal, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return from_torch(o.cpu(), q.dtype)


def check(dev, q, k, v, got, *, use_torch=False, lse=None, **kw):
    ref, ref_lse = attention_ref(q, k, v, **kw)
    tres = None
    if use_torch:
        tres = torch_sdpa(dev, q, k, v, mask=kw.get("mask"), causal=kw.get("causal", False), scale=kw.get("scale"))
    assert_close(got, ref, q.dtype, torch_result=tres, what="attention out")
    if lse is not None:
        assert lse.dtype == np.float32
        assert_close(lse, ref_lse, np.float32, what="lse")


def run(dev, q, k, v, **kw):
    """attention on device copies; returns numpy results."""
    mask = kw.pop("mask", None)
    res = dev.api.attention(dev.put(q), dev.put(k), dev.put(v),
                            mask=None if mask is None else dev.put(mask), **kw)
    if kw.get("return_lse"):
        return dev.get(res[0]), dev.get(res[1])
    return dev.get(res)


# ---- attention: the grid of tests/test_attention.py ----

@pytest.mark.parametrize("dtype", TC_AND_FP32, ids=dtype_id)
@pytest.mark.parametrize("D", [1, 8, 40, 59, 64, 80, 96, 111, 128, 160, 192, 256])
def test_head_dims(dev, rng, D, dtype):
    q, k, v = make_qkv(rng, 1, 2, 2, 17, 113, D, dtype=dtype)
    check(dev, q, k, v, run(dev, q, k, v), use_torch=True)
    o, lse = run(dev, q, k, v, causal=True, return_lse=True)
    check(dev, q, k, v, o, lse=lse, use_torch=True, causal=True)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
@pytest.mark.parametrize("D,Dv", [(64, 32), (40, 96), (7, 1), (128, 256), (256, 64)])
def test_dv_differs(dev, rng, D, Dv, dtype):
    q, k, v = make_qkv(rng, 2, 2, 1, 33, 70, D, Dv, dtype=dtype)
    check(dev, q, k, v, run(dev, q, k, v), use_torch=True)


SEQS = [(1, 1), (2, 17), (17, 2), (113, 128), (128, 113), (1, 1023), (200, 70), (130, 600)]


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
@pytest.mark.parametrize("sq,sk", SEQS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_causal(dev, rng, sq, sk, causal, dtype):
    q, k, v = make_qkv(rng, 1, 2, 2, sq, sk, 64, dtype=dtype)
    check(dev, q, k, v, run(dev, q, k, v, causal=causal), use_torch=True, causal=causal)
    o, lse = run(dev, q, k, v, causal=causal, causal_align="bottom_right", return_lse=True)
    check(dev, q, k, v, o, lse=lse, causal=causal, bottom_right=True)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
@pytest.mark.parametrize("H,Hkv", [(8, 2), (8, 1), (6, 6)])
@pytest.mark.parametrize("sq", [1, 5, 50])
def test_gqa_mqa(dev, rng, H, Hkv, sq, dtype):
    q, k, v = make_qkv(rng, 2, H, Hkv, sq, 77, 32, dtype=dtype)
    check(dev, q, k, v, run(dev, q, k, v), use_torch=True)
    o, lse = run(dev, q, k, v, causal=True, causal_align="bottom_right", return_lse=True)
    check(dev, q, k, v, o, lse=lse, causal=True, bottom_right=True)


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
        "float16": addf.astype(np.float16),
        "2d": rng.random((Sq, Sk)) < 0.5,
        "broadcast_rows": np.ascontiguousarray(rng.random((1, 1, 1, Sk)) < 0.8),
    }


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
@pytest.mark.parametrize("kind", ["keypad", "bool", "float", "float_inf", "float16", "2d", "broadcast_rows"])
def test_masks(dev, rng, kind, dtype):
    B, H, Sq, Sk = 2, 4, 37, 150
    q, k, v = make_qkv(rng, B, H, 2, Sq, Sk, 48, dtype=dtype)
    mask = masks(rng, B, H, Sq, Sk)[kind]
    o, lse = run(dev, q, k, v, mask=mask, return_lse=True)
    check(dev, q, k, v, o, lse=lse, mask=mask, use_torch=kind in ("keypad", "float", "2d"))


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_fully_masked_rows_give_zero(dev, rng, dtype):
    q, k, v = make_qkv(rng, 1, 2, 2, 10, 20, 16, dtype=dtype)
    mask = np.ones((1, 2, 10, 20), bool)
    mask[0, 1, 3] = False
    o, lse = run(dev, q, k, v, mask=mask, return_lse=True)
    assert (o[0, 1, 3] == 0).all() and lse[0, 1, 3] == -np.inf
    q, k, v = make_qkv(rng, 1, 1, 1, 9, 4, 8, dtype=dtype)
    o, lse = run(dev, q, k, v, causal=True, causal_align="bottom_right", return_lse=True)
    assert (o[0, 0, :5] == 0).all() and np.isneginf(lse[0, 0, :5]).all()
    check(dev, q, k, v, o, lse=lse, causal=True, bottom_right=True)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
@pytest.mark.parametrize("window", [(0, 0), (16, 0), (5, 7), (-1, 3), (40, -1), (10**12, 2)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_windows(dev, rng, window, align, dtype):
    q, k, v = make_qkv(rng, 1, 2, 1, 70, 200, 32, dtype=dtype)
    for causal in (False, True):
        o, lse = run(dev, q, k, v, window=window, causal=causal, causal_align=align, return_lse=True)
        check(dev, q, k, v, o, lse=lse, window=window, causal=causal, bottom_right=align == "bottom_right")


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_alibi_and_softcap(dev, rng, dtype):
    B, H = 2, 4
    q, k, v = make_qkv(rng, B, H, 2, 60, 90, 40, dtype=dtype)
    slopes = (2.0 ** -np.arange(1, H + 1)).astype(np.float32)
    for causal in (False, True):
        check(dev, q, k, v, run(dev, q, k, v, alibi_slopes=slopes, causal=causal), alibi=slopes, causal=causal)
    slopes_bh = rng.random((B, H)).astype(np.float32)
    check(dev, q, k, v, run(dev, q, k, v, alibi_slopes=slopes_bh), alibi=slopes_bh)
    # device-resident slopes, (H,) and (B, H)
    got = dev.get(dev.api.attention(dev.put(q), dev.put(k), dev.put(v), alibi_slopes=dev.put(slopes)))
    check(dev, q, k, v, got, alibi=slopes)
    got = dev.get(dev.api.attention(dev.put(q), dev.put(k), dev.put(v), alibi_slopes=dev.put(slopes_bh)))
    check(dev, q, k, v, got, alibi=slopes_bh)
    qs = (q.astype(np.float32) * 6).astype(dtype)  # large scores so the cap matters
    for cap in (5.0, 30.0):
        check(dev, qs, k, v, run(dev, qs, k, v, softcap=cap), softcap=cap)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_feature_combinations(dev, rng, dtype):
    B, H, Sq, Sk = 2, 4, 45, 200
    q, k, v = make_qkv(rng, B, H, 2, Sq, Sk, 64, 32, dtype=dtype)
    q = (q.astype(np.float32) * 3).astype(dtype)
    m = masks(rng, B, H, Sq, Sk)
    slopes = rng.random(H).astype(np.float32)
    for mask in (m["keypad"], m["float_inf"]):
        kw = dict(mask=mask, causal=True, window=(30, -1), softcap=8.0, scale=0.2)
        o, lse = run(dev, q, k, v, alibi_slopes=slopes, causal_align="bottom_right", return_lse=True, **kw)
        check(dev, q, k, v, o, lse=lse, alibi=slopes, bottom_right=True, **kw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dtypes(dev, rng, dtype):
    q, k, v = make_qkv(rng, 2, 4, 2, 70, 130, 64, dtype=dtype)
    o = run(dev, q, k, v, causal=True)
    assert o.dtype == dtype
    check(dev, q, k, v, o, use_torch=True, causal=True)


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_half_kv_under_f32_q(dev, rng, kv):
    if kv == "bfloat16" and bfloat16 is None:
        pytest.skip("ml_dtypes not installed")
    kvd = np.float16 if kv == "float16" else bfloat16
    q, k, v = make_qkv(rng, 1, 4, 2, 30, 99, 64, dtype=np.float32, kv_dtype=kvd)
    o = run(dev, q, k, v)
    assert o.dtype == np.float32
    ref, _ = attention_ref(q, k, v)
    assert_close(o, ref, np.float32)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_layouts_and_views(dev, rng, dtype):
    B, H, S, D = 2, 4, 40, 32
    q, k, v = make_qkv(rng, B, H, H, S, S, D, dtype=dtype)
    A = dev.api.attention
    qs, ks, vs = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v))
    o = dev.get(A(dev.put(qs), dev.put(ks), dev.put(vs), layout="bshd", causal=True))
    assert o.shape == (B, S, H, D)
    check(dev, q, k, v, o.transpose(0, 2, 1, 3), causal=True)
    # bshd views of a fused qkv projection (B, S, 3, H, D): strided device views, no copy
    qkv = randn(rng, (B, S, 3, H, D), dtype)
    d = dev.put(qkv)
    o = dev.get(A(d[:, :, 0], d[:, :, 1], d[:, :, 2], layout="bshd"))
    check(dev, *(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)), o.transpose(0, 2, 1, 3))
    # strided batch / seq views on the device
    big = randn(rng, (B * 2, H, S * 2, D * 2), dtype)
    bd = dev.put(big)
    qv, kv_, vv = bd[::2, :, ::2, :D], bd[1::2, :, 1::2, D:], bd[::2, :, 1::2, :D]
    got = dev.get(A(qv, kv_, vv))
    check(dev, big[::2, :, ::2, :D], big[1::2, :, 1::2, D:], big[::2, :, 1::2, :D], got)
    # broadcast (stride 0) batch of k/v
    kb, vb = dev.put(k[:1]), dev.put(v[:1])
    got = dev.get(A(dev.put(q), dev.expand(kb, (B, H, S, D)), dev.expand(vb, (B, H, S, D))))
    check(dev, q, np.broadcast_to(k[:1], k.shape), np.broadcast_to(v[:1], v.shape), got)


def test_out_and_poison(dev, rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 20, 30, 16)
    out = dev.poisoned((1, 2, 20, 16), np.float32)
    assert dev.api.attention(dev.put(q), dev.put(k), dev.put(v), out=out) is out
    check(dev, q, k, v, dev.get(out))
    out = dev.poisoned((1, 20, 2, 16), np.float32)
    t = lambda a: dev.put(np.ascontiguousarray(a.transpose(0, 2, 1, 3)))
    assert dev.api.attention(t(q), t(k), t(v), layout="bshd", out=out) is out
    check(dev, q, k, v, dev.get(out).transpose(0, 2, 1, 3))


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_empty_keys_and_queries(dev, rng, dtype):
    q, k, v = make_qkv(rng, 2, 2, 2, 5, 0, 8, dtype=dtype)
    o, lse = run(dev, q, k, v, return_lse=True)
    assert (o == 0).all() and np.isneginf(lse).all()
    q, k, v = make_qkv(rng, 2, 2, 2, 0, 5, 8, dtype=dtype)
    assert run(dev, q, k, v).shape == (2, 2, 0, 8)


def masked_nonfinite_kv(rng, sq, D, dtype):
    """q, k, v over 300 keys whose K/V are NaN from key 250 on and whose V is inf at key 100,
    and the bool mask that hides exactly those keys."""
    q, k, v = make_qkv(rng, 1, 2, 2, sq, 300, D, dtype=dtype)
    k[0, :, 250:] = np.nan
    v[0, :, 250:] = np.nan
    v[0, :, 100] = np.inf
    mask = np.ones((1, 1, sq, 300), bool)
    mask[..., 250:] = False
    mask[..., 100] = False
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_nan_in_masked_kv_does_not_leak(dev, rng, dtype):
    q, k, v, mask = masked_nonfinite_kv(rng, 12, 16, dtype)
    o = run(dev, q, k, v, mask=mask)
    assert np.isfinite(o.astype(np.float32)).all()
    check(dev, q, k, v, o, mask=mask)
    # causal rows: keys past the diagonal hold NaN in V
    q2, k2, v2 = make_qkv(rng, 1, 1, 1, 70, 70, 32, dtype=dtype)
    v2[0, 0, 40:] = np.nan
    o = run(dev, q2[:, :, :40], k2, v2, causal=True)
    assert np.isfinite(o.astype(np.float32)).all()
    # an unmasked inf in V propagates as in torch
    assert not np.isfinite(run(dev, q, k[:, :, :150], v[:, :, :150]).astype(np.float32)).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sq,sk", [(40, 300), (37, 19), (4, 300), (1, 700)])
def test_nonfinite_propagates_from_attended_entries(dev, rng, sq, sk, dtype):
    """As the CPU kernels (tests/test_attention.py): NaN/inf in an attended entry makes the row
    NaN (the split-KV combine included), masked-out entries stay out, fully masked rows are 0."""
    check_nonfinite_cases(dev, rng, sq, sk, dtype)


def check_nonfinite_cases(dev, rng, sq, sk, dtype):
    for name, q, k, v, opts in nonfinite_cases(rng, 1, 4, 2, sq, sk, 16, dtype):
        kw = {key: val for key, val in opts.items() if key != "bottom_right"}
        if opts.get("bottom_right"):
            kw["causal_align"] = "bottom_right"
        o, lse = run(dev, q, k, v, return_lse=True, **kw)
        ref, ref_lse = attention_ref(q, k, v, **opts)
        nan_rows = np.isnan(to64(o)).any(-1)
        assert np.array_equal(nan_rows, np.isnan(ref).any(-1)), (name, np.argwhere(nan_rows != np.isnan(ref).any(-1))[:5])
        assert np.array_equal(np.isnan(lse), np.isnan(ref_lse)), name
        assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)), name
        fin = np.isfinite(ref)
        assert_close(o, ref, dtype, scale=float(np.abs(ref[fin]).max()) if fin.any() else 1.0, what=name)


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_repeated_runs_bit_identical(dev, rng, dtype):
    q, k, v = make_qkv(rng, 2, 8, 2, 1, 700 if dev.small else 2000, 64, dtype=dtype)  # split-KV decode
    qq, kk, vv = dev.put(q), dev.put(k), dev.put(v)
    runs = [dev.api.attention(qq, kk, vv, return_lse=True) for _ in range(3)]
    for o, l in runs[1:]:
        assert np.array_equal(dev.get(o), dev.get(runs[0][0]), equal_nan=True)
        assert np.array_equal(dev.get(l), dev.get(runs[0][1]), equal_nan=True)


@pytest.mark.parametrize("dtype", TC_AND_FP32, ids=dtype_id)
@pytest.mark.parametrize("sq", [1, 4])
def test_split_kv_decode(dev, rng, sq, dtype):
    q, k, v = make_qkv(rng, 2, 8, 2, sq, 1100 if dev.small else 3000, 128, dtype=dtype)
    o, lse = run(dev, q, k, v, return_lse=True)
    check(dev, q, k, v, o, lse=lse, use_torch=True)
    o, lse = run(dev, q, k, v, causal=True, causal_align="bottom_right", window=(700, 0), return_lse=True)
    check(dev, q, k, v, o, lse=lse, causal=True, bottom_right=True, window=(700, 0))


# ---- varlen ----

@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("device_cu", [False, True])
def test_varlen_matches_per_sequence(dev, rng, causal, dtype, device_cu):
    lens_q, lens_k = [5, 0, 70, 1, 33], [9, 4, 70, 0, 100]
    H, Hkv, D = 4, 2, 32
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, k, v = (randn(rng, (n, h, D), dtype) for n, h in ((cu_q[-1], H), (cu_k[-1], Hkv), (cu_k[-1], Hkv)))
    slopes = rng.random(H).astype(np.float32)
    cq, ck = (dev.put(cu_q), dev.put(cu_k)) if device_cu else (cu_q, cu_k)
    o, lse = dev.api.attention_varlen(dev.put(q), dev.put(k), dev.put(v), cq, ck, causal=causal, return_lse=True,
                                      window=(20, 5), alibi_slopes=slopes, softcap=10.0)
    o, lse = dev.get(o), dev.get(lse)
    assert o.shape == (q.shape[0], H, D) and lse.shape == (H, q.shape[0])
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            continue
        sl = lambda a, cu: a[cu[b]:cu[b + 1]].transpose(1, 0, 2)[None]
        check(dev, sl(q, cu_q), sl(k, cu_k), sl(v, cu_k), sl(o, cu_q), lse=lse[:, cu_q[b]:cu_q[b + 1]][None],
              causal=causal, bottom_right=True, window=(20, 5), alibi=slopes, softcap=10.0)


# ---- KV cache (decode / chunked prefill) ----

def kvcache_reference(q, k_full, v_full, lens, **kw):
    """Per batch entry: q (Sq, H, D) against the first lens[b] cache rows, bottom-right."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, l = attention_ref(q[b:b + 1].transpose(0, 2, 1, 3), k_full[b:b + 1, :lens[b]].transpose(0, 2, 1, 3),
                             v_full[b:b + 1, :lens[b]].transpose(0, 2, 1, 3), bottom_right=True, **kw)
        outs.append(o.transpose(0, 2, 1, 3))
        lses.append(l)
    return np.concatenate(outs), np.concatenate(lses)


def page_table(rng, B, Smax, page):
    """(B, ceil(Smax / page)) shuffled page indices into a pool with 3 spare pages."""
    nb = -(-Smax // page)
    return rng.permutation(B * nb + 3)[:B * nb].reshape(B, nb).astype(np.int64), B * nb + 3


def to_pages(cache, table, num_pages, page):
    """Scatter a dense (B, Smax, Hkv, D) cache into (num_pages, page, Hkv, D) by table."""
    pages = np.zeros((num_pages, page) + cache.shape[2:], cache.dtype)
    for b in range(table.shape[0]):
        for j in range(table.shape[1]):
            rows = cache[b, j * page:(j + 1) * page]
            pages[table[b, j], :rows.shape[0]] = rows
    return pages


def put_caches(dev, rng, k_cache, v_cache, page):
    """Device copies of dense (B, Smax, Hkv, D) caches, or (page: tokens per page) of their pages
    scattered by a shuffled table; returns (k, v, table or None)."""
    if not page:
        return dev.put(k_cache), dev.put(v_cache), None
    table, num_pages = page_table(rng, k_cache.shape[0], k_cache.shape[1], page)
    return (dev.put(to_pages(k_cache, table, num_pages, page)), dev.put(to_pages(v_cache, table, num_pages, page)),
            table)


@pytest.mark.parametrize("dtype", TC_AND_FP32, ids=dtype_id)
@pytest.mark.parametrize("paged", [None, 16, 64])
@pytest.mark.parametrize("sq,n_new", [(1, 1), (1, 0), (5, 5), (33, 33)])
def test_kvcache(dev, rng, dtype, paged, sq, n_new):
    B, H, Hkv, D, Dv, Smax = 3, 8, 2, 64, 64, 300
    lens = np.array([0, 150, 300 - n_new])
    k_full = randn(rng, (B, Smax, Hkv, D), dtype)
    v_full = randn(rng, (B, Smax, Hkv, Dv), dtype)
    q = randn(rng, (B, sq, H, D), dtype)
    k_new = randn(rng, (B, n_new, Hkv, D), dtype)
    v_new = randn(rng, (B, n_new, Hkv, Dv), dtype)
    k_cache, v_cache = k_full.copy(), v_full.copy()
    for b in range(B):  # what the cache holds after the append
        k_full[b, lens[b]:lens[b] + n_new] = k_new[b]
        v_full[b, lens[b]:lens[b] + n_new] = v_new[b]
    for causal in (True, False):
        kc, vc, table = put_caches(dev, rng, k_cache, v_cache, paged)
        kw = {} if table is None else dict(block_table=dev.put(table.astype(np.int32)) if causal else table)
        seqlens = dev.put(lens.astype(np.int32)) if causal else lens
        new = dict(k=dev.put(k_new), v=dev.put(v_new)) if n_new else {}
        o, lse = dev.api.attention_with_kvcache(dev.put(q), kc, vc, cache_seqlens=seqlens, causal=causal,
                                                return_lse=True, **new, **kw)
        ref, ref_lse = kvcache_reference(q, k_full, v_full, lens + n_new, causal=causal)
        assert_close(dev.get(o), ref, dtype, what="kvcache out")
        assert_close(dev.get(lse), ref_lse, np.float32, what="kvcache lse")
        if n_new:  # the new rows were written into the caches
            kc_h = dev.get(kc)
            for b in range(B):
                for t in range(n_new):
                    pos = lens[b] + t
                    row = kc_h[table[b, pos // paged], pos % paged] if paged else kc_h[b, pos]
                    assert np.array_equal(row, k_new[b, t])


def test_kvcache_scalar_seqlen_window_alibi(dev, rng):
    B, H, Hkv, D = 2, 4, 4, 32
    k_full = randn(rng, (B, 128, Hkv, D), np.float16)
    v_full = randn(rng, (B, 128, Hkv, D), np.float16)
    q = randn(rng, (B, 3, H, D), np.float16)
    slopes = rng.random(H).astype(np.float32)
    o = dev.api.attention_with_kvcache(dev.put(q), dev.put(k_full), dev.put(v_full), cache_seqlens=100,
                                       window=(20, 0), alibi_slopes=slopes, softcap=12.0)
    ref, _ = kvcache_reference(q, k_full, v_full, [100, 100], causal=True, window=(20, 0), alibi=slopes, softcap=12.0)
    assert_close(dev.get(o), ref, np.float16)


def test_kvcache_invalid_metadata(dev, rng):
    B, H, D = 2, 2, 16
    kc = randn(rng, (B, 64, H, D), np.float16)
    vc = randn(rng, (B, 64, H, D), np.float16)
    q = randn(rng, (B, 1, H, D), np.float16)
    A = dev.api.attention_with_kvcache
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 64 plus 1 new tokens does not fit"):
        A(dev.put(q), dev.put(kc), dev.put(vc), cache_seqlens=np.array([3, 64]), k=dev.put(q), v=dev.put(q))
    # device metadata is checked on the device: the bad batch entry gives NaN, the other is fine
    o, lse = A(dev.put(q), dev.put(kc), dev.put(vc), cache_seqlens=dev.put(np.array([10, 65], np.int32)),
               return_lse=True)
    o, lse = dev.get(o), dev.get(lse)
    assert np.isnan(o[1].astype(np.float32)).all() and np.isnan(lse[1]).all()
    assert np.isfinite(o[0].astype(np.float32)).all()
    table, num_pages = page_table(rng, B, 64, 16)
    pages = to_pages(kc, table, num_pages, 16)
    table[0, 1] = 999
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 999 is not a page index"):
        A(dev.put(q), dev.put(pages), dev.put(pages), cache_seqlens=np.array([20, 5]), block_table=table)
    o = dev.get(A(dev.put(q), dev.put(pages), dev.put(pages), cache_seqlens=dev.put(np.array([20, 5])),
                  block_table=dev.put(table)))
    assert np.isnan(o[0].astype(np.float32)).all() and np.isfinite(o[1].astype(np.float32)).all()


def test_kvcache_refusals_leave_the_caches_untouched(dev, rng):
    """The same refusals as tests/test_decode.py on device arrays: each names the function and
    leaves every cache as it was (validation before the first write, one front end)."""
    B, H, Hkv, D, Smax = 2, 4, 2, 16, 32
    q_h = randn(rng, (B, 1, H, D), np.float32)
    kc_h, vc_h = randn(rng, (B, Smax, Hkv, D), np.float32), randn(rng, (B, Smax, Hkv, D), np.float32)
    big_h = randn(rng, (B, Smax, Hkv, 2 * D), np.float32)
    kn_h, vn_h = randn(rng, (B, 2, Hkv, D), np.float32), randn(rng, (B, 2, Hkv, D), np.float32)
    q, kc, vc, big, kn, vn = (dev.put(a) for a in (q_h, kc_h, vc_h, big_h, kn_h, vn_h))
    A = dev.api.attention_with_kvcache
    lens = np.array([1, 2])
    wide_out = dev.put(np.zeros((B, 1, H, 2 * D), np.float32))
    cases = [
        ("does not fit the cache capacity", dict(cache_seqlens=np.array([1, 31]))),
        ("is negative", dict(cache_seqlens=np.array([-1, 2]))),
        ("out must be contiguous along its last dim", dict(out=wide_out[..., ::2])),
        ("k_cache must be contiguous along its last dim", dict(k_cache=big[..., ::2], v_cache=big[..., 1::2])),
        ("k/v overlap the caches", dict(k=kc[:, 4:6])),
        ("k has dtype float16 but the caches have float32", dict(k=dev.put(kn_h.astype(np.float16)))),
        ("scale must be finite", dict(scale=float("nan"))),
        ("causal must be a bool", dict(causal=0)),
    ]
    for msg, kw in cases:
        args = dict(k_cache=kc, v_cache=vc, k=kn, v=vn, cache_seqlens=lens)
        args.update(kw)
        with pytest.raises((ValueError, TypeError), match=msg) as info:
            A(q, args.pop("k_cache"), args.pop("v_cache"), **args)
        assert str(info.value).startswith("attention_with_kvcache: ")
        assert np.array_equal(dev.get(kc), kc_h) and np.array_equal(dev.get(vc), vc_h), msg
        assert np.array_equal(dev.get(big), big_h), msg


# ---- the decode kernel (attention_decode.cuh; off by default until it has run on a GPU) ----

@contextlib.contextmanager
def cuda_switch(name, on=True):
    """Turns the unverified CUDA path `name` ("decode" or "backward") on or off inside the block
    (as ATTNKIT_CUDA_DECODE / ATTNKIT_CUDA_BACKWARD do at import); yields the CUDA module."""
    from attnkit import _cuda_backend as cb

    mod = cb._module()
    enabled, setter = getattr(mod, f"{name}_kernel_enabled"), getattr(mod, f"_set_{name}_kernel")
    was = enabled()
    setter(on)
    try:
        yield mod
    finally:
        setter(was)


def decode_kernel(on=True):
    """The decode kernel on (or off) inside a with-block."""
    return cuda_switch("decode", on)


# (D, Dv, H, Hkv, page): every head-dim bucket, GQA packs of 4, 2, 1 and a 32-head group cut
# into two 16-row blocks, dense and paged caches.
DECODE_CASES = [(64, 64, 8, 2, None), (128, 128, 8, 2, 16), (80, 80, 4, 4, None), (40, 72, 32, 1, 16),
                (256, 256, 6, 3, None), (192, 160, 8, 8, 64)]


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "D{}-{}-H{}-{}-page{}".format(*c))
def test_decode_kernel_kvcache(dev, rng, dtype, case):
    """One new token appended and attended over ragged lengths (0 .. capacity) against float64;
    unused cache slots hold NaN (they must not reach the output); with and without the (bottom-right) causal bound; repeated runs are
    bit-identical."""
    D, Dv, H, Hkv, paged = case
    B, Smax = 4, 300
    lens = np.array([0, 1, 150, Smax - 1])
    k_full = randn(rng, (B, Smax, Hkv, D), dtype)
    v_full = randn(rng, (B, Smax, Hkv, Dv), dtype)
    for b in range(B):  # never written, never read
        k_full[b, lens[b] + 1:] = np.nan
        v_full[b, lens[b] + 1:] = np.nan
    q = randn(rng, (B, 1, H, D), dtype)
    k_new, v_new = randn(rng, (B, 1, Hkv, D), dtype), randn(rng, (B, 1, Hkv, Dv), dtype)
    k_cache, v_cache = k_full.copy(), v_full.copy()
    for b in range(B):
        k_full[b, lens[b]], v_full[b, lens[b]] = k_new[b, 0], v_new[b, 0]
    for causal in (True, False):
        kc, vc, table = put_caches(dev, rng, k_cache, v_cache, paged)
        kw = {} if table is None else dict(block_table=dev.put(table))
        with decode_kernel() as mod:
            o, lse = dev.api.attention_with_kvcache(dev.put(q), kc, vc, k=dev.put(k_new), v=dev.put(v_new),
                                                    cache_seqlens=dev.put(lens.astype(np.int32)),
                                                    causal=causal, return_lse=True, **kw)
            plan = mod._last_attention_plan()
            again = dev.api.attention_with_kvcache(dev.put(q), kc, vc, cache_seqlens=dev.put(lens + 1),
                                                   causal=causal, **kw)
        assert plan["kernel"] == "decode" and plan["block_m"] == 16, plan
        assert plan["pack"] == min(H // Hkv, 16), plan
        ref, ref_lse = kvcache_reference(q, k_full, v_full, lens + 1, causal=causal)
        assert_close(dev.get(o), ref, dtype, what="decode kernel out")
        assert_close(dev.get(lse), ref_lse, np.float32, what="decode kernel lse")
        assert np.array_equal(dev.get(again), dev.get(o), equal_nan=True)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_decode_kernel_features(dev, rng, dtype):
    """Splits over a long key range, windows, ALiBi, softcap, a non-default scale, a few query
    positions without causal bounds, the top-left causal alignment, against float64."""
    B, H, Hkv, D = 2, 8, 2, 64
    q, k, v = make_qkv(rng, B, H, Hkv, 1, 1100, D, dtype=dtype)
    slopes = rng.random((B, H)).astype(np.float32)
    runs = [dict(), dict(causal=True, causal_align="bottom_right", window=(300, 0)),
            dict(alibi_slopes=slopes, softcap=5.0, scale=0.3), dict(causal=True)]
    with decode_kernel() as mod:
        for kw in runs:
            o, lse = run(dev, q, k, v, return_lse=True, **kw)
            plan = mod._last_attention_plan()
            assert plan["kernel"] == "decode" and plan["num_splits"] > 1, (kw, plan)
            ref_kw = dict(kw)
            if "causal_align" in ref_kw:
                ref_kw["bottom_right"] = ref_kw.pop("causal_align") == "bottom_right"
            if "alibi_slopes" in ref_kw:
                ref_kw["alibi"] = ref_kw.pop("alibi_slopes")
            check(dev, q, k, v, o, lse=lse, **ref_kw)
        q3, k3, v3 = make_qkv(rng, B, H, Hkv, 3, 200, D, dtype=dtype)
        o = run(dev, q3, k3, v3)
        assert mod._last_attention_plan()["kernel"] == "decode"
        check(dev, q3, k3, v3, o)


def test_decode_kernel_nonfinite(dev, rng):
    """An inf in an attended value reaches its rows; a NaN in keys the window excludes, inside
    a tile the kernel loads, does not."""
    B, H, Hkv, D, Sk = 1, 4, 2, 64, 400
    q, k, v = make_qkv(rng, B, H, Hkv, 1, Sk, D, dtype=np.float16)
    v[0, 0, [195, 199], 3] = np.nan  # kv head 0: keys 192..255 are one tile; the window starts at 200
    v[0, 1, 350, 5] = np.inf  # kv head 1: attended by query heads 2, 3
    with decode_kernel() as mod:
        o = run(dev, q, k, v, causal=True, causal_align="bottom_right", window=(199, 0))
        assert mod._last_attention_plan()["kernel"] == "decode"
    o = o.astype(np.float32)
    assert not np.isfinite(o[0, 2:, 0, 5]).any()
    ref, _ = attention_ref(q[:, :2], k[:, :1], v[:, :1], causal=True, bottom_right=True, window=(199, 0))
    assert np.isfinite(ref).all()
    assert_close(o[:, :2], ref, np.float16, what="heads beside the excluded NaN")


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("sq,sk", [(4, 300), (1, 700)])
def test_decode_kernel_nonfinite_cases(dev, rng, sq, sk, dtype):
    """The forward's non-finite cases (NaN query rows, keys, values, masked entries) through the
    decode kernel where it applies; the rest take the tensor-core forward as before."""
    with decode_kernel():
        check_nonfinite_cases(dev, rng, sq, sk, dtype)


def test_decode_kernel_is_chosen_only_where_it_applies(dev, rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 4, 100, 64, dtype=np.float16)
    mask = rng.random((1, 4, 4, 100)) < 0.8
    with decode_kernel() as mod:
        run(dev, q, k, v)  # 4 positions x pack 4, no bounds
        assert mod._last_attention_plan()["kernel"] == "decode"
        for kw in (dict(causal=True), dict(window=(10, 10)), dict(mask=mask)):
            run(dev, q, k, v, **kw)  # rows masked unlike each other: the tensor-core forward
            assert mod._last_attention_plan()["kernel"] == "mma", kw
        q17, k17, v17 = make_qkv(rng, 1, 4, 4, 17, 100, 64, dtype=np.float16)
        run(dev, q17, k17, v17)
        assert mod._last_attention_plan()["kernel"] == "mma"
        run(dev, *make_qkv(rng, 1, 4, 2, 1, 100, 64, dtype=np.float32))
        assert mod._last_attention_plan()["kernel"] == "simt"
    with decode_kernel(False) as mod:
        run(dev, q[:, :, :1], k, v)
        assert mod._last_attention_plan()["kernel"] == "mma"



# ---- the Hopper kernel (attention_hopper.cuh: TMA, wgmma, warp specialization; sm_90 only and
# off by default until it has run on a GPU). On the emulator the device poses as an sm_90
# (dev.as_sm90); every call asserts which kernel the planner chose.

@contextlib.contextmanager
def hopper_kernel(dev):
    """The Hopper forward switched on inside the block (skips where the build lacks it or the
    GPU is not an sm_90); yields the CUDA module."""
    from attnkit import _cuda_backend as cb

    if not cb._module().hopper_kernel_built():
        pytest.skip("this build has no Hopper attention kernel (sm_90 and the CUTLASS headers at build time)")
    with dev.as_sm90(), cuda_switch("hopper") as mod:
        yield mod


def run_hopper(dev, q, k, v, kernel="hopper", **kw):
    """run() with the Hopper kernel on; asserts the planner chose `kernel`."""
    with hopper_kernel(dev) as mod:
        res = run(dev, q, k, v, **kw)
        plan = mod._last_attention_plan()
    assert plan["kernel"] == kernel, plan
    return res


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("D,Dv", [(64, 64), (40, 40), (80, 80), (96, 96), (104, 104), (128, 128), (160, 160),
                                  (192, 192), (256, 256), (64, 32), (40, 96), (128, 256), (256, 64), (72, 136)])
def test_hopper_head_dims(dev, rng, D, Dv, dtype):
    """Every head-dim bucket, head dims that end inside a 64-column panel (TMA's zero fill) or
    leave whole panels unloaded, Dv != D; 130 query rows (a second block of 2 rows) and 200 keys
    (a partial key tile), causal and not, against float64."""
    q, k, v = make_qkv(rng, 1, 2, 1, 130, 200, D, Dv, dtype=dtype)
    for causal in (False, True):
        o, lse = run_hopper(dev, q, k, v, causal=causal, return_lse=True)
        check(dev, q, k, v, o, lse=lse, causal=causal)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_hopper_features(dev, rng, dtype):
    """GQA and MQA, both causal alignments with Sq != Sk, windows, ALiBi with softcap and a
    scale, bool / float / key-padding masks (a fully masked row, -inf entries), lse."""
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 100, 260, 64
    q, k, v = make_qkv(rng, B, H, Hkv, Sq, Sk, D, dtype=dtype)
    slopes = rng.random((B, H)).astype(np.float32)
    qs = (q.astype(np.float32) * 4).astype(dtype)  # large scores so the cap matters
    cases = [({}, {}), (dict(causal=True), dict(causal=True)),
             (dict(causal=True, causal_align="bottom_right"), dict(causal=True, bottom_right=True)),
             (dict(window=(30, 10)), dict(window=(30, 10))),
             (dict(window=(50, 0), causal=True, causal_align="bottom_right"),
              dict(window=(50, 0), causal=True, bottom_right=True)),
             (dict(alibi_slopes=slopes, softcap=5.0, scale=0.3), dict(alibi=slopes, softcap=5.0, scale=0.3))]
    for run_kw, ref_kw in cases:
        x = qs if "softcap" in run_kw else q
        o, lse = run_hopper(dev, x, k, v, return_lse=True, **run_kw)
        check(dev, x, k, v, o, lse=lse, **ref_kw)
    m = masks(rng, B, H, Sq, Sk)
    for kind in ("bool", "float_inf", "keypad"):
        o, lse = run_hopper(dev, q, k, v, mask=m[kind], return_lse=True)
        check(dev, q, k, v, o, lse=lse, mask=m[kind])
        if kind == "bool":  # its row 0 is fully masked: zeros, lse -inf
            assert (o[:, :, 0] == 0).all() and np.isneginf(lse[:, :, 0]).all()
    q1, k1, v1 = make_qkv(rng, 1, 3, 1, 70, 90, 128, dtype=dtype)  # MQA
    check(dev, q1, k1, v1, run_hopper(dev, q1, k1, v1, causal=True), causal=True)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_hopper_nonfinite(dev, rng, dtype):
    """NaN / inf in masked-out K/V never reaches the output (the rare path), an attended one
    does (as torch), fully masked rows give 0 and lse -inf; the grid of the CPU tests."""
    q, k, v, mask = masked_nonfinite_kv(rng, 70, 64, dtype)
    o = run_hopper(dev, q, k, v, mask=mask)
    assert np.isfinite(o.astype(np.float32)).all()
    check(dev, q, k, v, o, mask=mask)
    q2, k2, v2 = make_qkv(rng, 1, 2, 2, 100, 200, 64, dtype=dtype)  # causal rows: V past the diagonal is NaN
    k2[0, :, 100:] = np.nan
    v2[0, :, 100:] = np.nan
    o = run_hopper(dev, q2, k2, v2, causal=True)
    assert np.isfinite(o.astype(np.float32)).all()
    check(dev, q2, k2[:, :, :100], v2[:, :, :100], o, causal=True)
    assert not np.isfinite(run_hopper(dev, q, k[:, :, :150], v[:, :, :150]).astype(np.float32)).all()
    with hopper_kernel(dev) as mod:
        check_nonfinite_cases(dev, rng, 70, 150, dtype)
        assert mod._last_attention_plan()["kernel"] == "hopper"


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_hopper_varlen_layouts_splits(dev, rng, dtype):
    """Varlen batches (empty, 1-token and multi-block sequences: rows and keys past a sequence
    are the next sequence's, masked), bshd and strided views, key splits with the combine,
    repeated runs bit-identical; a layout TMA cannot describe falls back to the mma kernel."""
    lens_q, lens_k = [5, 0, 140, 1, 70], [9, 4, 150, 0, 100]
    H, Hkv, D = 4, 2, 64
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, k, v = (randn(rng, (n, h, D), dtype) for n, h in ((cu_q[-1], H), (cu_k[-1], Hkv), (cu_k[-1], Hkv)))
    with hopper_kernel(dev) as mod:
        o, lse = dev.api.attention_varlen(dev.put(q), dev.put(k), dev.put(v), cu_q, cu_k, causal=True,
                                          return_lse=True)
        assert mod._last_attention_plan()["kernel"] == "hopper"
    o, lse = dev.get(o), dev.get(lse)
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            continue
        sl = lambda a, cu: a[cu[b]:cu[b + 1]].transpose(1, 0, 2)[None]
        check(dev, sl(q, cu_q), sl(k, cu_k), sl(v, cu_k), sl(o, cu_q), lse=lse[:, cu_q[b]:cu_q[b + 1]][None],
              causal=True, bottom_right=True)
    B, S = 2, 96
    q, k, v = make_qkv(rng, B, H, H, S, S, D, dtype=dtype)
    A = dev.api.attention
    qkv = randn(rng, (B, S, 3, H, D), dtype)  # bshd views of a fused projection
    d = dev.put(qkv)
    with hopper_kernel(dev) as mod:
        o = dev.get(A(d[:, :, 0], d[:, :, 1], d[:, :, 2], layout="bshd", causal=True))
        assert mod._last_attention_plan()["kernel"] == "hopper"
        check(dev, *(qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3)), o.transpose(0, 2, 1, 3), causal=True)
        big = randn(rng, (B * 2, H, S * 2, D * 2), dtype)  # strided batch / seq views
        bd = dev.put(big)
        got = dev.get(A(bd[::2, :, ::2, :D], bd[1::2, :, 1::2, D:], bd[::2, :, 1::2, :D]))
        assert mod._last_attention_plan()["kernel"] == "hopper"
        check(dev, big[::2, :, ::2, :D], big[1::2, :, 1::2, D:], big[::2, :, 1::2, :D], got)
        odd = randn(rng, (B, H, S, D + 1), dtype)  # rows 2 * 65 bytes apart: not for TMA
        od = dev.put(odd)
        got = dev.get(A(od[..., :D], od[..., 1:], od[..., :D]))
        assert mod._last_attention_plan()["kernel"] == "mma"
        check(dev, odd[..., :D], odd[..., 1:], odd[..., :D], got)
        # few blocks, many keys: split (the emulated GPU has 4 SMs) and combined
        q1, k1, v1 = make_qkv(rng, 1, 1, 1, 64, 1000 if dev.small else 20000, 128, dtype=dtype)
        qq, kk, vv = dev.put(q1), dev.put(k1), dev.put(v1)
        runs = [A(qq, kk, vv, return_lse=True) for _ in range(2)]
        plan = mod._last_attention_plan()
        assert plan["kernel"] == "hopper" and plan["num_splits"] > 1, plan
    check(dev, q1, k1, v1, dev.get(runs[0][0]), lse=dev.get(runs[0][1]))
    assert np.array_equal(dev.get(runs[0][0]), dev.get(runs[1][0]))


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_hopper_kvcache_prefill(dev, rng, dtype):
    """A chunk of 70 tokens appended to caches of ragged lengths and attended (bottom-right
    causal) through the Hopper kernel: contiguous, and paged with pages that hold whole key
    tiles (128 here, shuffled); smaller pages take the mma kernel."""
    B, H, Hkv, D, Smax, n_new = 3, 4, 2, 64, 300, 70
    lens = np.array([0, 100, Smax - n_new])
    k_full = randn(rng, (B, Smax, Hkv, D), dtype)
    v_full = randn(rng, (B, Smax, Hkv, D), dtype)
    q = randn(rng, (B, n_new, H, D), dtype)
    k_new, v_new = randn(rng, (B, n_new, Hkv, D), dtype), randn(rng, (B, n_new, Hkv, D), dtype)
    k_cache, v_cache = k_full.copy(), v_full.copy()
    for b in range(B):
        k_full[b, lens[b]:lens[b] + n_new] = k_new[b]
        v_full[b, lens[b]:lens[b] + n_new] = v_new[b]
        k_cache[b, lens[b]:] = np.nan  # unused slots: never attended
        v_cache[b, lens[b]:] = np.nan
    ref, ref_lse = kvcache_reference(q, k_full, v_full, lens + n_new, causal=True)
    for paged, kernel in ((None, "hopper"), (128, "hopper"), (256, "hopper"), (64, "mma")):
        kc, vc, table = put_caches(dev, rng, k_cache, v_cache, paged)
        kw = {} if table is None else dict(block_table=dev.put(table.astype(np.int32)))
        with hopper_kernel(dev) as mod:
            o, lse = dev.api.attention_with_kvcache(dev.put(q), kc, vc, k=dev.put(k_new), v=dev.put(v_new),
                                                    cache_seqlens=dev.put(lens.astype(np.int32)), causal=True,
                                                    return_lse=True, **kw)
            plan = mod._last_attention_plan()
            assert plan["kernel"] == kernel, (paged, plan)
        assert_close(dev.get(o), ref, dtype, what="hopper kvcache out")
        assert_close(dev.get(lse), ref_lse, np.float32, what="hopper kvcache lse")


# ---- backward (attention_bwd.cu; off by default until it has run on a GPU) ----

def backward_kernel(on=True):
    """attention_backward on device arrays allowed (or not) inside a with-block."""
    return cuda_switch("backward", on)


def run_backward(dev, rng, B, H, Hkv, Sq, Sk, D, Dv, dtype, **kw):
    """Forward and backward on the device against float64 autograd (test_backward.py)."""
    from reference import grad_rounding_floors
    from test_backward import torch_reference_grads

    q, k, v = make_qkv(rng, B, H, Hkv, Sq, Sk, D, Dv, dtype=dtype)
    ak = {kk: vv for kk, vv in kw.items() if kk not in ("bottom_right", "alibi")}
    if kw.get("bottom_right"):
        ak["causal_align"] = "bottom_right"
    if kw.get("alibi") is not None:
        ak["alibi_slopes"] = kw["alibi"]
    if "mask" in ak:
        ak["mask"] = dev.put(ak["mask"])
    o, lse = dev.api.attention(dev.put(q), dev.put(k), dev.put(v), return_lse=True, **ak)
    o_h = dev.get(o)
    dout = randn(rng, o_h.shape, dtype)
    with backward_kernel():
        dq, dk, dv = dev.api.attention_backward(dev.put(dout), dev.put(q), dev.put(k), dev.put(v), o, lse, **ak)
    _, rq, rk, rv, key_mass = torch_reference_grads(q, k, v, dout, with_key_mass=True, **kw)
    floors = grad_rounding_floors(q, k, o_h, dout, kw.get("scale"), key_mass)
    for name, got, ref, fl in zip(("dq", "dk", "dv"), (dq, dk, dv), (rq, rk, rv), floors):
        got = dev.get(got)
        assert got.shape == ref.shape and got.dtype == q.dtype
        assert_close(got, ref, dtype, floor=fl, what=f"{name} {kw}")


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 4, 2, 45, 70, 64, 64), (1, 2, 1, 70, 33, 40, 72), (1, 2, 2, 33, 100, 128, 128),
                                   (1, 3, 3, 17, 17, 96, 80), (1, 2, 1, 20, 30, 36, 36)],
                         ids=lambda s: "B{}H{}/{}Sq{}Sk{}D{}Dv{}".format(*s))
def test_backward_shapes(dev, rng, dtype, shape):
    for causal, br in ((False, False), (True, False), (True, True)):
        run_backward(dev, rng, *shape, dtype, causal=causal, bottom_right=br)


@pytest.mark.parametrize("dtype", HALF, ids=dtype_id)
def test_backward_features(dev, rng, dtype):
    B, H, Sq, Sk = 2, 4, 40, 75
    keypad = (np.arange(Sk)[None, :] < np.array([50, 75])[:, None])[:, None, None, :]
    fmask = randn(rng, (B, 1, Sq, Sk), np.float32)
    fmask[..., ::4] = -np.inf
    full = np.ones((B, H, Sq, Sk), bool)
    full[:, :, 5] = False  # a fully masked row: zero gradients there
    slopes = rng.random(H).astype(np.float32)
    for kw in (dict(mask=keypad), dict(mask=fmask), dict(mask=full), dict(window=(10, 3), causal=True),
               dict(alibi=slopes, bottom_right=True, causal=True), dict(softcap=2.0, scale=1.0), dict(scale=0.3)):
        run_backward(dev, rng, B, H, 2, Sq, Sk, 64, 64, dtype, **kw)


def test_backward_nonfinite_stays_where_it_belongs(dev, rng):
    """NaN in keys/values every query has masked out stays out of every gradient; a NaN query
    row reaches its own dq and the dk/dv of the keys it attends, nowhere else."""
    q, k, v = make_qkv(rng, 1, 2, 2, 10, 80, 64, dtype=np.float16)
    k[0, :, 70:] = np.nan
    v[0, :, 70:] = np.nan
    mask = np.ones((1, 1, 10, 80), bool)
    mask[..., 70:] = False
    o, lse = dev.api.attention(dev.put(q), dev.put(k), dev.put(v), mask=dev.put(mask), return_lse=True)
    with backward_kernel():
        dq, dk, dv = (dev.get(g) for g in dev.api.attention_backward(
            dev.put(np.ones(dev.get(o).shape, np.float16)), dev.put(q), dev.put(k), dev.put(v), o, lse,
            mask=dev.put(mask)))
    assert np.isfinite(dq.astype(np.float32)).all() and np.isfinite(dv.astype(np.float32)).all()
    assert np.isfinite(dk[:, :, :70].astype(np.float32)).all()
    q2, k2, v2 = make_qkv(rng, 1, 1, 1, 40, 60, 64, dtype=np.float16)
    q2[0, 0, 7] = np.nan
    o2, lse2 = dev.api.attention(dev.put(q2), dev.put(k2), dev.put(v2), causal=True, return_lse=True)
    with backward_kernel():
        dq2, dk2, dv2 = (dev.get(g).astype(np.float32) for g in dev.api.attention_backward(
            dev.put(np.ones(dev.get(o2).shape, np.float16)), dev.put(q2), dev.put(k2), dev.put(v2), o2, lse2,
            causal=True))
    assert np.isnan(dq2[0, 0, 7]).all() and np.isfinite(np.delete(dq2[0, 0], 7, axis=0)).all()
    assert np.isnan(dk2[0, 0, :8]).any(axis=-1).all() and np.isfinite(dk2[0, 0, 8:]).all()
    assert np.isfinite(dv2[0, 0, 8:]).all()


def test_backward_refusals(dev, rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 8, 8, 64, dtype=np.float16)
    o, lse = dev.api.attention(dev.put(q), dev.put(k), dev.put(v), return_lse=True)
    args = (dev.put(np.ones(dev.get(o).shape, np.float16)), dev.put(q), dev.put(k), dev.put(v), o, lse)
    with backward_kernel(False):
        with pytest.raises(ValueError, match="attention_backward: .*ATTNKIT_CUDA_BACKWARD=1"):
            dev.api.attention_backward(*args)
    with backward_kernel():
        with pytest.raises(NotImplementedError, match="attention_backward: dropout"):
            dev.api.attention_backward(*args, dropout_p=0.1)
        q32, k32, v32 = make_qkv(rng, 1, 2, 2, 8, 8, 64, dtype=np.float32)
        o32, lse32 = dev.api.attention(dev.put(q32), dev.put(k32), dev.put(v32), return_lse=True)
        with pytest.raises(ValueError, match="attention_backward: the CUDA backward takes float16 or bfloat16"):
            dev.api.attention_backward(dev.put(np.ones(dev.get(o32).shape, np.float32)), dev.put(q32),
                                       dev.put(k32), dev.put(v32), o32, lse32)
        qb, kb, vb = make_qkv(rng, 1, 2, 2, 8, 8, 160, dtype=np.float16)
        ob, lseb = dev.api.attention(dev.put(qb), dev.put(kb), dev.put(vb), return_lse=True)
        with pytest.raises(ValueError, match="head dims up to 128"):
            dev.api.attention_backward(dev.put(np.ones(dev.get(ob).shape, np.float16)), dev.put(qb),
                                       dev.put(kb), dev.put(vb), ob, lseb)


# ---- 8-bit caches (int8, float8 e4m3fn; issue 15) ----

CODE_FORMATS = ["int8", "fp8_e4m3"]


def _bytes(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("fmt", CODE_FORMATS)
@pytest.mark.parametrize("D", [1, 40, 128, 200])
def test_quantize_kv_matches_the_cpu(dev, rng, fmt, D):
    """quantize_kv on device arrays writes the CPU's bytes (codes and scales), every input dtype,
    with zero and non-finite rows."""
    import attnkit

    for dt in HALF + [np.dtype(np.float32)]:
        x = randn(rng, (3, 5, 2, D), dt, 2.0)
        x[0, 1, 0] = 0
        x[2, 0, 1, 0] = np.inf
        codes, scale = dev.api.quantize_kv(dev.put(x), fmt)
        want_c, want_s = attnkit.quantize_kv(x, fmt)
        assert np.array_equal(_bytes(dev.get(codes)), _bytes(want_c))
        assert np.array_equal(dev.get(scale), want_s, equal_nan=True)


def _code_caches(rng, fmt, B, Smax, Hkv, D):
    import attnkit

    kq, ks = attnkit.quantize_kv(randn(rng, (B, Smax, Hkv, D), np.float32), fmt)
    vq, vs = attnkit.quantize_kv(randn(rng, (B, Smax, Hkv, D), np.float32), fmt)
    return kq, ks, vq, vs


@pytest.mark.parametrize("fmt", CODE_FORMATS)
@pytest.mark.parametrize("paged", [None, 16])
@pytest.mark.parametrize("sq", [1, 5])
def test_kvcache_codes(dev, rng, fmt, paged, sq):
    """Decode (and a few query rows) over 8-bit caches: the float64 reference on the
    dequantized cache, q in float32 / float16 / bfloat16; appended rows are quantized on the
    device into the CPU's bytes; paged caches; ragged lengths."""
    check_kvcache_codes(dev, rng, fmt, paged, sq, TC_AND_FP32)


@pytest.mark.parametrize("fmt", CODE_FORMATS)
@pytest.mark.parametrize("D,Hkv,paged", [(64, 2, None), (64, 2, 16), (40, 2, None), (36, 1, 16), (128, 4, None)])
def test_decode_kernel_codes(dev, rng, fmt, D, Hkv, paged):
    """8-bit caches through the decode kernel (codes staged, dequantized per warp into q's
    dtype): 16-byte rows and byte-aligned rows (D 36, one kv head), column tails, paged."""
    with decode_kernel():
        check_kvcache_codes(dev, rng, fmt, paged, 1, HALF, D=D, Hkv=Hkv, kernel="decode")


def check_kvcache_codes(dev, rng, fmt, paged, sq, q_dtypes, D=64, Hkv=2, kernel=None):
    import attnkit
    from attnkit import _cuda_backend as cb

    B, H = 3, 8
    Smax = 96 if dev.small else 300
    lens = np.array([0, 40, Smax - sq])
    for qd in q_dtypes:
        kq, ks, vq, vs = _code_caches(rng, fmt, B, Smax, Hkv, D)
        q = randn(rng, (B, sq, H, D), qd)
        kn, vn = randn(rng, (B, sq, Hkv, D), qd), randn(rng, (B, sq, Hkv, D), qd)
        kw = {}
        if paged:
            table, num_pages = page_table(rng, B, Smax, paged)
            pages = [to_pages(a, table, num_pages, paged) for a in (kq, vq)]
            spages = [to_pages(a[..., None], table, num_pages, paged)[..., 0] for a in (ks, vs)]
            kc, vc = dev.put(pages[0]), dev.put(pages[1])
            kcs, vcs = dev.put(spages[0]), dev.put(spages[1])
            kw["block_table"] = dev.put(table)
        else:
            kc, vc, kcs, vcs = dev.put(kq), dev.put(vq), dev.put(ks), dev.put(vs)
        o = dev.api.attention_with_kvcache(dev.put(q), kc, vc, k=dev.put(kn), v=dev.put(vn),
                                           cache_seqlens=lens, k_scale=kcs, v_scale=vcs, **kw)
        # the append, as the CPU would quantize it
        ckn, skn = attnkit.quantize_kv(kn, fmt)
        cvn, svn = attnkit.quantize_kv(vn, fmt)
        kc_h, ks_h = dev.get(kc), dev.get(kcs)
        for b in range(B):
            for t in range(sq):
                pos = lens[b] + t
                kq[b, pos], vq[b, pos], ks[b, pos], vs[b, pos] = ckn[b, t], cvn[b, t], skn[b, t], svn[b, t]
                where = (table[b, pos // paged], pos % paged) if paged else (b, pos)
                assert np.array_equal(_bytes(kc_h[where]), _bytes(ckn[b, t]))
                assert np.array_equal(ks_h[where], skn[b, t])
        if kernel:
            assert cb._module()._last_attention_plan()["kernel"] == kernel
        deq = lambda c, s_: c.astype(np.float64) * s_.astype(np.float64)[..., None]
        ref, _ = kvcache_reference(q, deq(kq, ks), deq(vq, vs), lens + sq, causal=True)
        assert_close(dev.get(o), ref, qd, what=f"{fmt} cache out, q {np.dtype(qd).name}")


def test_kvcache_codes_refusals(dev, rng):
    """Misuse of 8-bit caches on device arrays: named, before any write."""
    B, H, Hkv, D, Smax = 2, 4, 2, 16, 32
    kq, ks, vq, vs = _code_caches(rng, "int8", B, Smax, Hkv, D)
    kc, vc, kcs, vcs = dev.put(kq), dev.put(vq), dev.put(ks), dev.put(vs)
    q = dev.put(randn(rng, (B, 1, H, D), np.float32))
    kn, vn = dev.put(randn(rng, (B, 1, Hkv, D), np.float32)), dev.put(randn(rng, (B, 1, Hkv, D), np.float32))
    A = dev.api.attention_with_kvcache
    cases = [
        ("k_scale and v_scale .* are required", dict(k_scale=None)),
        ("v_scale has shape", dict(v_scale=dev.put(vs[:, :, :1]))),
        ("k_scale has dtype float16", dict(k_scale=dev.put(ks.astype(np.float16)))),
        ("q has dtype float64 but the caches are int8", dict(q=dev.put(randn(rng, (B, 1, H, D), np.float64)))),
        ("rows appended to a int8 cache must be float32", dict(k=dev.put(np.zeros((B, 1, Hkv, D), np.int8)))),
        ("does not fit the cache capacity", dict(cache_seqlens=np.array([1, 32]))),
    ]
    for msg, kw in cases:
        args = dict(q=q, k=kn, v=vn, cache_seqlens=np.array([1, 2]), k_scale=kcs, v_scale=vcs)
        args.update(kw)
        with pytest.raises((ValueError, TypeError), match=msg) as info:
            A(args.pop("q"), kc, vc, **args)
        assert str(info.value).startswith("attention_with_kvcache: ")
        for d, h in ((kc, kq), (vc, vq), (kcs, ks), (vcs, vs)):
            assert np.array_equal(_bytes(dev.get(d)), _bytes(h)), msg


# ---- softmax ----

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape,axis", [((7, 300), -1), ((3, 1024), 1), ((5, 1025), -1), ((2, 4100), -1),
                                        ((3, 2048), -1), ((2, 5000), -1),
                                        ((4, 33, 6), 1), ((300, 5), 0), ((1,), 0), ((6, 8), -1)])
def test_softmax(dev, rng, shape, axis, dtype):
    x = randn(rng, shape, dtype, scale=3.0)
    got = dev.get(dev.api.softmax(dev.put(x), axis=axis))
    assert got.dtype == dtype
    assert_close(got, softmax_ref(x, axis), dtype)


def test_softmax_special_values_and_views(dev, rng):
    x = randn(rng, (6, 40), np.float32)
    x[1, 5] = np.nan
    x[2] = -np.inf
    x[3, ::2] = -np.inf
    x[4, 7] = np.inf
    got = dev.get(dev.api.softmax(dev.put(x)))
    assert_close(got, softmax_ref(x, -1), np.float32)
    # in place and strided views
    x2 = randn(rng, (5, 64), np.float16)
    d2 = dev.put(x2)
    assert dev.api.softmax(d2, out=d2) is d2
    assert_close(dev.get(d2), softmax_ref(x2, -1), np.float16)
    for dt in HALF + [np.dtype(np.float32)]:  # long rows: the 16-byte-vector block kernel
        xl = randn(rng, (5, 2048), dt)
        xl[1, 1000] = np.nan
        xl[2] = -np.inf
        xl[3, ::3] = -np.inf
        xl[4, 2047] = np.inf
        assert_close(dev.get(dev.api.softmax(dev.put(xl))), softmax_ref(xl, -1), dt)
    big = randn(rng, (8, 3000), np.float32)
    db = dev.put(big)
    assert_close(dev.get(dev.api.softmax(db[::2, ::3])), softmax_ref(big[::2, ::3], -1), np.float32)
    assert_close(dev.get(dev.api.softmax(db[:, :200], axis=0)), softmax_ref(big[:, :200], 0), np.float32)


# ---- matmul ----

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sa,sb", [((1, 1), (1, 1)), ((33, 70), (70, 129)), ((130, 40), (40, 7)),
                                   ((2, 1, 17, 24), (3, 24, 40)), ((64,), (64, 9)), ((5, 64), (64,)),
                                   ((3, 0), (0, 4))])
def test_matmul(dev, rng, sa, sb, dtype):
    a, b = randn(rng, sa, dtype), randn(rng, sb, dtype)
    got = dev.get(dev.api.matmul(dev.put(a), dev.put(b)))
    ref = np.matmul(to64(a), to64(b))
    assert got.shape == ref.shape and got.dtype == dtype
    scale = max(1.0, float(np.abs(np.matmul(np.abs(to64(a)), np.abs(to64(b)))).max(initial=0.0)))
    assert_close(got, ref, dtype, scale=scale)
    if ref.size and a.size and b.size:  # which kernel ran (the CUTLASS one only when switched on)
        from attnkit import _cuda_backend as cb
        mod = cb._module()
        half = np.dtype(dtype).itemsize == 2
        want = ({"mma", "sm90"} if mod.cutlass_gemm_enabled() else {"mma"}) if half else {"simt"}
        assert mod._last_gemm_kernel() in want


@pytest.mark.parametrize("dtype", [np.dtype(np.float16), np.dtype(np.float32)], ids=dtype_id)
def test_matmul_views(dev, rng, dtype):
    a, b = randn(rng, (150, 96), dtype), randn(rng, (96, 200), dtype)
    da, db = dev.put(a), dev.put(b)
    ref = np.matmul(to64(a), to64(b))
    scale = float(np.abs(np.matmul(np.abs(to64(a)), np.abs(to64(b)))).max())
    wt = dev.put(np.ascontiguousarray(b.T))  # b = w.T: k-contiguous
    assert_close(dev.get(dev.api.matmul(da, dev.transpose(wt, (1, 0)))), ref, dtype, scale=scale)
    at = dev.put(np.ascontiguousarray(a.T))  # a = x.T: column-major a
    assert_close(dev.get(dev.api.matmul(dev.transpose(at, (1, 0)), db)), ref, dtype, scale=scale)
    out = dev.poisoned((150, 200), dtype)
    assert dev.api.matmul(da, db, out=out) is out
    assert_close(dev.get(out), ref, dtype, scale=scale)
    assert_close(dev.get(dev.api.matmul(da[::3, 1:], db[1:, ::2])), np.matmul(to64(a[::3, 1:]), to64(b[1:, ::2])),
                 dtype, scale=scale)
