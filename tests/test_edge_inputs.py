"""Inputs at the edges of the NumPy API: byte order, huge windows and scalars, empty batches,
self-overlapping outputs. Each was once read wrongly or refused with the wrong message."""
import sys

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import attnkit
from reference import attention_ref


def _qkv(rng, sq=4, sk=6, h=1, d=8, dtype=np.float32):
    return (rng.standard_normal((1, h, sq, d)).astype(dtype),
            rng.standard_normal((1, h, sk, d)).astype(dtype),
            rng.standard_normal((1, h, sk, d)).astype(dtype))


def test_byte_swapped_arrays_are_refused_by_name(rng):
    """'>f4' on a little-endian host (or '<f4' on a big-endian one) was read as native floats:
    softmax of [0, 1, 2] gave [-1e-12] * 3, eye @ eye gave zeros."""
    swapped = np.dtype(np.float32).newbyteorder("S")
    x = np.array([[0.0, 1.0, 2.0]], swapped)
    with pytest.raises(TypeError, match=r"softmax: x has dtype .f4 \(non-native byte order"):
        attnkit.softmax(x)
    e = np.eye(2, dtype=swapped)
    with pytest.raises(TypeError, match=r"matmul: a has dtype .f4 \(non-native byte order"):
        attnkit.matmul(e, e)
    q, k, v = _qkv(rng)
    with pytest.raises(TypeError, match=r"attention: k has dtype .f4 \(non-native byte order"):
        attnkit.attention(q, k.astype(swapped), v)
    with pytest.raises(TypeError, match=r"quantize_kv: x has dtype .f4 \(non-native byte order"):
        attnkit.quantize_kv(q.astype(swapped))
    out = np.empty((1, 1, 4, 8), swapped)
    with pytest.raises(TypeError, match=r"attention: out .*non-native byte order"):
        attnkit.attention(q, k, v, out=out)
    # the same values in native order are computed as usual
    np.testing.assert_allclose(attnkit.softmax(x.astype(np.float32)),
                               np.exp([[0, 1, 2]]) / np.exp([0, 1, 2]).sum(), rtol=1e-6)


@pytest.mark.parametrize("window", [(-1, sys.maxsize), (sys.maxsize, -1), (2**64, 2**62),
                                    ((1 << 40) + 1, -1)])
def test_a_window_wider_than_memory_bounds_nothing(rng, window):
    """A right bound of sys.maxsize wrapped around in i + offset + right and masked whole rows
    (lse -inf, output 0); 2**64 was a pybind11 argument error."""
    q, k, v = _qkv(rng)
    ref, ref_lse = attention_ref(q, k, v)
    out, lse = attnkit.attention(q, k, v, window=window, return_lse=True)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 1e-5 * scale
    assert np.abs(lse - ref_lse.reshape(lse.shape)).max() <= 1e-5
    kc = rng.standard_normal((1, 6, 1, 8)).astype(np.float32)
    vc = rng.standard_normal((1, 6, 1, 8)).astype(np.float32)
    qd = rng.standard_normal((1, 1, 1, 8)).astype(np.float32)
    got = attnkit.attention_with_kvcache(qd, kc, vc, cache_seqlens=6, window=window)
    want = attnkit.attention_with_kvcache(qd, kc, vc, cache_seqlens=6)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    cu = np.array([0, 4], np.int64)
    cuk = np.array([0, 6], np.int64)
    got = attnkit.attention_varlen(q[0].transpose(1, 0, 2), k[0].transpose(1, 0, 2),
                                   v[0].transpose(1, 0, 2), cu, cuk, window=window)
    assert np.abs(got - ref[0].transpose(1, 0, 2)).max() <= 1e-5 * scale


def test_quantize_kv_of_an_empty_array(rng):
    """NumPy gives empty arrays all-zero strides: an empty x was refused as not contiguous."""
    for shape in [(0, 2, 8), (3, 0, 8), (2, 0, 3, 8)]:
        codes, scale = attnkit.quantize_kv(np.zeros(shape, np.float32))
        assert codes.shape == shape and codes.dtype == np.int8
        assert scale.shape == shape[:-1] and scale.dtype == np.float32


def test_float64_dropout_scales_by_the_exact_keep_probability(rng):
    """dropout_p was stored as float32: a float64 call scaled kept weights by 1 / (1 - 0.3f),
    1.7e-8 off the float64 result."""
    q, k, v = _qkv(rng, sq=5, sk=9, h=2, dtype=np.float64)
    p = 0.3
    out = attnkit.attention(q, k, v, dropout_p=p, dropout_seed=7)
    keep = attnkit.dropout_mask((1, 2, 5, 9), p, 7)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = (w * keep / (1 - p)) @ v
    assert keep.any() and not keep.all()
    assert np.abs(out - ref).max() <= 1e-13 * np.abs(ref).max()


def _overlapping(shape, dtype=np.float32):
    """A writeable view whose first two dims share memory (stride 0)."""
    buf = np.zeros(shape[2:], dtype)
    return as_strided(buf, shape, (0, 0) + buf.strides)


