"""Device-array front end of attnkit's CUDA kernels (the optional ``attnkit._cuda`` module).

The public functions (``attnkit.softmax``, ``matmul``, ``attention``, ``attention_varlen``,
``attention_with_kvcache``) send device arrays here (``is_device_array``); this module gives
them the semantics and error messages of the NumPy API, zero-copy:

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
* Determinism: every kernel reduces in a fixed order chosen from the shapes only, so the same
  inputs give bit-identical results on every run.

Numerics and masking follow the NumPy API (``attnkit.attention``) exactly, except:
device-resident ``cache_seqlens`` / ``block_table`` are checked on the device (raising would
need a synchronization), so an invalid entry makes that batch entry's output and lse NaN
instead of raising; and device ALiBi slopes are not checked for finiteness.
"""
import math
import numbers
import sys

import numpy as np

# The module, not its names: _attention.py imports this module for its dispatch line, so at
# that point it may be only partly initialized; its helpers are looked up at call time.
from . import _attention as _att

__all__ = ["is_device_array", "softmax", "matmul", "attention", "attention_varlen",
           "attention_with_kvcache"]

_backend = None  # the compiled module, imported on first use (tests may substitute another)
_FLOAT = ("float32", "float64", "float16", "bfloat16")
_KDL_CUDA, _KDL_CUDA_MANAGED = 2, 13


def _module():
    global _backend
    if _backend is None:
        try:
            from . import _cuda
        except ImportError:
            raise RuntimeError(
                "attnkit: this build has no CUDA support; reinstall with "
                "`pip install . -Ccmake.define.ATTNKIT_CUDA=ON` (or ATTNKIT_CUDA=ON) to use device arrays"
            ) from None
        if _cuda.device_count() == 0:
            raise RuntimeError("attnkit: device arrays given, but no CUDA device is available")
        _backend = _cuda
    return _backend


def _torch():
    return sys.modules.get("torch")


def _cupy():
    return sys.modules.get("cupy")


def is_device_array(obj):
    """True if ``obj`` is an array in CUDA device memory that attnkit's CUDA kernels accept.

    That is a CUDA ``torch.Tensor``, a ``cupy.ndarray``, an object exposing
    ``__cuda_array_interface__``, or a ``__dlpack__`` object whose ``__dlpack_device__`` is a
    CUDA device. Cheap and never raises (NumPy arrays and scalars return False at once), so
    every public function can call it first.
    """
    if type(obj) is np.ndarray or obj is None or isinstance(obj, (numbers.Number, str, list, tuple, np.generic)):
        return False
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        return bool(obj.is_cuda)
    cupy = _cupy()
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


# ---- device array descriptors ----

class _Dev:
    """A device array as the kernels see it: pointer, shape, strides (elements), dtype name."""

    __slots__ = ("obj", "kind", "ptr", "shape", "strides", "dtype", "device", "writeable", "stream", "keep")

    def __init__(self, obj, kind, ptr, shape, strides, dtype, device, writeable, stream=None, keep=None):
        self.obj, self.kind, self.ptr = obj, kind, int(ptr)
        self.shape, self.strides = tuple(int(s) for s in shape), tuple(int(s) for s in strides)
        self.dtype, self.device, self.writeable = dtype, device, bool(writeable)
        self.stream, self.keep = stream, keep

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    def desc(self):
        """The raw descriptor the binding reads (csrc/bindings/tensor.h)."""
        return (self.ptr, self.shape, self.strides, self.dtype, self.writeable)

    def view(self, shape, strides):
        return _Dev(self.obj, self.kind, self.ptr, shape, strides, self.dtype, self.device,
                    self.writeable, self.stream, self.keep)

    def transpose(self, *perm):
        return self.view([self.shape[p] for p in perm], [self.strides[p] for p in perm])

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


_TORCH_NAMES = {"float32": "float32", "float64": "float64", "float16": "float16",
                "bfloat16": "bfloat16", "bool": "bool", "int32": "int32", "int64": "int64"}


def _torch_dtype(name):
    torch = _torch()
    return getattr(torch, name)


def _cai_dtype(typestr, fn, name):
    try:
        dt = np.dtype(typestr)
    except TypeError:
        raise TypeError(f"{fn}: {name} has an unsupported __cuda_array_interface__ typestr {typestr!r}") from None
    return dt.name, dt.itemsize


