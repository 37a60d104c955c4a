"""The device-neutral front end: one place for argument checks and option resolution.

Every public function (``attnkit.softmax``, ``matmul``, ``attention``, ``attention_varlen``,
``attention_with_kvcache``, ``attention_backward``) opens a :class:`Call` on its first array,
which picks the backend -- CPU (``_cpu_backend``, NumPy arrays, the ``_C`` module) or CUDA
(``_cuda_backend``, device arrays, the optional ``_cuda`` module) -- describes every array as
an :class:`~attnkit._arrays.Arr`, and then runs the checks below, which are the same for both
devices (same conditions, same messages). Only when everything has passed does it hand the
canonical views to the backend; backends never import this module (docs/ARCHITECTURE.md).
"""
import math
import numbers

import numpy as np

from . import _cpu_backend, _cuda_backend
from ._arrays import FLOAT_DTYPES, Arr, host, is_device_array


class Call:
    """One public call: its function name, its backend and every array it has described."""

    __slots__ = ("fn", "backend", "device", "stream", "arrays", "first")

    def __init__(self, fn, first, first_name):
        self.fn = fn
        self.backend = _cuda_backend if is_device_array(first) else _cpu_backend
        self.device, self.stream, self.arrays = None, 0, []
        self.first = self.backend.begin(self, first, first_name)
        self.arrays.append(self.first)

    def arg(self, obj, name):
        """Describe another array argument; it must live where the first one does."""
        d = self.backend.describe(self, obj, name)
        self.arrays.append(d)
        return d

    def contiguous(self, d, name):
        """d, or a copy with a unit-stride last dim (q/k/v only; documented copies)."""
        return d if d.last_dim_contiguous() else self.backend.contiguous(self, d, name)

    def empty(self, shape, dtype, like=None):
        """A new result array (obj, Arr) of this call's kind."""
        obj, d = self.backend.empty(self, tuple(int(s) for s in shape), dtype, like)
        return obj, d

    def result(self, out, shape, dtype, like, source="q"):
        """Allocate the result, or check a given ``out=``: kind, shape, dtype, writeable."""
        if out is None:
            return self.empty(shape, dtype, like)
        d = self.arg(out, "out")  # TypeError if out is not an array of this call's kind
        if d.shape != tuple(shape):
            raise ValueError(f"{self.fn}: out has shape {d.shape} but the result has {tuple(shape)}")
        if d.dtype != dtype:
            raise TypeError(f"{self.fn}: out has dtype {d.dtype} but {source} has {dtype}")
        if not d.writeable:
            raise ValueError(f"{self.fn}: out is read-only")
        return out, d

    def index(self, a, name, ndim, *, to_host):
        """An int32/int64 index array: numpy -> int64 numpy; a device array -> checked on the
        device (an Arr) or, with ``to_host``, copied to the host."""
        fn = self.fn
        if is_device_array(a):
            d = self.backend.device_index(self, a, name)
            if d.dtype not in ("int32", "int64"):
                raise TypeError(f"{fn}: {name} must be int32 or int64, got {d.dtype}")
            if d.ndim != ndim:
                raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {d.shape}")
            if not to_host:
                return d
            a = self.backend.to_host(self, d)
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{fn}: {name} must be a numpy.ndarray"
                            f"{' or a device array' if self.backend.on_device else ''}, "
                            f"got {type(a).__name__}")
        if a.dtype not in (np.int32, np.int64):
            raise TypeError(f"{fn}: {name} must be int32 or int64, got {a.dtype}")
        if a.ndim != ndim:
            raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {a.shape}")
        return np.ascontiguousarray(a, dtype=np.int64)


# ---- dtypes ----

def check_float(d, fn, name):
    if d.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} has dtype {d.dtype}; expected float32, float64, float16 "
                        "or bfloat16")


