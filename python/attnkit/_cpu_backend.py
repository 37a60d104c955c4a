"""CPU backend: NumPy arrays, the ``_C`` module (SIMD + OpenMP kernels).

The front end (``_front.py``) has checked every argument and built canonical views before any
function here runs; these only allocate results and call the binding, which re-checks what
memory safety needs (docs/ARCHITECTURE.md). Nothing here imports the front end.
"""
import numpy as np

from . import _C, _alloc
from ._arrays import host

name = "cpu"
on_device = False


def begin(call, obj, arg):
    """Describe the first array of a call (sets nothing else: CPU calls have no stream)."""
    return host(obj, call.fn, arg)


def describe(call, obj, arg):
    return host(obj, call.fn, arg)


def _np_dtype(dtype, like):
    if like is not None and like.kind == "numpy" and like.dtype == dtype:
        return like.obj.dtype  # keeps extension dtypes (ml_dtypes.bfloat16)
    if dtype in ("float8_e4m3fn", "bfloat16"):
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(f"attnkit: {dtype} NumPy arrays need the ml_dtypes package "
                            "(pip install ml_dtypes)") from None
        return np.dtype(getattr(ml_dtypes, dtype))
    return np.dtype(dtype)


def empty(call, shape, dtype, like):
    a = _alloc.empty(shape, _np_dtype(dtype, like))
    return a, host(a, call.fn, "out")


def contiguous(call, d, arg):
    """A copy of d's array with a unit-stride last dim (d must be an undoctored description)."""
    return host(np.ascontiguousarray(d.obj), call.fn, arg)


def device_index(call, obj, arg):
    raise TypeError(f"{call.fn}: {arg} must be a numpy.ndarray like q, got {type(obj).__name__}")


device_alibi = device_index


def to_host(call, d):
    return d.obj


def _desc(d):
    return None if d is None else d.desc()


def softmax(call, x, out, axis, allocated=False):
    """allocated: out is the result array the front end just made (not the caller's out=)."""
    _C.softmax(x.desc(), out.desc(), int(axis), allocated and _alloc.is_fresh(out.obj))


def matmul(call, a, b, out):
    _C.matmul(a.desc(), b.desc(), out.desc())


def matmul_matrices(a, b, out=None):
    """a @ b for two NumPy matrices (and out, if given) whose dtypes and shapes the front end
    has matched; the binding reads the arrays themselves and checks the rest."""
    if out is None:
        out = _alloc.empty((a.shape[0], b.shape[1]), a.dtype)
    _C.matmul(a, b, out)
    return out


def attention(call, q, k, v, out, lse, mask, alibi, cu_q, cu_k, seqlens, table, k_new, v_new, o,
              k_scale=None, v_scale=None):
    """One attention forward; with k_new/v_new the binding appends them to the caches k/v
    after its own checks (so a refused call never writes the cache). 8-bit caches come with
    their (B|pages, Hkv, S) float32 scales."""
    # Every argument positional: pybind11 matches keyword arguments by name, which was about
    # a tenth of a short decode call (bench/notes/decode.md, "fixed cost of a short decode call").
    _C.attention(q.desc(), k.desc(), v.desc(), out.desc(), _desc(lse), _desc(mask), _desc(alibi),
                 cu_q, cu_k, seqlens, table, o.batch, o.scale, o.softcap, o.causal,
                 o.bottom_right, o.wl, o.wr, o.dropout_p, o.seed, 0, 0, _desc(k_new),
                 _desc(v_new), call.fn, _desc(k_scale), _desc(v_scale))


def quantize_kv(call, x, q, scale):
    """Codes and per-row scales of x's rows into q and scale (allocated by the front end)."""
    _C.quantize_kv(x.desc(), q.desc(), scale.desc(), fn=call.fn)


def merge_attention_states(call, outs, lses, out, lse):
    """Partial attention states merged through their lse (csrc/cpu/merge.cpp)."""
    _C.merge_attention_states(outs.desc(), lses.desc(), out.desc(), lse.desc(), 0, fn=call.fn)


def attention_backward(call, dout, q, k, v, out, lse, dq, dk, dv, mask, alibi, o):
    _C.attention_backward(dout.desc(), q.desc(), k.desc(), v.desc(), out.desc(), lse.desc(),
                          dq.desc(), dk.desc(), dv.desc(), _desc(mask), _desc(alibi), None, None,
                          o.batch, o.scale, o.softcap, o.causal, o.bottom_right, o.wl, o.wr,
                          o.dropout_p, o.seed, 0)


def dropout_mask(out, p, seed, heads):
    _C.dropout_mask(out, p, seed, 0, heads)
