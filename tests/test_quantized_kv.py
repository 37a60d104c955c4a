"""8-bit KV caches (issue 15): quantize_kv, and attention_with_kvcache over int8 / float8 e4m3fn
caches with one float32 scale per (token, kv head) row.

Two kinds of checks. Kernel checks compare against the float64 reference on the *dequantized*
cache (codes * scale): the kernels compute exactly that in fp32, so they are held to the fp32
(or q dtype) tolerance of every other attention test. Documented steps are part of that
reference: the decode kernel over an int8 cache quantizes each q row as quantize_kv would and
computes Q K in integers (ARCHITECTURE.md, "int8 KV caches"), so its reference attends with the
quantized q (q_seen); on avx512_bf16 the decode kernel over an e4m3 cache rounds q to bf16 (also
in q_seen) and P to bf16 ("e4m3 KV caches on vdpbf16ps"), which moves each output element by at
most 2^-8 of sum_k P_k |v_k| / l <= 2^-8 max |v| (p_floor; bf16 keeps 8 significant bits),
except on the walk in address order (one query row per kv head over a position-major cache:
ARCHITECTURE.md, "decode walks"), whose P V is fp32. Accuracy checks compare the 8-bit cache's
output with the float cache's output: that is the format's error, bounded by the issue's 2e-2
(int8) relative to the output's magnitude.
"""
import numpy as np
import pytest

import attnkit
from conftest import assert_refusals_write_nothing, isas_for, poisoned
from reference import assert_close, bfloat16, ml_dtypes, output_scale, randn, to64

from test_decode import ref_from_cache

ISA_KERNELS = ("attention_fwd", "quantize_kv")  # the kernel-table entries tested here (conftest.isas_for)

if ml_dtypes is None:  # pragma: no cover - ml_dtypes is in the test extra
    pytest.skip("ml_dtypes is not installed", allow_module_level=True)

F8 = np.dtype(ml_dtypes.float8_e4m3fn)
FORMATS = ["int8", "fp8_e4m3"]
CODE_DTYPE = {"int8": np.dtype(np.int8), "fp8_e4m3": F8}
QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}