def check_qkv_dtypes(q, k, v, fn):
    check_float(q, fn, "q")
    if k.dtype != v.dtype:
        raise TypeError(f"{fn}: k has dtype {k.dtype} but v has {v.dtype}")
    if not (k.dtype == q.dtype or (q.dtype == "float32" and k.dtype in ("float16", "bfloat16"))):
        raise TypeError(f"{fn}: q has dtype {q.dtype} but k/v have {k.dtype}; k/v must have q's "
                        "dtype, or be float16/bfloat16 when q is float32")


# ---- scalar options ----

def check_bool(x, fn, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(x).__name__}")
    return bool(x)


def resolve_scale(scale, head_dim, fn):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return scale


def resolve_softcap(softcap, fn):
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{fn}: softcap must be a real number or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"{fn}: softcap must be a finite number >= 0 (0 or None: off), got {softcap}")
    return softcap


# A window entry this large bounds nothing any array in memory could hold: it means -1
# (unbounded), so no index arithmetic in the kernels can overflow (the bindings do the same).
UNBOUNDED_WINDOW = 1 << 40


def window_entry(w):
    """One checked window entry as the kernels take it (-1 for anything unbounded)."""
    return -1 if w > UNBOUNDED_WINDOW else int(w)


def resolve_window(window, fn):
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{fn}: window must be a (left, right) pair of ints, got {window!r}")
    out = []
    for w in window:
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"{fn}: window entries must be ints (-1 = unbounded), got {window!r}")
        if w < -1:
            raise ValueError(f"{fn}: window entries must be >= -1 (-1 = unbounded), got {window!r}")
        out.append(window_entry(w))
    return out[0], out[1]


def resolve_align(causal_align, fn):
    if causal_align not in ("top_left", "bottom_right"):
        raise ValueError(f"{fn}: causal_align must be 'top_left' or 'bottom_right', got "
                         f"{causal_align!r}")
    return causal_align == "bottom_right"


def resolve_dropout(dropout_p, dropout_seed, fn):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{fn}: dropout_p must be a float, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral):
        raise TypeError(f"{fn}: dropout_seed must be an int, got {type(dropout_seed).__name__}")
    return dropout_p, int(dropout_seed) & (2**64 - 1)


class Options:
    """Resolved scalar options of an attention call (what both bindings take)."""

    __slots__ = ("batch", "scale", "softcap", "causal", "bottom_right", "wl", "wr", "dropout_p",
                 "seed")

    def __init__(self, fn, batch, head_dim, *, causal, causal_align, scale, window, softcap,
                 dropout_p=0.0, dropout_seed=0):
        self.batch = batch
        self.causal = check_bool(causal, fn, "causal")
        self.bottom_right = resolve_align(causal_align, fn)
        self.scale = resolve_scale(scale, head_dim, fn)
        self.softcap = resolve_softcap(softcap, fn)
        self.wl, self.wr = resolve_window(window, fn)
        self.dropout_p, self.seed = resolve_dropout(dropout_p, dropout_seed, fn)


# ---- array options ----

def resolve_alibi(call, alibi_slopes, batch, heads):
    """ALiBi slopes as a float32 (B, H) view: host slopes (numpy, also with device q: uploaded
    by the binding) are checked for finiteness here; device slopes are converted to float32."""
    fn = call.fn
    if alibi_slopes is None:
        return None
    if is_device_array(alibi_slopes):
        d = call.backend.device_alibi(call, alibi_slopes)
    else:
        if not isinstance(alibi_slopes, np.ndarray):
            raise TypeError(f"{fn}: alibi_slopes must be a numpy.ndarray, got "
                            f"{type(alibi_slopes).__name__}")
        a = alibi_slopes
        if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
            raise TypeError(f"{fn}: alibi_slopes must be a float array, got {a.dtype}")
        if a.shape not in ((heads,), (batch, heads)):
            raise ValueError(f"{fn}: alibi_slopes has shape {a.shape}; expected ({heads},) or "
                             f"({batch}, {heads})")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{fn}: alibi_slopes must be finite")
        d = host(a, fn, "alibi_slopes")
    if d.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: alibi_slopes must be a float array, got {d.dtype}")
    if d.shape == (heads,):
        d = d.expand_dims(0)
    elif d.shape != (batch, heads):
        raise ValueError(f"{fn}: alibi_slopes has shape {d.shape}; expected ({heads},) or "
                         f"({batch}, {heads})")
    return d.broadcast_to((batch, heads))


