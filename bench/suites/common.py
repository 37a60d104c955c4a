"""Helpers shared by the suites: dtypes, NumPy <-> torch views, tolerances, API probes."""
from __future__ import annotations

import importlib
from typing import Optional

import numpy as np

# Max error allowed against the contender a row is compared with, relative to max(1, max|ref|).
# fp32: both sides accumulate in fp32 (errors ~1e-6); half types: the output is rounded to
# the storage type (fp16 ~5e-4, bf16 ~4e-3 relative), plus inputs the contender rounds.
TOL = {"float32": 2e-5, "float64": 1e-10, "float16": 5e-3, "bfloat16": 3e-2}

DTYPE_ALIASES = {
    "f32": "float32", "fp32": "float32", "float32": "float32",
    "f16": "float16", "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "f64": "float64", "fp64": "float64", "float64": "float64",
    # 8-bit KV caches (decode suite)
    "i8": "int8", "int8": "int8",
    "fp8": "float8_e4m3fn", "f8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3fn": "float8_e4m3fn",
}
SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int8": "i8",
         "float8_e4m3fn": "fp8"}


def canonical_dtype(name: str) -> str:
    """'fp16' / 'f16' / 'float16' -> 'float16' (ValueError for unknown names)."""
    try:
        return DTYPE_ALIASES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPE_ALIASES))}") from None


def torch_or_none():
    """torch if it imports, else None."""
    try:
        import torch

        return torch
    except ImportError:
        return None


def np_dtype(name: str):
    """NumPy dtype for a canonical name (bfloat16 comes from ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def randn(rng, shape, dtype="float32", scale=1.0):
    """Standard-normal array of `shape` in `dtype` (generated in fp32, then rounded)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if scale != 1.0:
        x *= scale
    return x if dtype == "float32" else x.astype(np_dtype(dtype))


def to_torch(a):
    """A torch tensor sharing `a`'s memory (bfloat16 through a uint16 view)."""
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_numpy(x):
    """Any result (NumPy array, torch tensor, tuple of them) as float64 NumPy data."""
    if isinstance(x, (tuple, list)):
        return type(x)(to_numpy(v) for v in x)
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().to("cpu").double().numpy()
    return np.asarray(x).astype(np.float64)


def close_enough(a, b, tol, scale=None):
    """None when a and b agree within tol * scale, else a message saying by how much.

    scale defaults to max(1, max|b|). Tuples (e.g. gradients) are compared element by
    element. A differing NaN pattern or shape is always a mismatch.
    """
    a, b = to_numpy(a), to_numpy(b)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if not isinstance(a, (tuple, list)) or not isinstance(b, (tuple, list)) or len(a) != len(b):
            return "result structure differs"
        for i, (x, y) in enumerate(zip(a, b)):
            msg = close_enough(x, y, tol, scale)
            if msg:
                return f"[{i}] {msg}"
        return None
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    if (np.isnan(a) != np.isnan(b)).any():
        return "NaN pattern differs"
    s = scale if scale is not None else max(1.0, float(np.nanmax(np.abs(b))) if b.size else 1.0)
    err = float(np.nanmax(np.abs(a - b))) if a.size else 0.0
    return None if err <= tol * s else f"max error {err:.3e} > {tol * s:.3e}"


def checker(dtype):
    """A Case.check function with the tolerance of `dtype`."""
    tol = TOL[dtype]
    return lambda x, ref: close_enough(x, ref, tol)


def find_api(module: str, attr: Optional[str] = None):
    """The object `module.attr` (or the module) if it imports, else None. Never raises."""
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    if attr is None:
        return mod
    return getattr(mod, attr, None)


def shape_label(b, h, sq, sk, d, hkv=None):
    """'B1 H32 Hkv8 Sq1 Sk4096 D128' style label; Sq/Sk collapse to S when equal."""
    heads = f"H{h}" + (f" Hkv{hkv}" if hkv and hkv != h else "")
    seq = f"S{sq}" if sq == sk else f"Sq{sq} Sk{sk}"
    return f"B{b} {heads} {seq} D{d}"
