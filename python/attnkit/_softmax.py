import numpy as np

from . import _C, _alloc, _cuda_api
from ._validate import check_array, check_out


def softmax(x, axis=-1, *, out=None):
    """Softmax of ``x`` along ``axis``, like ``torch.softmax(x, dim=axis)``.

    Parameters
    ----------
    x : numpy.ndarray
        float32, float64, float16, or ``ml_dtypes.bfloat16`` (computed in fp32, stored back in
        the input dtype; float64 is computed in float64). Any strides, including negative and
        non-contiguous views, are read in place: nothing is copied.
    axis : int
        The axis to normalise (negative counts from the end).
    out : numpy.ndarray, optional
        Written in place; must have x's shape and dtype. ``out=x`` (the same array) computes
        in place. An ``out`` that partly overlaps ``x`` is refused.

    Returns
    -------
    numpy.ndarray
        ``out`` if given, else a new array.

    Numerics: the row max is subtracted first; NaN anywhere in a row gives NaN for the row; a
    row of all ``-inf`` gives NaN (as torch); ``+inf`` gives NaN for its row (as torch).
    """
    if _cuda_api.is_device_array(x):
        return _cuda_api.softmax(x, axis, out=out)
    check_array(x, "softmax", "x")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"softmax: axis must be an int, got {type(axis).__name__}")
    if out is None:
        out = _alloc.empty(x.shape, x.dtype)
    else:
        check_out(out, "softmax")
    _C.softmax(x, out, int(axis))
    return out