def np_quantize(x, fmt):
    """The documented quantizer in NumPy (float32 arithmetic, as the kernels)."""
    x = np.asarray(x).astype(np.float32)
    amax = np.abs(x).max(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = (amax / np.float32(QMAX[fmt])).astype(np.float32)
        y = x / scale[..., None]
    bad = ~np.isfinite(amax)
    zero = ~(scale > 0)
    y[zero] = 0
    if fmt == "int8":
        codes = np.clip(np.rint(y), -127, 127).astype(np.int8)
    else:
        codes = y.astype(F8)
    scale = np.where(bad, np.float32(np.nan), np.where(zero, np.float32(0), scale)).astype(np.float32)
    return codes, scale


def deq(codes, scale):
    return to64(codes) * to64(scale)[..., None]


def rounds_to_bf16(fmt):
    """Whether the last call was the decode kernel over an e4m3 cache on avx512_bf16, which
    rounds q and P to bf16."""
    return fmt == "fp8_e4m3" and _plan()["kernel"] == "decode" and attnkit._C._active_isa() == "avx512_bf16"


def q_seen(q, fmt):
    """The query the last call attended with: decode over an int8 cache quantizes every q row
    of D <= 1024 finite values (per batch, position and head) as quantize_kv does; decode over
    an e4m3 cache on avx512_bf16 rounds q to bf16; any other path, format or row attends with q
    itself."""
    if rounds_to_bf16(fmt):
        return to64(np.asarray(q).astype(bfloat16))
    if fmt != "int8" or _plan()["kernel"] != "decode" or q.shape[-1] > 1024:
        return q
    codes, scale = np_quantize(q, "int8")
    return np.where(np.isfinite(scale)[..., None], deq(codes, scale), to64(q))


def p_rounds_to_bf16(fmt):
    """Whether the last call also rounded P to bf16: the e4m3 decode on avx512_bf16 except the
    walk in address order (plan "address_order"), whose P V is fp32."""
    return rounds_to_bf16(fmt) and not _plan()["address_order"]


def p_floor(fmt, vq, vs):
    """The absolute error bound that P rounded to bf16 adds to the last call's output (twice
    2^-8 max |v|: see the module docstring), 0 where P is not rounded."""
    return 2.0 ** -7 * float(np.nanmax(np.abs(deq(vq, vs)))) if p_rounds_to_bf16(fmt) else 0.0


def same_bits(a, b):
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def cache8(rng, fmt, B=2, Smax=96, Hkv=2, D=64, Dv=None, fill=1.0):
    """Random K/V caches quantized to `fmt`: (kq, ks, vq, vs)."""
    Dv = D if Dv is None else Dv
    kq, ks = attnkit.quantize_kv(randn(rng, (B, Smax, Hkv, D), np.float32, fill), fmt)
    vq, vs = attnkit.quantize_kv(randn(rng, (B, Smax, Hkv, Dv), np.float32, fill), fmt)
    return kq, ks, vq, vs


# ---- quantize_kv: the format itself ----

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D", [1, 40, 59, 128])
def test_quantize_round_trip_bounds(isa, rng, fmt, D):
    dtypes = [np.float32, np.float16] + ([bfloat16] if bfloat16 is not None else [])
    for dt in dtypes:
        x = randn(rng, (3, 7, 4, D), dt, 3.0)
        codes, scale = attnkit.quantize_kv(x, fmt)
        assert codes.dtype == CODE_DTYPE[fmt] and codes.shape == x.shape
        assert scale.dtype == np.float32 and scale.shape == x.shape[:-1]
        want_c, want_s = np_quantize(x, fmt)
        assert same_bits(codes, want_c) and np.array_equal(scale, want_s), "codes differ from the documented rule"
        x64, err = to64(x), np.abs(deq(codes, scale) - to64(x))
        if fmt == "int8":
            # half a quantization step, plus the fp32 rounding of x / scale
            assert (err <= to64(scale)[..., None] * (0.5 + 1e-5)).all()
            assert np.abs(to64(codes)).max() <= 127
        else:
            # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value; below 2^-6 (in units
            # of scale) the subnormal step is 2^-9
            bound = np.maximum(np.abs(x64) * 2.0 ** -4, to64(scale)[..., None] * 2.0 ** -10) * (1 + 1e-5)
            assert (err <= bound).all()
        # the largest |x| of each row maps to the largest code
        amax_code = np.abs(to64(codes)).max(-1)
        assert np.allclose(amax_code, QMAX[fmt], rtol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_zero_and_nonfinite_rows_and_views(isa, rng, fmt):
    x = randn(rng, (4, 3, 33), np.float32)
    x[0, 1] = 0.0
    x[1, 2, 5] = np.inf
    x[2, 0, 7] = np.nan
    codes, scale = attnkit.quantize_kv(x, fmt)
    assert scale[0, 1] == 0 and (to64(codes[0, 1]) == 0).all()
    for i, j in ((1, 2), (2, 0)):
        assert np.isnan(scale[i, j]) and (to64(codes[i, j]) == 0).all()
    ok = np.isfinite(scale)
    assert (scale[ok] >= 0).all() and np.isfinite(to64(codes)).all()
    # a strided view (transposed outer dims, a sliced head dim) quantizes like its copy
    big = randn(rng, (6, 5, 80), np.float32)
    view = big.transpose(1, 0, 2)[:, ::2, 3:70]
    c1, s1 = attnkit.quantize_kv(view, fmt)
    c2, s2 = attnkit.quantize_kv(np.ascontiguousarray(view), fmt)
    assert same_bits(c1, c2) and np.array_equal(s1, s2)


def test_quantize_refusals(rng):
    x = randn(rng, (2, 3, 8), np.float32)
    with pytest.raises(ValueError, match="quantize_kv: dtype must be 'int8' or 'fp8_e4m3'"):
        attnkit.quantize_kv(x, "int4")
    with pytest.raises(TypeError, match="quantize_kv: x has dtype float64"):
        attnkit.quantize_kv(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"quantize_kv: x must be \(\.\.\., Hkv, D\)"):
        attnkit.quantize_kv(x[0, 0])
    with pytest.raises(ValueError, match="head dim must be at least 1"):
        attnkit.quantize_kv(x[..., :0])
    with pytest.raises(TypeError, match="quantize_kv: x must be a numpy.ndarray"):
        attnkit.quantize_kv([[1.0, 2.0]])


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_every_code_converts_exactly(isa, fmt):
    """All 256 codes in one V row of a one-key cache: out = v = code * scale exactly (P = 1),
    through the SIMD conversion (full vectors) and its tail (D = 250); NaN codes give NaN."""
    codes = np.arange(256, dtype=np.uint8).view(CODE_DTYPE[fmt])
    want = to64(codes) * 0.25
    for D in (256, 250):
        vq = codes[:D].reshape(1, 1, 1, D).copy()
        kq = np.zeros_like(vq)
        scale = np.full((1, 1, 1), 0.25, np.float32)
        q = np.ones((1, 1, 2, D), np.float32)
        o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=1, k_scale=scale, v_scale=scale)
        assert np.array_equal(to64(o[0, 0, 0]), want[:D], equal_nan=True)
    assert np.isnan(want).sum() == (2 if fmt == "fp8_e4m3" else 0)


# ---- the kernels against float64 on the dequantized cache ----

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D", [1, 40, 59, 128])
@pytest.mark.parametrize("H,Hkv", [(8, 2), (4, 4), (8, 1)])
def test_decode_over_codes_matches_dequantized_reference(isa, rng, fmt, D, H, Hkv):
    B, Smax = 3, 200
    kq, ks, vq, vs = cache8(rng, fmt, B=B, Smax=Smax, Hkv=Hkv, D=D)
    q = randn(rng, (B, 1, H, D), np.float32)
    lens = np.array([0, 1, 199], np.int32)  # ragged: empty, one key, nearly full
    o, lse = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks,
                                            v_scale=vs, return_lse=True)
    assert _plan()["kernel"] == "decode"
    assert (o[0] == 0).all() and np.isneginf(lse[0]).all()
    ref = ref_from_cache(q_seen(q, fmt)[1:], deq(kq, ks)[1:], deq(vq, vs)[1:], lens[1:])
    assert_close(o[1:], ref, np.float32, floor=p_floor(fmt, vq, vs))


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_q_gqa_mqa_and_head_major_cache(isa, rng, fmt):
    """q in float16/bfloat16, GQA and MQA, and a cache that is a transposed view of a head-major
    (B, Hkv, Smax, D) array (the decode kernel then walks it one kv head at a time)."""
    qdts = [np.float16] + ([bfloat16] if bfloat16 is not None else [])
    for H, Hkv in ((32, 8), (8, 1)):
        B, Smax, D = 2, 300, 128
        kq, ks, vq, vs = cache8(rng, fmt, B=B, Smax=Smax, Hkv=Hkv, D=D)
        lens = np.array([300, 123], np.int32)
        for qd in qdts + [np.float32]:
            q = randn(rng, (B, 1, H, D), qd)
            o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks, v_scale=vs)
            assert o.dtype == qd
            assert_close(o, ref_from_cache(q_seen(q, fmt), deq(kq, ks), deq(vq, vs), lens), qd,
                         floor=p_floor(fmt, vq, vs))
        # head-major storage, position-major view
        khm = np.ascontiguousarray(kq.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        vhm = np.ascontiguousarray(vq.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        kshm = np.ascontiguousarray(ks.transpose(0, 2, 1)).transpose(0, 2, 1)
        vshm = np.ascontiguousarray(vs.transpose(0, 2, 1)).transpose(0, 2, 1)
        q = randn(rng, (B, 1, H, D), np.float32)
        o1 = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks, v_scale=vs)
        o2 = attnkit.attention_with_kvcache(q, khm, vhm, cache_seqlens=lens, k_scale=kshm, v_scale=vshm)
        ref = ref_from_cache(q_seen(q, fmt), deq(kq, ks), deq(vq, vs), lens)
        assert_close(o1, ref, np.float32, floor=p_floor(fmt, vq, vs))
        assert_close(o2, ref, np.float32, floor=p_floor(fmt, vq, vs))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sq", [1, 3, 40])  # decode, decode with several rows, prefill tiles
def test_append_quantizes_like_quantize_kv(isa, rng, fmt, sq):
    """New float rows are quantized into the cache bit for bit as quantize_kv would, scales
    too, for every new dtype; then attention over the cache matches the reference."""
    B, Smax, Hkv, H, D = 2, 128, 2, 4, 59
    new_dts = [np.float32, np.float16] + ([bfloat16] if bfloat16 is not None else [])
    for nd in new_dts:
        kq, ks, vq, vs = cache8(rng, fmt, B=B, Smax=Smax, Hkv=Hkv, D=D)
        lens = np.array([5, 70], np.int32)
        q = randn(rng, (B, sq, H, D), np.float32)
        kn, vn = randn(rng, (B, sq, Hkv, D), nd), randn(rng, (B, sq, Hkv, D), nd)
        before = [a.copy() for a in (kq, ks, vq, vs)]
        o = attnkit.attention_with_kvcache(q, kq, vq, k=kn, v=vn, cache_seqlens=lens, k_scale=ks,
                                           v_scale=vs)
        assert _plan()["kernel"] == ("decode" if sq < 16 else "prefill")
        ckn, skn = attnkit.quantize_kv(kn, fmt)
        cvn, svn = attnkit.quantize_kv(vn, fmt)
        rows = lens[:, None] + np.arange(sq)
        bidx = np.arange(B)[:, None]
        assert same_bits(kq[bidx, rows], ckn) and np.array_equal(ks[bidx, rows], skn)
        assert same_bits(vq[bidx, rows], cvn) and np.array_equal(vs[bidx, rows], svn)
        written = np.zeros((B, Smax), bool)
        written[bidx, rows] = True
        for a, a0 in zip((kq, ks, vq, vs), before):
            assert same_bits(a[~written], a0[~written]), "a row outside the appended ones changed"
        ref = ref_from_cache(q_seen(q, fmt), deq(kq, ks), deq(vq, vs), lens + sq, causal=True)
        assert_close(o, ref, np.float32, floor=p_floor(fmt, vq, vs))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("H,Hkv", [(8, 2), (8, 8)])  # GQA, and MHA (the walk in address order)
def test_paged_equals_contiguous(isa, rng, fmt, H, Hkv):
    B, D, page, nblk = 3, 64, 16, 8
    Smax = page * nblk
    kq, ks, vq, vs = cache8(rng, fmt, B=B, Smax=Smax, Hkv=Hkv, D=D)
    q = randn(rng, (B, 1, H, D), np.float32)
    lens = np.array([1, 70, 127], np.int32)
    P = B * nblk + 5
    perm = rng.permutation(P)[: B * nblk].reshape(B, nblk).astype(np.int32)
    kp, vp = np.zeros((P, page, Hkv, D), kq.dtype), np.zeros((P, page, Hkv, D), vq.dtype)
    ksp, vsp = np.zeros((P, page, Hkv), np.float32), np.zeros((P, page, Hkv), np.float32)
    for b in range(B):
        for j in range(nblk):
            sl = slice(j * page, (j + 1) * page)
            kp[perm[b, j]], vp[perm[b, j]] = kq[b, sl], vq[b, sl]
            ksp[perm[b, j]], vsp[perm[b, j]] = ks[b, sl], vs[b, sl]
    kn, vn = randn(rng, (B, 1, Hkv, D), np.float32), randn(rng, (B, 1, Hkv, D), np.float32)
    oc = attnkit.attention_with_kvcache(q, kq, vq, k=kn, v=vn, cache_seqlens=lens, k_scale=ks, v_scale=vs)
    op = attnkit.attention_with_kvcache(q, kp, vp, k=kn, v=vn, cache_seqlens=lens, k_scale=ksp,
                                        v_scale=vsp, block_table=perm)
    assert np.array_equal(oc, op) and _plan()["address_order"] == (H == Hkv)
    qq = q_seen(q, fmt)
    for b in range(B):  # the paged append wrote the same codes and scales
        j, r = divmod(int(lens[b]), page)
        assert same_bits(kp[perm[b, j], r], kq[b, lens[b]]) and np.array_equal(ksp[perm[b, j], r], ks[b, lens[b]])
        assert same_bits(vp[perm[b, j], r], vq[b, lens[b]]) and np.array_equal(vsp[perm[b, j], r], vs[b, lens[b]])
    assert_close(oc, ref_from_cache(qq, deq(kq, ks), deq(vq, vs), lens + 1, causal=True), np.float32,
                 floor=p_floor(fmt, vq, vs))


@pytest.mark.parametrize("fmt", FORMATS)
def test_options_and_long_split_cache(isa, rng, fmt):
    """Window, ALiBi, softcap, lse, out= over an 8-bit cache, and a long cache that takes the
    split-KV path."""
    kq, ks, vq, vs = cache8(rng, fmt, B=3, Smax=256, Hkv=2, D=64)
    q = randn(rng, (3, 1, 8, 64), np.float32)
    lens = np.array([50, 60, 256], np.int32)
    out = poisoned((3, 1, 8, 64), np.float32)
    slopes = rng.random(8).astype(np.float32)
    res, lse = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks, v_scale=vs,
                                              out=out, window=(20, 0), alibi_slopes=slopes,
                                              softcap=4.0, return_lse=True)
    assert res is out
    ref = ref_from_cache(q_seen(q, fmt), deq(kq, ks), deq(vq, vs), lens, causal=True, window=(20, 0),
                         alibi=slopes, softcap=4.0)
    assert_close(out, ref, np.float32, floor=p_floor(fmt, vq, vs))
    assert np.isfinite(lse).all()
    kq, ks, vq, vs = cache8(rng, fmt, B=1, Smax=5000, Hkv=8, D=128)
    q = randn(rng, (1, 1, 32, 128), np.float32)
    o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=4999, k_scale=ks, v_scale=vs)
    plan = _plan()
    assert plan["kernel"] == "decode" and plan["split"] and plan["num_chunks"] > 1
    assert_close(o, ref_from_cache(q_seen(q, fmt), deq(kq, ks), deq(vq, vs), [4999]), np.float32,
                 floor=p_floor(fmt, vq, vs))


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_over_codes(isa, rng, fmt):
    """Many query rows (the tile kernel dequantizes while packing), GQA, ragged lengths."""
    B, Smax, Hkv, H, D = 2, 300, 2, 4, 40
    kq, ks, vq, vs = cache8(rng, fmt, B=B, Smax=Smax, Hkv=Hkv, D=D)
    q = randn(rng, (B, 37, H, D), np.float32)
    lens = np.array([37, 290], np.int32)
    o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks, v_scale=vs)
    assert _plan()["kernel"] == "prefill"
    assert_close(o, ref_from_cache(q, deq(kq, ks), deq(vq, vs), lens, causal=True), np.float32)


