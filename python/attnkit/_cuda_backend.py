"""CUDA backend: device arrays, the optional ``_cuda`` module.

The public functions send device arrays here through the front end (``_front.py``), which
has already checked every argument exactly as for NumPy arrays; this module describes device
arrays, picks the device and stream, allocates results and calls the binding. Nothing here
imports the front end.

* Accepted arrays: ``torch.Tensor`` on a CUDA device, ``cupy.ndarray``, any object with
  ``__cuda_array_interface__`` (v2/v3), and any object with ``__dlpack__`` /
  ``__dlpack_device__`` on a CUDA device. Inputs are read in place (any strides; stride-0
  broadcasting, transposed and sliced views included); nothing is copied except: attention
  q/k/v whose head dim is not contiguous (torch / CuPy arrays are copied; KV caches never are,
  they raise), and small host index arrays and ALiBi slopes, which are uploaded.
* dtypes: float16 / bfloat16 attention and matmul run on tensor cores (fp32 accumulation);
  float32 (also q float32 with float16/bfloat16 k/v) and float64 run FMA kernels (no TF32).
  Head dims up to 256. Compute capability 8.0+ (Ampere, Ada, Hopper).
* Stream: kernels are queued on the caller's current stream and never synchronize: torch's
  ``torch.cuda.current_stream(device)`` for torch tensors, CuPy's current stream for CuPy
  arrays, the producer's stream for ``__cuda_array_interface__`` objects that name one, else
  the legacy default stream (also the stream DLPack producers are asked to order against).
  Other arrays' CAI streams are waited for with an event. Exceptions: ``attention_varlen``
  with device ``cu_seqlens`` copies them to the host (one synchronization: the launch needs
  the longest sequence).
* Results: arrays of the same kind as the first input -- torch tensors for torch, CuPy arrays
  for CuPy; for other producers, torch if it has CUDA, else CuPy, else pass ``out=``. ``out=``
  works with every kind. Results do not track autograd (see ``attnkit.torch`` for that).
* Device: the kernels run on the first input's device; every other array must be on it.
* Determinism: every kernel reduces in a fixed order chosen from the shapes (and host-known
  cache lengths) only, so the same inputs give bit-identical results on every run.

Numerics and masking follow the NumPy API exactly, except: device-resident ``cache_seqlens``
/ ``block_table`` are checked on the device (raising would need a synchronization), so an
invalid entry makes that batch entry's output and lse NaN instead of raising, and split-KV then
sizes its splits from the cache capacity rather than the lengths; and device ALiBi slopes are
not checked for finiteness.
"""
import math
import sys

import numpy as np

from ._arrays import _KDL_CUDA, _KDL_CUDA_MANAGED, Arr

name = "cuda"
on_device = True

_module_cache = None  # the compiled module, imported on first use (tests may substitute another)


def _module():
    global _module_cache
    if _module_cache is None:
        try:
            from . import _cuda
        except ImportError:
            raise RuntimeError(
                "attnkit: this build has no CUDA support; reinstall with "
                "`pip install . -Ccmake.define.ATTNKIT_CUDA=ON` (or ATTNKIT_CUDA=ON) to use device arrays"
            ) from None
        if _cuda.device_count() == 0:
            raise RuntimeError("attnkit: device arrays given, but no CUDA device is available")
        _module_cache = _cuda
    return _module_cache


def _torch():
    return sys.modules.get("torch")


def _cupy():
    return sys.modules.get("cupy")


def _import(mod_name):
    mod = sys.modules.get(mod_name)
    if mod is None:
        try:
            mod = __import__(mod_name)
        except ImportError:
            mod = None
    return mod


def _cai_dtype(typestr, fn, arg):
    try:
        dt = np.dtype(typestr)
    except TypeError:
        raise TypeError(f"{fn}: {arg} has an unsupported __cuda_array_interface__ typestr {typestr!r}") from None
    return dt.name, dt.itemsize


