import glob
import os

import numpy as np
import pytest
import torch

import attnkit
from attnkit import _C
from conftest import poisoned
from reference import FLOAT_DTYPES, assert_close, bfloat16, dtype_id, from_torch, randn, to64, to_torch

ISA_KERNELS = ("gemm",)  # the kernel-table entries tested here (conftest.isas_for)

SIZES = [1, 2, 5, 13, 17, 63, 65, 127, 255, 257, 1000]


def reference(a, b):
    a64, b64 = to64(a), to64(b)
    return np.matmul(a64, b64), float(np.max(np.matmul(np.abs(a64), np.abs(b64)), initial=1.0))


def torch_matmul(a, b):
    return from_torch(torch.matmul(to_torch(a), to_torch(b)), a.dtype)


def check(a, b, got):
    ref, scale = reference(a, b)
    assert got.dtype == a.dtype
    assert_close(got, ref, a.dtype, torch_result=torch_matmul(a, b), scale=scale, what="matmul")


@pytest.mark.parametrize("m", SIZES)
def test_square_and_odd_sizes_f32(isa, rng, m):
    for k, n in [(m, m), (17, 65), (257, 13)]:
        a, b = randn(rng, (m, k), np.float32), randn(rng, (k, n), np.float32)
        check(a, b, attnkit.matmul(a, b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mkn", [(1, 1, 1), (5, 7, 3), (13, 300, 17), (63, 65, 127), (200, 513, 129)])
def test_dtypes(isa, rng, dtype, mkn):
    m, k, n = mkn
    a, b = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
    check(a, b, attnkit.matmul(a, b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_transposed_and_strided_views(isa, rng, dtype):
    A = randn(rng, (130, 90), dtype)
    B = randn(rng, (90, 70), dtype)
    views = [
        (A, B),
        (A.T.copy().T, B),                  # Fortran-ordered A
        (A[::2], B),                        # row step
        (A[:, ::-1], B[::-1]),              # negative strides
        (A, B.T.copy().T),                  # Fortran-ordered B
        (A[:, :45], B[:45, ::3]),           # column step in B
    ]
    at = randn(rng, (90, 130), dtype).T     # a.T view
    bt = randn(rng, (70, 90), dtype).T      # b.T view
    views += [(at, B), (A, bt), (at, bt)]
    for a, b in views:
        check(a, b, attnkit.matmul(a, b))


def test_skinny_shapes(isa, rng):
    for m in (1, 4, 16, 33):
        a, b = randn(rng, (m, 4096), np.float32), randn(rng, (4096, 700), np.float32)
        check(a, b, attnkit.matmul(a, b))
        check(a, b[:, :699], attnkit.matmul(a, b[:, :699]))  # N tail with B read in place
    # GEMV-like (1-4 rows: whole panels in one loop): a short last k-block (K % 8), more panels
    # than the prefetch distance, an N tail, a transposed A (the general loop), fp64
    for m in (1, 2, 3, 4):
        for dtype in (np.float32, np.float64):
            a, b = randn(rng, (m, 1029), dtype), randn(rng, (1029, 1111), dtype)
            check(a, b, attnkit.matmul(a, b))
            at = randn(rng, (1029, m), dtype).T
            check(at, b, attnkit.matmul(at, b))


def test_one_dimensional_promotion(rng):
    a = randn(rng, (7,), np.float32)
    b = randn(rng, (7, 5), np.float32)
    got = attnkit.matmul(a, b)
    assert got.shape == (5,)
    check(a[None], b, got[None])
    c = randn(rng, (3, 7), np.float32)
    got = attnkit.matmul(c, a)
    assert got.shape == (3,)
    got = attnkit.matmul(a, a)
    assert got.shape == () and np.allclose(got, np.dot(a.astype(np.float64), a), rtol=1e-5)
    batched = randn(rng, (4, 3, 7), np.float32)
    got = attnkit.matmul(batched, a)
    assert got.shape == (4, 3)
    assert got.shape == np.matmul(batched, a).shape


def test_batch_broadcasting(isa, rng):
    for sa, sb in [((2, 1, 5, 7), (3, 7, 4)), ((6, 5, 7), (7, 4)), ((5, 7), (2, 3, 7, 4)),
                   ((64, 128, 64), (64, 64, 128)), ((1, 3, 1, 9, 8), (2, 1, 4, 8, 6))]:
        a, b = randn(rng, sa, np.float32), randn(rng, sb, np.float32)
        got = attnkit.matmul(a, b)
        assert got.shape == np.matmul(a, b).shape
        check(a, b, got)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_out(isa, rng, dtype):
    a, b = randn(rng, (33, 20), dtype), randn(rng, (20, 47), dtype)
    out = poisoned((33, 47), dtype)
    assert attnkit.matmul(a, b, out=out) is out
    check(a, b, out)
    big = poisoned((47, 66), dtype)  # transposed, strided out
    view = big[:, ::2].T
    attnkit.matmul(a, b, out=view)
    check(a, b, view)
    assert np.isnan(big[:, 1::2].astype(np.float64)).all()


def test_empty_dims_and_zero_k(rng):
    for sa, sb in [((0, 5), (5, 3)), ((4, 5), (5, 0)), ((2, 0, 5), (5, 3))]:
        a, b = np.ones(sa, np.float32), np.ones(sb, np.float32)
        assert attnkit.matmul(a, b).shape == np.matmul(a, b).shape
    for dtype in FLOAT_DTYPES:
        a, b = np.ones((4, 0), dtype), np.ones((0, 3), dtype)
        out = poisoned((4, 3), dtype)
        attnkit.matmul(a, b, out=out)
        assert (out.astype(np.float64) == 0).all()


def test_bit_identical_across_threads(threads, rng):
    for sa, sb in [((300, 700), (700, 500)), ((7, 4096), (4096, 300)), ((3, 1029), (1029, 1111)),
                   ((16, 64, 32), (16, 32, 48)),
                   ((1000, 1000), (1000, 1000))]:
        a, b = randn(rng, sa, np.float32), randn(rng, sb, np.float32)
        outs = []
        for nt in (1, 2, 3):
            attnkit.set_num_threads(nt)
            outs.append(attnkit.matmul(a, b))
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2]), (sa, sb)


def test_bad_inputs():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError, match="a must be a numpy.ndarray"):
        attnkit.matmul([[1.0]], a)
    with pytest.raises(TypeError, match="b must be a numpy.ndarray"):
        attnkit.matmul(a, 2.0)
    with pytest.raises(ValueError, match=r"shapes \(3, 4\) and \(3, 4\) are not aligned"):
        attnkit.matmul(a, a)
    with pytest.raises(ValueError, match="do not broadcast"):
        attnkit.matmul(np.ones((2, 3, 4), np.float32), np.ones((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        attnkit.matmul(np.ones((), np.float32), a)
    with pytest.raises(TypeError, match="a has dtype float32 but b has float64"):
        attnkit.matmul(a, np.ones((4, 2)))
    with pytest.raises(TypeError, match="a has dtype int64"):
        attnkit.matmul(np.ones((3, 4), np.int64), np.ones((4, 2), np.int64))
    with pytest.raises(ValueError, match=r"out has shape \(3, 3\) but the result has \(3, 2\)"):
        attnkit.matmul(a, np.ones((4, 2), np.float32), out=np.empty((3, 3), np.float32))
    with pytest.raises(TypeError, match="out has dtype float64"):
        attnkit.matmul(a, np.ones((4, 2), np.float32), out=np.empty((3, 2)))
    buf = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError, match="out overlaps an input"):
        attnkit.matmul(buf[:4, :4], buf[4:, 4:], out=buf[:4, 4:])
    with pytest.raises(ValueError, match="overlapping elements"):
        out = np.lib.stride_tricks.as_strided(np.empty(4, np.float32), (3, 4), (0, 4))
        attnkit.matmul(a, np.ones((4, 4), np.float32), out=out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
def test_blocks_larger_than_nc_kc_mc(isa, rng, dtype):
    """N above every variant's NC (3072 fp32 / 1536 fp64), K above KC (256) and M above MC
    (144), each with a ragged tail: the outer BLIS loops run more than once and end partway."""
    for m, k, n in [(20, 40, 3200), (150, 600, 40), (5, 9, 1600)]:
        a, b = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
        check(a, b, attnkit.matmul(a, b))
        bt = np.asfortranarray(b)  # the packed path, not the skinny in-place one
        check(a, bt, attnkit.matmul(a, bt))


# Shapes past gemm_bf16.cpp's thresholds (>= 24 rows on vdpbf16ps, >= 64 on tiles, > 2^21
# multiply-adds), so the avx512_bf16 variant runs them on vdpbf16ps and amx / amx_emulated on
# tiles (all but the 24-row one): odd K (the zero pad of the last pair), K over one k-block,
# N tails, strided and transposed operands (test_bf16_kernel_blocks_and_thread_counts takes
# M, K and N past each block of the blocking actually in use).
@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
@pytest.mark.parametrize("mkn", [(24, 4097, 33), (130, 301, 77), (150, 1025, 70), (301, 77, 129)])
def test_bf16_pair_path_shapes(isa, rng, mkn):
    m, k, n = mkn
    a, b = randn(rng, (m, k), bfloat16), randn(rng, (k, n), bfloat16)
    check(a, b, attnkit.matmul(a, b))
    A = randn(rng, (2 * m, 2 * k), bfloat16)
    B = randn(rng, (k + 1, 3 * n), bfloat16)
    for av, bv in [(A[::2, ::2], B[:k, ::3]), (A[:m, ::-2], B[:k][::-1, :n]),
                   (randn(rng, (k, m), bfloat16).T, randn(rng, (n, k), bfloat16).T)]:
        check(av, bv, attnkit.matmul(av, bv))
    ab = randn(rng, (3, m, k), bfloat16)
    check(ab, b, attnkit.matmul(ab, b))


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
def test_bf16_subnormal_inputs_take_the_exact_path(isa, rng):
    """vdpbf16ps reads subnormal bf16 as zero (Intel SDM: DAZ); a product with a subnormal
    input is computed on the fp32 path instead, so every variant gives the same bits as avx512."""
    m, k, n = 64, 700, 96
    a, b = randn(rng, (m, k), bfloat16), randn(rng, (k, n), bfloat16)
    tiny = np.float32(2.0 ** -130)  # subnormal in bf16 (and fp32)
    assert np.asarray(tiny).astype(bfloat16).view(np.uint16) & 0x7f80 == 0
    a[5] = 0
    a[5, 3] = tiny
    b[3, 7] = np.float32(2.0 ** 126)  # c[5, 7] = 2^-4 exactly; 0 if the input were flushed
    got = attnkit.matmul(a, b)
    check(a, b, got)
    assert float(got[5, 7]) == 2.0 ** -4
    if isa.startswith(("avx512", "amx")):  # the isa fixture holds the selection lock: switch directly
        from attnkit import _C
        _C._select_isa("avx512")
        try:
            base = attnkit.matmul(a, b)
        finally:
            _C._select_isa(isa)
        assert np.array_equal(got.view(np.uint16), base.view(np.uint16))
    # The scan before the bf16 kernel sees a subnormal in a row's scalar tail (k = 699 of 700)
    # and in a transposed operand (walked along its contiguous axis).
    a2, b2 = a.copy(), b.copy()
    a2[5] = 0
    a2[5, 699] = tiny
    b2[3, 7], b2[699, 7] = 1.0, np.float32(2.0 ** 126)  # c[5, 7] = 2^-4 as above
    bt = np.ascontiguousarray(b.T).T  # b as a (k, n) view with unit row stride
    for x, y in ((a2, b2), (a, bt)):
        got2 = attnkit.matmul(x, y)
        check(x, y, got2)
        assert float(got2[5, 7]) == 2.0 ** -4
    # Batched, with the subnormal in the last product only: the whole call takes the exact
    # path, decided before anything is written, so a MemoryError at any allocation leaves out
    # untouched (the first version recomputed that product after writing the others).
    from attnkit import _C

    a3, b3 = randn(rng, (3, m, k), bfloat16), randn(rng, (3, k, n), bfloat16)
    a3[2], b3[2] = a, b
    raised = 0
    for nfail in range(1, 40):
        out = np.full((3, m, n), np.nan, dtype=np.float32).astype(bfloat16)
        _C._debug_fail_allocation_after(nfail)
        try:
            attnkit.matmul(a3, b3, out=out)
        except MemoryError:
            assert np.isnan(out.astype(np.float32)).all(), f"out written before allocation {nfail} failed"
            raised += 1
            continue
        finally:
            _C._debug_fail_allocation_after(0)
        break
    assert raised >= 1
    check(a3, b3, out)
    assert float(out[2, 5, 7]) == 2.0 ** -4


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
def test_bf16_subnormal_in_b_is_found_while_packing(isa, rng, threads):
    """A single product's B is checked for subnormal bf16 as it is packed (gemm_bf16.cpp): one
    in the last k-block and the last column panel, of B in rows and of a transposed B, on wide
    products (threads split the columns, each packing its own B panels) and tall ones (threads
    share the packed B), on 1-3 threads: every thread stops and the exact fp32 path runs."""
    tiny = np.float32(2.0 ** -130)
    for m, k, n in [(48, 1100, 300), (300, 1100, 96)]:
        a, b = randn(rng, (m, k), bfloat16), randn(rng, (k, n), bfloat16)
        kk, jj = k - 3, n - 2
        a[5], a[:, kk], b[kk] = 0, 0, 0
        a[5, kk] = np.float32(2.0 ** 126)
        b[kk, jj] = tiny  # c[5, jj] = 2^-4 exactly; 0 if it were flushed
        bt = np.ascontiguousarray(b.T).T
        for nt in (1, 2, 3):
            attnkit.set_num_threads(nt)
            for y in (b, bt):
                out = np.full((m, n), np.nan, np.float32).astype(bfloat16)
                attnkit.matmul(a, y, out=out)
                check(a, y, out)
                assert float(out[5, jj]) == 2.0 ** -4, (m, k, n, nt, y.strides)


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
def test_bf16_column_split_over_a_narrower_last_block(isa, rng, threads):
    """A wide product whose threads split the columns (no barrier, each packing the B panels it
    reads) over more than one NC block, the last one narrower: its shares start elsewhere, and
    a fast thread must not repack a panel a slow one still reads (it did: 16-30 of 30 products
    wrong at 64 x 4032 x 384 on 2-3 threads). Repeated, and compared bit for bit with 1 thread."""
    from attnkit import _C

    if isa not in ("avx512_bf16", "amx", "amx_emulated"):
        pytest.skip(f"{isa} has no bf16 kernel (bf16 runs on its fp32 path)")
    attnkit.matmul(np.ones((256, 512), bfloat16), np.ones((512, 256), bfloat16))
    nc, nr = _C._last_gemm_plan()["nc"], _C._last_gemm_plan()["nr"]
    for m, n, k in [(64, nc + (nc // nr - 2) * nr, 384), (48, 2 * nc + 40 * nr, 200)]:
        a, b = randn(rng, (m, k), bfloat16), randn(rng, (k, n), bfloat16)
        attnkit.set_num_threads(1)
        one = attnkit.matmul(a, b)
        check(a, b, one)
        for nt in (2, 3):
            attnkit.set_num_threads(nt)
            for _ in range(8):
                got = attnkit.matmul(a, b)
                assert np.array_equal(got.view(np.uint16), one.view(np.uint16)), (m, n, k, nt)


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
def test_bf16_kernel_blocks_and_thread_counts(isa, rng, threads):
    """The bf16 kernels (vdpbf16ps pairs, AMX tiles) past one of each block: M one past the A
    block and over it with a tail, K over two k-blocks with an odd tail, N past the B block;
    and the same bits on 1, 2 and 3 threads (row shares of whole micro-panels)."""
    if isa not in ("avx512_bf16", "amx", "amx_emulated"):
        pytest.skip(f"{isa} has no bf16 kernel (bf16 runs on its fp32 path)")
    a, b = np.ones((256, 512), bfloat16), np.ones((512, 256), bfloat16)
    attnkit.matmul(a, b)
    plan = _C._last_gemm_plan()
    assert plan["elem_bytes"] == 2, plan  # the bf16 kernel ran
    assert plan["mr"] == (32 if isa.startswith("amx") else 12), plan
    kc, mc, nc = plan["kc_max"], plan["mc"], plan["nc"]
    # blocks from this CPU's caches (gemm_bf16.cpp, pair_blocks): the B micro-panel (kc / 2
    # pair rows of nr words) within the L1d, the A block (mc rows) within half the L2
    l1d = _sysfs_cache_bytes(1)
    if l1d is not None and 16 << 10 <= l1d <= 1 << 20:
        assert plan["l1d"] == l1d, plan
    # the vdpbf16ps kernel keeps its B micro-panel in the L1d; the tile kernel streams both
    # micro-panels from the L2 (deeper k blocks measured faster: gemm/ukernel_amx.h)
    b_panel = kc // 2 * plan["nr"] * 4
    assert kc % 32 == 0 and b_panel <= (plan["l2"] // 8 if isa.startswith("amx") else plan["l1d"]), plan
    assert mc % plan["mr"] == 0 and mc * kc // 2 * 4 <= plan["l2"] // 2, plan
    # every product above gemm_bf16.cpp's kMinMacs (2^21) for mc >= 48 (an L2 of 512 KB)
    for m, k, n in [(mc + 1, kc + 33, 45), (2 * mc + 37, 70, 299), (100, 2 * kc + 3, 70),
                    (70, 40, nc + 5)]:
        a, b = randn(rng, (m, k), bfloat16), randn(rng, (k, n), bfloat16)
        outs = []
        for nt in (1, 2, 3):
            attnkit.set_num_threads(nt)
            outs.append(attnkit.matmul(a, b))
            assert _C._last_gemm_plan()["elem_bytes"] == 2, (m, k, n)
        check(a, b, outs[0])
        for o in outs[1:]:
            assert np.array_equal(o.view(np.uint16), outs[0].view(np.uint16)), (m, k, n)
    # avx512_bf16 reads A in place as pair words when k and its row stride are even: from an
    # odd element offset (words straddling 4-byte boundaries), and packed for an odd row stride.
    b = randn(rng, (2 * kc, 300), bfloat16)
    for cols in (2 * kc + 10, 2 * kc + 9):
        big = randn(rng, (130, cols), bfloat16)
        a = big[:, 1:2 * kc + 1]
        for nt in (1, 2):
            attnkit.set_num_threads(nt)
            check(a, b, attnkit.matmul(a, b))


def _sysfs_cache_bytes(level):
    """cpu0's level-`level` data (or unified) cache size per Linux sysfs, or None."""
    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            fields = [open(os.path.join(d, f)).read().strip() for f in ("level", "type", "size")]
        except OSError:
            continue
        lv, kind, size = fields
        if lv == str(level) and kind in ("Data", "Unified"):
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            return int(size.rstrip("KM")) * scale
    return None


def _plan_for(dtype):
    """The blocking this variant uses for `dtype` (recorded by a product on the packed path)."""
    attnkit.matmul(np.ones((200, 300), dtype), np.ones((300, 200), dtype))
    return _C._last_gemm_plan()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
def test_blocking_comes_from_the_cpu_caches(isa, dtype):
    """KC / MC / NC are derived at run time from the L1d and L2 (gemm/blocking.h): the sizes
    are the ones sysfs reports, the blocks keep their cache budgets, k-blocks are balanced."""
    plan = _plan_for(dtype)
    eb = np.dtype(dtype).itemsize
    assert plan["elem_bytes"] == eb
    for level, key in ((1, "l1d"), (2, "l2")):
        size = _sysfs_cache_bytes(level)
        if size is not None and (16 << 10 if level == 1 else 128 << 10) <= size <= (1 << 20 if level == 1 else 64 << 20):
            assert plan[key] == size, (key, plan)
    assert 16 << 10 <= plan["l1d"] <= 1 << 20 and 128 << 10 <= plan["l2"] <= 64 << 20
    kc, mc, nc, mr, nr = plan["kc_max"], plan["mc"], plan["nc"], plan["mr"], plan["nr"]
    assert kc % 16 == 0 and 64 <= kc <= 1024, plan
    assert kc * nr * eb <= plan["l1d"], plan          # the B micro-panel fits the L1d
    assert mc % mr == 0 and mc * kc * eb <= plan["l2"] // 2, plan  # the A block half the L2
    assert nc % nr == 0 and nc >= nr, plan
    attnkit.matmul(np.ones((200, 700), dtype), np.ones((700, 200), dtype))
    blocks = -(-700 // kc)  # fewest k-blocks of at most kc, of equal depth rounded up to 16
    assert _C._last_gemm_plan()["kc"] == min(kc, -(-(-(-700 // blocks)) // 16) * 16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
def test_shapes_across_the_run_time_block_edges(isa, rng, dtype):
    """M, K and N one past (or one short of) this machine's MC, KC and NC, against float64."""
    plan = _plan_for(dtype)
    kc, mc, nc = plan["kc_max"], plan["mc"], plan["nc"]
    for m, k, n in [(mc + 1, kc + 1, 70), (max(mc - 1, 100), 2 * kc + 3, 40),
                    (100, kc - 1, nc + 5), (mc + 13, 3 * kc, 2 * plan["nr"] + 1)]:
        a, b = randn(rng, (m, k), dtype), randn(rng, (k, n), dtype)
        check(a, b, attnkit.matmul(a, b))
        bt = np.asfortranarray(b)  # B packed from strided columns
        check(a, bt, attnkit.matmul(a, bt))


def _run_with_threads(nt, a, b):
    attnkit.set_num_threads(nt)
    return attnkit.matmul(a, b), _C._last_gemm_plan()


def test_few_rows_read_b_in_place_by_the_size_of_b(isa, rng, threads):
    """Few rows stream B where it lies (gemm.cpp, reads_b_in_place_skinny): always up to 24
    rows, up to 36 only when B is larger than 16 L2s; otherwise B is packed. Either way the
    result is right and the same on 1, 2 and 3 threads."""
    l2 = _plan_for(np.float32)["l2"]
    k = 1024
    n_large = 16 * l2 // (4 * k) + 40   # B just over 16 L2s
    n_small = 16 * l2 // (4 * k) - 40   # just under
    for m, n, in_place in [(24, n_small, True), (30, n_small, False), (30, n_large, True),
                           (36, n_large, True), (37, n_large, False)]:
        a, b = randn(rng, (m, k), np.float32), randn(rng, (k, n), np.float32)
        outs = []
        for nt in (1, 2, 3):
            out, plan = _run_with_threads(nt, a, b)
            assert plan["b_in_place"] == in_place, (m, n, plan)
            outs.append(out)
        check(a, b, outs[0])
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2]), (m, n)


def test_loop_order_and_thread_split(isa, rng, threads):
    """Products with both operands packed run in the shared-A order (gemm.cpp), except tall ones
    whose B block fits half the L2 (N <= nb); there two threads share the columns of a product
    wider than it is tall, the rows otherwise. Products that read B in place keep the shared-B
    order's rule (columns for a wide product with under two MC blocks of rows per thread).
    Results are right and bit-identical on 1, 2 and 3 threads either way."""
    plan = _plan_for(np.float32)
    nb, mc = plan["nb"], plan["mc"]
    assert nb % plan["nr"] == 0 and nb * plan["kc_max"] * 4 <= plan["l2"] // 2, plan
    cases = [  # m, k, n, shared_a, columns at 2 threads
        (300, 300, 300, True, False),
        (200, 300, 520, True, True),
        (2 * nb, 200, nb, False, False),
        (2 * nb, 200, nb + 40, True, False),
        (60, 300, 100, False, True),  # 1.8M multiply-adds: read in place
        (4 * mc + 8, 300, 4 * mc + 40, True, True),
    ]
    for m, k, n, shared_a, columns in cases:
        a, b = randn(rng, (m, k), np.float32), randn(rng, (k, n), np.float32)
        one, plan1 = _run_with_threads(1, a, b)
        two, plan2 = _run_with_threads(2, a, b)
        three, _ = _run_with_threads(3, a, b)
        assert plan1["shared_a"] == plan2["shared_a"] == shared_a, (m, k, n, plan2)
        assert not plan1["split_columns"] and plan2["split_columns"] == columns, (m, k, n, plan2)
        check(a, b, one)
        assert np.array_equal(one, two) and np.array_equal(one, three), (m, k, n)


def test_shared_a_rows_split_with_a_shallower_last_k_block(isa, rng, threads):
    """With the rows split the shared-A order packs without a barrier, in two alternating
    buffers; a shallower last k-block once placed a thread's panels over panels another thread
    was still reading (a race: wrong values near the thread boundaries, in about half of the
    runs). Repeated products at 2 and 3 threads give one thread's bits every time."""
    kc = _plan_for(np.float32)["kc_max"]
    n = max(_plan_for(np.float32)["nb"] + 32, 700)
    a, b = randn(rng, (n, 2 * kc + 1), np.float32), randn(rng, (2 * kc + 1, n), np.float32)
    one, plan = _run_with_threads(1, a, b)
    assert plan["shared_a"] and plan["kc"] * 2 < 2 * kc + 1 < plan["kc"] * 3, plan
    check(a, b, one)
    for i in range(16):
        out, plan = _run_with_threads(2 + i % 2, a, b)
        assert not plan["split_columns"], plan
        assert np.array_equal(out, one), i


def test_many_threads_use_a_two_dimensional_grid(isa, rng, threads):
    """From 4 threads on, a square product is shared on a 2-D thread grid (threading.h,
    gemm_grid_rows), not in row strips that each read all of B; the grid covers the team and
    the result is bit-identical to one thread's."""
    a, b = randn(rng, (300, 280), np.float32), randn(rng, (280, 300), np.float32)
    one, _ = _run_with_threads(1, a, b)
    for nt in (4, 6, 16):
        out, plan = _run_with_threads(nt, a, b)
        tm, tn = plan["grid"]
        assert tm * tn == nt and tm > 1 and tn > 1, (nt, plan)
        assert np.array_equal(out, one), nt
    check(a, b, one)


def test_shared_a_rows_split_in_row_quanta(isa, rng, threads):
    """The shared A block's rows go to the thread rows in quanta of 4 rows, not whole MR-row
    panels (gemm.cpp, kRowQuantum): a thread row's last panel may be short, and each thread
    row's panels sit past every earlier row's in the buffer. Every split (2 to 6 threads, 1-D
    and 2-D grids, k-blocks deep and shallow) gives one thread's bits and the float64 result."""
    kc = _plan_for(np.float32)["kc_max"]
    for m, k in [(37, 1600), (100, 2 * kc + 5), (512, 300)]:
        a, b = randn(rng, (m, k), np.float32), randn(rng, (k, m), np.float32)
        one, plan = _run_with_threads(1, a, b)
        assert plan["shared_a"], (m, plan)
        check(a, b, one)
        for nt in (2, 3, 4, 6):
            for _ in range(3):
                out, plan = _run_with_threads(nt, a, b)
                assert np.array_equal(out, one), (m, nt, plan)


def test_shared_a_short_last_block_on_a_single_column_grid(isa, rng, threads):
    """With more rows than one shared A block and a single-column thread grid (no barrier),
    the short last block once placed a thread's panels where another thread could still be
    reading them two blocks back: wrong rows in ~1% of products at 3-4 threads. Every product
    gives one thread's bits."""
    plan = _plan_for(np.float32)
    rows = -(-plan["nc"] // plan["mr"]) * plan["mr"]  # shared_a_rows: one A block
    m, k, n = 3 * rows + 112, 64, plan["nb"] + 32
    a, b = randn(rng, (m, k), np.float32), randn(rng, (k, n), np.float32)
    one, plan1 = _run_with_threads(1, a, b)
    assert plan1["shared_a"], plan1
    check(a, b, one)
    for nt in (3, 4):
        for i in range(60):
            out, p = _run_with_threads(nt, a, b)
            assert p["grid"][1] == 1, p
            assert np.array_equal(out, one), (nt, i, np.nonzero((out != one).any(1))[0][:8])
