"""Decode path (few query rows, long KV) and attention_with_kvcache."""
import numpy as np
import pytest

import attnkit
from conftest import poisoned
from reference import assert_close, attention_ref, bfloat16, nonfinite_cases, randn, to64

from test_attention import ak_options, check, make_qkv, masks


def half_dtypes():
    return [np.float16] + ([bfloat16] if bfloat16 is not None else [])


@pytest.mark.parametrize("sq", [1, 3, 16])
@pytest.mark.parametrize("H,Hkv", [(8, 8), (8, 2), (8, 1)])
def test_decode_path_features(isa, rng, sq, H, Hkv):
    if sq * (H // Hkv) > 32:
        pytest.skip("not a decode shape")
    B, Sk, D = 2, 700, 64
    q, k, v = make_qkv(rng, B, H, Hkv, sq, Sk, D, 48)
    m = masks(rng, B, H, sq, Sk)
    slopes = rng.random(H).astype(np.float32)
    for kw in (dict(), dict(causal=True), dict(mask=m["keypad"]), dict(mask=m["float_inf"]),
               dict(window=(100, 0), causal=True), dict(softcap=3.0, scale=0.5)):
        o, lse = attnkit.attention(q, k, v, causal_align="bottom_right", alibi_slopes=slopes,
                                   return_lse=True, **kw)
        check(q, k, v, o, lse=lse, bottom_right=True, alibi=slopes, **kw)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("B,Hkv", [(1, 1), (1, 8), (4, 8)])
def test_split_kv_long_sequences(isa, rng, layout, B, Hkv):
    H, Sk, D = 32, 5000, 128  # long enough to split into chunks
    q, k, v = make_qkv(rng, B, H, Hkv, 1, Sk, D)
    if layout == "bshd":
        args = [np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v)]
        o, lse = attnkit.attention(*args, layout="bshd", return_lse=True)
        o = o.transpose(0, 2, 1, 3)
    else:
        o, lse = attnkit.attention(q, k, v, return_lse=True)
    check(q, k, v, o, lse=lse)


@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_decode_nonfinite_propagation_position_major(isa, rng, sq, dtype):
    """The split-KV decode path on a (B, S, H, D) cache: a NaN/inf in any attended entry makes
    the row NaN through the chunk combine (a chunk's NaN is not dropped as an empty chunk);
    masked-out entries stay out."""
    for name, q, k, v, opts in nonfinite_cases(rng, 1, 8, 2, sq, 1500, 32, dtype):
        bshd = [np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v)]
        o, lse = attnkit.attention(*bshd, layout="bshd", return_lse=True, **ak_options(opts))
        o = o.transpose(0, 2, 1, 3)
        ref, ref_lse = attention_ref(q, k, v, **opts)
        assert np.array_equal(np.isnan(to64(o)).any(-1), np.isnan(ref).any(-1)), name
        assert np.array_equal(np.isnan(lse), np.isnan(ref_lse)), name
        fin = np.isfinite(ref)
        assert_close(o, ref, dtype, scale=float(np.abs(ref[fin]).max()) if fin.any() else 1.0, what=name)


def cache_case(rng, B=3, H=8, Hkv=2, D=64, Dv=64, Smax=256, dtype=np.float32, kv_dtype=None):
    kvd = kv_dtype or dtype
    q = randn(rng, (B, 1, H, D), dtype)
    kc = randn(rng, (B, Smax, Hkv, D), kvd)
    vc = randn(rng, (B, Smax, Hkv, Dv), kvd)
    return q, kc, vc


def ref_from_cache(q, kc, vc, lens, **kw):
    """float64 reference per sequence on the gathered cache (bottom-right causal)."""
    outs = []
    for b, L in enumerate(lens):
        qs = q[b:b + 1].transpose(0, 2, 1, 3)
        ks = kc[b:b + 1, :L].transpose(0, 2, 1, 3)
        vs = vc[b:b + 1, :L].transpose(0, 2, 1, 3)
        o, _ = attention_ref(qs, ks, vs, bottom_right=True, **kw)
        outs.append(o.transpose(0, 2, 1, 3))
    return np.concatenate(outs)


