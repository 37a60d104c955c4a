import numpy as np
import pytest
import torch

import attnkit
from conftest import poisoned
from reference import (
    FLOAT_DTYPES,
    assert_close,
    bfloat16,
    dtype_id,
    from_torch,
    randn,
    softmax_ref,
    to_torch,
)

ISA_KERNELS = ("softmax",)  # the kernel-table entries tested here (conftest.isas_for)


def torch_softmax(x, axis):
    t = to_torch(x)
    return from_torch(torch.softmax(t, dim=axis), x.dtype)


def check(x, axis, got):
    ref = softmax_ref(x, axis)
    assert_close(got, ref, x.dtype, torch_result=torch_softmax(x, axis), what="softmax")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [1, 7, 17, 1000, 4097])
@pytest.mark.parametrize("axis", [-1, 0])
def test_sizes_dtypes_axes(isa, rng, dtype, n, axis):
    x = randn(rng, (5, n) if axis == -1 else (n, 5), dtype, scale=3.0)
    check(x, axis, attnkit.softmax(x, axis=axis))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", [4096, 4097, 12289, 100003])
def test_long_rows_split_into_chunks(isa, rng, dtype, n):
    x = randn(rng, (3, n), dtype, scale=4.0)
    x[1, : n // 2] = -np.inf  # whole chunks of -inf in one row
    check(x, -1, attnkit.softmax(x))


def test_single_long_row(isa, rng):
    x = randn(rng, (1 << 20,), np.float32, scale=2.0)
    check(x, -1, attnkit.softmax(x))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_middle_axis_and_3d(isa, rng, dtype):
    x = randn(rng, (4, 33, 19), dtype)
    for axis in (0, 1, 2, -2):
        check(x, axis, attnkit.softmax(x, axis=axis))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_non_contiguous_views(isa, rng, dtype):
    base = randn(rng, (40, 70), dtype, scale=2.0)
    views = {
        "step": base[:, ::3],
        "transpose": base.T,
        "negative": base[::-1, ::-2],
        "broadcast": np.broadcast_to(base[3:4, :], (6, 70)),
        "fortran": np.asfortranarray(base),
    }
    for name, v in views.items():
        for axis in (-1, 0):
            got = attnkit.softmax(v, axis=axis)
            assert got.shape == v.shape, name
            check(v, axis, got)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_out_written_in_place(isa, rng, dtype):
    x = randn(rng, (9, 130), dtype)
    out = poisoned(x.shape, dtype)
    res = attnkit.softmax(x, out=out)
    assert res is out
    check(x, -1, out)
    # non-contiguous out
    big = poisoned((9, 260), dtype)
    res = attnkit.softmax(x, out=big[:, ::2])
    check(x, -1, big[:, ::2])
    assert np.isnan(to_f(big[:, 1::2])).all(), "wrote outside the out view"


def to_f(a):
    return a.astype(np.float64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("axis", [-1, 0])
def test_same_array_in_place(isa, rng, dtype, axis):
    x = randn(rng, (31, 5000), dtype)
    expect = softmax_ref(x, axis)
    res = attnkit.softmax(x, axis=axis, out=x)
    assert res is x
    assert_close(x, expect, dtype, what="in-place softmax")


def test_special_values_match_torch(isa):
    inf, nan = np.inf, np.nan
    x = np.array(
        [
            [0.0, 1.0, 2.0, 3.0],
            [-inf, 0.0, 1.0, -inf],
            [-inf, -inf, -inf, -inf],
            [inf, 0.0, 1.0, 2.0],
            [nan, 0.0, 1.0, 2.0],
            [1e30, -1e30, 0.0, 1e30],
            [-1e30, -1e30, -1e30, -1e30],
        ],
        dtype=np.float32,
    )
    for dtype in FLOAT_DTYPES:
        with np.errstate(over="ignore"):
            xd = x.astype(dtype)
        got = to_f(attnkit.softmax(xd))
        expect = to_f(torch_softmax(xd, -1))
        assert np.array_equal(np.isnan(got), np.isnan(expect)), (dtype, got, expect)
        fin = ~np.isnan(expect)
        assert np.allclose(got[fin], expect[fin], atol=1e-2), (dtype, got, expect)
    # the same rules hold in long (chunked) rows
    row = np.zeros(10000, np.float32)
    for val in (inf, nan):
        r = row.copy()
        r[7777] = val
        assert np.isnan(attnkit.softmax(r)).all()
    assert np.isnan(attnkit.softmax(np.full(10000, -inf, np.float32))).all()


def test_exp_extremes(isa):
    # Differences down to -100 (exp underflows to 0) and huge magnitudes.
    x = np.array([[0.0, -20.0, -87.0, -88.0, -100.0, -1e4, -np.inf, 5.0]], np.float32)
    check(x, -1, attnkit.softmax(x))
    y = np.linspace(-90, 0, 4096, dtype=np.float32)[None]
    check(y, -1, attnkit.softmax(y))


def test_empty_and_degenerate_shapes(isa):
    for shape, axis in [((0,), -1), ((3, 0), -1), ((0, 4), -1), ((3, 0), 0), ((1,), 0), ((5, 1), -1)]:
        x = np.ones(shape, np.float32)
        got = attnkit.softmax(x, axis=axis)
        assert got.shape == shape
        if x.size:
            np.testing.assert_array_equal(got, softmax_ref(x, axis).astype(np.float32))
    s = attnkit.softmax(np.array(3.0, np.float32), axis=0)
    assert s.shape == () and s == 1.0


def test_many_dims_merge(isa, rng):
    x = randn(rng, (2, 3, 2, 3, 2, 3, 2, 3, 2, 5), np.float32)
    check(x, 4, attnkit.softmax(x, axis=4))
    # a permuted view whose outer dims cannot all merge
    y = x.transpose(9, 0, 2, 4, 6, 8, 1, 3, 5, 7)
    check(y, 3, attnkit.softmax(y, axis=3))


def test_bit_identical_across_threads(threads, rng):
    for shape, axis in [((64, 3000), -1), ((2, 300000), -1), ((3000, 64), 0), ((1 << 21,), -1)]:
        x = randn(rng, shape, np.float32)
        outs = []
        for nt in (1, 2, 3):
            attnkit.set_num_threads(nt)
            outs.append(attnkit.softmax(x, axis=axis))
        assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2]), shape