def _describe(obj, fn, arg, stream=None):
    """Arr for a device array, or TypeError naming the argument."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        if not obj.is_cuda:
            raise TypeError(f"{fn}: {arg} must be a CUDA device array like the other arrays, "
                            f"got a tensor on {obj.device}")
        dt = str(obj.dtype).replace("torch.", "")
        return Arr(obj, "torch", obj.data_ptr(), tuple(obj.shape), tuple(obj.stride()), dt,
                   obj.device.index, True)
    cai = None
    try:
        cai = getattr(obj, "__cuda_array_interface__", None)
    except Exception:
        cai = None
    if cai is not None:
        ptr, readonly = cai["data"]
        dt, isz = _cai_dtype(cai["typestr"], fn, arg)
        shape = tuple(cai["shape"])
        if cai.get("mask") is not None:
            raise ValueError(f"{fn}: {arg} is a masked __cuda_array_interface__ array, which is not supported")
        if cai.get("strides") is None:
            strides, acc = [], 1
            for n in reversed(shape):
                strides.append(acc)
                acc *= n
            strides = tuple(reversed(strides))
        else:
            strides = []
            for sb in cai["strides"]:
                if sb % isz:
                    raise ValueError(f"{fn}: {arg} has a stride of {sb} bytes, not a multiple of its item size")
                strides.append(sb // isz)
        cupy = _cupy()
        if cupy is not None and isinstance(obj, cupy.ndarray):
            kind, device = "cupy", obj.device.id
        else:
            kind = "cai"
            device = _module().pointer_device(ptr) if ptr and math.prod(shape) else -1
        return Arr(obj, kind, int(ptr), tuple(int(n) for n in shape), tuple(int(st) for st in strides),
                   dt, device, not readonly, cai.get("stream"))
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        try:
            dev_type = obj.__dlpack_device__()[0]
        except Exception:
            dev_type = -1
        if dev_type in (_KDL_CUDA, _KDL_CUDA_MANAGED):
            dl_stream = 1 if not stream else stream  # 0 is not a valid DLPack stream: 1 = legacy default
            try:
                cap = obj.__dlpack__(stream=dl_stream)
            except TypeError:
                cap = obj.__dlpack__()
            ptr, shape, strides, dt, writeable, _, dev = _module().dlpack_describe(cap)
            return Arr(obj, "dlpack", int(ptr), tuple(shape), tuple(strides), dt,
                       int(dev) if dev_type == _KDL_CUDA else -1, writeable, keep=cap)
    raise TypeError(
        f"{fn}: {arg} must be a CUDA device array (a CUDA torch.Tensor, cupy.ndarray, or an object "
        f"with __cuda_array_interface__ or __dlpack__) like the other arrays, got {type(obj).__name__}"
    )


def _call_stream(d):
    """The stream the call runs on (an int handle; 0 = legacy default)."""
    if d.kind == "torch":
        return _torch().cuda.current_stream(d.device).cuda_stream
    if d.kind == "cupy":
        cupy = _cupy()
        with cupy.cuda.Device(d.device):
            return cupy.cuda.get_current_stream().ptr
    if d.kind == "cai" and d.stream is not None:
        return int(d.stream)
    return 0


def _device_of(d, fn):
    if d.device is None or d.device < 0:
        if d.size == 0 or d.device == -2:  # empty, or managed memory: run on the current device
            return 0
        raise ValueError(f"{fn}: cannot tell which CUDA device holds the inputs")
    return d.device


def _waits(call):
    """CAI producer streams (other than the call's) the call must wait for."""
    out = []
    for d in call.arrays:
        if d is not None and d.kind in ("cai", "cupy") and d.stream is not None and int(d.stream) != call.stream:
            out.append(int(d.stream))
    return out


def _empty(like, shape, dtype, device, fn):
    """A new device array of like's kind (torch / CuPy; other producers: torch, else CuPy)."""
    if like.kind != "cupy":
        torch = _torch() if like.kind == "torch" else _import("torch")
        if torch is not None and (like.kind == "torch" or torch.cuda.is_available()):
            return torch.empty(shape, dtype=getattr(torch, dtype), device=torch.device("cuda", device))
    cupy = _import("cupy")
    if cupy is not None and dtype != "bfloat16":
        with cupy.cuda.Device(device):
            return cupy.empty(shape, dtype=np.dtype(dtype))
    raise TypeError(f"{fn}: cannot allocate a {dtype} result for {type(like.obj).__name__} inputs; pass out=")


# ---- the backend interface (see _cpu_backend.py for the same functions on the CPU) ----

def begin(call, obj, arg):
    d = _describe(obj, call.fn, arg)
    call.device = _device_of(d, call.fn)
    call.stream = _call_stream(d)
    return d


def describe(call, obj, arg):
    return _describe(obj, call.fn, arg, call.stream)


def empty(call, shape, dtype, like):
    obj = _empty(call.first, shape, dtype, call.device, call.fn)
    d = _describe(obj, call.fn, "out", call.stream)
    call.arrays.append(d)
    return obj, d


def contiguous(call, d, arg):
    """A copy with a unit-stride last dim: torch / CuPy arrays only (documented)."""
    c = None
    if d.kind == "torch" and d.obj.dim() == d.ndim and tuple(d.obj.shape) == d.shape:
        c = d.obj.contiguous()
    elif d.kind == "cupy" and d.obj.shape == d.shape:
        c = _cupy().ascontiguousarray(d.obj)
    if c is None:
        raise ValueError(f"{call.fn}: {arg} must be contiguous along its last dim")
    return _describe(c, call.fn, arg, call.stream)


def device_index(call, obj, arg):
    return describe(call, obj, arg)


def device_alibi(call, obj):
    """Device ALiBi slopes as float32 (torch / CuPy arrays of other float dtypes are converted)."""
    d = describe(call, obj, "alibi_slopes")
    if d.dtype in ("float64", "float16", "bfloat16"):
        if d.kind == "torch":
            d = _describe(d.obj.float(), call.fn, "alibi_slopes")
        elif d.kind == "cupy":
            d = _describe(d.obj.astype(np.float32), call.fn, "alibi_slopes")
        else:
            raise TypeError(f"{call.fn}: device alibi_slopes must be float32, got {d.dtype}")
        call.arrays.append(d)
    return d


def to_host(call, d):
    return _module().to_host(d.desc(), call.device, call.stream)


def _desc(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.desc()


def softmax(call, x, out, axis, allocated=False):
    _module().softmax(x.desc(), out.desc(), int(axis), call.device, call.stream, _waits(call))


def matmul(call, a, b, out):
    _module().matmul(a.desc(), b.desc(), out.desc(), call.device, call.stream, _waits(call))


def _host_alibi(alibi):
    """Host ALiBi slopes as the numpy array the binding uploads (broadcast to their shape)."""
    if alibi is not None and alibi.kind == "numpy":
        return alibi.obj if alibi.shape == alibi.obj.shape else np.broadcast_to(alibi.obj, alibi.shape)
    return alibi


def attention(call, q, k, v, out, lse, mask, alibi, cu_q, cu_k, seqlens, table, k_new, v_new, o,
              k_scale=None, v_scale=None):
    if o.dropout_p:
        raise NotImplementedError(f"{call.fn}: dropout is not implemented for device arrays")
    alibi = _host_alibi(alibi)
    _module().attention(call.fn, q.desc(), k.desc(), v.desc(), out.desc(), _desc(lse), _desc(mask),
                        _desc(alibi), cu_q, cu_k, _desc(seqlens), _desc(table), _desc(k_new),
                        _desc(v_new), o.batch, o.scale, o.softcap, o.causal, o.bottom_right, o.wl,
                        o.wr, call.device, call.stream, _waits(call),
                        **({} if k_scale is None else dict(k_scale=k_scale.desc(), v_scale=v_scale.desc())))


def quantize_kv(call, x, q, scale):
    """Codes and per-row scales of the device array x (results allocated by the front end)."""
    _module().quantize_kv(x.desc(), q.desc(), scale.desc(), call.device, call.stream, _waits(call))


def merge_attention_states(call, outs, lses, out, lse):
    """CUDA torch tensors: merged by torch ops on their device and the current stream
    (attnkit._torch_merge._merge_math, the CPU kernel's semantics); there is no CUDA kernel for it."""
    if any(d.kind != "torch" for d in (outs, lses, out, lse)):
        raise NotImplementedError(f"{call.fn}: on a GPU only torch tensors are merged (by torch on "
                                  "the device; there is no CUDA kernel); convert with "
                                  "torch.from_dlpack")
    from ._torch_merge import _merge_math

    o, l = _merge_math(outs.obj, lses.obj)
    out.obj.copy_(o)
    lse.obj.copy_(l)


def attention_backward(call, dout, q, k, v, out, lse, dq, dk, dv, mask, alibi, o):
    """Gradients on the device (csrc/cuda/attention_bwd.cu): float16/bfloat16, head dims up to
    128, no dropout; off unless ATTNKIT_CUDA_BACKWARD=1 (it has run only on the emulator)."""
    if o.dropout_p:
        raise NotImplementedError(f"{call.fn}: dropout is not implemented for device arrays")
    alibi = _host_alibi(alibi)
    _module().attention_backward(dout.desc(), q.desc(), k.desc(), v.desc(), out.desc(), lse.desc(),
                                 dq.desc(), dk.desc(), dv.desc(), _desc(mask), _desc(alibi), o.batch,
                                 o.scale, o.softcap, o.causal, o.bottom_right, o.wl, o.wr, o.dropout_p,
                                 call.device, call.stream, _waits(call))


__all__ = ["begin", "describe", "empty", "contiguous", "softmax", "matmul", "attention"]