# ---- int8 caches: q quantized, Q K in integers (ARCHITECTURE.md, "int8 KV caches") ----

@pytest.mark.parametrize("D", [1, 40, 64, 100, 128, 200])
def test_int8_scores_are_the_same_on_every_avx512_variant(rng, D):
    """avx512_vnni computes Q K with vpdpbusd, avx512 with fp32 FMAs on the integer values: both
    are exact integers, so the outputs and lse are bit-identical, at every D (the 64-byte tail of
    the VNNI loop at D = 40, 100, 200), GQA and MHA, one and four rows per kv head, and a row of
    q holding inf (kept in float: the item takes the float path on both)."""
    names = {i["name"] for i in attnkit.info()["isas"] if i["compiled"] and i["supported"]}
    if not {"avx512", "avx512_vnni"} <= names:
        pytest.skip("needs a CPU with AVX512-VNNI")
    from attnkit._runtime import _use_isa

    for H, Hkv, inf in ((8, 2, False), (4, 4, False), (8, 2, True)):
        kq, ks, vq, vs = cache8(rng, "int8", B=2, Smax=300, Hkv=Hkv, D=D)
        q = randn(rng, (2, 1, H, D), np.float32)
        if inf:
            q[1, 0, 3, D // 2] = np.inf
        got = {}
        for isa in ("avx512", "avx512_vnni"):
            with _use_isa(isa):
                got[isa] = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=np.array([300, 171]),
                                                          k_scale=ks, v_scale=vs, return_lse=True)
                assert _plan()["kernel"] == "decode"
        assert np.array_equal(got["avx512"][0], got["avx512_vnni"][0], equal_nan=True)
        assert np.array_equal(got["avx512"][1], got["avx512_vnni"][1], equal_nan=True)
        if inf:  # the inf row (batch 1, head 3) is NaN as in torch; its neighbours are not
            assert np.isnan(got["avx512_vnni"][0][1, 0, 3]).all()
            assert np.isfinite(got["avx512_vnni"][0][0]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_head_groups_over_codes(isa, rng, fmt):
    """Nine kv heads of 8-bit D128 rows: a key block runs as a group of eight (64 KB of V) and
    a group of one, whose q codes, q scales, correction terms and V scales are offsets into
    the item's scratch."""
    kq, ks, vq, vs = cache8(rng, fmt, B=2, Smax=200, Hkv=9, D=128)
    q = randn(rng, (2, 1, 36, 128), np.float32)
    lens = np.array([200, 77], np.int32)
    o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks, v_scale=vs)
    assert _plan()["kernel"] == "decode"
    assert_close(o, ref_from_cache(q_seen(q, fmt), deq(kq, ks), deq(vq, vs), lens), np.float32,
                 floor=p_floor(fmt, vq, vs))