@pytest.fixture
def small_llc():
    """Softmax's store policy assumes a 64 KB last-level cache (a test hook), so small arrays
    take the paths of DRAM-sized ones."""
    from attnkit import _C

    _C._debug_set_llc_bytes(64 << 10)
    yield
    _C._debug_set_llc_bytes(0)


def test_long_rows_whole_row_and_chunk_items_agree(isa, rng, threads, small_llc):
    """Long rows of a streamed output are done whole per thread (rows >= threads, out= or a
    cached buffer) or as (row, chunk) items (a fresh output, or fewer rows than threads): the
    same bits either way, with -inf chunks, an all -inf row and a NaN row among them."""
    from attnkit import _C

    n = 3 * 4096 + 123
    x = randn(rng, (5, n), np.float32, scale=4.0)
    x[1, :4096] = -np.inf
    x[2, :] = -np.inf
    x[3, 5000] = np.nan
    got, paths = [], set()
    for nt in (1, 2, 3, 8):  # 8 threads > 5 rows: items
        attnkit.set_num_threads(nt)
        out = np.zeros_like(x)
        attnkit.softmax(x, out=out)
        plan = _C._last_softmax_plan()
        assert plan["path"] == ("whole_rows" if nt <= 5 else "chunk_items"), (nt, plan)
        paths.add(plan["path"])
        got += [out, attnkit.softmax(x)]
        paths.add(_C._last_softmax_plan()["path"])
    assert paths == {"whole_rows", "chunk_items"}
    for g in got[1:]:
        assert np.array_equal(g, got[0], equal_nan=True)
    assert np.isnan(got[0][2]).all() and np.isnan(got[0][3]).all()
    keep = [0, 1, 4]
    check(x[keep], -1, got[0][keep])


def test_fresh_outputs_are_not_streamed(isa, rng, small_llc):
    """A new output (its pages zeroed by the OS on first touch) gets ordinary stores; an out=
    array gets non-temporal ones once the data fill the (assumed) last-level cache."""
    from attnkit import _C

    x = randn(rng, (64, 1000), np.float32)
    out = np.zeros_like(x)
    attnkit.softmax(x, out=out)
    assert _C._last_softmax_plan() == {"path": "short_rows", "streamed": True}
    fresh = attnkit.softmax(x)
    assert _C._last_softmax_plan() == {"path": "short_rows", "streamed": False}
    assert np.array_equal(fresh, out)
    check(x, -1, out)


# ---- bad input ----


def test_bad_inputs():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        attnkit.softmax([[1.0, 2.0]])
    with pytest.raises(TypeError, match="x has dtype int32"):
        attnkit.softmax(np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="x has dtype complex64; expected float32"):
        attnkit.softmax(np.zeros(3, np.complex64))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        attnkit.softmax(x, axis=2)
    with pytest.raises(ValueError, match="axis -3 is out of range"):
        attnkit.softmax(x, axis=-3)
    with pytest.raises(TypeError, match="axis must be an int"):
        attnkit.softmax(x, axis=1.0)
    with pytest.raises(ValueError, match=r"out has shape \(4, 3\) but x has \(3, 4\)"):
        attnkit.softmax(x, out=np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError, match="out has dtype float64 but x has float32"):
        attnkit.softmax(x, out=np.zeros((3, 4), np.float64))
    with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
        attnkit.softmax(x, out=[0.0])
    ro = np.zeros((3, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        attnkit.softmax(x, out=ro)
    big = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="out overlaps x"):
        attnkit.softmax(big[:, :4], out=big[:, 2:6])
    with pytest.raises(ValueError, match="out overlaps x"):
        attnkit.softmax(big[:, ::2], out=big[:, 1::2])  # interleaved: refused conservatively


def test_in_place_through_bf16_and_fp16_views():
    if bfloat16 is None:
        pytest.skip("ml_dtypes not installed")
    x = np.linspace(-3, 3, 64).astype(bfloat16).reshape(8, 8)
    expect = softmax_ref(x, -1)
    attnkit.softmax(x, out=x)
    assert_close(x, expect, bfloat16)


def test_out_with_overlapping_elements_is_refused():
    x = np.zeros((3, 4), np.float32)
    out = np.lib.stride_tricks.as_strided(np.empty(4, np.float32), (3, 4), (0, 4))
    with pytest.raises(ValueError, match="out has overlapping elements"):
        attnkit.softmax(x, out=out)
