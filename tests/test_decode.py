"""Decode path (few query rows, long KV) and attention_with_kvcache."""
import numpy as np
import pytest

import attnkit
from conftest import assert_refusals_write_nothing, poisoned
from reference import assert_close, attention_ref, bfloat16, nonfinite_cases, randn, to64

from test_attention import ak_options, check, make_qkv, masks

ISA_KERNELS = ("attention_fwd",)  # the kernel-table entries tested here (conftest.isas_for)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bfloat16"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 2), (5, 1)])
def test_decode_register_block_edges(isa, rng, dtype, H, Hkv):
    """1, 2, 3 and 5 query rows per KV head (the scores' and P V's leftover row blocks), head
    dims whose vectors split into every P V block (8, 4, 2, 1 vectors, a partial last one, and
    exactly a block's count with a partial last), 77 keys (one-row decode takes 16-key groups,
    then 4-key groups, then single keys), with and without zero P (a key-padding mask). bf16 q
    over a bf16 cache: avx512_bf16 scores on vdpbf16ps, 32 values a step (head dims that end
    mid-step)."""
    from attnkit import _C

    if dtype == "bfloat16":
        if bfloat16 is None:
            pytest.skip("ml_dtypes not installed")
        dtype = bfloat16

    B, Sk = 2, 77
    for D, Dv in [(64, 64), (32, 250), (72, 136), (250, 40), (16, 8), (128, 200), (40, 122)]:
        q, k, v = make_qkv(rng, B, H, Hkv, 1, Sk, D, Dv, dtype=dtype)
        keypad = masks(rng, B, H, 1, Sk)["keypad"]
        for kw in (dict(), dict(mask=keypad)):
            o, lse = attnkit.attention(q, k, v, return_lse=True, **kw)
            assert _C._last_attention_plan()["kernel"] == "decode"
            check(q, k, v, o, lse=lse, **kw)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("B,Hkv", [(1, 1), (1, 4), (2, 2), (4, 8)])
def test_split_kv_long_sequences(isa, rng, layout, B, Hkv):
    """Long keys cut into chunks and combined: few (batch x kv heads) in a head-major cache,
    and every position-major (bshd) cache, take the split path (asserted via the plan record);
    (4, 8) head-major does not, and is checked as the unsplit control."""
    from attnkit import _C

    H, Sk, D = 32, 5000, 128
    q, k, v = make_qkv(rng, B, H, Hkv, 1, Sk, D)
    if layout == "bshd":
        args = [np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v)]
        o, lse = attnkit.attention(*args, layout="bshd", return_lse=True)
        o = o.transpose(0, 2, 1, 3)
    else:
        o, lse = attnkit.attention(q, k, v, return_lse=True)
    plan = _C._last_attention_plan()
    should_split = layout == "bshd" or B * Hkv < 8
    assert plan["kernel"] == "decode" and plan["split"] == should_split, plan
    assert (plan["num_chunks"] > 1) == should_split
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
    assert_close(o, ref, np.float32)
    # without appending, a zero-length sequence attends to nothing: 0
    o, lse = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=np.array([0, 5, 9]), return_lse=True)
    assert (o[0] == 0).all() and np.isneginf(lse[0]).all()
    assert_close(o[1:], ref_from_cache(q[1:], kc[1:], vc[1:], [5, 9]), np.float32)


def to_pages(rng, kc, vc, page):
    """The contiguous (B, Smax, Hkv, D) caches scattered into shuffled pages of `page`
    positions (5 spare pages): (k_pages, v_pages, block_table)."""
    B, Smax = kc.shape[:2]
    nblk = Smax // page
    perm = rng.permutation(B * nblk + 5)[: B * nblk].reshape(B, nblk).astype(np.int32)
    kp = np.zeros((B * nblk + 5, page) + kc.shape[2:], kc.dtype)
    vp = np.zeros((B * nblk + 5, page) + vc.shape[2:], vc.dtype)
    for b in range(B):
        for j in range(nblk):
            kp[perm[b, j]] = kc[b, j * page:(j + 1) * page]
            vp[perm[b, j]] = vc[b, j * page:(j + 1) * page]
    return kp, vp, perm