def test_int8_decode_quantizes_q_and_only_there(isa, rng):
    """The quantized q is what decode attends with: the reference on q_seen passes at fp32
    tolerance and the one on float q does not (the step is observable, so the test can fail);
    prefill and D > 1024 attend with float q."""
    kq, ks, vq, vs = cache8(rng, "int8", B=1, Smax=64, Hkv=2, D=64)
    q = randn(rng, (1, 1, 8, 64), np.float32)
    o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=64, k_scale=ks, v_scale=vs)
    ref_q8 = ref_from_cache(q_seen(q, "int8"), deq(kq, ks), deq(vq, vs), [64])
    ref_f = ref_from_cache(q, deq(kq, ks), deq(vq, vs), [64])
    assert_close(o, ref_q8, np.float32)
    assert np.abs(to64(o) - ref_f).max() > 1e2 * np.abs(to64(o) - ref_q8).max()
    # prefill (many query rows): float q
    q = randn(rng, (1, 40, 8, 64), np.float32)
    o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=64, k_scale=ks, v_scale=vs)
    assert _plan()["kernel"] == "prefill"
    assert_close(o, ref_from_cache(q, deq(kq, ks), deq(vq, vs), [64], causal=True), np.float32)
    # D > 1024: float q (the integer sums would pass 2^24 in the fp32 path)
    kq, ks, vq, vs = cache8(rng, "int8", B=1, Smax=20, Hkv=1, D=1100)
    q = randn(rng, (1, 1, 2, 1100), np.float32)
    o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=20, k_scale=ks, v_scale=vs)
    assert _plan()["kernel"] == "decode"
    assert_close(o, ref_from_cache(q, deq(kq, ks), deq(vq, vs), [20]), np.float32)