def _describe(obj, fn, name, stream=None):
    """_Dev for a device array, or TypeError naming the argument."""
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        if not obj.is_cuda:
            raise TypeError(f"{fn}: {name} must be a CUDA device array like the other arrays, "
                            f"got a tensor on {obj.device}")
        dt = str(obj.dtype).replace("torch.", "")
        return _Dev(obj, "torch", obj.data_ptr(), obj.shape, obj.stride(), dt, obj.device.index, True)
    cai = None
    try:
        cai = getattr(obj, "__cuda_array_interface__", None)
    except Exception:
        cai = None
    if cai is not None:
        ptr, readonly = cai["data"]
        dt, isz = _cai_dtype(cai["typestr"], fn, name)
        shape = tuple(cai["shape"])
        if cai.get("mask") is not None:
            raise ValueError(f"{fn}: {name} is a masked __cuda_array_interface__ array, which is not supported")
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
                    raise ValueError(f"{fn}: {name} has a stride of {sb} bytes, not a multiple of its item size")
                strides.append(sb // isz)
        cupy = _cupy()
        if cupy is not None and isinstance(obj, cupy.ndarray):
            kind, device = "cupy", obj.device.id
        else:
            kind = "cai"
            device = _module().pointer_device(ptr) if ptr and math.prod(shape) else -1
        return _Dev(obj, kind, ptr, shape, strides, dt, device, not readonly, cai.get("stream"))
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        try:
            dev_type, dev_id = obj.__dlpack_device__()
        except Exception:
            dev_type, dev_id = -1, -1
        if dev_type in (_KDL_CUDA, _KDL_CUDA_MANAGED):
            dl_stream = 1 if not stream else stream  # 0 is not a valid DLPack stream: 1 = legacy default
            try:
                cap = obj.__dlpack__(stream=dl_stream)
            except TypeError:
                cap = obj.__dlpack__()
            ptr, shape, strides, dt, writeable, _, dev = _module().dlpack_describe(cap)
            return _Dev(obj, "dlpack", ptr, shape, strides, dt, int(dev) if dev_type == _KDL_CUDA else -1,
                        writeable, keep=cap)
    raise TypeError(
        f"{fn}: {name} must be a CUDA device array (a CUDA torch.Tensor, cupy.ndarray, or an object "
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


def _waits(stream, *devs):
    """CAI producer streams (other than the call's) the call must wait for."""
    out = []
    for d in devs:
        if d is not None and d.kind in ("cai", "cupy") and d.stream is not None and int(d.stream) != stream:
            out.append(int(d.stream))
    return out


def _device_of(d, fn):
    if d.device is None or d.device < 0:
        if d.size == 0 or d.device == -2:  # empty, or managed memory: run on the current device
            return 0
        raise ValueError(f"{fn}: cannot tell which CUDA device holds the inputs")
    return d.device


class _Call:
    """Per-call state: the primary array sets device and stream; others are described with it."""

    def __init__(self, fn, first, first_name):
        self.fn = fn
        self.first = _describe(first, fn, first_name)
        self.device = _device_of(self.first, fn)
        self.stream = _call_stream(self.first)
        self.devs = [self.first]

    def describe(self, obj, name):
        d = _describe(obj, self.fn, name, self.stream)
        self.devs.append(d)
        return d

    def waits(self):
        return _waits(self.stream, *self.devs)

    def empty(self, shape, dtype):
        arr = _empty(self.first, shape, dtype, self.device, self.fn)
        d = _describe(arr, self.fn, "out", self.stream)
        return arr, d

    def out(self, out, shape, dtype, source="q"):
        """Allocate, or check a given out= (shape, dtype, writeable); `source` names the dtype's origin."""
        if out is None:
            return self.empty(shape, dtype)
        d = self.describe(out, "out")
        if not d.writeable:
            raise ValueError(f"{self.fn}: out is read-only")
        if d.shape != tuple(shape):
            raise ValueError(f"{self.fn}: out has shape {d.shape} but the result has {tuple(shape)}")
        if d.dtype != dtype:
            raise TypeError(f"{self.fn}: out has dtype {d.dtype} but {source} has {dtype}")
        return out, d


def _import(name):
    mod = sys.modules.get(name)
    if mod is None:
        try:
            mod = __import__(name)
        except ImportError:
            mod = None
    return mod


def _empty(like, shape, dtype, device, fn):
    """A new device array of like's kind (torch / CuPy; other producers: torch, else CuPy)."""
    shape = tuple(int(s) for s in shape)
    if like.kind != "cupy":
        torch = _torch() if like.kind == "torch" else _import("torch")
        if torch is not None and (like.kind == "torch" or torch.cuda.is_available()):
            return torch.empty(shape, dtype=_torch_dtype(dtype), device=torch.device("cuda", device))
    cupy = _import("cupy")
    if cupy is not None and dtype != "bfloat16":
        with cupy.cuda.Device(device):
            return cupy.empty(shape, dtype=np.dtype(dtype))
    raise TypeError(f"{fn}: cannot allocate a {dtype} result for {type(like.obj).__name__} inputs; pass out=")


def _contig_last(d, fn, name, copy=True):
    """Kernels need unit stride along the last dim; torch / CuPy arrays are copied (documented),
    except with copy=False (KV caches, which are written in place and too big to copy)."""
    if d.ndim == 0 or d.shape[-1] <= 1 or d.strides[-1] == 1 or d.size == 0:
        return d
    if not copy:
        raise ValueError(f"{fn}: {name} must be contiguous along its last dim")
    if d.kind == "torch":
        c = d.obj.contiguous() if d.obj.dim() == d.ndim and tuple(d.obj.shape) == d.shape else None
    elif d.kind == "cupy":
        c = _cupy().ascontiguousarray(d.obj) if d.obj.shape == d.shape else None
    else:
        c = None
    if c is None:
        raise ValueError(f"{fn}: {name} must be contiguous along its last dim")
    return _describe(c, fn, name)


def _check_float(d, fn, name):
    if d.dtype not in _FLOAT:
        raise TypeError(f"{fn}: {name} has dtype {d.dtype}; expected float32, float64, float16 or bfloat16")


# ---- softmax / matmul ----

def softmax(x, axis=-1, *, out=None):
    """``attnkit.softmax`` for a device array ``x`` (see there); returns ``out`` or a new array.

    Any strides are read in place; ``out=x`` computes in place; float16/bfloat16 compute in
    fp32, float64 in fp64. Rows up to 1024 elements take one warp each, longer rows a block.
    """
    fn = "softmax"
    call = _Call(fn, x, "x")
    xd = call.first
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"softmax: axis must be an int, got {type(axis).__name__}")
    _check_float(xd, fn, "x")
    out, od = call.out(out, xd.shape, xd.dtype, "x")
    _module().softmax(xd.desc(), od.desc(), int(axis), call.device, call.stream, call.waits())
    return out


def matmul(a, b, *, out=None):
    """``attnkit.matmul`` (``np.matmul`` semantics) for device arrays; see there.

    float16/bfloat16 run on tensor cores (fp32 accumulation), float32/float64 on FMAs (no TF32:
    results keep full float32 precision). Batch dims broadcast without copies; any strides.
    """
    fn = "matmul"
    call = _Call(fn, a, "a")
    ad = call.first
    bd = call.describe(b, "b")
    if ad.ndim == 0 or bd.ndim == 0:
        raise ValueError(f"matmul: operands must have at least 1 dimension, got shapes {ad.shape} and {bd.shape}")
    a2 = ad.expand_dims(0) if ad.ndim == 1 else ad
    b2 = bd.expand_dims(1) if bd.ndim == 1 else bd
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"matmul: shapes {ad.shape} and {bd.shape} are not aligned: "
                         f"a has K={a2.shape[-1]} but b has K={b2.shape[-2]}")
    try:
        batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dims of shapes {ad.shape} and {bd.shape} do not broadcast") from None
    if ad.dtype != bd.dtype:
        raise TypeError(f"matmul: a has dtype {ad.dtype} but b has {bd.dtype}; mixed dtypes are not computed, "
                        "convert one operand")
    _check_float(ad, fn, "a")
    m, n = a2.shape[-2], b2.shape[-1]
    shape = tuple(batch) + (m, n)
    result_shape = tuple(batch) + ((m,) if ad.ndim > 1 else ()) + ((n,) if bd.ndim > 1 else ())
    out, od = call.out(out, result_shape, ad.dtype, "a")
    od2 = od
    if ad.ndim == 1:
        od2 = od2.expand_dims(od2.ndim - (1 if bd.ndim > 1 else 0))
    if bd.ndim == 1:
        od2 = od2.expand_dims(od2.ndim)
    _module().matmul(a2.broadcast_to(tuple(batch) + a2.shape[-2:]).desc(),
                     b2.broadcast_to(tuple(batch) + b2.shape[-2:]).desc(), od2.desc(),
                     call.device, call.stream, call.waits())
    return out