def test_kvcache_ragged_and_append(isa, rng):
    q, kc, vc = cache_case(rng)
    lens = np.array([0, 17, 250], np.int32)
    kn = randn(rng, (3, 1, 2, 64), np.float32)
    vn = randn(rng, (3, 1, 2, 64), np.float32)
    o = attnkit.attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens)
    assert np.array_equal(kc[np.arange(3), lens], kn[:, 0]) and np.array_equal(vc[np.arange(3), lens], vn[:, 0])
    ref = ref_from_cache(q, kc, vc, lens + 1, causal=True)
    assert_close(o, ref, np.float32, scale=float(np.abs(vc).max()))
    # without appending, a zero-length sequence attends to nothing: 0
    o, lse = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=np.array([0, 5, 9]), return_lse=True)
    assert (o[0] == 0).all() and np.isneginf(lse[0]).all()
    assert_close(o[1:], ref_from_cache(q[1:], kc[1:], vc[1:], [5, 9]), np.float32, scale=4.0)


@pytest.mark.parametrize("kv", ["float32", "float16", "bfloat16"])
def test_paged_equals_contiguous(isa, rng, kv):
    kvd = {"float32": np.float32, "float16": np.float16, "bfloat16": bfloat16}[kv]
    if kvd is None:
        pytest.skip("ml_dtypes not installed")
    B, Hkv, D, page, nblk = 3, 2, 64, 16, 8
    Smax = page * nblk
    q, kc, vc = cache_case(rng, B=B, Hkv=Hkv, Smax=Smax, kv_dtype=kvd)
    lens = np.array([1, 70, 127], np.int32)
    # scatter the contiguous cache into shuffled pages
    perm = rng.permutation(B * nblk + 5)[: B * nblk].reshape(B, nblk).astype(np.int32)
    kp = np.zeros((B * nblk + 5, page, Hkv, D), kvd)
    vp = np.zeros((B * nblk + 5, page, Hkv, D), kvd)
    for b in range(B):
        for j in range(nblk):
            kp[perm[b, j]] = kc[b, j * page:(j + 1) * page]
            vp[perm[b, j]] = vc[b, j * page:(j + 1) * page]
    kn, vn = randn(rng, (B, 1, Hkv, D), kvd), randn(rng, (B, 1, Hkv, D), kvd)
    oc = attnkit.attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens)
    op = attnkit.attention_with_kvcache(q, kp, vp, k=kn, v=vn, cache_seqlens=lens, block_table=perm)
    assert np.array_equal(oc, op)
    ref = ref_from_cache(q, kc, vc, lens + 1, causal=True)
    assert_close(oc, ref, np.float32, scale=float(np.abs(to64(vc)).max()))


def test_append_then_attend_many_steps(isa, rng):
    B, H, Hkv, D, steps = 2, 4, 2, 32, 24
    kc = np.zeros((B, 64, Hkv, D), np.float32)
    vc = np.zeros((B, 64, Hkv, D), np.float32)
    start = np.array([3, 0], np.int32)
    kc[0, :3] = randn(rng, (3, Hkv, D), np.float32)
    vc[0, :3] = randn(rng, (3, Hkv, D), np.float32)
    lens = start.copy()
    for step in range(steps):
        sq = 1 if step % 5 else 3  # sometimes several new tokens at once
        q = randn(rng, (B, sq, H, D), np.float32)
        kn, vn = randn(rng, (B, sq, Hkv, D), np.float32), randn(rng, (B, sq, Hkv, D), np.float32)
        o = attnkit.attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens)
        lens = lens + sq
        for b in range(B):
            ref, _ = attention_ref(q[b:b + 1].transpose(0, 2, 1, 3), kc[b:b + 1, :lens[b]].transpose(0, 2, 1, 3),
                                   vc[b:b + 1, :lens[b]].transpose(0, 2, 1, 3), causal=True, bottom_right=True)
            assert_close(o[b:b + 1].transpose(0, 2, 1, 3), ref, np.float32, scale=5.0)