@pytest.mark.parametrize("H,Hkv", [(32, 8), (24, 24), (9, 9)])
def test_results_bit_identical_across_threads(threads, rng, H, Hkv):
    """GQA, and MHA (the walk in address order, whose heads the thread count groups into items
    where the keys are split in few chunks: at 200 keys 24 heads go 24, 12, 8 or 4 to an item
    on 1, 2, 3 or 5 threads, 9 heads 9, 4 + 4 + 1, 3 or 1; at 4000 keys all of them)."""
    for fmt in FORMATS:
        kq, ks, vq, vs = cache8(rng, fmt, B=1, Smax=4096, Hkv=Hkv, D=128)
        q = randn(rng, (1, 1, H, 128), np.float32)
        for S in (4000, 200):
            outs = []
            for nt in (1, 2, 3, 5):
                attnkit.set_num_threads(nt)
                outs.append(attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=S, k_scale=ks,
                                                           v_scale=vs, return_lse=True))
                assert _plan()["address_order"] == (H == Hkv)
            for o in outs[1:]:
                assert np.array_equal(o[0], outs[0][0]) and np.array_equal(o[1], outs[0][1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("Hkv", [4, 7, 9])
def test_mha_codes_in_address_order(isa, rng, fmt, Hkv):
    """One query row per kv head over a position-major 8-bit cache: the kernel reads K and V in
    address order (plan "address_order"), scores in blocks of four heads with the rest padded
    (7 = 4 + 3, 9 = 8 + 1), P V in fp32 (also for e4m3 on avx512_bf16: p_floor is 0 there).
    Against float64 on the dequantized cache: D tails (int8's masked last 64 codes, e4m3's last
    lookup) and Dv != D, ragged lengths (0, 1, 130, 299), and a window whose masked-out V rows
    hold NaN scales (not attended) while one attended row's NaN scale makes its head NaN.
    e4m3: NaN codes in V (S.1111.111, either sign) make just their output elements NaN where
    attended and nothing outside a window (each row's codes are tested for NaN before P V reads
    them without the per-vector fix)."""
    for D, Dv in [(40, 40), (59, 100), (128, 128)]:
        kq, ks, vq, vs = cache8(rng, fmt, B=4, Smax=304, Hkv=Hkv, D=D, Dv=Dv)
        vs_clean = vs.copy()
        q = randn(rng, (4, 1, Hkv, D), np.float32)
        lens = np.array([0, 1, 130, 299], np.int32)
        o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks, v_scale=vs)
        assert _plan()["address_order"] and p_floor(fmt, vq, vs) == 0
        assert (o[0] == 0).all()
        kd, vd = deq(kq, ks), deq(vq, vs)
        assert_close(o[1:], ref_from_cache(q_seen(q, fmt)[1:], kd[1:], vd[1:], lens[1:]), np.float32)
        vs[2:, :100, 0] = np.nan  # before the window
        vs[3, 290, 1] = np.nan  # inside it
        o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks, v_scale=vs,
                                           window=(19, 0))
        assert _plan()["address_order"]
        assert np.isnan(o[3, 0, 1]).all()
        o[3, 0, 1] = 0
        assert np.isfinite(o).all()
        ref = ref_from_cache(q_seen(q, fmt)[1:], kd[1:], vd[1:], lens[1:], window=(19, 0))
        ref[2, 0, 1] = 0
        assert_close(o[1:], ref, np.float32)
        if fmt != "fp8_e4m3":
            continue
        codes = vq.view(np.uint8)
        codes[2, 100, Hkv - 1, [3, Dv - 1]] = [0x7F, 0xFF]  # attended without a window
        codes[3, 10, 0, 0] = 0xFF  # before the window of batch 3 (299 keys)
        for window in (None, (19, 0)):
            o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=lens, k_scale=ks,
                                               v_scale=vs_clean, window=window)
            assert _plan()["address_order"]
            nan = np.zeros(o.shape, bool)
            if window is None:
                nan[2, 0, Hkv - 1, [3, Dv - 1]] = True
                nan[3, 0, 0, 0] = True
            assert (np.isnan(o) == nan).all()
            vd = deq(vq, vs_clean)
            ref = ref_from_cache(q_seen(q, fmt)[1:], kd[1:], vd[1:], lens[1:], window=window)
            o[nan], ref[nan[1:]] = 0, 0
            assert_close(o[1:], ref, np.float32)


