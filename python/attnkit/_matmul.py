"""attnkit.matmul: the public function (device-neutral; see _front.py)."""
import numpy as np

from . import _cpu_backend
from ._front import Call, check_float

_NUMPY_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def _float_matrix_dtype(dt):
    """float32/64/16 or ml_dtypes.bfloat16, without ``dt.name`` (a Python-level property of
    NumPy's: 3.7 us, more than the binding's whole 8x8 product)."""
    return dt in _NUMPY_FLOATS or (dt.char == "E" and dt.type.__name__ == "bfloat16")


def matmul(a, b, *, out=None):
    """Matrix product with ``np.matmul`` semantics, on attnkit's packed SIMD GEMM.

    Parameters
    ----------
    a, b : numpy.ndarray or CUDA device arrays
        Same dtype: float32 or float64 (computed natively), float16 or ``ml_dtypes.bfloat16``
        (converted to fp32 while packing, accumulated in fp32, returned in the input dtype).
        Mixed dtypes raise ``TypeError``. 1-D operands are promoted as in ``np.matmul``
        (prepend / append a unit dim, removed from the result). Leading batch dims broadcast,
        e.g. ``(B, 1, M, K) @ (H, K, N) -> (B, H, M, N)``; broadcasting never copies.
    out : array, optional
        Written in place; must have the result's shape and dtype and must not overlap ``a``
        or ``b``. If a kernel runs out of scratch memory (``MemoryError``), ``out`` is left
        untouched.

    Any strides are accepted and read in place (transposed ``a.T`` / ``b.T`` views included);
    see the README for which layouts take the fastest paths.
    """
    if (type(a) is np.ndarray and type(b) is np.ndarray and a.ndim == 2 and b.ndim == 2
            and a.shape[1] == b.shape[0] and a.dtype == b.dtype and _float_matrix_dtype(a.dtype)
            and (out is None or (type(out) is np.ndarray and out.dtype == a.dtype
                                 and out.shape == (a.shape[0], b.shape[1])))):
        # Two NumPy matrices (and an out= of the result's shape and dtype) that pass every
        # check below: the arrays go to the binding as they are, without descriptors (8x8: 4.4 ->
        # 1.8 us; bench/notes/matmul.md, "fixed cost of a small product").
        # The binding checks strides, alignment, writeability and overlap with the same
        # messages. Anything else, errors included, takes the path below.
        return _cpu_backend.matmul_matrices(a, b, out)
    fn = "matmul"
    call = Call(fn, a, "a")
    ad = call.first
    bd = call.arg(b, "b")
    if ad.ndim == 0 or bd.ndim == 0:
        raise ValueError(f"matmul: operands must have at least 1 dimension, got shapes {ad.shape} "
                         f"and {bd.shape}")
    a2 = ad.expand_dims(0) if ad.ndim == 1 else ad
    b2 = bd.expand_dims(1) if bd.ndim == 1 else bd
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"matmul: shapes {ad.shape} and {bd.shape} are not aligned: "
                         f"a has K={a2.shape[-1]} but b has K={b2.shape[-2]}")
    try:
        batch = tuple(np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]))
    except ValueError:
        raise ValueError(f"matmul: batch dims of shapes {ad.shape} and {bd.shape} do not broadcast") from None
    if ad.dtype != bd.dtype:
        raise TypeError(f"matmul: a has dtype {ad.dtype} but b has {bd.dtype}; mixed dtypes "
                        "are not computed, convert one operand")
    check_float(ad, fn, "a")
    m, n = a2.shape[-2], b2.shape[-1]
    result_shape = batch + ((m,) if ad.ndim > 1 else ()) + ((n,) if bd.ndim > 1 else ())
    out, od = call.result(out, result_shape, ad.dtype, ad, "a")
    # The result with its unit dims back: (..., M, N) as a view of out.
    od2 = od
    if ad.ndim == 1:
        od2 = od2.expand_dims(od2.ndim - (1 if bd.ndim > 1 else 0))
    if bd.ndim == 1:
        od2 = od2.expand_dims(od2.ndim)
    call.backend.matmul(call, a2.broadcast_to(batch + a2.shape[-2:]),
                        b2.broadcast_to(batch + b2.shape[-2:]), od2)
    return out
