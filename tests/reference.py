"""Float64 references and the pass rule shared by every kernel test (see DESIGN.md).

A result passes when its max error against the float64 reference is at most twice PyTorch's
own error on the same inputs, or within the per-dtype tolerance below, whichever is larger.
Errors are measured in units of `scale`, the magnitude the result is built from (1 for
softmax probabilities, max(|A| @ |B|) for a matmul, max |V| for attention), so one table
serves every kernel. NaN never passes unless the reference is NaN at the same place.
"""
import numpy as np

try:
    import ml_dtypes

    bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is in the test extra
    ml_dtypes = None
    bfloat16 = None

# Max error / scale allowed regardless of torch, per storage dtype. fp32: a few ulps of
# accumulated rounding; fp16/bf16: the final rounding to the storage type dominates
# (half an ulp relative: 4.9e-4 and 3.9e-3), plus fp32 work before it.
TOLERANCE = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float16): 1.5e-3,
}
if bfloat16 is not None:
    TOLERANCE[bfloat16] = 1.2e-2

FLOAT_DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)] + (
    [bfloat16] if bfloat16 is not None else []
)


def dtype_id(dt):
    return np.dtype(dt).name


def to64(a):
    return np.asarray(a).astype(np.float64)


def randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def max_error(got, ref):
    """Max |got - ref| over the finite reference entries; inf if NaN/inf patterns differ."""
    got, ref = to64(got), to64(ref)
    if got.shape != ref.shape:
        raise AssertionError(f"shape {got.shape} != reference shape {ref.shape}")
    ref_nan, got_nan = np.isnan(ref), np.isnan(got)
    if not np.array_equal(ref_nan, got_nan):
        return np.inf
    ref_inf, got_inf = np.isinf(ref), np.isinf(got)
    if not np.array_equal(ref_inf, got_inf) or not np.array_equal(ref[ref_inf], got[got_inf]):
        return np.inf
    fin = ~(ref_nan | ref_inf)
    if not fin.any():
        return 0.0
    return float(np.max(np.abs(got[fin] - ref[fin])))


def assert_close(got, ref, dtype, *, torch_result=None, scale=1.0, what="result"):
    """The pass rule: error <= max(2 * torch error, TOLERANCE[dtype] * scale)."""
    dtype = np.dtype(dtype)
    err = max_error(got, ref)
    bound = TOLERANCE[dtype] * scale
    torch_err = None
    if torch_result is not None:
        torch_err = max_error(torch_result, ref)
        if np.isfinite(torch_err):
            bound = max(bound, 2 * torch_err)
    assert err <= bound, (
        f"{what}: max error {err:.3e} vs float64 exceeds bound {bound:.3e} "
        f"(dtype {dtype.name}, scale {scale:.3g}, torch error {torch_err})"
    )


# ---- references ----


def softmax_ref(x, axis):
    """float64 softmax on the (already rounded) inputs, torch's NaN/inf rules."""
    x = to64(x)
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - m)
        return e / np.sum(e, axis=axis, keepdims=True)


def torch_dtype(dt):
    import torch

    dt = np.dtype(dt)
    if bfloat16 is not None and dt == bfloat16:
        return torch.bfloat16
    return {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float64): torch.float64,
        np.dtype(np.float16): torch.float16,
    }[dt]


def to_torch(a):
    """numpy -> torch without going through float64 (bfloat16 via its bits)."""
    import torch

    a = np.ascontiguousarray(a)
    if bfloat16 is not None and a.dtype == bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def from_torch(t, dtype):
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(bfloat16)
    return t.detach().contiguous().numpy().astype(dtype)