# ---- NaN: a NaN row propagates where it is attended, and only there ----

@pytest.mark.parametrize("fmt", FORMATS)
def test_nonfinite_rows_propagate_only_where_attended(isa, rng, fmt):
    B, Smax, Hkv, H, D = 2, 64, 2, 4, 32
    kq, ks, vq, vs = cache8(rng, fmt, B=B, Smax=Smax, Hkv=Hkv, D=D)
    q = randn(rng, (B, 1, H, D), np.float32)
    kn = randn(rng, (B, 1, Hkv, D), np.float32)
    vn = randn(rng, (B, 1, Hkv, D), np.float32)
    vn[1, 0, 0, 3] = np.nan  # batch 1, kv head 0: its scale becomes NaN
    o = attnkit.attention_with_kvcache(q, kq, vq, k=kn, v=vn, cache_seqlens=np.array([10, 20]),
                                       k_scale=ks, v_scale=vs)
    assert np.isnan(vs[1, 20, 0]) and np.isfinite(vs[0, 10]).all()
    assert np.isfinite(o[0]).all() and np.isfinite(o[1, :, 2:]).all()  # other heads of b=1 too
    assert np.isnan(o[1, :, :2]).all()
    # masked out by the window: the NaN row is not attended, the output is finite
    q1 = randn(rng, (B, 1, H, D), np.float32)
    o = attnkit.attention_with_kvcache(q1, kq, vq, cache_seqlens=np.array([30, 30]), k_scale=ks,
                                       v_scale=vs, window=(5, 0))
    assert np.isfinite(o).all()
    # and positions past cache_seqlens may hold anything
    ks[:, 40:] = np.nan
    vs[:, 40:] = np.nan
    o = attnkit.attention_with_kvcache(q1, kq, vq, cache_seqlens=np.array([40, 12]), k_scale=ks, v_scale=vs)
    assert np.isfinite(o).all()


# ---- accuracy of the formats (the figures) ----

@pytest.mark.parametrize("fmt,bound", [("int8", 2e-2), ("fp8_e4m3", 8e-2)])
@pytest.mark.parametrize("B,H,Hkv,Sk", [(1, 32, 8, 2048), (2, 8, 8, 1000)])
def test_format_error_against_the_float_cache(rng, fmt, bound, B, H, Hkv, Sk):
    """Decode over an 8-bit cache vs the same data in a float32 cache, on random data: int8
    within the issue's 2e-2 of the output's magnitude; e4m3 (3 mantissa bits) within 8e-2."""
    D = 128
    k32, v32 = randn(rng, (B, Sk, Hkv, D), np.float32), randn(rng, (B, Sk, Hkv, D), np.float32)
    q = randn(rng, (B, 1, H, D), np.float32)
    o32 = attnkit.attention_with_kvcache(q, k32, v32, cache_seqlens=Sk)
    kq, ks = attnkit.quantize_kv(k32, fmt)
    vq, vs = attnkit.quantize_kv(v32, fmt)
    o8 = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=Sk, k_scale=ks, v_scale=vs)
    rel = np.abs(to64(o8) - to64(o32)).max() / output_scale(o32)
    assert rel <= bound, f"{fmt}: error {rel:.3g} of the output's magnitude"
    # and the cache is half an fp16 cache plus one float32 per row
    assert kq.nbytes + ks.nbytes == k32.astype(np.float16).nbytes // 2 + B * Sk * Hkv * 4


# ---- refusals: every misuse is named, before any write ----

def _plan():
    return attnkit._C._last_attention_plan()