@pytest.mark.parametrize("kv", ["float32", "float16", "bfloat16"])
def test_paged_equals_contiguous(isa, rng, kv):
    kvd = {"float32": np.float32, "float16": np.float16, "bfloat16": bfloat16}[kv]
    if kvd is None:
        pytest.skip("ml_dtypes not installed")
    B, Hkv, D, page, nblk = 3, 2, 64, 16, 8
    Smax = page * nblk
    q, kc, vc = cache_case(rng, B=B, Hkv=Hkv, Smax=Smax, kv_dtype=kvd)
    lens = np.array([1, 70, 127], np.int32)
    kp, vp, perm = to_pages(rng, kc, vc, page)
    kn, vn = randn(rng, (B, 1, Hkv, D), kvd), randn(rng, (B, 1, Hkv, D), kvd)
    oc = attnkit.attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens)
    op = attnkit.attention_with_kvcache(q, kp, vp, k=kn, v=vn, cache_seqlens=lens, block_table=perm)
    assert np.array_equal(oc, op)
    ref = ref_from_cache(q, kc, vc, lens + 1, causal=True)
    assert_close(oc, ref, np.float32)


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
            assert_close(o[b:b + 1].transpose(0, 2, 1, 3), ref, np.float32)


@pytest.mark.parametrize("H,Hkv", [(32, 8), (8, 1)])
def test_half_caches_gqa_mqa(isa, rng, H, Hkv):
    for kvd in half_dtypes():
        for qd in (np.float32, kvd):
            q, kc, vc = cache_case(rng, B=2, H=H, Hkv=Hkv, D=128, Dv=128, Smax=300, dtype=qd, kv_dtype=kvd)
            lens = np.array([300, 123], np.int32)
            o = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
            assert o.dtype == qd
            ref = ref_from_cache(q, kc, vc, lens, causal=True)
            assert_close(o, ref, qd)


@pytest.mark.parametrize("H,Hkv,kv", [(32, 8, np.float32), (24, 24, np.float16), (9, 9, np.float16),
                                      (9, 9, np.float32)])
def test_kvcache_bit_identical_across_threads(threads, rng, H, Hkv, kv):
    """GQA, and MHA over a half cache and an fp32 one (the walk in address order, fp32 on avx2
    and scalar only; its heads are grouped into items by the thread count where the keys are
    split in few chunks: at 200 keys 24 heads go 24, 12, 8 or 4 to an item on 1, 2, 3 or 5
    threads, 9 heads 9, 4 + 4 + 1, 3 or 1)."""
    in_order = H == Hkv and (kv != np.float32 or attnkit.info()["isa"] in ("scalar", "avx2"))
    q, kc, vc = cache_case(rng, B=1, H=H, Hkv=Hkv, D=128, Dv=128, Smax=4096, kv_dtype=kv)
    outs = []
    for lens in (np.array([4000], np.int32), np.array([200], np.int32)):  # 16 key chunks, and 2
        for nt in (1, 2, 3, 5):
            attnkit.set_num_threads(nt)
            outs.append(attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, return_lse=True))
            assert _last_plan()["address_order"] == in_order
        for o in outs[1:]:
            assert np.array_equal(o[0], outs[0][0]) and np.array_equal(o[1], outs[0][1])
        outs = []


def _last_plan():
    from attnkit import _C

    return _C._last_attention_plan()


