"""merge_attention_states: the public function (device-neutral front end; see _front.py).

Partial attention results over the same query rows -- each computed against its own block of
keys, as in split-KV decoding or context-parallel (ring) attention -- combine exactly through
their log-sum-exp. This module checks the arguments (the same checks and messages for NumPy
and device arrays) and hands the descriptors to the backend: the CPU kernel
(csrc/cpu/merge.cpp) or, for CUDA torch tensors, a torch implementation on the device.
"""
from ._front import Call, check_float


def merge_attention_states(outs, lses, *, out=None):
    """Merge partial attention states through their log-sum-exp.

    Parameters
    ----------
    outs : numpy.ndarray or CUDA torch tensor
        (N, ..., Sq, Dv): N partial outputs of attention over the same query rows, each
        normalized over its own keys (what :func:`attention` returns with ``return_lse=True``),
        float32, float64, float16 or ``ml_dtypes.bfloat16``. Any strides; a last dim that is
        not contiguous is copied first.
    lses : array
        (N, ..., Sq), float32 or float64: the natural-log log-sum-exp of each part's scaled
        scores (``-inf``: the part had no allowed key for that row, and is ignored).
    out : array, optional
        (..., Sq, Dv) of outs' dtype, contiguous along its last dim, written in place. It may
        be ``outs[0]`` itself (a running merge in place); any other overlap with the inputs
        is refused.

    With ``m = max_n lses[n]`` and ``w_n = exp(lses[n] - m)``, the result is
    ``out = sum_n w_n outs[n] / sum_n w_n`` and ``lse = m + log(sum_n w_n)``: exactly the
    attention of the rows over the union of the parts' keys. Accumulation is fp32 (fp64 when
    outs or lses are float64), one pass over the parts in order; the result does not depend on
    the thread count. A row whose every part is empty (lse ``-inf``) gives 0 and ``-inf``; a
    part with lse ``-inf`` is never read (NaN in its values does not reach the result); a NaN
    or ``+inf`` lse makes its row NaN; NaN in a non-empty part's values makes the row NaN.

    CUDA torch tensors are merged by a torch implementation on their device (no CUDA kernel);
    other device arrays raise ``NotImplementedError``. ``attnkit.torch.merge_attention_states``
    is the differentiable version for torch tensors.

    Returns
    -------
    (out, lse): out (..., Sq, Dv) in outs' dtype, lse (..., Sq) in lses' dtype.
    """
    fn = "merge_attention_states"
    call = Call(fn, outs, "outs")
    od = call.first
    ld = call.arg(lses, "lses")
    check_float(od, fn, "outs")
    if ld.dtype not in ("float32", "float64"):
        raise TypeError(f"{fn}: lses has dtype {ld.dtype}; expected float32 or float64")
    if od.ndim < 3:
        raise ValueError(f"{fn}: outs must be (N, ..., Sq, Dv) with at least 3 dims, got shape "
                         f"{od.shape}")
    if ld.shape != od.shape[:-1]:
        raise ValueError(f"{fn}: lses has shape {ld.shape} but outs has {od.shape}; expected "
                         f"lses of shape {od.shape[:-1]} (outs without its last dim)")
    if od.shape[0] < 1:
        raise ValueError(f"{fn}: outs must hold at least one part (N >= 1), got shape {od.shape}")
    od = call.contiguous(od, "outs")
    out, outd = call.result(out, od.shape[1:], od.dtype, od, source="outs")
    if not outd.last_dim_contiguous():
        raise ValueError(f"{fn}: out must be contiguous along its last dim")
    lse, lsed = call.empty(ld.shape[1:], ld.dtype)
    call.backend.merge_attention_states(call, od, ld, outd, lsed)
    return out, lse


__all__ = ["merge_attention_states"]
