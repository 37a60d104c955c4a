import numpy as np

from . import _C, _alloc, _cuda_api
from ._validate import check_array, check_out


def matmul(a, b, *, out=None):
    """Matrix product with ``np.matmul`` semantics, on attnkit's packed SIMD GEMM.

    Parameters
    ----------
    a, b : numpy.ndarray
        Same dtype: float32 or float64 (computed natively), float16 or ``ml_dtypes.bfloat16``
        (converted to fp32 while packing, accumulated in fp32, returned in the input dtype).
        Mixed dtypes raise ``TypeError``. 1-D operands are promoted as in ``np.matmul``
        (prepend / append a unit dim, removed from the result). Leading batch dims broadcast,
        e.g. ``(B, 1, M, K) @ (H, K, N) -> (B, H, M, N)``; broadcasting never copies.
    out : numpy.ndarray, optional
        Written in place; must have the result's shape and dtype and must not overlap ``a``
        or ``b``.

    Any strides are accepted and read in place (transposed ``a.T`` / ``b.T`` views included);
    see the README for which layouts take the fastest paths.
    """
    if _cuda_api.is_device_array(a):
        return _cuda_api.matmul(a, b, out=out)
    check_array(a, "matmul", "a")
    check_array(b, "matmul", "b")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(
            f"matmul: operands must have at least 1 dimension, got shapes {a.shape} and {b.shape}"
        )
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(
            f"matmul: shapes {a.shape} and {b.shape} are not aligned: "
            f"a has K={a2.shape[-1]} but b has K={b2.shape[-2]}"
        )
    try:
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        raise ValueError(
            f"matmul: batch dims of shapes {a.shape} and {b.shape} do not broadcast"
        ) from None
    m, n = a2.shape[-2], b2.shape[-1]
    shape = batch + (m, n)
    result_shape = batch + ((m,) if a.ndim > 1 else ()) + ((n,) if b.ndim > 1 else ())
    if a.dtype != b.dtype:
        raise TypeError(
            f"matmul: a has dtype {a.dtype} but b has {b.dtype}; mixed dtypes are not computed, "
            "convert one operand"
        )
    if out is None:
        out = _alloc.empty(result_shape, a.dtype)
    else:
        check_out(out, "matmul")
        if out.shape != result_shape:
            raise ValueError(f"matmul: out has shape {out.shape} but the result has {result_shape}")
    out2 = out.reshape(shape) if out.shape != shape else out
    if out2.size and not np.shares_memory(out2, out):  # reshape had to copy: never happens for
        raise AssertionError("matmul: internal error reshaping out")  # inserted unit dims
    _C.matmul(np.broadcast_to(a2, batch + a2.shape[-2:]), np.broadcast_to(b2, batch + b2.shape[-2:]), out2)
    return out