@pytest.mark.parametrize("Hkv", [4, 7, 9])
def test_mha_decode_in_address_order(isa, rng, Hkv):
    """One query row per kv head over a position-major half-precision cache: the kernel reads K
    and V in address order (plan "address_order"; ARCHITECTURE.md, "decode walks"), scores in
    blocks of four heads with the rest padded (7 = 4 + 3 heads, 9 = 8 + 1). Against float64: D
    tails and Dv != D, ragged lengths across key blocks (0, 1, 130, 299), a window (zero P: the
    careful path) with NaN in V rows it masks out and in one it attends (that element's output
    only is NaN), and paged caches, equal to contiguous ones; q in float32 and in the cache's
    dtype (bf16 q over a bf16 cache scores on vdpbf16ps on avx512_bf16). fp32 caches take this
    walk on the variants narrower than AVX-512 (avx2, scalar) and the other one on the AVX-512
    variants (decode_stages.h, kFloatInAddressOrder); GQA keeps the other walk."""
    fp32_in_order = isa in ("scalar", "avx2")
    kv_dtypes = list(half_dtypes()) + ([np.float32] if fp32_in_order else [])
    for kvd, qd, (D, Dv) in [(kvd, qd, dims) for kvd in kv_dtypes for qd in dict.fromkeys((np.float32, kvd))
                             for dims in [(64, 64), (72, 40), (128, 128), (59, 100)]]:
        q, kc, vc = cache_case(rng, B=4, H=Hkv, Hkv=Hkv, D=D, Dv=Dv, Smax=304, dtype=qd, kv_dtype=kvd)
        lens = np.array([0, 1, 130, 299], np.int32)
        o = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens)
        assert _last_plan()["address_order"] and o.dtype == qd
        assert (o[0] == 0).all()
        assert_close(o[1:], ref_from_cache(q[1:], kc[1:], vc[1:], lens[1:]), qd)
        kp, vp, table = to_pages(rng, kc, vc, 16)
        op = attnkit.attention_with_kvcache(q, kp, vp, cache_seqlens=lens, block_table=table)
        assert _last_plan()["address_order"] and np.array_equal(o, op)
        # a window of 20 keys: NaN in V rows before it (head 0) is not attended; a NaN
        # inside it (head 1, batch 3, element 5) makes that output element NaN, no other
        vc[2:, :100, 0] = np.nan
        vc[3, 290, 1, 5] = np.nan
        o = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, window=(19, 0))
        assert _last_plan()["address_order"]
        assert np.isnan(o[3, 0, 1, 5])
        o[3, 0, 1, 5] = 0
        assert np.isfinite(o).all()
        vc[2:, :100, 0] = 0  # (the values the reference sees in the masked-out rows)
        vc[3, 290, 1, 5] = 0
        ref = ref_from_cache(q[1:], kc[1:], vc[1:], lens[1:], window=(19, 0))
        ref[2, 0, 1, 5] = 0
        assert_close(o[1:], ref, qd)
    q, kc, vc = cache_case(rng, B=1, H=8, Hkv=8, D=64, Dv=64, Smax=64)
    attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=64)
    assert _last_plan()["address_order"] == fp32_in_order  # fp32
    q, kc, vc = cache_case(rng, B=1, H=16, Hkv=8, D=64, Dv=64, Smax=64, kv_dtype=np.float16)
    attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=64)
    assert not _last_plan()["address_order"]  # two query rows per kv head


def test_kvcache_out_and_options(isa, rng):
    q, kc, vc = cache_case(rng)
    lens = np.array([50, 60, 70], np.int32)
    out = poisoned((3, 1, 8, 64), np.float32)
    slopes = rng.random(8).astype(np.float32)
    res = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, out=out, window=(20, 0),
                                         alibi_slopes=slopes, softcap=4.0, causal=True)
    assert res is out
    ref = ref_from_cache(q, kc, vc, lens, causal=True, window=(20, 0), alibi=slopes, softcap=4.0)
    assert_close(out, ref, np.float32)