def _refusals(rng):
    B, H, Hkv, D, Smax = 2, 8, 2, 64, 32
    q = randn(rng, (B, 1, H, D), np.float32)
    kn, vn = randn(rng, (B, 1, Hkv, D), np.float32), randn(rng, (B, 1, Hkv, D), np.float32)
    lens = np.array([1, 2])
    kq, ks, vq, vs = cache8(rng, "int8", B=B, Smax=Smax, Hkv=Hkv, D=D)
    kf, vf = randn(rng, (B, Smax, Hkv, D), np.float32), randn(rng, (B, Smax, Hkv, D), np.float32)
    k8, _, v8, _ = cache8(rng, "fp8_e4m3", B=B, Smax=Smax, Hkv=Hkv, D=D)
    # one byte buffer holding both a cache and a scale array that overlaps it
    raw = np.zeros(B * Smax * Hkv * D + 64, np.uint8)
    kq_shared = raw[:B * Smax * Hkv * D].view(np.int8).reshape(B, Smax, Hkv, D)
    ks_over = raw[64:64 + B * Smax * Hkv * 4].view(np.float32).reshape(B, Smax, Hkv)
    ks_ro = np.broadcast_to(ks[:1], ks.shape)
    fbuf = np.zeros(4096, np.float32)  # a scale array sharing memory with new rows / out
    vs_shared = fbuf[:B * Smax * Hkv].reshape(B, Smax, Hkv)

    def F(**kw):
        args = dict(q=q, k_cache=kq, v_cache=vq, k=kn, v=vn, cache_seqlens=lens, k_scale=ks, v_scale=vs)
        args.update(kw)
        return lambda: attnkit.attention_with_kvcache(args.pop("q"), args.pop("k_cache"),
                                                      args.pop("v_cache"), **args)

    cases = [
        ("missing k_scale", ValueError, r"k_cache is int8: k_scale and v_scale .* are required", F(k_scale=None)),
        ("missing v_scale", ValueError, r"k_scale and v_scale .* are required", F(v_scale=None)),
        ("scale dtype", TypeError, "k_scale has dtype float64; expected float32", F(k_scale=ks.astype(np.float64))),
        ("scale shape", ValueError, r"v_scale has shape \(2, 32\); expected \(2, 32, 2\)", F(v_scale=vs[..., 0])),
        ("scale transposed", ValueError, r"k_scale has shape \(2, 2, 32\)", F(k_scale=ks.transpose(0, 2, 1))),
        ("float cache with scales", ValueError, "k_scale/v_scale go with int8 or float8_e4m3fn caches, but the caches are float32",
         F(k_cache=kf, v_cache=vf)),
        ("read-only scale", ValueError, "k_scale is read-only but k/v were given to append", F(k_scale=ks_ro)),
        ("new rows int8", TypeError, r"k has dtype int8; rows appended to a int8 cache must be float32",
         F(k=kn.astype(np.int8), v=vn.astype(np.int8))),
        ("new rows float64", TypeError, "v has dtype float64; rows appended", F(v=vn.astype(np.float64))),
        ("new rows mixed", TypeError, "k has dtype float32 but v has float16", F(v=vn.astype(np.float16))),
        ("q float64", TypeError, "q has dtype float64 but the caches are int8", F(q=q.astype(np.float64))),
        ("mixed cache formats", TypeError, "k_cache has dtype int8 but v_cache has float8_e4m3fn", F(v_cache=v8)),
        ("fp8 k, int8 v", TypeError, "k_cache has dtype float8_e4m3fn but v_cache has int8", F(k_cache=k8)),
        ("scale overlaps cache", ValueError, "k_scale overlaps the caches", F(k_cache=kq_shared, k_scale=ks_over)),
        ("scales overlap", ValueError, "k_scale and v_scale overlap", F(v_scale=ks)),
        ("k overlaps scales", ValueError, "k/v overlap the scales",
         F(v_scale=vs_shared, k=fbuf[:B * Hkv * D].reshape(B, 1, Hkv, D))),
        ("out overlaps scale", ValueError, "out overlaps an input",
         F(v_scale=vs_shared, out=fbuf[:B * H * D].reshape(B, 1, H, D))),
        ("capacity", ValueError, "does not fit the cache capacity 32", F(cache_seqlens=np.array([3, 32]))),
    ]
    return cases, (kq, ks, vq, vs, kf, vf, k8, v8, raw, fbuf)


def test_every_refusal_leaves_caches_and_scales_untouched(rng):
    cases, arrays = _refusals(rng)
    assert_refusals_write_nothing(cases, arrays, "attention_with_kvcache")


def test_binding_refuses_what_the_front_end_would(rng):
    """The shared binding check (attention_params) holds on its own: the raw _C entry with a
    missing scale or float caches with scales raises before any write."""
    from attnkit import _C

    kq, ks, vq, vs = cache8(rng, "int8", B=1, Smax=16, Hkv=1, D=8)
    q = randn(rng, (1, 1, 1, 8), np.float32)
    out = np.zeros((1, 1, 1, 8), np.float32)
    t = lambda a: a.transpose(0, 2, 1, 3)
    base = dict(lse=None, mask=None, alibi=None, cu_seqlens_q=None, cu_seqlens_k=None,
                cache_seqlens=np.array([4]), block_table=None, batch=1, scale=1.0, softcap=0.0,
                causal=False, bottom_right=True, window_left=-1, window_right=-1, fn="attention_with_kvcache")
    with pytest.raises(ValueError, match="k_scale and v_scale .* are required"):
        _C.attention(t(q), t(kq), t(vq), t(out), k_scale=ks.transpose(0, 2, 1), **base)
    kf = kq.astype(np.float32)
    with pytest.raises(ValueError, match="k_scale/v_scale go with int8"):
        _C.attention(t(q), t(kf), t(kf), t(out), k_scale=ks.transpose(0, 2, 1),
                     v_scale=vs.transpose(0, 2, 1), **base)
    with pytest.raises(ValueError, match="one entry per cache row"):
        _C.attention(t(q), t(kq), t(vq), t(out), k_scale=ks, v_scale=vs, **base)


@pytest.mark.parametrize("sq", [1, 20])
def test_memory_error_leaves_cache_scales_and_out_untouched(rng, sq):
    from attnkit import _C

    B, H, Hkv, D = 2, 8, 2, 64
    kq, ks, vq, vs = cache8(rng, "int8", B=B, Smax=256, Hkv=Hkv, D=D)
    q = randn(rng, (B, sq, H, D), np.float32)
    kn, vn = randn(rng, (B, sq, Hkv, D), np.float32), randn(rng, (B, sq, Hkv, D), np.float32)
    lens = np.array([100, 200])
    before = [a.copy() for a in (kq, ks, vq, vs)]
    attnkit.set_num_threads(2)
    try:
        for n in range(1, 40):
            out = poisoned((B, sq, H, D), np.float32)
            _C._debug_fail_allocation_after(n)
            try:
                attnkit.attention_with_kvcache(q, kq, vq, k=kn, v=vn, cache_seqlens=lens, out=out,
                                               k_scale=ks, v_scale=vs)
            except MemoryError:
                assert np.isnan(out).all(), "out was written by a call that raised MemoryError"
                for a, a0 in zip((kq, ks, vq, vs), before):
                    assert same_bits(a, a0), "the cache or its scales were appended to"
                continue
            finally:
                _C._debug_fail_allocation_after(0)
            break
        assert n > 3 and np.isfinite(out).all()
        rows = lens[:, None] + np.arange(sq)
        assert same_bits(kq[np.arange(B)[:, None], rows], attnkit.quantize_kv(kn, "int8")[0])
    finally:
        attnkit.set_num_threads(None)