# ---- attention ----

def _check_qkv(qd, kd, vd, fn):
    _check_float(qd, fn, "q")
    if kd.dtype != vd.dtype:
        raise TypeError(f"{fn}: k has dtype {kd.dtype} but v has {vd.dtype}")
    if not (kd.dtype == qd.dtype or (qd.dtype == "float32" and kd.dtype in ("float16", "bfloat16"))):
        raise TypeError(f"{fn}: q has dtype {qd.dtype} but k/v have {kd.dtype}; k/v must have q's dtype, or be "
                        "float16/bfloat16 when q is float32")


def _mask(call, mask, shape):
    if mask is None:
        return None
    fn = call.fn
    if isinstance(mask, np.ndarray):
        raise TypeError(f"{fn}: mask must be a CUDA device array like q, got numpy.ndarray")
    md = call.describe(mask, "mask")
    if md.dtype != "bool" and md.dtype not in _FLOAT:
        raise TypeError(f"{fn}: mask must be bool (True = attend) or float (added), got {md.dtype}")
    if md.ndim > 4:
        raise ValueError(f"{fn}: mask has {md.ndim} dims; it must broadcast to (B, H, Sq, Sk) = {shape}")
    try:
        return md.broadcast_to(shape)
    except ValueError:
        raise ValueError(f"{fn}: mask of shape {md.shape} does not broadcast to (B, H, Sq, Sk) = {shape}") from None