def _refusals(rng):
    """(name, exception, message regex, call) for every way attention_with_kvcache can refuse a
    call that would append; each call gets fresh k/v and the shared caches."""
    B, H, Hkv, D, Smax = 2, 8, 2, 64, 32
    q = randn(rng, (B, 1, H, D), np.float32)
    kn, vn = randn(rng, (B, 4, Hkv, D), np.float32), randn(rng, (B, 4, Hkv, D), np.float32)
    lens = np.array([1, 2])
    kc = randn(rng, (B, Smax, Hkv, D), np.float32)
    vc = randn(rng, (B, Smax, Hkv, D), np.float32)
    big = randn(rng, (B, Smax, Hkv, 2 * D), np.float32)  # a cache with a strided last dim
    kp = randn(rng, (4, 8, Hkv, D), np.float32)
    vp = randn(rng, (4, 8, Hkv, D), np.float32)
    bt = np.array([[0, 1], [2, 9]], np.int32)

    def F(**kw):
        args = dict(q=q, k_cache=kc, v_cache=vc, k=kn, v=vn, cache_seqlens=lens)
        args.update(kw)
        return lambda: attnkit.attention_with_kvcache(args.pop("q"), args.pop("k_cache"),
                                                      args.pop("v_cache"), **args)

    bad_out = np.empty((B, 1, H, 2 * D), np.float32)[..., ::2]
    cases = [
        ("capacity", ValueError, r"cache_seqlens\[1\] = 29 plus 4 new tokens does not fit the cache capacity 32",
         F(cache_seqlens=np.array([3, 29]))),
        ("negative length", ValueError, r"cache_seqlens\[0\] = -1 is negative", F(cache_seqlens=np.array([-1, 2]))),
        ("k without v", ValueError, "pass both k and v", F(v=None)),
        ("k dtype", TypeError, "k has dtype float16 but the caches have float32", F(k=kn.astype(np.float16))),
        ("k shape", ValueError, r"k and v must be \(B, Sq_new, Hkv, D/Dv\)", F(k=kn[:, :, :1])),
        ("seqlens shape", ValueError, r"cache_seqlens has shape \(3,\)", F(cache_seqlens=np.array([1, 2, 3]))),
        ("seqlens dtype", TypeError, "cache_seqlens must be int32 or int64", F(cache_seqlens=np.array([1.0, 2.0]))),
        ("strided out", ValueError, "out must be contiguous along its last dim", F(out=bad_out)),
        ("out overlaps q", ValueError, "out overlaps an input", F(out=q)),
        ("out overlaps cache", ValueError, "out overlaps an input", F(out=kc.reshape(B, Smax * Hkv, D)[:, None, :H])),
        ("out read-only", ValueError, "out is read-only", F(out=np.broadcast_to(np.zeros((1, 1, 1, D), np.float32), (B, 1, H, D)))),
        ("out dtype", TypeError, "out has dtype float64 but q has float32", F(out=np.zeros((B, 1, H, D)))),
        ("strided cache", ValueError, "k_cache must be contiguous along its last dim", F(k_cache=big[..., ::2], v_cache=big[..., 1::2])),
        ("k overlaps cache", ValueError, "k/v overlap the caches", F(k=kc[:, 4:8])),
        ("read-only cache", ValueError, "k_cache is read-only", F(k_cache=np.broadcast_to(kc[:1], kc.shape))),
        ("bad scale", ValueError, "scale must be finite", F(scale=float("inf"))),
        ("bad window", ValueError, "window entries must be >= -1", F(window=(-3, 0))),
        ("bad softcap", ValueError, "softcap must be a finite number", F(softcap=-2.0)),
        ("bad alibi", ValueError, r"alibi_slopes has shape \(3,\)", F(alibi_slopes=np.ones(3, np.float32))),
        ("causal not bool", TypeError, "causal must be a bool", F(causal=1)),
        ("return_lse not bool", TypeError, "return_lse must be a bool", F(return_lse="yes")),
        ("q dtype", TypeError, "q has dtype int32", F(q=q.astype(np.int32))),
        ("bad page", ValueError, r"block_table\[1, 1\] = 9 is not a page index in \[0, 4\)",
         F(k_cache=kp, v_cache=vp, cache_seqlens=np.array([1, 6]), block_table=bt)),
        ("table rows", ValueError, "block_table has 1 rows", F(k_cache=kp, v_cache=vp, block_table=bt[:1])),
        ("table dtype", TypeError, "block_table must be int32 or int64",
         F(k_cache=kp, v_cache=vp, block_table=bt.astype(np.float32))),
    ]
    return cases, (kc, vc, kp, vp, big)


