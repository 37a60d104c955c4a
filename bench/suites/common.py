"""Helpers shared by the suites."""
import numpy as np


def torch_or_none():
    try:
        import torch

        return torch
    except ImportError:
        return None


def close_enough(a, b, tol, scale=None):
    """None when a and b agree within tol * scale (scale defaults to max|b|, at least 1)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    if np.isnan(a).any() != np.isnan(b).any():
        return "NaN pattern differs"
    s = scale if scale is not None else max(1.0, float(np.nanmax(np.abs(b))) if b.size else 1.0)
    err = float(np.nanmax(np.abs(a - b))) if a.size else 0.0
    return None if err <= tol * s else f"max error {err:.3e} > {tol * s:.3e}"