def _alibi(call, alibi_slopes, batch, heads):
    """Host slopes: checked and converted as on the CPU (uploaded per call). Device slopes:
    float32 (torch / CuPy arrays of other float dtypes are converted), (H,) or (B, H)."""
    fn = call.fn
    if alibi_slopes is None:
        return None
    if not is_device_array(alibi_slopes):
        return _att.resolve_alibi(alibi_slopes, batch, heads, fn)
    ad = call.describe(alibi_slopes, "alibi_slopes")
    if ad.dtype not in _FLOAT:
        raise TypeError(f"{fn}: alibi_slopes must be a float array, got {ad.dtype}")
    if ad.dtype != "float32":
        if ad.kind == "torch":
            ad = _describe(ad.obj.float(), fn, "alibi_slopes")
        elif ad.kind == "cupy":
            ad = _describe(ad.obj.astype(np.float32), fn, "alibi_slopes")
        else:
            raise TypeError(f"{fn}: device alibi_slopes must be float32, got {ad.dtype}")
        call.devs.append(ad)
    if ad.shape == (heads,):
        ad = ad.expand_dims(0)
    elif ad.shape != (batch, heads):
        raise ValueError(f"{fn}: alibi_slopes has shape {ad.shape}; expected ({heads},) or ({batch}, {heads})")
    return ad.broadcast_to((batch, heads))


def _desc_or(x):
    if x is None or isinstance(x, np.ndarray):
        return x
    return x.desc()