def test_outputs_with_overlapping_elements_are_refused(rng):
    """attention accepted a writeable out whose heads shared memory (a stride-0 dim): two
    threads then wrote the same elements. softmax and matmul refused it; now every output."""
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="attention: out has overlapping elements"):
        attnkit.attention(q, k, v, out=_overlapping((1, 2, 4, 8)))
    # interleaved rows: row i starts one element after row i - 1
    flat = np.zeros(64, np.float32)
    inter = as_strided(flat, (1, 2, 4, 8), (0, 128, 4, 4))
    with pytest.raises(ValueError, match="attention: out has overlapping elements"):
        attnkit.attention(q, k, v, out=inter)
    with pytest.raises(ValueError, match="softmax: out has overlapping elements"):
        attnkit.softmax(q, out=inter)
    with pytest.raises(ValueError, match="matmul: out has overlapping elements"):
        attnkit.matmul(q[0, 0], k[0, 0].T, out=as_strided(np.zeros(8, np.float32), (4, 6), (4, 4)))
    # interleaved strides that do not overlap (offsets 0, 3, 2, 5, 4, 7) are accepted
    a, b = q[0, 0, :3, :4], k[0, 0, :2, :4].T
    out = as_strided(np.zeros(8, np.float32), (3, 2), (8, 12))
    got = attnkit.matmul(np.ascontiguousarray(a), np.ascontiguousarray(b), out=out)
    assert np.abs(got - a.astype(np.float64) @ b).max() <= 1e-5 * np.abs(a @ b).max()
    # a cache with overlapping rows, appended to, is refused before anything is written
    kc = np.zeros((6, 2, 8), np.float32)
    kcache = as_strided(kc, (2, 6, 2, 8), (0,) + kc.strides)
    vcache = np.zeros((2, 6, 2, 8), np.float32)
    snapshot = kc.copy()
    new = rng.standard_normal((2, 1, 2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="attention_with_kvcache: k_cache/v_cache have overlapping elements"):
        attnkit.attention_with_kvcache(rng.standard_normal((2, 1, 2, 8)).astype(np.float32),
                                       kcache, vcache, k=new, v=new.copy(), cache_seqlens=2)
    assert np.array_equal(kc, snapshot) and not vcache.any()


def test_argument_errors_name_the_function_and_argument(rng):
    with pytest.raises(ValueError, match=r"dropout_mask: shape must be \(B, H, Sq, Sk\) with sizes >= 0"):
        attnkit.dropout_mask((1, 2, -3, 4), 0.1, 0)
    with pytest.raises(TypeError, match=r"dropout_mask: shape must be a \(B, H, Sq, Sk\) tuple of ints"):
        attnkit.dropout_mask((1, 2, 3.5, 4), 0.1, 0)
    with pytest.raises(TypeError, match=r"dropout_mask: shape must be a \(B, H, Sq, Sk\) tuple of ints"):
        attnkit.dropout_mask(4, 0.1, 0)
    before = attnkit.get_num_threads()
    with pytest.raises(ValueError, match="set_num_threads: n = 2147483648 is more than"):
        attnkit.set_num_threads(2**31)
    assert attnkit.get_num_threads() == before
    qd = np.zeros((2, 1, 2, 8), np.float32)
    kc = np.zeros((2, 10, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"attention_with_kvcache: cache_seqlens = 18446744073709551616 is not an int64"):
        attnkit.attention_with_kvcache(qd, kc, kc.copy(), cache_seqlens=2**64)
    for bad in ([1, 1], True, None):
        with pytest.raises(TypeError, match=r"attention_with_kvcache: cache_seqlens must be an int "
                                            r"or a \(2,\) int32/int64 array"):
            attnkit.attention_with_kvcache(qd, kc, kc.copy(), cache_seqlens=bad)
    new = np.zeros((2, 1, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 9223372036854775807 plus 1 new tokens"):
        attnkit.attention_with_kvcache(qd, kc, kc.copy(), k=new, v=new.copy(),
                                       cache_seqlens=np.array([0, 2**63 - 1]))


@pytest.mark.parametrize("name", ["scale", "softcap"])
def test_scalars_beyond_float32_are_refused_for_float32_inputs(rng, name):
    """scale / softcap of 1e39 passed the finiteness check and became inf (NaN outputs) in
    float32 arithmetic; float64 inputs compute in float64 and keep them."""
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match=f"attention: {name} is beyond float32's range"):
        attnkit.attention(q, k, v, **{name: 1e39})
    out = attnkit.attention(*(x.astype(np.float64) for x in (q, k, v)), **{name: 1e39})
    assert np.isfinite(out).all()


def test_append_to_an_empty_batch(rng):
    """Batch 0 with k/v to append was refused as 'k/v need cache_seqlens' (an empty lengths
    array read as none given); it appends nothing and returns an empty output."""
    z = np.zeros((0, 5, 2, 8), np.float32)
    e = np.zeros((0, 1, 2, 8), np.float32)
    out = attnkit.attention_with_kvcache(e, z, z.copy(), k=e, v=e.copy(), cache_seqlens=0)
    assert out.shape == (0, 1, 2, 8)
