"""Device-neutral array descriptors: what the front end checks and the backends are handed.

An :class:`Arr` is an array as the kernels see it: a data pointer, a shape, strides in
elements, a dtype name, writeability, and the object it came from (kept alive for the call).
NumPy arrays (the CPU backend) and CUDA device arrays (the CUDA backend: torch, CuPy,
``__cuda_array_interface__``, DLPack) are described the same way, so the argument checks,
option resolution and canonical (B, H, S, D) views of the front end (``_attention.py``,
``_softmax.py``, ``_matmul.py``) are written once for both. Views (transpose, broadcast,
inserted unit dims) change shape and strides only; nothing here copies or touches data.
See docs/ARCHITECTURE.md, "Python front end and backends".
"""
import math
import numbers
import sys

import numpy as np

from . import _C

_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13

FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
CODE_DTYPES = ("int8", "float8_e4m3fn")  # 8-bit KV-cache storage (with per-row scales)
_ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "bool": 1, "int32": 4,
             "int64": 8, "int8": 1, "uint8": 1, "int16": 2, "float8_e4m3fn": 1}


class Arr:
    """An array as the kernels see it (pointer, shape, strides in elements, dtype name).

    ``kind`` is ``"numpy"`` for host arrays, else the device producer (``"torch"``, ``"cupy"``,
    ``"cai"``, ``"dlpack"``). ``obj`` is the described object (for numpy: the array itself);
    ``stream``/``keep`` are the CUDA producer stream and a DLPack capsule kept alive.
    """

    __slots__ = ("obj", "kind", "ptr", "shape", "strides", "dtype", "device", "writeable",
                 "stream", "keep")

    def __init__(self, obj, kind, ptr, shape, strides, dtype, device, writeable, stream=None,
                 keep=None):
        # shape / strides: tuples of Python ints (callers convert torch.Size, lists, ...): this
        # runs several times per call, so it converts nothing itself.
        self.obj, self.kind, self.ptr = obj, kind, ptr
        self.shape, self.strides = shape, strides
        self.dtype, self.device, self.writeable = dtype, device, writeable
        self.stream, self.keep = stream, keep

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def itemsize(self):
        return _ITEMSIZE.get(self.dtype, 1)

    @property
    def on_device(self):
        return self.kind != "numpy"

    def desc(self):
        """The raw descriptor both bindings read (csrc/bindings/tensor.h)."""
        return (self.ptr, self.shape, self.strides, self.dtype, self.writeable)

    def view(self, shape, strides):
        return Arr(self.obj, self.kind, self.ptr, tuple(shape), tuple(strides), self.dtype,
                   self.device, self.writeable, self.stream, self.keep)

    def transpose(self, *perm):
        shape, strides = self.shape, self.strides
        return Arr(self.obj, self.kind, self.ptr, tuple([shape[p] for p in perm]),
                   tuple([strides[p] for p in perm]), self.dtype, self.device, self.writeable,
                   self.stream, self.keep)

    def swap_seq_heads(self):
        """(B, S, H, D) <-> (B, H, S, D) of a 4-D array: transpose(0, 2, 1, 3), on every
        attention call with layout="bshd", so spelled out."""
        (b, s, h, d), (tb, ts, th, td) = self.shape, self.strides
        return Arr(self.obj, self.kind, self.ptr, (b, h, s, d), (tb, th, ts, td), self.dtype,
                   self.device, self.writeable, self.stream, self.keep)

    def expand_dims(self, axis):
        shape, strides = list(self.shape), list(self.strides)
        shape.insert(axis, 1)
        strides.insert(axis, 0)
        return self.view(shape, strides)

    def broadcast_to(self, shape):
        """numpy.broadcast_to as a view (stride 0 on broadcast dims); ValueError if impossible."""
        shape = tuple(shape)
        if len(shape) < self.ndim:
            raise ValueError("cannot broadcast to fewer dims")
        pad = len(shape) - self.ndim
        src_shape = (1,) * pad + self.shape
        src_strides = (0,) * pad + self.strides
        strides = []
        for n, s, st in zip(shape, src_shape, src_strides):
            if s == n:
                strides.append(st if n > 1 else 0)
            elif s == 1:
                strides.append(0)
            else:
                raise ValueError(f"cannot broadcast {self.shape} to {shape}")
        return self.view(shape, strides)

    def last_dim_contiguous(self):
        """The kernels need unit stride along the last dim (or a last dim of 1, or no data)."""
        return self.ndim == 0 or self.shape[-1] <= 1 or self.strides[-1] == 1 or self.size == 0


def host(a, fn, name):
    """Describe a numpy array (TypeError naming ``fn`` and ``name`` for anything else)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray, got {type(a).__name__}")
    ptr, shape, strides, dt, writeable = _C._describe(a)
    if strides is None:
        raise ValueError(f"{fn}: {name} has a stride that is not a multiple of its item size; "
                         f"pass np.ascontiguousarray({name})")
    if ptr % a.itemsize and a.size:
        raise ValueError(f"{fn}: {name} is not aligned to its item size; pass "
                         f"np.ascontiguousarray({name})")
    return Arr(a, "numpy", ptr, shape, strides, dt, None, writeable)


def is_device_array(obj):
    """True if ``obj`` is an array in CUDA device memory that attnkit's CUDA kernels accept.

    That is a CUDA ``torch.Tensor``, a ``cupy.ndarray``, an object exposing
    ``__cuda_array_interface__``, or a ``__dlpack__`` object whose ``__dlpack_device__`` is a
    CUDA device. Cheap and never raises (NumPy arrays and scalars return False at once), so
    every public function can call it first.
    """
    if type(obj) is np.ndarray or obj is None or isinstance(
            obj, (numbers.Number, str, list, tuple, np.generic, np.ndarray)):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return bool(obj.is_cuda)
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(obj, cupy.ndarray):
        return True
    try:
        if getattr(obj, "__cuda_array_interface__", None) is not None:
            return True
    except Exception:  # a property that refuses (e.g. a host tensor) means "not on a device"
        return False
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        try:
            return obj.__dlpack_device__()[0] in (_KDL_CUDA, _KDL_CUDA_MANAGED)
        except Exception:
            return False
    return False
