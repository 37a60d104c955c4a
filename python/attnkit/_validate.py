"""Argument checks shared by the NumPy API (the C++ binding re-checks what memory safety needs)."""
import numpy as np


def check_array(x, fn, name):
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray, got {type(x).__name__}")


def check_out(out, fn):
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: out must be a numpy.ndarray or None, got {type(out).__name__}")
    if not out.flags.writeable:
        raise ValueError(f"{fn}: out is read-only")