def test_every_refusal_leaves_the_caches_untouched(rng):
    """Every refused call names attention_with_kvcache and writes nothing into any cache."""
    cases, caches = _refusals(rng)
    assert_refusals_write_nothing(cases, caches, "attention_with_kvcache")


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("sq", [1, 20])  # the decode kernel and the prefill (tile) kernel
def test_memory_error_leaves_cache_and_out_untouched(rng, paged, sq):
    """A scratch allocation that fails inside the kernel's parallel region: MemoryError, and
    neither the caches (the append) nor out are written."""
    from attnkit import _C

    B, H, Hkv, D = 2, 8, 2, 64
    q = randn(rng, (B, sq, H, D), np.float32)
    kn, vn = randn(rng, (B, sq, Hkv, D), np.float32), randn(rng, (B, sq, Hkv, D), np.float32)
    if paged:
        kc, vc = randn(rng, (8, 64, Hkv, D), np.float32), randn(rng, (8, 64, Hkv, D), np.float32)
        extra = dict(block_table=np.arange(8, dtype=np.int32).reshape(B, 4))
    else:
        kc, vc = randn(rng, (B, 256, Hkv, D), np.float32), randn(rng, (B, 256, Hkv, D), np.float32)
        extra = {}
    lens = np.array([100, 200])
    k0, v0 = kc.copy(), vc.copy()
    attnkit.set_num_threads(2)
    try:
        # The first call runs; count its allocations by arming later and later faults until
        # one lands inside the parallel region (the last allocations of the call).
        for n in range(1, 40):
            out = poisoned((B, sq, H, D), np.float32)
            _C._debug_fail_allocation_after(n)
            try:
                attnkit.attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens, out=out, **extra)
            except MemoryError as e:
                assert "attention_with_kvcache" in str(e)
                assert np.isnan(out).all(), "out was written by a call that raised MemoryError"
                assert np.array_equal(kc, k0) and np.array_equal(vc, v0), "the cache was appended to"
                continue
            finally:
                _C._debug_fail_allocation_after(0)
            break  # n is past the call's last allocation: it ran normally
        assert n > 3, "the call made fewer allocations than expected"
        assert np.isfinite(out).all()
        pos = lens[:, None] + np.arange(sq)
        if paged:
            page = extra["block_table"][np.arange(B)[:, None], pos // 64]
            assert np.array_equal(kc[page, pos % 64], kn) and np.array_equal(vc[page, pos % 64], vn)
        else:
            assert np.array_equal(kc[np.arange(B)[:, None], pos], kn)
            assert np.array_equal(vc[np.arange(B)[:, None], pos], vn)
    finally:
        attnkit.set_num_threads(None)


def _fail_each_allocation_in_turn(run, out):
    """Arm a fault on the 1st, 2nd, ... scratch allocation of `run()` until the call makes it
    through; every failing call must raise MemoryError and leave `out` (NaN-poisoned) as it
    was. Returns how many faults were injected."""
    from attnkit import _C

    for n in range(1, 60):
        _C._debug_fail_allocation_after(n)
        try:
            run()
        except MemoryError:
            assert np.isnan(out).all(), f"out was written by a call whose allocation {n} failed"
            continue
        finally:
            _C._debug_fail_allocation_after(0)
        assert np.isfinite(out).all()
        return n - 1
    raise AssertionError("the call never completed")


def test_memory_error_in_attention_backward_and_matmul(rng):
    """The other kernels with scratch in parallel regions: outputs untouched on MemoryError
    (the backward allocates its own dq/dk/dv: it must raise cleanly, then work)."""
    from attnkit import _C

    attnkit.set_num_threads(2)
    try:
        q, k, v = make_qkv(rng, 1, 4, 1, 200, 200, 32)  # few groups: chunked dK/dV partials
        o, lse = attnkit.attention(q, k, v, return_lse=True)
        want = attnkit.attention_backward(o, q, k, v, o, lse)
        raised = 0
        for n in range(1, 60):
            _C._debug_fail_allocation_after(n)
            try:
                got = attnkit.attention_backward(o, q, k, v, o, lse)
            except MemoryError as e:
                assert "attention_backward" in str(e)
                raised += 1
                continue
            finally:
                _C._debug_fail_allocation_after(0)
            break
        assert raised > 3 and all(np.array_equal(g, w) for g, w in zip(got, want))
        q, k, v = make_qkv(rng, 2, 4, 2, 300, 300, 32)
        out = poisoned(q.shape, np.float32)
        assert _fail_each_allocation_in_turn(lambda: attnkit.attention(q, k, v, out=out), out) > 3
        a, b = randn(rng, (16, 33, 40), np.float32), randn(rng, (16, 40, 21), np.float32)
        out = poisoned((16, 33, 21), np.float32)
        # one product per thread, each thread's scratch its own allocation (B's N tail: these
        # small products read A and B in place)
        assert _fail_each_allocation_in_turn(lambda: attnkit.matmul(a, b, out=out), out) >= 2
    finally:
        attnkit.set_num_threads(None)


# ---- which path ran: the debug plan record (csrc/cpu/debug.h) ----

def _plan():
    from attnkit import _C

    return _C._last_attention_plan()


def test_split_chunks_follow_the_lengths_not_the_capacity(rng):
    """2048 tokens in a 32768-position cache split exactly like 2048 tokens in a 2048-position
    cache (issue: decode splits over the real lengths), and give bit-identical results."""
    B, H, Hkv, D = 1, 32, 8, 128
    q = randn(rng, (B, 1, H, D), np.float32)
    small_k, small_v = randn(rng, (B, 2048, Hkv, D), np.float32), randn(rng, (B, 2048, Hkv, D), np.float32)
    big_k = np.zeros((B, 32768, Hkv, D), np.float32)
    big_v = np.zeros((B, 32768, Hkv, D), np.float32)
    big_k[:, :2048], big_v[:, :2048] = small_k, small_v
    o_small = attnkit.attention_with_kvcache(q, small_k, small_v, cache_seqlens=2048)
    plan_small = _plan()
    o_big = attnkit.attention_with_kvcache(q, big_k, big_v, cache_seqlens=2048)
    plan_big = _plan()
    assert plan_small["kernel"] == "decode" and plan_small["split"]
    assert plan_big == plan_small, (plan_big, plan_small)
    assert np.array_equal(o_big, o_small)
    # and the chunk length follows the longest sequence of a batch
    q2 = randn(rng, (2, 1, H, D), np.float32)
    kk, vv = np.zeros((2, 32768, Hkv, D), np.float32), np.zeros((2, 32768, Hkv, D), np.float32)
    attnkit.attention_with_kvcache(q2, kk, vv, cache_seqlens=np.array([100, 4096]))
    p = _plan()
    assert p["num_chunks"] * p["chunk_keys"] >= 4096 and (p["num_chunks"] - 1) * p["chunk_keys"] < 4096


def test_split_decision_and_chunk_count_by_shape(rng):
    """Few (batch x kv heads) split the keys; many do not; chunks never depend on threads."""
    H, D = 8, 64
    q, k, v = make_qkv(rng, 1, H, 1, 1, 3000, D)
    plans = []
    for nt in (1, 2):
        attnkit.set_num_threads(nt)
        attnkit.attention(q, k, v)
        plans.append(_plan())
    attnkit.set_num_threads(None)
    assert plans[0]["split"] and plans[0]["num_chunks"] > 1
    assert {**plans[0], "threads": 0} == {**plans[1], "threads": 0}
    q, k, v = make_qkv(rng, 4, 8, 8, 1, 300, D)  # 32 (batch, kv head) items: no split
    attnkit.attention(q, k, v)
    p = _plan()
    assert p["kernel"] == "decode" and not p["split"] and p["num_chunks"] == 1
    q, k, v = make_qkv(rng, 1, 4, 4, 100, 300, D)
    attnkit.attention(q, k, v)
    assert _plan()["kernel"] == "prefill"


def test_append_then_refuse_then_append(rng):
    """A good append, a refused one (nothing written), then the next good append lands right
    after the first: the cache holds exactly the accepted rows."""
    B, H, Hkv, D = 2, 4, 2, 32
    kc, vc = np.zeros((B, 16, Hkv, D), np.float32), np.zeros((B, 16, Hkv, D), np.float32)
    q = randn(rng, (B, 1, H, D), np.float32)
    k1, v1 = randn(rng, (B, 1, Hkv, D), np.float32), randn(rng, (B, 1, Hkv, D), np.float32)
    attnkit.attention_with_kvcache(q, kc, vc, k=k1, v=v1, cache_seqlens=np.array([3, 5]))
    after_first = kc.copy(), vc.copy()
    bad = np.empty((B, 1, H, 2 * D), np.float32)[..., ::2]
    with pytest.raises(ValueError, match="out must be contiguous"):
        attnkit.attention_with_kvcache(q, kc, vc, k=k1 * 7, v=v1 * 7, cache_seqlens=np.array([4, 6]), out=bad)
    assert np.array_equal(kc, after_first[0]) and np.array_equal(vc, after_first[1])
    k2, v2 = randn(rng, (B, 1, Hkv, D), np.float32), randn(rng, (B, 1, Hkv, D), np.float32)
    o = attnkit.attention_with_kvcache(q, kc, vc, k=k2, v=v2, cache_seqlens=np.array([4, 6]))
    expect_k = np.zeros_like(kc)
    for b, n in enumerate([3, 5]):
        expect_k[b, n], expect_k[b, n + 1] = k1[b, 0], k2[b, 0]
    assert np.array_equal(kc, expect_k)
    assert_close(o, ref_from_cache(q, kc, vc, [5, 7], causal=True), np.float32)



@pytest.mark.parametrize("kv,Hkv", [("float32", 5), ("float16", 6), ("bfloat16", 7)])
def test_head_groups_of_a_key_block(isa, rng, kv, Hkv):
    """A key block's kv heads run in groups whose V rows fit the prefetch budget (64 KB: two
    heads of fp32 D128, four of fp16/bf16): counts that leave a last, smaller group give the
    reference's result. Two query rows with a window: the key at lens - 102 is visible to the
    first row and masked for the second, so blocks take the careful P V path (per-row masking,
    with the group's shifted head offsets); a NaN in that V row (dim 5) reaches the first row's
    dim 5 only."""
    kvd = {"float32": np.float32, "float16": np.float16, "bfloat16": bfloat16}[kv]
    if kvd is None:
        pytest.skip("ml_dtypes not installed")
    B, H, D, Smax = 2, 2 * Hkv, 128, 300
    _, kc, vc = cache_case(rng, B=B, H=H, Hkv=Hkv, D=D, Dv=D, Smax=Smax, kv_dtype=kvd)
    q = randn(rng, (B, 2, H, D), np.float32)
    lens = np.array([300, 171], np.int32)
    vc[1, 171 - 102, :, 5] = np.nan
    o = attnkit.attention_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, window=(100, 0))
    plan = attnkit._C._last_attention_plan()
    assert plan["kernel"] == "decode"
    assert np.isnan(o[1, 0, :, 5]).all() and np.isfinite(np.delete(o[1, 0], 5, axis=-1)).all()
    assert np.isfinite(o[1, 1]).all() and np.isfinite(o[0]).all()
    ref = ref_from_cache(q, to64(kc), to64(vc), lens, causal=True, window=(100, 0))
    assert_close(o[0], ref[0], np.float32)
    assert_close(o[1, 1], ref[1, 1], np.float32)