@pytest.mark.parametrize("H,Hkv", [(32, 8), (8, 1)])
def test_half_caches_gqa_mqa(isa, rng, H, Hkv):
    for kvd in half_dtypes():
        for qd in (np.float32, kvd):
            q, kc, vc = cache_case(rng, B=2, H=H, Hkv=Hkv, D=128, Dv=128, Smax=300, dtype=qd, kv_dtype=kvd)
            lens = np.array([300, 123], np.int32)
            o = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
            assert o.dtype == qd
            ref = ref_from_cache(q, kc, vc, lens, causal=True)
            assert_close(o, ref, qd, scale=float(np.abs(to64(vc)).max()))


def test_kvcache_bit_identical_across_threads(threads, rng):
    q, kc, vc = cache_case(rng, B=1, H=32, Hkv=8, D=128, Dv=128, Smax=4096)
    lens = np.array([4000], np.int32)
    outs = []
    for nt in (1, 2, 3):
        attnkit.set_num_threads(nt)
        outs.append(attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, return_lse=True))
    for o in outs[1:]:
        assert np.array_equal(o[0], outs[0][0]) and np.array_equal(o[1], outs[0][1])


def test_kvcache_out_and_options(isa, rng):
    q, kc, vc = cache_case(rng)
    lens = np.array([50, 60, 70], np.int32)
    out = poisoned((3, 1, 8, 64), np.float32)
    slopes = rng.random(8).astype(np.float32)
    res = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, out=out, window=(20, 0),
                                         alibi_slopes=slopes, softcap=4.0, causal=True)
    assert res is out
    ref = ref_from_cache(q, kc, vc, lens, causal=True, window=(20, 0), alibi=slopes, softcap=4.0)
    assert_close(out, ref, np.float32, scale=5.0)


def test_bad_input_leaves_cache_unchanged(rng):
    q, kc, vc = cache_case(rng, B=2, Smax=32)
    kn, vn = randn(rng, (2, 4, 2, 64), np.float32), randn(rng, (2, 4, 2, 64), np.float32)
    k0, v0 = kc.copy(), vc.copy()
    F = attnkit.attention_with_kvcache
    with pytest.raises(ValueError, match="would hold 33 tokens but the cache holds 32"):
        F(q, kc, vc, k=kn, v=vn, cache_seqlens=np.array([3, 29]))
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        F(q, kc, vc, k=kn, v=vn, cache_seqlens=np.array([-1, 2]))
    with pytest.raises(ValueError, match="pass both k and v"):
        F(q, kc, vc, k=kn, cache_seqlens=np.array([1, 2]))
    with pytest.raises(TypeError, match="k has dtype float16 but its cache has float32"):
        F(q, kc, vc, k=kn.astype(np.float16), v=vn, cache_seqlens=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"k and v must be \(B, Sq_new, Hkv, D/Dv\)"):
        F(q, kc, vc, k=kn[:, :, :1], v=vn, cache_seqlens=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"cache_seqlens has shape \(3,\)"):
        F(q, kc, vc, k=kn, v=vn, cache_seqlens=np.array([1, 2, 3]))
    assert np.array_equal(kc, k0) and np.array_equal(vc, v0)
    # paged: a block_table entry out of range, touched only by the append
    kp = randn(rng, (4, 8, 2, 64), np.float32)
    vp = randn(rng, (4, 8, 2, 64), np.float32)
    kp0, vp0 = kp.copy(), vp.copy()
    bt = np.array([[0, 1], [2, 9]], np.int32)
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 9 is not a page index in \[0, 4\)"):
        F(q, kp, vp, k=kn, v=vn, cache_seqlens=np.array([1, 6]), block_table=bt)
    assert np.array_equal(kp, kp0) and np.array_equal(vp, vp0)
    with pytest.raises(ValueError, match="block_table has 1 rows"):
        F(q, kp, vp, cache_seqlens=np.array([1, 6]), block_table=bt[:1])
    with pytest.raises(TypeError, match="block_table must be int32 or int64"):
        F(q, kp, vp, cache_seqlens=np.array([1, 6]), block_table=bt.astype(np.float32))