# ---- e4m3 caches on avx512_bf16: q and P rounded to bf16 (ARCHITECTURE.md) ----

def _bf16_variant():
    if "avx512_bf16" not in isas_for(None) or bfloat16 is None:
        pytest.skip("needs a CPU with AVX512-BF16 and AVX512-VBMI")
    from attnkit._runtime import _use_isa

    return _use_isa("avx512_bf16")


@pytest.mark.parametrize("H,Hkv,D,S", [(32, 8, 128, 300), (4, 4, 59, 303), (6, 2, 40, 302),
                                         (3, 1, 250, 301), (4, 1, 64, 3), (2, 2, 128, 300)])
def test_e4m3_decode_on_bf16_stays_within_its_rounding_bound(rng, H, Hkv, D, S):
    """Each output element moves from the reference on bf16 q by at most 2^-8 sum_k P_k |v_k|
    (P rounded to bf16, the codes exact), element by element, plus the fp32 tolerance, and lse
    is the reference's (every key scored with the bf16 q, the last S % 4 too); and the rounding
    is there to see (the output is not the fp32 one), so the bound is not vacuous. Shapes: GQA,
    MHA and MQA rows (4, 3 and 1 rows per kv head in the P V blocks), D tails, S past a
    multiple of 4 (the keys scored one at a time) and below 4. MHA over 4 kv heads takes the
    walk in address order, whose P V is fp32: held to the fp32 tolerance there; over 2 kv heads
    it rounds P. q is scaled by 12 so that q's rounding moves the scores visibly."""
    B = 2
    kq, ks, vq, vs = cache8(rng, "fp8_e4m3", B=B, Smax=S, Hkv=Hkv, D=D)
    q = randn(rng, (B, 1, H, D), np.float32) * np.float32(12)
    with _bf16_variant():
        o, lse = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=S, k_scale=ks, v_scale=vs,
                                                return_lse=True)
        assert rounds_to_bf16("fp8_e4m3")
        p_rounded = p_rounds_to_bf16("fp8_e4m3")
        assert _plan()["address_order"] == (H == Hkv and Hkv >= 4)
    qb = to64(q.astype(bfloat16))
    kd, vd = deq(kq, ks), deq(vq, vs)
    G = H // Hkv
    kh = np.repeat(kd.transpose(0, 2, 1, 3), G, axis=1)  # (B, H, S, D)
    vh = np.repeat(vd.transpose(0, 2, 1, 3), G, axis=1)
    s = np.einsum("bhd,bhsd->bhs", qb[:, 0], kh) / np.sqrt(D)
    smax = s.max(-1, keepdims=True)
    p = np.exp(s - smax)
    lse_ref = np.log(p.sum(-1)) + smax[..., 0]
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhs,bhsd->bhd", p, vh)[:, None]
    bound = 2.0 ** -8 * np.einsum("bhs,bhsd->bhd", p, np.abs(vh))[:, None]
    err = np.abs(to64(o) - ref)
    tol = 1e-5 * output_scale(ref)
    assert (err <= bound * 1.01 + tol).all(), float((err - bound).max())
    assert np.abs(to64(lse).reshape(B, H) - lse_ref).max() <= 1e-5 * np.abs(lse_ref).max()
    if not p_rounded:  # the walk in address order: P V in fp32, within the fp32 tolerance
        assert err.max() <= tol
    elif S > 100:
        assert err.max() > 10 * tol  # P was rounded: the fp32 path would sit within tol


@pytest.mark.parametrize("factor", [3e-39, 1e-37])
def test_e4m3_tiny_p_takes_the_fp32_path(rng, factor):
    """A head whose P times its V rows' scales is below 2^-109 keeps the fp32 P V:
    vcvtne2ps2bf16 flushes a subnormal P to zero, and vdpbf16ps flushes subnormal products and
    sums. With q = 0 every P is 1, so P' = 256 x the V scale for each key: subnormal for V values
    near 3e-39 (the output came out 0), normal but with subnormal products for 1e-37 (errors far
    past the rounding bound where the threshold was FLT_MIN). The fp32 path there computes in
    part in subnormals (~2^-149 absolute per product, about 1e-5 of these values), hence the
    1e-3 bound. A head of normal values beside it rounds P as usual."""
    B, S, Hkv, H, D = 1, 64, 2, 8, 64
    v = randn(rng, (B, S, Hkv, D), np.float32)
    v[:, :, 0] *= np.float32(factor)
    kq, ks = attnkit.quantize_kv(randn(rng, (B, S, Hkv, D), np.float32), "fp8_e4m3")
    vq, vs = attnkit.quantize_kv(v, "fp8_e4m3")
    assert 256 * vs[:, :, 0].max() < 2.0 ** -109  # every P' of head 0 below the threshold
    q = np.zeros((B, 1, H, D), np.float32)
    with _bf16_variant():
        o = attnkit.attention_with_kvcache(q, kq, vq, cache_seqlens=S, k_scale=ks, v_scale=vs)
        ref = ref_from_cache(q_seen(q, "fp8_e4m3"), deq(kq, ks), deq(vq, vs), [S])
    tiny = slice(0, H // Hkv)  # the query heads of kv head 0
    scale = output_scale(ref[:, :, tiny])
    assert scale > 0 and np.abs(to64(o[:, :, tiny]) - ref[:, :, tiny]).max() <= 1e-3 * scale
    assert_close(o[:, :, H // Hkv:], ref[:, :, H // Hkv:], np.float32,
                 floor=2.0 ** -7 * float(np.abs(deq(vq, vs)[:, :, 1]).max()))