@pytest.mark.parametrize("Hkv", [1, 3, 8])
def test_short_position_major_decode_shares_heads_among_threads(isa, rng, threads, Hkv):
    """A short bshd decode (one key chunk) is cut into KV-head groups so every thread gets
    items (attention_decode.cpp): the plan has at least 2 items per thread where the heads
    allow, never a split, and the output is right and bit-identical on 1, 2 and 3 threads."""
    B, H, Sk, D = 1, 8 if Hkv != 3 else 6, 100, 64
    q, k, v = make_qkv(rng, B, H, Hkv, 1, Sk, D)
    args = [np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v)]
    outs = []
    for nt in (1, 2, 3):
        attnkit.set_num_threads(nt)
        o, lse = attnkit.attention(*args, layout="bshd", return_lse=True)
        plan = _plan()
        assert plan["kernel"] == "decode" and not plan["split"] and plan["num_chunks"] == 1, plan
        if Hkv > 1:  # a head-major single head is one item whatever the threads
            assert plan["items"] >= min(Hkv, 2 * plan["threads"]), (nt, plan)
        outs.append((o, lse))
    check(q, k, v, outs[0][0].transpose(0, 2, 1, 3), lse=outs[0][1])
    for o, lse in outs[1:]:
        assert np.array_equal(o, outs[0][0]) and np.array_equal(lse, outs[0][1])