def attention(q, k, v, *, mask=None, causal=False, causal_align="top_left", scale=None, window=None,
              alibi_slopes=None, softcap=None, layout="bhsd", return_lse=False, out=None):
    """``attnkit.attention`` for device arrays: same arguments, semantics and errors (see there).

    fp16/bf16 q/k/v run the FlashAttention-2-style tensor-core kernel (head dims up to 256,
    D and Dv may differ); float32 (also with float16/bfloat16 k/v) and float64 run an FMA
    kernel. Few (batch, head, query-block) tiles -- decoding -- split the keys across blocks
    and combine the partial results (flash-decoding); GQA heads sharing a kv head are then
    processed together. ``mask`` must be a device array; ``alibi_slopes`` may be host or device.
    Returns ``out`` or ``(out, lse)``, lse float32 (B, H, Sq).
    """
    fn = "attention"
    call = _Call(fn, q, "q")
    qd = call.first
    kd, vd = call.describe(k, "k"), call.describe(v, "v")
    for name, d in (("q", qd), ("k", kd), ("v", vd)):
        if d.ndim != 4:
            raise ValueError(f"{fn}: {name} must be 4-D ({layout}), got shape {d.shape}")
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"{fn}: layout must be 'bhsd' or 'bshd', got {layout!r}")
    _check_qkv(qd, kd, vd, fn)
    qd, kd, vd = (_contig_last(d, fn, n) for d, n in ((qd, "q"), (kd, "k"), (vd, "v")))
    if layout == "bshd":
        qc, kc, vc = (d.transpose(0, 2, 1, 3) for d in (qd, kd, vd))
    else:
        qc, kc, vc = qd, kd, vd
    B, H, Sq, D, Hkv, Sk, Dv = _att.check_attention_shapes(fn, layout, qd.shape, kd.shape, vd.shape,
                                                           qc.shape, kc.shape, vc.shape)
    causal = _att._check_bool(causal, fn, "causal")
    return_lse = _att._check_bool(return_lse, fn, "return_lse")
    bottom_right = _att.resolve_align(causal_align, fn)
    scale = _att.resolve_scale(scale, D, fn)
    softcap = _att.resolve_softcap(softcap, fn)
    wl, wr = _att.resolve_window(window, fn)
    alibi = _alibi(call, alibi_slopes, B, H)
    maskc = _mask(call, mask, (B, H, Sq, Sk))
    out_shape = (B, Sq, H, Dv) if layout == "bshd" else (B, H, Sq, Dv)
    out, od = call.out(out, out_shape, qd.dtype)
    outc = od.transpose(0, 2, 1, 3) if layout == "bshd" else od
    if outc.size and outc.shape[-1] > 1 and outc.strides[-1] != 1:
        raise ValueError(f"{fn}: out must be contiguous along its last dim")
    lse, lsed = call.empty((B, H, Sq), "float32") if return_lse else (None, None)
    _module().attention(fn, qc.desc(), kc.desc(), vc.desc(), outc.desc(), _desc_or(lsed), _desc_or(maskc),
                        _desc_or(alibi), None, None, None, None, None, None, B, scale, softcap, causal,
                        bottom_right, wl, wr, call.device, call.stream, call.waits())
    return (out, lse) if return_lse else out


def _host_index(call, a, name, ndim):
    """Host copy of an index array (numpy or device), int64; TypeError / ValueError as on the CPU."""
    fn = call.fn
    if is_device_array(a):
        d = call.describe(a, name)
        if d.dtype not in ("int32", "int64"):
            raise TypeError(f"{fn}: {name} must be int32 or int64, got {d.dtype}")
        a = _module().to_host(d.desc(), call.device, call.stream)
    elif not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray or a device array, got {type(a).__name__}")
    if a.dtype not in (np.int32, np.int64):
        raise TypeError(f"{fn}: {name} must be int32 or int64, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, causal_align="bottom_right",
                     scale=None, window=None, alibi_slopes=None, softcap=None, return_lse=False, out=None):
    """``attnkit.attention_varlen`` for device arrays (see there): packed (total, H, D) q/k/v.

    ``cu_seqlens_*`` may be host (numpy) or device arrays; device ones are copied to the host
    (a synchronization: the launch needs the longest sequence, as FlashAttention's max_seqlen).
    Returns out (total_q, H, Dv), and with ``return_lse=True`` also lse (H, total_q) float32.
    """
    fn = "attention_varlen"
    call = _Call(fn, q, "q")
    qd = call.first
    kd, vd = call.describe(k, "k"), call.describe(v, "v")
    for name, d in (("q", qd), ("k", kd), ("v", vd)):
        if d.ndim != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total_tokens, heads, dim), got shape {d.shape}")
    _check_qkv(qd, kd, vd, fn)
    cu_q = _host_index(call, cu_seqlens_q, "cu_seqlens_q", 1)
    cu_k = _host_index(call, cu_seqlens_k, "cu_seqlens_k", 1)
    batch, Tq, H, D, Dv = _att.check_varlen(fn, qd.shape, kd.shape, vd.shape, cu_q, cu_k)
    causal = _att._check_bool(causal, fn, "causal")
    return_lse = _att._check_bool(return_lse, fn, "return_lse")
    bottom_right = _att.resolve_align(causal_align, fn)
    scale = _att.resolve_scale(scale, D, fn)
    softcap = _att.resolve_softcap(softcap, fn)
    wl, wr = _att.resolve_window(window, fn)
    alibi = _alibi(call, alibi_slopes, batch, H)
    if out is None:
        out, od = call.empty((Tq, H, Dv), qd.dtype)
    else:
        od = call.describe(out, "out")
        if od.shape != (Tq, H, Dv) or od.dtype != qd.dtype:
            raise ValueError(f"{fn}: out must have shape {(Tq, H, Dv)} and dtype {qd.dtype}, got {od.shape} {od.dtype}")
        if not od.writeable:
            raise ValueError(f"{fn}: out is read-only")
    lse, lsed = call.empty((H, Tq), "float32") if return_lse else (None, None)
    if od.size and od.shape[-1] > 1 and od.strides[-1] != 1:
        raise ValueError(f"{fn}: out must be contiguous along its last dim")
    as4 = lambda d, n: _contig_last(d, fn, n).transpose(1, 0, 2).expand_dims(0)  # (1, H, T, D)
    _module().attention(fn, as4(qd, "q").desc(), as4(kd, "k").desc(), as4(vd, "v").desc(),
                        od.transpose(1, 0, 2).expand_dims(0).desc(),
                        None if lsed is None else lsed.expand_dims(0).desc(), None, _desc_or(alibi), cu_q, cu_k,
                        None, None, None, None, batch, scale, softcap, causal, bottom_right, wl, wr,
                        call.device, call.stream, call.waits())
    return (out, lse) if return_lse else out


