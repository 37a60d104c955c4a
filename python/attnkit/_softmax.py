"""attnkit.softmax: the public function (device-neutral; see _front.py)."""
import numpy as np

from ._front import Call, check_float


def softmax(x, axis=-1, *, out=None):
    """Softmax of ``x`` along ``axis``, like ``torch.softmax(x, dim=axis)``.

    Parameters
    ----------
    x : numpy.ndarray or CUDA device array
        float32, float64, float16, or ``ml_dtypes.bfloat16`` (computed in fp32, stored back in
        the input dtype; float64 is computed in float64). Any strides, including negative and
        non-contiguous views, are read in place: nothing is copied. Device arrays (CUDA build)
        run on the GPU and return the same kind of array.
    axis : int
        The axis to normalise (negative counts from the end).
    out : array, optional
        Written in place; must have x's shape and dtype. ``out=x`` (the same array) computes
        in place. An ``out`` that partly overlaps ``x`` is refused.

    Returns
    -------
    array
        ``out`` if given, else a new array of x's kind.

    Numerics: the row max is subtracted first; NaN anywhere in a row gives NaN for the row; a
    row of all ``-inf`` gives NaN (as torch); ``+inf`` gives NaN for its row (as torch).
    """
    call = Call("softmax", x, "x")
    xd = call.first
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"softmax: axis must be an int, got {type(axis).__name__}")
    check_float(xd, "softmax", "x")
    # out's shape and dtype, the axis range and aliasing are checked by the binding (bindings/params_from.cpp,
    # shared by both devices): the same messages whichever backend runs.
    allocated = out is None
    if allocated:
        out, od = call.empty(xd.shape, xd.dtype, xd)
    else:
        od = call.arg(out, "out")
    call.backend.softmax(call, xd, od, axis, allocated)
    return out