def resolve_mask(call, mask, shape):
    """A bool/float mask broadcast to (B, H, Sq, Sk) as a view (stride 0 where broadcast)."""
    if mask is None:
        return None
    fn = call.fn
    d = call.arg(mask, "mask")
    if d.dtype != "bool" and d.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: mask must be bool (True = attend) or float (added), got {d.dtype}")
    if d.ndim > 4:
        raise ValueError(f"{fn}: mask has {d.ndim} dims; it must broadcast to (B, H, Sq, Sk) = {shape}")
    try:
        return d.broadcast_to(shape)
    except ValueError:
        raise ValueError(f"{fn}: mask of shape {d.shape} does not broadcast to (B, H, Sq, Sk) = "
                         f"{shape}") from None


# ---- shapes ----

def check_attention_shapes(fn, layout, q, k, v, qc, kc, vc):
    """Shape checks of attention's q/k/v: ``q`` etc. as passed (for messages), ``qc`` etc. their
    canonical (B, H, S, D) views (Arr descriptors, or torch tensors for the ring). Returns
    (B, H, Sq, D, Hkv, Sk, Dv)."""
    B, H, Sq, D = qc.shape
    Bk, Hkv, Sk, Dk = kc.shape
    Dv = vc.shape[3]
    names = "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"
    if Bk != B or vc.shape[0] != B:
        raise ValueError(f"{fn}: q, k and v must have the same batch size, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if Dk != D:
        raise ValueError(f"{fn}: k has head_dim {Dk} but q has {D}")
    if vc.shape[1] != Hkv or vc.shape[2] != Sk:
        raise ValueError(f"{fn}: v has shape {tuple(v.shape)} but k has {tuple(k.shape)}; {names} "
                         "must agree but for D")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: q has {H} heads, which is not a multiple of k/v's {Hkv} "
                         "(GQA needs H % Hkv == 0)")
    if D == 0 or Dv == 0:
        raise ValueError(f"{fn}: head dims must be at least 1, got D={D}, Dv={Dv}")
    return B, H, Sq, D, Hkv, Sk, Dv


def check_varlen(fn, q, k, v, cu_q, cu_k):
    """attention_varlen's packed shapes against its int64 prefix sums. Returns
    (batch, total_q, H, D, Dv)."""
    if cu_q.shape != cu_k.shape or cu_q.shape[0] < 1:
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length >= 1, "
                         f"got {cu_q.shape[0]} and {cu_k.shape[0]}")
    for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])):
        if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] != total:
            raise ValueError(f"{fn}: {name} must be non-decreasing from 0 to the token count "
                             f"{total}, got {cu.tolist() if cu.size < 20 else cu}")
    Tq, H, D = q.shape
    Tk, Hkv, Dk = k.shape
    Dv = v.shape[2]
    if Dk != D:
        raise ValueError(f"{fn}: k has head_dim {Dk} but q has {D}")
    if tuple(v.shape[:2]) != tuple(k.shape[:2]):
        raise ValueError(f"{fn}: v has shape {v.shape} but k has {k.shape}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: q has {H} heads, which is not a multiple of k/v's {Hkv}")
    if D == 0 or Dv == 0:
        raise ValueError(f"{fn}: head dims must be at least 1")
    return cu_q.shape[0] - 1, Tq, H, D, Dv


def check_out_rows(d, fn):
    """Kernels write each output row with unit stride along the last dim."""
    if not d.last_dim_contiguous():
        raise ValueError(f"{fn}: out must be contiguous along its last dim")


__all__ = ["Arr", "Call", "Options", "check_attention_shapes", "check_bool", "check_float",
           "check_out_rows", "check_qkv_dtypes", "check_varlen", "resolve_alibi", "resolve_mask"]