def _cache_index(call, a, name, ndim, batch):
    """cache_seqlens / block_table: host numpy (checked here, uploaded) or device (checked on the
    device). Returns (numpy int64 or _Dev)."""
    fn = call.fn
    if is_device_array(a):
        d = call.describe(a, name)
        if d.dtype not in ("int32", "int64"):
            raise TypeError(f"{fn}: {name} must be int32 or int64, got {d.dtype}")
        if d.ndim != ndim or d.shape[0] != batch:
            raise ValueError(f"{fn}: {name} must have shape ({batch}{', max_blocks' if ndim == 2 else ','}), got {d.shape}")
        return d
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray or a device array, got {type(a).__name__}")
    if a.dtype not in (np.int32, np.int64):
        raise TypeError(f"{fn}: {name} must be int32 or int64, got {a.dtype}")
    if a.ndim != ndim or a.shape[0] != batch:
        raise ValueError(f"{fn}: {name} must have shape ({batch}{', max_blocks' if ndim == 2 else ','}), got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens, block_table=None, causal=True,
                           scale=None, window=None, alibi_slopes=None, softcap=None, return_lse=False, out=None):
    """Decode / chunked-prefill attention over a KV cache (FlashAttention's flash_attn_with_kvcache).

    q (B, Sq, H, D); caches (B, Smax, Hkv, D) and (B, Smax, Hkv, Dv), or paged
    (num_blocks, page_size, Hkv, D / Dv) with ``block_table`` (B, max_blocks) int32/int64 naming
    the pages of each sequence. ``cache_seqlens``: an int or (B,) int32/int64, the tokens already
    in each sequence's cache. ``k``/``v`` (B, Snew, Hkv, D / Dv), if given, are written into the
    caches in place at positions ``cache_seqlens[b] + t`` before attending (``cache_seqlens``
    itself is not updated); the query then attends to ``cache_seqlens[b] + Snew`` keys. Causal
    and window masks are bottom-right aligned (the query's last row is the newest token).
    Options as in :func:`attention`. Small Sq runs split-KV (flash-decoding).

    Host ``cache_seqlens`` / ``block_table`` are checked here (ValueError); device ones on the
    device, where an invalid entry makes that batch entry's results NaN. Returns out
    (B, Sq, H, Dv), or (out, lse) with lse (B, H, Sq) float32.
    """
    fn = "attention_with_kvcache"
    call = _Call(fn, q, "q")
    qd = call.first
    kcd, vcd = call.describe(k_cache, "k_cache"), call.describe(v_cache, "v_cache")
    for name, d in (("q", qd), ("k_cache", kcd), ("v_cache", vcd)):
        if d.ndim != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {d.shape}")
    _check_qkv(qd, kcd, vcd, fn)
    B, Sq, H, D = qd.shape
    paged = block_table is not None
    P, S_or_page, Hkv, Dk = kcd.shape
    Dv = vcd.shape[3]
    if vcd.shape[:3] != kcd.shape[:3]:
        raise ValueError(f"{fn}: v_cache has shape {vcd.shape} but k_cache has {kcd.shape}")
    if not paged and P != B:
        raise ValueError(f"{fn}: k_cache has batch size {P} but q has {B}")
    if Dk != D:
        raise ValueError(f"{fn}: k_cache has head_dim {Dk} but q has {D}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: q has {H} heads, which is not a multiple of the caches' {Hkv}")
    if D == 0 or Dv == 0:
        raise ValueError(f"{fn}: head dims must be at least 1")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v, or neither")
    kn = vn = None
    n_new = 0
    if k is not None:
        kn, vn = call.describe(k, "k"), call.describe(v, "v")
        if kn.ndim != 4 or vn.ndim != 4 or kn.shape[0] != B or kn.shape[2:] != (Hkv, D) or \
                vn.shape[:3] != kn.shape[:3] or vn.shape[3] != Dv:
            raise ValueError(f"{fn}: k/v must have shapes (B, Snew, Hkv, D) = ({B}, Snew, {Hkv}, {D}) and "
                             f"(..., {Dv}), got {kn.shape} and {vn.shape}")
        if kn.dtype != kcd.dtype or vn.dtype != kcd.dtype:
            raise TypeError(f"{fn}: k/v have dtype {kn.dtype}/{vn.dtype} but the caches have {kcd.dtype}")
        n_new = kn.shape[1]
    if isinstance(cache_seqlens, (numbers.Integral,)) and not isinstance(cache_seqlens, bool):
        cache_seqlens = np.full(B, int(cache_seqlens), np.int64)
    seqlens = _cache_index(call, cache_seqlens, "cache_seqlens", 1, B)
    table = _cache_index(call, block_table, "block_table", 2, B) if paged else None
    capacity = table.shape[1] * S_or_page if paged else S_or_page
    if isinstance(seqlens, np.ndarray):
        bad = np.nonzero((seqlens < 0) | (seqlens + n_new > capacity))[0]
        if bad.size:
            b = int(bad[0])
            raise ValueError(f"{fn}: cache_seqlens[{b}] = {int(seqlens[b])} plus {n_new} new tokens does not fit "
                             f"the cache capacity {capacity}")
        if isinstance(table, np.ndarray):
            for b in range(B):
                used = -(-(int(seqlens[b]) + n_new) // S_or_page)
                row = table[b, :used]
                if ((row < 0) | (row >= P)).any():
                    j = int(np.nonzero((row < 0) | (row >= P))[0][0])
                    raise ValueError(f"{fn}: block_table[{b}, {j}] = {int(row[j])} is not a page index in [0, {P})")
    causal = _att._check_bool(causal, fn, "causal")
    return_lse = _att._check_bool(return_lse, fn, "return_lse")
    scale = _att.resolve_scale(scale, D, fn)
    softcap = _att.resolve_softcap(softcap, fn)
    wl, wr = _att.resolve_window(window, fn)
    alibi = _alibi(call, alibi_slopes, B, H)
    out, od = call.out(out, (B, Sq, H, Dv), qd.dtype)
    outc = od.transpose(0, 2, 1, 3)
    if outc.size and outc.shape[-1] > 1 and outc.strides[-1] != 1:
        raise ValueError(f"{fn}: out must be contiguous along its last dim")
    lse, lsed = call.empty((B, H, Sq), "float32") if return_lse else (None, None)
    t = lambda d, n, copy=True: _contig_last(d, fn, n, copy).transpose(0, 2, 1, 3)
    if kn is not None:
        kn, vn = t(kn, "k"), t(vn, "v")
    _module().attention(fn, t(qd, "q").desc(), t(kcd, "k_cache", False).desc(), t(vcd, "v_cache", False).desc(),
                        outc.desc(),
                        _desc_or(lsed), None, _desc_or(alibi), None, None, _desc_or(seqlens), _desc_or(table),
                        _desc_or(kn), _desc_or(vn), B, scale, softcap, causal, True, wl, wr,
                        call.device, call.stream, call.waits())
    return (out, lse) if return_lse else out
